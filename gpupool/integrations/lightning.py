"""gpupool for the Lightning ``Trainer``: add one callback, resume from the restored folder.

    from gpupool.integrations.lightning import GpupoolCallback, ckpt_path

    trainer = L.Trainer(max_epochs=10, callbacks=[GpupoolCallback()])
    trainer.fit(model, loader, ckpt_path=ckpt_path())    # None on the first session
    trainer.save_checkpoint("final/model.ckpt")           # reached only when finished

The experiment file declares the checkpoint folder (``checkpoint: {path: checkpoints}``). The
callback saves ``last.ckpt`` there every ``checkpoint.interval``, and before the session deadline
(or on SIGTERM) saves it once more and stops; ``fit()`` then ends the process with exit 75 (a
yield), so gpupool resumes the run in the next session instead of counting it done. After every
save it asks gpupool to snapshot the folder.

Lightning's checkpoint holds no RNG state; this callback adds Python's, NumPy's and torch's (CPU
and every CUDA device) to it and restores them, so dropout and the next epoch's shuffle continue
as in an uninterrupted run. Exactness mid-epoch needs a loader whose position is saved: use
torchdata's ``StatefulDataLoader`` (Lightning saves and restores its ``state_dict``); a plain
``DataLoader`` cut mid-epoch restarts that epoch with a new order (see the README's measurement).

Imports ``lightning`` and ``torch``; ``import gpupool`` does not import this module.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpupool import runtime
from gpupool.errors import RuntimeErrorInSession
from gpupool.integrations._pacing import Pacer, progress_now, state_folder, under_gpupool

LAST = "last.ckpt"  # the name Lightning's ModelCheckpoint(save_last=True) also uses
STANDALONE_FOLDER = "checkpoints"  # outside gpupool, when no folder is given
REPORT_EVERY = 1.0  # seconds: reading the loss syncs a GPU, so not every step


class GpupoolCallback(pl.Callback):
    """Reports progress, saves ``last.ckpt`` on gpupool's interval and before the deadline or on
    SIGTERM, snapshots after each save, yields (exit 75) when stopped early, and carries the
    RNG states in the checkpoint.

    ``dirpath``: where to save (default: the experiment's checkpoint folder,
    ``session.checkpoint_dir``); inside a gpupool session it must lie in that folder, else
    ``RuntimeErrorInSession``. ``every_interval``: also save every ``checkpoint.interval``
    seconds (False when a ``ModelCheckpoint`` in the same folder is enough). ``clock``:
    monotonic seconds, injected in tests.
    """

    def __init__(self, dirpath: str | Path | None = None, *, every_interval: bool = True,
                 session: runtime.Session | None = None, clock: Callable[[], float] | None = None):
        self.session = session if session is not None else runtime.session()  # + SIGTERM handler
        self.dirpath = checkpoint_folder(self.session, dirpath, "GpupoolCallback(dirpath)")
        self.every_interval = every_interval
        self.pacer = Pacer(self.session, clock) if clock is not None else Pacer(self.session)
        self._last_save = self.pacer.clock()
        self._last_report = float("-inf")
        self._saved_step: int | None = None
        self._save_at_epoch_end = False

    @property
    def path(self) -> Path:
        """The checkpoint this callback writes (``<dirpath>/last.ckpt``)."""
        return self.dirpath / LAST

    # -- progress, interval saves, the stop -------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.pacer.step_ended()
        self._report(trainer, outputs)
        if self.pacer.must_stop():
            self.pacer.stopping = True
            trainer.should_stop = True
        elif not (self.every_interval and self.pacer.clock() - self._last_save >= self.session.interval):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            self._save_at_epoch_end = True  # Lightning miscounts epochs resumed from this point
        else:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A save due at an epoch's last batch happens here. Lightning 2.6 resumes a checkpoint
        taken at the last batch's end without counting the next epoch as started, so a second
        resume replays a whole epoch; one taken at the epoch end it resumes correctly."""
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pacer.stopping:  # stopped early on purpose: resume elsewhere, not "done"
            self.session.yield_session(trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Lightning answers SIGTERM with ``SIGTERMException``, a ``SystemExit`` whose code is
        0 ("done"); make it a saved yield (75) instead, so the run is resumed."""
        if not isinstance(exception, SIGTERMException):
            return
        if self._saved_step != trainer.global_step:  # e.g. SIGTERM came during validation
            self.save(trainer)
        try:
            self.session.yield_session(trainer.global_step)  # records the yield, then exits
        except SystemExit as ending:
            exception.code = ending.code  # Lightning re-raises its exception: let it exit 75

    def save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` now (complete when this returns) and ask gpupool to snapshot it."""
        self.pacer.save_started()
        trainer.save_checkpoint(self.path)
        self.pacer.save_ended()
        self._last_save = self.pacer.clock()
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            progress_now(self.session, trainer.global_step, total_steps(trainer), {})
            self.session.request_snapshot()

    def _report(self, trainer: pl.Trainer, outputs: Any) -> None:
        now = self.pacer.clock()
        if now - self._last_report < REPORT_EVERY:
            return
        self._last_report = now
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        metrics = {"loss": float(loss)} if isinstance(loss, torch.Tensor) and loss.numel() == 1 else {}
        self.session.report(trainer.global_step, total=total_steps(trainer), **metrics)

    # -- the RNG states Lightning leaves out ------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rng": collect_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            restore_rng_states(state_dict["rng"])


def total_steps(trainer: pl.Trainer) -> int | None:
    """The run's last step: ``max_steps``, else Lightning's estimate; None when unbounded."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        estimate = trainer.estimated_stepping_batches
    except (RuntimeError, ValueError, AttributeError):  # no loader attached yet
        return None
    return int(estimate) if estimate != float("inf") else None


def checkpoint_folder(session: runtime.Session, dirpath: str | Path | None, what: str) -> Path:
    """The folder ``last.ckpt`` lives in: ``dirpath`` or the declared checkpoint folder.

    Raises ``RuntimeErrorInSession`` inside a gpupool session that declares none (checkpoints
    would be lost with the session) or when ``dirpath`` lies outside it."""
    folder = state_folder(session, dirpath, what)
    if folder is not None:
        return folder
    if under_gpupool(session):
        raise RuntimeErrorInSession(
            f"{what}: this experiment declares no checkpoint folder, so Lightning's checkpoints would "
            f"be lost when the session ends; add `checkpoint: {{path: checkpoints}}` to the experiment file")
    return Path(STANDALONE_FOLDER).absolute()


def ckpt_path(dirpath: str | Path | None = None, session: runtime.Session | None = None) -> str | None:
    """``last.ckpt`` in the checkpoint folder, for ``trainer.fit(..., ckpt_path=...)``; None on
    a fresh start (no checkpoint restored yet). Same folder rules as ``GpupoolCallback``."""
    session = session if session is not None else runtime.session()
    path = checkpoint_folder(session, dirpath, "ckpt_path(dirpath)") / LAST
    return str(path) if path.is_file() else None


def collect_rng_states() -> dict[str, Any]:
    """Python's, NumPy's (if installed), torch's CPU and each CUDA device's RNG state, as tensors
    and plain numbers only: Lightning loads checkpoints with ``torch.load(weights_only=True)``."""
    version, words, gauss = random.getstate()
    states: dict[str, Any] = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with the supported environments
        return states
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    states["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the RNG states saved by ``collect_rng_states``. CUDA states are restored for the
    devices present: a session on another machine (fewer GPUs, or a CPU) keeps the rest as is."""
    python = states["python"]
    random.setstate((python["version"], tuple(int(w) for w in python["words"].tolist()), python["gauss"]))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        for index, state in enumerate(states.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    if "numpy" in states:
        import numpy as np

        saved = states["numpy"]
        np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached"]))
