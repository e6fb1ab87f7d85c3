"""The local provider: one supervised subprocess per attempt on this machine.

Each attempt gets a session folder under ``<data_dir>/sessions/<attempt>``; the supervisor
(``gpupool.session.bootstrap``) runs detached from the scheduler, so a scheduler that dies or restarts
leaves training running, and finds it again from the files the supervisor wrote.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from gpupool.durations import Seconds
from gpupool.errors import CancelFailed, CorruptCheckpoint, InputUnavailable, ProviderError
from gpupool.inputs import OpenUrl, fetch_url
from gpupool.lifecycle import AttemptState
from gpupool.manifest import MANIFEST, Manifest, list_local
from gpupool.provider import (
    Availability,
    Launch,
    PollResult,
    Provider,
    Submission,
    classify_exit,
    runtime_env,
)
from gpupool.provider_config import Capabilities, ProviderConfig, ProviderModel
from gpupool.session import contract

if TYPE_CHECKING:
    from gpupool.spec import ExperimentSpec
    from gpupool.state import Attempt
    from gpupool.store import CheckpointStore

LOCK_FILE = "session.lock"
SUPERVISOR = "gpupool.session.bootstrap"  # run as python -m
LOG_FILE = "log.txt"  # the supervisor's stdout and stderr
LAUNCHED_FILE = "launched.json"  # the scheduler started the supervisor: {"pid"}
RESTORE_DIR = "restore"  # the checkpoint handed to the session, downloaded from the store
PROC = Path("/proc")


class LocalConfig(ProviderConfig):
    """The ``providers.local`` section: this machine (shared fields in ``ProviderConfig``)."""

    max_concurrent: int = Field(1, ge=1, description="sessions at once on this machine")
    startup_seconds: Seconds = Field(5.0, ge=0, description="seconds from submit to training "
                                     "(a local process starts at once)")
    loss_prior_seconds: Seconds = Field(336 * 3600.0, gt=0, description="assumed mean seconds "
                                        "between unplanned losses (a reboot, a crash): 2 weeks")
    gpus: Literal["auto", "none"] | list[str] = "auto"
    cpu_fallback: bool = Field(True, description="run GPU experiments on the CPU when no GPU")
    windows: list[str] = Field(default_factory=list, description='e.g. ["22:00-07:00"] local time')
    python: str = Field(default_factory=lambda: sys.executable)
    cancel_grace_seconds: Seconds = Field(
        10.0, ge=0, description="after a cancel's SIGTERM, how long the trainer may save before SIGKILL")

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        for window in value:
            _parse_window(window)
        return value


class LocalProvider(Provider):
    name = "local"
    Config = LocalConfig
    config: LocalConfig
    capabilities = Capabilities(cpu_fallback=True)
    input_kinds = frozenset({"local", "url", "kaggle", "drive"})  # kaggle, drive: see _input_env
    open_url: OpenUrl | None = None  # how url inputs are fetched: None is urllib; tests swap it

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._gpus: list[str] | None = None

    # -- what this machine offers ----------------------------------------------------------

    def check_credentials(self) -> tuple[bool, str]:
        gpus = self.detected_gpus()
        if gpus:
            return True, f"{len(gpus)} GPU(s): {', '.join(gpus)}"
        if self.config.cpu_fallback:
            return True, "no CUDA GPU found: experiments run on the CPU (cpu_fallback)"
        return False, "no CUDA GPU found (nvidia-smi); set providers.local.cpu_fallback: true"

    def detected_gpus(self) -> list[str]:
        if self._gpus is None:
            configured = self.config.gpus
            if isinstance(configured, list):
                self._gpus = list(configured)
            else:
                self._gpus = [] if configured == "none" else detect_gpus()
        return self._gpus

    def gpu_kinds(self) -> set[str] | None:
        return {name.lower() for name in self.detected_gpus()}

    def availability(self, account: str, now: float) -> Availability:
        """Inside one of the configured windows (this machine's local time), or not until
        the next one opens (``until``, epoch seconds)."""
        inside, change = self.open_at(now)
        if inside:
            return Availability(True)
        return Availability(False, f"outside the local windows {', '.join(self.config.windows)}",
                            until=change)

    def open_at(self, now: float) -> tuple[bool, float | None]:
        """(inside a window at ``now``, epoch seconds of the next window edge); no windows:
        always open. The one rule for local windows: availability and the forecast use it."""
        return window_state(self._windows, now)

    @cached_property
    def _windows(self) -> list[tuple[int, int]]:
        return [_parse_window(w) for w in self.config.windows]  # checked when the pool loaded

    def accepts_cpu(self) -> bool:
        """A GPU experiment trains on the CPU here: no GPU found and ``cpu_fallback`` is on."""
        return self.config.cpu_fallback and super().accepts_cpu()

    def forecast_model(self) -> ProviderModel:
        """The generic model, plus this machine's windows (the same rule as ``availability``)."""
        model = super().forecast_model()
        return replace(model, open_at=self.open_at) if self.config.windows else model

    # -- inputs ----------------------------------------------------------------------------

    def check_inputs(self, spec: ExperimentSpec) -> list[tuple[tuple[Any, ...], str]]:
        """Kinds it cannot bring, and url inputs fetched (once, cached) and verified now."""
        problems = super().check_inputs(spec)
        for name, item in spec.inputs.items():
            if item.url is not None:
                try:
                    self.fetch(item.url, item.sha256)
                except InputUnavailable as err:
                    problems.append((("inputs", name, "sha256" if item.sha256 else "url"),
                                     str(err).removeprefix("inputs: ")))
        return problems

    def fetch(self, url: str, sha256: str | None) -> Path:
        """``url`` in this provider's download cache (tests replace ``open_url``)."""
        return fetch_url(url, sha256, self.data_dir / "inputs" / "url", self.open_url)

    def _input_env(self, spec: ExperimentSpec) -> dict[str, str]:
        """``GPUPOOL_INPUT_<NAME>``: local inputs in place, url inputs from the cache, Kaggle
        datasets and Drive files from the pool's download cache (downloaded once by the
        adapter that owns the kind, ``Provider.download_input``).

        Raises InputUnavailable when an input is gone since the experiment was checked."""
        env = {}
        for name, item in spec.inputs.items():
            if item.local is not None:
                if not item.local.exists():
                    raise InputUnavailable(self.name, f"input {name!r}: {item.local} no longer exists")
                env[contract.input_env_name(name)] = str(item.local)
            elif item.url is not None:
                env[contract.input_env_name(name)] = str(self.fetch(item.url, item.sha256))
            elif self.sources is not None:
                env[contract.input_env_name(name)] = str(self.sources.fetch(name, item))
            else:
                raise InputUnavailable(self.name, f"input {name!r}: {item.kind} inputs need a "
                                                  "pool that can ask the provider holding them")
        return env

    # -- attempts --------------------------------------------------------------------------

    def session_dir(self, attempt_id: str) -> Path:
        return self.data_dir / "sessions" / attempt_id

    def submit(self, launch: Launch) -> Submission:
        session = self.session_dir(launch.attempt_id)
        session.mkdir(parents=True, exist_ok=True)
        lock = _try_lock(session / LOCK_FILE)
        if lock is None or (session / LAUNCHED_FILE).exists() or (session / contract.STARTED_FILE).exists():
            if lock is not None:
                os.close(lock)
            return self._adopt(session)  # launched before a scheduler crash: never twice
        try:
            restore_dir = self._prepare_restore(launch, session)
            config = contract.session_config(  # the deadline counts from the supervisor's start
                session_dir=str(session), bundle=str(launch.bundle), setup=launch.spec.setup,
                run=launch.spec.run, env=self._env(launch, session, restore_dir),
                runtime_path=_gpupool_root(), session_seconds=self.planned_session_seconds(launch),
                deadline_margin=self.config.deadline_margin)
            (session / contract.SESSION_CONFIG).write_text(json.dumps(config, indent=1))
            process = self._spawn(session, lock)
        finally:
            os.close(lock)  # the supervisor holds its own copy of the lock for its whole life
        self._children[launch.attempt_id] = process
        contract.write_json_atomic(session / LAUNCHED_FILE, {"pid": process.pid})
        log = session / LOG_FILE
        return Submission(remote_id=str(process.pid), message=f"pid {process.pid}, logs in {log}")

    def _adopt(self, session: Path) -> Submission:
        info = (contract.read_json(session / LAUNCHED_FILE)
                or contract.read_json(session / contract.STARTED_FILE) or {})
        pid = info.get("pid", "unknown")
        return Submission(remote_id=str(pid), deadline=info.get("deadline"),
                          message=f"adopted the session already started (pid {pid})")

    def _prepare_restore(self, launch: Launch, session: Path) -> str | None:
        if launch.restore is None:
            return None
        target = session / RESTORE_DIR / launch.restore.name
        if not (target / MANIFEST).exists():
            shutil.rmtree(target, ignore_errors=True)
            launch.store.download(launch.restore, target)
        return str(target)

    def _env(self, launch: Launch, session: Path, restore: str | None) -> dict[str, str]:
        env = runtime_env(launch, provider=self.name, session_dir=str(session), restore_dir=restore)
        env.update(self._input_env(launch.spec))
        python_dir = str(Path(self.config.python).parent)
        # the experiment's own PATH entries are kept (after the python that runs it), not dropped
        env["PATH"] = os.pathsep.join(p for p in [python_dir, launch.spec.env.get("PATH"),
                                                  os.environ.get("PATH", "")] if p)
        if not self.detected_gpus():
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        return env

    def _spawn(self, session: Path, lock: int) -> subprocess.Popen[bytes]:
        log = open(session / LOG_FILE, "ab")
        try:
            return subprocess.Popen(
                [self.config.python, "-m", SUPERVISOR, str(session / contract.SESSION_CONFIG)],
                cwd=session, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=_bootstrap_env(), pass_fds=(lock,),
            )
        except OSError as err:
            raise ProviderError(self.name, f"cannot start {self.config.python}: {err}") from None
        finally:
            log.close()

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        session = self.session_dir(attempt.id)
        self._reap(attempt.id)
        progress = contract.last_event(session)
        started = (contract.read_json(session / contract.STARTED_FILE) or {}).get("time")
        ended = contract.read_json(session / contract.EXIT_FILE)
        if ended is not None:
            end_session_tree(attempt.id, session)  # e.g. DataLoader workers of a killed trainer
            state, message = classify_exit(ended.get("returncode"), ended.get("outcome"),
                                           ended.get("stopped_by"))
            return PollResult(state, step=progress.get("step"), heartbeat=ended.get("ended"),
                              started_at=started, message=message + _tail_hint(session, state))
        if _locked(session / LOCK_FILE):
            pass  # the supervisor is alive
        elif not (session / contract.SESSION_CONFIG).exists():
            return PollResult(AttemptState.LOST, message="the session was never started")
        else:
            end_session_tree(attempt.id, session)
            return PollResult(AttemptState.LOST, started_at=started, step=progress.get("step"),
                              message="the session's supervisor died without an exit status")
        state = AttemptState.RUNNING if started else AttemptState.SUBMITTED
        saved = contract.last_event(session, contract.EVENT_CHECKPOINT)
        metrics = contract.last_event(session, contract.EVENT_PROGRESS).get("metrics")
        return PollResult(state, step=progress.get("step"), heartbeat=progress.get("time"),
                          started_at=started, total=progress.get("total"), metrics=metrics or None,
                          checkpoint=saved.get("name"), checkpoint_at=saved.get("time"))

    def _reap(self, attempt_id: str) -> None:
        child = self._children.get(attempt_id)
        if child is not None and child.poll() is not None:
            del self._children[attempt_id]

    def cancel(self, attempt: Attempt) -> None:
        """Stop the session: SIGTERM to its supervisor (forwarded to the trainer, which may save
        and yield), then, after ``cancel_grace_seconds``, SIGKILL to every process of the
        session. Returns once nothing of it runs; raises ``CancelFailed`` if something does."""
        session = self.session_dir(attempt.id)
        started = contract.read_json(session / contract.STARTED_FILE)
        if started and _locked(session / LOCK_FILE):
            _signal_pid(int(started["pid"]), signal.SIGTERM)  # the supervisor forwards it
            _wait_until(lambda: not _locked(session / LOCK_FILE), self.config.cancel_grace_seconds)
        if started and _locked(session / LOCK_FILE):
            _signal_pid(int(started["pid"]), signal.SIGKILL)
        left = end_session_tree(attempt.id, session)
        if left or not _wait_until(lambda: not _locked(session / LOCK_FILE), 5.0):
            raise CancelFailed(self.name, f"processes of session {attempt.id} survived SIGKILL "
                               f"({', '.join(map(str, left)) or 'its supervisor'})",
                               action="stop them by hand (kill -9 PID) or restart the machine")

    def logs(self, attempt: Attempt) -> str:
        try:
            return (self.session_dir(attempt.id) / LOG_FILE).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        root = self.session_dir(attempt.id) / contract.CHECKPOINTS_DIR
        collected = []
        for manifest in reversed(list_local(root)):
            try:  # hashed once, while copied into the store (see gpupool.store)
                collected.append(store.import_local(root / manifest.name, manifest))
            except CorruptCheckpoint:
                continue  # torn by a kill mid-write: never published
        return collected

    def cleanup(self, attempt: Attempt) -> None:
        session = self.session_dir(attempt.id)
        for name in (contract.CODE_DIR, RESTORE_DIR, contract.CHECKPOINTS_DIR):
            shutil.rmtree(session / name, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------

def detect_gpus() -> list[str]:
    """GPU names from nvidia-smi; empty when there is none (or no driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _gpupool_root() -> str:
    import gpupool

    return str(Path(gpupool.__file__).resolve().parent.parent)


def _bootstrap_env() -> dict[str, str]:
    env = dict(os.environ)
    root = _gpupool_root()
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH")] if p)
    return env


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None if someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _locked(path: Path) -> bool:
    """Whether a live supervisor holds the session lock (the lock dies with its holder)."""
    if not path.exists():
        return False
    fd = _try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def end_session_tree(attempt_id: str, session: Path) -> list[int]:
    """SIGKILL whatever of the session still runs: every process that carries the attempt in
    its environment (the trainer and its children, DataLoader workers, even ones that left its
    process group), found by environment rather than by a group id that may have been reused.
    Returns the pids still alive afterwards (none, normally)."""
    trainer = contract.read_json(session / contract.TRAINER_FILE)
    if trainer and not PROC.is_dir():  # no /proc to tell ours apart: the group is all we know
        _signal_group(int(trainer["pid"]), signal.SIGKILL)
    pids = session_processes(attempt_id)
    for pid in pids:
        _signal_pid(pid, signal.SIGKILL)
    _wait_until(lambda: not session_processes(attempt_id), 5.0)
    return session_processes(attempt_id)


def session_processes(attempt_id: str) -> list[int]:
    """Live processes (not zombies) whose environment names this attempt (Linux ``/proc``;
    elsewhere none are found and the trainer's process group is all that is killed)."""
    marker = f"{contract.ENV_ATTEMPT}={attempt_id}".encode()
    found = []
    for entry in PROC.glob("[0-9]*"):
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # dead, waiting for its parent to reap it
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        found.append(int(entry.name))
    return found


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """Wait (bounded) for a process-level event that has no notification to block on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def _tail_hint(session: Path, state: AttemptState) -> str:
    if state != AttemptState.FAILED:
        return ""
    try:
        lines = (session / LOG_FILE).read_text(errors="replace").splitlines()[-5:]
    except OSError:
        return ""
    return "; log ends with:\n" + "\n".join(lines)


def _parse_window(text: str) -> tuple[int, int]:
    try:
        start, end = (dt.datetime.strptime(part.strip(), "%H:%M") for part in text.split("-"))
    except ValueError:
        raise ValueError(f"{text!r} is not a window like 22:00-07:00") from None
    return start.hour * 60 + start.minute, end.hour * 60 + end.minute


def _inside(minute: int, window: tuple[int, int]) -> bool:
    start, end = window
    return start <= minute < end if start <= end else minute >= start or minute < end


def window_state(windows: list[tuple[int, int]], now: float) -> tuple[bool, float | None]:
    """Whether ``now`` (epoch seconds) falls in one of ``windows`` (minutes of this machine's
    local day, start and end; an end before the start wraps past midnight), and the epoch
    seconds of the next window edge after ``now`` (None without windows: always open)."""
    if not windows:
        return True, None
    local = dt.datetime.fromtimestamp(now)
    minute = local.hour * 60 + local.minute
    inside = any(_inside(minute, w) for w in windows)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    edges = [midnight + dt.timedelta(days=day, minutes=edge)
             for day in (0, 1) for window in windows for edge in window]
    return inside, min(e.timestamp() for e in edges if e > local)
