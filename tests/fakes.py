"""An in-memory provider for scheduler tests: sessions follow a script in virtual time."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from gpupool.errors import CancelFailed, ProviderUnavailable
from gpupool.lifecycle import AttemptState
from gpupool.manifest import Manifest, publish_local
from gpupool.provider import Launch, PollResult, Provider, Quota, Submission
from gpupool.provider_config import ProviderConfig, ProviderModel
from gpupool.state import Attempt
from gpupool.store import CheckpointStore


class FakeConfig(ProviderConfig):
    """The shared fields (``ProviderConfig``) with test defaults: no limit, instant start."""

    max_concurrent: int | None = None
    startup_seconds: float = 0.0
    quota_hours: float | None = None


@dataclass
class Session:
    launch: Launch
    start: float
    outcome: AttemptState
    duration: float
    steps: int
    message: str = ""
    cancelled: bool = False
    ended: bool = False  # its end was seen: a later cancel changes nothing, as on a real service


@dataclass
class Script:
    """What each successive session on the provider does."""

    outcomes: list[tuple[AttemptState, float, int]] = field(default_factory=list)  # state, secs, steps
    refuse: int = 0  # refuse this many submits with ProviderUnavailable first
    cancel_fails: bool = False  # cancel raises CancelFailed (no API to stop a session)

    def next(self) -> tuple[AttemptState, float, int]:
        return self.outcomes.pop(0) if self.outcomes else (AttemptState.SUCCEEDED, 60.0, 10)


class FakeProvider(Provider):
    Config = FakeConfig
    config: FakeConfig

    def __init__(self, name: str, script: Script | None = None, **config: object):
        super().__init__(FakeConfig(**config), Path(tempfile.mkdtemp()), lambda: 0.0)
        self.name = name  # type: ignore[misc]
        self.script = script or Script()
        self.sessions: dict[str, Session] = {}
        self.submits = 0
        self.cancels: list[str] = []

    def check_credentials(self) -> tuple[bool, str]:
        return True, "fake"

    def quota(self, account: str, now: float, charged: float) -> Quota | None:
        if self.config.quota_hours is None:
            return None
        return Quota(charged, self.config.quota_hours * 3600, source="ledger")

    def submit(self, launch: Launch) -> Submission:
        self.submits += 1
        if launch.attempt_id in self.sessions:
            return Submission(remote_id=launch.attempt_id)
        if self.script.refuse > 0:
            self.script.refuse -= 1
            raise ProviderUnavailable(self.name, "no capacity right now")
        outcome, seconds, steps = self.script.next()
        self.sessions[launch.attempt_id] = Session(launch, launch.now, outcome, seconds, steps)
        return Submission(remote_id=launch.attempt_id, message="fake session")

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        session = self.sessions[attempt.id]
        start_step = session.launch.restore.step if session.launch.restore else 0
        if session.cancelled:
            return PollResult(AttemptState.CANCELLED, message="cancelled")
        if now < session.start + session.duration:
            return PollResult(AttemptState.RUNNING, step=start_step, heartbeat=now,
                              started_at=session.start)
        session.ended = True
        return PollResult(session.outcome, step=start_step + session.steps, started_at=session.start,
                          message=session.message or f"fake {session.outcome.value}")

    def cancel(self, attempt: Attempt) -> None:
        self.cancels.append(attempt.id)
        if self.script.cancel_fails:
            raise CancelFailed(self.name, "this service has no call to stop a session",
                               action=f"stop {attempt.id} on the service's web page")
        session = self.sessions[attempt.id]
        session.cancelled = not session.ended

    def logs(self, attempt: Attempt) -> str:
        return f"log of {attempt.id}\nTraceback: boom\n"

    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        session = self.sessions[attempt.id]
        if session.outcome == AttemptState.UNAVAILABLE or session.steps == 0:
            return []
        start_step = session.launch.restore.step if session.launch.restore else 0
        staging = Path(tempfile.mkdtemp())
        (staging / "state.bin").write_bytes(f"{attempt.id}:{start_step + session.steps}".encode())
        root = Path(tempfile.mkdtemp())
        manifest = publish_local(staging, root, step=start_step + session.steps,
                                 experiment=attempt.experiment_id, attempt=attempt.id,
                                 provider=self.name, metadata={"save_seconds": 2.0})
        existing = [m for m in store.list() if m.attempt == attempt.id]
        if existing:  # idempotent: collected before a crash
            return existing
        return [store.import_local(root / manifest.name, manifest)]


# -- a fake provider shared by several processes ---------------------------------------------

class JournalConfig(ProviderConfig):
    max_concurrent: int | None = None  # any number of sessions at once
    daily_gpu_hours: float | None = None  # GPU hours per UTC day (None: unlimited)
    folder: str  # where the sessions and the journal live, shared by every process
    seconds: float = 1.0  # each session's length, in real seconds
    steps: int = 10  # steps each session makes
    yields: int = 1  # the first N sessions of an experiment yield; the next one completes


class JournalProvider(Provider):
    """Sessions kept as files, so several ``gpupool daemon`` processes (and the test) see the
    same sessions. ``submit`` creates a session file with O_EXCL and appends a ``started`` line
    to ``journal.log``: a session started twice would show there. Register it for a subprocess
    with ``register_entry_point`` (gpupool finds providers through entry points)."""

    name = "journal"
    Config = JournalConfig
    config: JournalConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.folder)

    def check_credentials(self) -> tuple[bool, str]:
        return True, "fake"

    # its own quota rule, which only this adapter knows: the core and the forecast reuse it
    def quota_window_start(self, now: float) -> float:
        return journal_day(now)[0]

    def quota(self, account: str, now: float, charged: float) -> Quota | None:
        if self.config.daily_gpu_hours is None:
            return None
        return Quota(charged, self.config.daily_gpu_hours * 3600, journal_day(now)[1])

    def forecast_model(self) -> ProviderModel:
        model = super().forecast_model()
        if self.config.daily_gpu_hours is None:
            return model
        return replace(model, quota_seconds=self.config.daily_gpu_hours * 3600,
                       quota_window=journal_day)

    def _session_file(self, attempt_id: str) -> Path:
        return self.folder / "sessions" / f"{attempt_id}.json"

    def _journal(self, line: str) -> None:
        with open(self.folder / "journal.log", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")  # one short O_APPEND write: whole lines from every process

    def submit(self, launch: Launch) -> Submission:
        seq = int(launch.attempt_id.rsplit("-a", 1)[1])
        record = {"start": launch.now, "end": launch.now + self.config.seconds,
                  "restore_step": launch.restore.step if launch.restore else 0,
                  "outcome": "yielded" if seq <= self.config.yields else "succeeded"}
        path = self._session_file(launch.attempt_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x", encoding="utf-8") as handle:
                json.dump(record, handle)
        except FileExistsError:  # a scheduler killed after submitting asks again: same session
            self._journal(f"resubmitted {launch.attempt_id} {os.getpid()}")
            return Submission(remote_id=launch.attempt_id)
        self._journal(f"started {launch.attempt_id} {record['start']} {record['end']} {os.getpid()}")
        return Submission(remote_id=launch.attempt_id, message="journal session")

    def _session(self, attempt_id: str) -> dict:
        return json.loads(self._session_file(attempt_id).read_text(encoding="utf-8"))

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        session = self._session(attempt.id)
        if session.get("cancelled"):
            return PollResult(AttemptState.CANCELLED, message="cancelled")
        if now < session["end"]:
            return PollResult(AttemptState.RUNNING, step=session["restore_step"], heartbeat=now,
                              started_at=session["start"])
        return PollResult(AttemptState(session["outcome"]), started_at=session["start"],
                          step=session["restore_step"] + self.config.steps,
                          message=f"journal {session['outcome']}")

    def cancel(self, attempt: Attempt) -> None:
        session = self._session(attempt.id)
        self._session_file(attempt.id).write_text(json.dumps(dict(session, cancelled=True)))

    def logs(self, attempt: Attempt) -> str:
        return f"log of {attempt.id}\n"

    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        existing = [m for m in store.list() if m.attempt == attempt.id]
        if existing:  # idempotent: collected before a crash
            return existing
        session = self._session(attempt.id)
        step = session["restore_step"] + self.config.steps
        staging = Path(tempfile.mkdtemp())
        (staging / "state.bin").write_bytes(f"{attempt.id}:{step}".encode())
        root = Path(tempfile.mkdtemp())
        manifest = publish_local(staging, root, step=step, experiment=attempt.experiment_id,
                                 attempt=attempt.id, provider=self.name)
        published = store.import_local(root / manifest.name, manifest)
        self._journal(f"collected {attempt.id} {os.getpid()}")
        return [published]


def journal_day(now: float) -> tuple[float, float | None]:
    """The journal's quota window holding ``now``: the UTC day (start, reset), epoch seconds."""
    start = now - now % 86400
    return start, start + 86400


def register_entry_point(site: Path) -> Path:
    """A distribution's metadata under ``site`` declaring ``journal`` as a gpupool provider;
    put ``site`` on PYTHONPATH (and sys.path) and gpupool finds it like any installed one."""
    info = site / "gpupool_test_fakes-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gpupool-test-fakes\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[gpupool.providers]\njournal = tests.fakes:JournalProvider\n")
    return site
