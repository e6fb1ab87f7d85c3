"""In-memory state of the Kaggle emulator: tuning knobs, kernels, sessions, datasets, uploads."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINAL_STATUSES = frozenset({"COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED"})
LIVE_STATUSES = frozenset({"QUEUED", "RUNNING", "CANCEL_REQUESTED"})
NOT_READY_STATUS = "BLOBS_RECEIVED"  # what GetDatasetStatus says while a version "processes"


def _next_week() -> dt.datetime:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return now + dt.timedelta(days=7)


@dataclass
class Config:
    """What a test tunes. Fields may change while the emulator runs (they are read per use)."""

    max_gpu_sessions: int = 2
    gpu_quota_seconds: float = 30 * 3600
    tpu_quota_seconds: float = 20 * 3600
    quota_refresh_time: dt.datetime = field(default_factory=_next_week)
    session_cap_seconds: float = 12 * 3600
    # What a session that hits its time limit (cap, sessionTimeoutSeconds or quota) ends as.
    limit_status: str = "ERROR"
    limit_message: str = (
        "Your notebook exceeded its maximum run time of {limit:g} seconds and was stopped."
    )
    limit_keeps_output: bool = True
    queue_seconds: float = 0.0  # time a session stays QUEUED before its script starts
    dataset_polls_until_ready: int = (
        1  # GetDatasetStatus answers not-ready this many times per version
    )
    input_layout: str = (
        "datasets"  # "datasets" (input/datasets/<owner>/<slug>), "legacy" (input/<slug>), "both"
    )
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)  # added to every kernel's environment
    max_hang_seconds: float = 10.0  # upper bound on a "hang" fault
    # Kaggle's public API does not expose a kernel session's id (kaggle-cli #1169, PR #1174:
    # "not currently exposed outside the server"), so by default no answer carries one. A test
    # may turn this on to model a service that puts `kernelSessionId` in the push and status
    # answers, the only id CancelKernelSession accepts.
    expose_session_id: bool = False
    # Bytes of private datasets an account may keep (Kaggle limits private storage);
    # CreateDataset is refused past it, and DeleteDataset frees it.
    private_dataset_quota_bytes: float = float("inf")
    # Whether ListKernelSessionOutput's `log` carries a running session's output. Kaggle gives
    # it once the session is over; a running one is read through GetKernelSessionLogsStream.
    # On by default (the older tests read progress from it); off models Kaggle as it is.
    log_in_output_list_while_running: bool = True


@dataclass
class Session:
    """One run (version) of a kernel."""

    id: int
    owner: str
    slug: str
    version: int
    request: dict[str, Any]
    gpu: bool
    status: str = "QUEUED"
    failure_message: str = ""
    root: Path | None = None  # the fake /kaggle
    process: subprocess.Popen[bytes] | None = None
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)  # relative name -> file
    pumps: list[threading.Thread] = field(default_factory=list)  # stdout/stderr -> log
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.slug}"

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    @property
    def charged_seconds(self) -> float:
        """GPU time this session was charged so far (0 for CPU or never-started sessions)."""
        if not self.gpu or self.started is None:
            return 0.0
        return (self.ended if self.ended is not None else time.monotonic()) - self.started


@dataclass
class Kernel:
    id: int
    owner: str
    slug: str
    title: str
    is_private: bool
    sessions: list[Session] = field(default_factory=list)
    deleted: bool = False

    @property
    def latest(self) -> Session | None:
        return self.sessions[-1] if self.sessions else None

    def version(self, label: str | None) -> Session | None:
        """The session for a versionLabel such as "v3"; the latest when no label is given."""
        if not label:
            return self.latest
        number = label[1:] if label.startswith("v") else label
        return next((s for s in self.sessions if str(s.version) == number), None)


@dataclass
class Blob:
    token: str
    name: str
    content_length: int
    data: bytes = b""

    @property
    def complete(self) -> bool:
        return len(self.data) >= self.content_length


@dataclass
class DatasetVersion:
    number: int
    files: dict[str, bytes]
    notes: str = ""
    polls_left: int = 0

    @property
    def ready(self) -> bool:
        return self.polls_left <= 0


@dataclass
class Dataset:
    owner: str
    slug: str
    title: str
    is_private: bool
    license_name: str = ""
    versions: list[DatasetVersion] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.slug}"

    @property
    def size(self) -> int:
        """Bytes held by every version (what counts against the private-dataset quota)."""
        return sum(len(data) for version in self.versions for data in version.files.values())

    def latest_ready(self) -> DatasetVersion | None:
        ready = [v for v in self.versions if v.ready]
        return ready[-1] if ready else None

    def get_version(self, number: int | None) -> DatasetVersion | None:
        if number is None:
            return self.latest_ready()
        return next((v for v in self.versions if v.number == number and v.ready), None)
