"""The in-session runtime: the part of gpupool that runs inside a training script.

Standard library only (plus ``gpupool.manifest``, ``gpupool.clock`` and
``gpupool.session.contract``, whose names it keeps public: ``runtime.EXIT_YIELD``,
``runtime.ENV_DEADLINE``...), so it works in any Colab, Kaggle or local session. A resumable
training script looks like this::

    from gpupool import runtime
    import gpupool.torch as gt

    session = runtime.session()
    step = 0
    if session.restore_dir:                       # None on the very first attempt
        step = gt.load_training_state(session.restore_dir, model=model, optimizer=opt).step
    while step < total_steps:
        train_one_step(); step += 1
        session.report(step, loss=loss)           # progress and heartbeat, cheap
        if session.checkpoint_due() or session.should_stop():
            with session.checkpoint(step) as folder:   # published atomically on exit
                gt.save_training_state(folder, model=model, optimizer=opt, step=step)
        if session.should_stop():                  # the session deadline is near, or SIGTERM
            session.yield_session()                # exits; gpupool resumes it elsewhere
    session.complete(step)

Outside gpupool (no ``GPUPOOL_*`` variables) the same script runs standalone, checkpointing
into ``./gpupool-session``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gpupool.clock import SYSTEM_CLOCK, Clock
from gpupool.manifest import Manifest, list_local, publish_local
from gpupool.session.contract import (  # the names shared with the scheduler, kept public here
    CHECKPOINTS_DIR,
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_KEEP_LAST,
    ENV_ATTEMPT,
    ENV_CHECKPOINT_DIR,
    ENV_DEADLINE,
    ENV_EXPERIMENT,
    ENV_INTERVAL,
    ENV_KEEP_LAST,
    ENV_LOG_EVENTS,
    ENV_PROVIDER,
    ENV_RESTORE_DIR,
    ENV_RESUMED,
    ENV_SESSION_DIR,
    EVENT_CHECKPOINT,
    EVENT_PREFIX,
    EVENT_PROGRESS,
    EVENTS_FILE,
    EXIT_YIELD,
    OUTCOME_DONE,
    OUTCOME_FILE,
    OUTCOME_YIELD,
    SNAPSHOT_REQUEST,
    event_line,
    write_json_atomic,
)

PROGRESS_EVERY = 1.0  # seconds between progress records: report() stays cheap


class Session:
    """What a training script needs from gpupool during one session."""

    def __init__(self, env: dict[str, str] | None = None, *, install_sigterm: bool = True,
                 clock: Clock = SYSTEM_CLOCK):
        """``env``: the ``GPUPOOL_*`` variables (default: this process's environment);
        ``clock`` (``gpupool.clock``): the time deadlines, intervals and records are read from."""
        self.clock = clock
        env = dict(os.environ if env is None else env)
        self.experiment = env.get(ENV_EXPERIMENT, "standalone")
        self.attempt = env.get(ENV_ATTEMPT, "standalone")
        self.provider = env.get(ENV_PROVIDER, "standalone")
        self.session_dir = Path(env.get(ENV_SESSION_DIR) or "gpupool-session").absolute()
        self.checkpoint_root = self.session_dir / CHECKPOINTS_DIR
        self.deadline = float(env[ENV_DEADLINE]) if env.get(ENV_DEADLINE) else None
        self.interval = float(env.get(ENV_INTERVAL) or DEFAULT_INTERVAL_SECONDS)
        self.keep_last = int(env.get(ENV_KEEP_LAST) or DEFAULT_KEEP_LAST)
        self.log_events = env.get(ENV_LOG_EVENTS) == "1"
        self._given_restore = Path(env[ENV_RESTORE_DIR]) if env.get(ENV_RESTORE_DIR) else None
        self._checkpoint_dir = Path(env[ENV_CHECKPOINT_DIR]) if env.get(ENV_CHECKPOINT_DIR) else None
        self._resumed = env.get(ENV_RESUMED) == "1"
        self._stop_requested = False
        self._last_checkpoint = self.clock.monotonic()
        self._last_progress = 0.0
        self._save_seconds = 0.0
        self._background: threading.Thread | None = None
        self._background_error: BaseException | None = None
        self.session_dir.mkdir(parents=True, exist_ok=True)
        if install_sigterm:
            self._install_sigterm()

    # -- where to restore from ------------------------------------------------------------

    @property
    def restore_dir(self) -> Path | None:
        """The newest checkpoint to resume from: one written earlier in this session, or the
        one gpupool brought in; None when training starts from scratch."""
        own = list_local(self.checkpoint_root)
        if own:
            return self.checkpoint_root / own[0].name
        return self._given_restore

    @property
    def restore_manifest(self) -> Manifest | None:
        directory = self.restore_dir
        if directory is None:
            return None
        from gpupool.manifest import read_local

        return read_local(directory)

    # -- a checkpoint folder of the script's own (experiment file: ``checkpoint.path``) ---

    @property
    def checkpoint_dir(self) -> Path | None:
        """The folder declared as ``checkpoint.path`` (absolute, in this session), where the
        last session's checkpoint was restored into place; None when none is declared.
        From ``GPUPOOL_CHECKPOINT_DIR``, set by the session's supervisor."""
        return self._checkpoint_dir

    @property
    def resumed(self) -> bool:
        """True when a checkpoint was restored into ``checkpoint_dir`` before this process
        started (``GPUPOOL_RESUMED=1``); False on the first session of a run."""
        return self._resumed

    def request_snapshot(self) -> None:
        """Ask the session's supervisor to snapshot the checkpoint folder now (call it right
        after the trainer finished writing a checkpoint). Cheap: it touches one small file and
        never waits for the copy or the upload; requests made while one runs are merged."""
        # a new inode and mtime each time (written beside, then replaced): the supervisor sees every ask
        write_json_atomic(self.session_dir / SNAPSHOT_REQUEST,
                          {"time": self.clock(), "attempt": self.attempt})

    # -- when to stop and when to save ----------------------------------------------------

    def should_stop(self) -> bool:
        """True once the session must end: SIGTERM arrived or the deadline (minus the time a
        checkpoint takes to save) is reached. Save, then call ``yield_session()``."""
        if self._stop_requested:
            return True
        if self.deadline is None:
            return False
        return self.clock() + 2 * self._save_seconds >= self.deadline

    def checkpoint_due(self) -> bool:
        return self.clock.monotonic() - self._last_checkpoint >= self.interval

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - self.clock())

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _on_term(signum: int, frame: Any) -> None:
            self._stop_requested = True
            self.event("sigterm")

        signal.signal(signal.SIGTERM, _on_term)

    # -- progress -------------------------------------------------------------------------

    def report(self, step: int, *, total: int | None = None, **metrics: float) -> None:
        """Record progress (``total``: the run's last step, for the ETA); written at most once
        a second, so call it every step."""
        now = self.clock.monotonic()
        if now - self._last_progress < PROGRESS_EVERY:
            return
        self._last_progress = now
        self.event(EVENT_PROGRESS, step=step, total=total, metrics=metrics)

    def event(self, kind: str, **fields: Any) -> None:
        record = {"event": kind, "time": self.clock(), "attempt": self.attempt, **fields}
        line = event_line(record)
        with open(self.session_dir / EVENTS_FILE, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        if self.log_events:
            print(EVENT_PREFIX + line, flush=True)

    # -- checkpoints ----------------------------------------------------------------------

    @contextlib.contextmanager
    def checkpoint(self, step: int, *, final: bool = False, **metadata: Any) -> Iterator[Path]:
        """A fresh folder to save into; on a clean exit it is published atomically."""
        self.wait_for_background()
        started = self.clock.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.session_dir))
        try:
            yield staging
            self._publish(staging, step, final, metadata, started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._save_seconds = self.clock.monotonic() - started

    def checkpoint_in_background(self, step: int, write: Callable[[Path], Any], **metadata: Any) -> None:
        """Run ``write(folder)`` and the publish in a thread; the loop goes on meanwhile.

        ``write`` must only touch a snapshot of the training state (see
        ``gpupool.torch.snapshot_training_state``). A crash during the write leaves no
        checkpoint: the publish happens only after ``write`` returns.
        """
        self.wait_for_background()
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.session_dir))
        self._last_checkpoint = self.clock.monotonic()

        def _run() -> None:
            started = self.clock.monotonic()
            try:
                write(staging)
                self._publish(staging, step, False, metadata, started)
            except BaseException as err:  # surfaced by wait_for_background()
                self._background_error = err
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._save_seconds = self.clock.monotonic() - started

        self._background = threading.Thread(target=_run, name="gpupool-checkpoint", daemon=False)
        self._background.start()

    def wait_for_background(self) -> None:
        """Wait for a background checkpoint; re-raise its error here, in the training loop."""
        if self._background is not None:
            self._background.join()
            self._background = None
        if self._background_error is not None:
            err, self._background_error = self._background_error, None
            raise err

    def _publish(self, staging: Path, step: int, final: bool, metadata: dict[str, Any],
                 started: float) -> None:
        # The save cost feeds gpupool's automatic checkpoint interval (Young/Daly).
        metadata = {**metadata, "save_seconds": round(self.clock.monotonic() - started, 4)}
        manifest = publish_local(
            staging, self.checkpoint_root, step=step, final=final, experiment=self.experiment,
            attempt=self.attempt, provider=self.provider, metadata=metadata,
        )
        self._last_checkpoint = self.clock.monotonic()
        self.event(EVENT_CHECKPOINT, step=step, name=manifest.name, bytes=manifest.total_bytes)
        self._prune()

    def _prune(self) -> None:
        for old in list_local(self.checkpoint_root)[self.keep_last :]:
            shutil.rmtree(self.checkpoint_root / old.name, ignore_errors=True)

    # -- ending the session ---------------------------------------------------------------

    def complete(self, step: int, **metrics: float) -> None:
        """Training is finished: gpupool marks the experiment done after this session."""
        self.wait_for_background()
        self._write_outcome(OUTCOME_DONE, step)
        self.event("complete", step=step, metrics=metrics)

    def yield_session(self, step: int | None = None) -> None:
        """End this session on purpose (deadline or SIGTERM); gpupool resumes elsewhere."""
        self.wait_for_background()
        self._write_outcome(OUTCOME_YIELD, step)
        self.event("yield", step=step)
        sys.exit(EXIT_YIELD)

    def _write_outcome(self, outcome: str, step: int | None) -> None:
        write_json_atomic(self.session_dir / OUTCOME_FILE,
                          {"outcome": outcome, "step": step, "time": self.clock()})


_session: Session | None = None


def session() -> Session:
    """The session of this process (created on first use)."""
    global _session
    if _session is None:
        _session = Session()
    return _session
