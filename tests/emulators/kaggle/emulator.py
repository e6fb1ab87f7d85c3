"""KaggleEmulator: the object a test starts, points the real client at, tunes and inspects."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .faults import Fault
from .runner import run_session
from .server import RecordedRequest, Server
from .state import Blob, Config, Dataset, DatasetVersion, Kernel, Session

if TYPE_CHECKING:
    import pytest
    from kagglesdk import KaggleClient

CREDENTIAL_ENV = ("KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY")


class KaggleEmulator:
    """A loopback Kaggle API. Use as a context manager (or start()/stop()).

    State is public for tests: `kernels[(owner, slug)]`, `sessions[id]`, `datasets[(owner, slug)]`,
    `blobs[token]`, `requests` (every request received), `config` (limits, quota, timing).
    """

    def __init__(
        self,
        username: str = "alice",
        key: str = "alice-key",
        *,
        tokens: dict[str, str] | None = None,
        workdir: Path | str | None = None,
        **config: Any,
    ) -> None:
        self.username, self.key = username, key
        self.credentials: dict[str, str] = {username: key}  # legacy API keys, sent as HTTP Basic
        self.tokens: dict[str, str] = dict(tokens or {})  # access token -> username, sent as Bearer
        self.config = Config(**config)
        self.kernels: dict[tuple[str, str], Kernel] = {}
        self.sessions: dict[int, Session] = {}
        self.datasets: dict[tuple[str, str], Dataset] = {}
        self.blobs: dict[str, Blob] = {}
        self.requests: list[RecordedRequest] = []
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.gpu_seconds_finished = 0.0  # GPU time of ended sessions; a test may preset it
        # Other users (add_user): each has its own week of GPU time, and its own session limit.
        self.user_gpu_seconds_finished: dict[str, float] = {}
        self.user_gpu_quota_seconds: dict[str, float] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self._ids = itertools.count(1)
        self._session_ids = itertools.count(1_000_001)
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="kaggle-emu-"))
        )
        self._server: Server | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> KaggleEmulator:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._server = Server(self)
        thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kaggle-emulator",
            daemon=True,
        )
        thread.start()
        self._server_thread = thread
        return self

    def stop(self) -> None:
        """Kill every running kernel (SIGKILL), then stop serving; bounded to a few seconds."""
        if self._server is None:
            return
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._server_thread.join(timeout=5)
        self._server = None
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KaggleEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the emulator is not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ reaching it with the real client

    @contextlib.contextmanager
    def endpoint_patch(self) -> Iterator[None]:
        """Point kagglesdk's LOCAL env here while clients are built (they read it in __init__)."""
        from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

        saved = _env_to_endpoint[KaggleEnv.LOCAL]
        _env_to_endpoint[KaggleEnv.LOCAL] = self.url
        try:
            yield
        finally:
            _env_to_endpoint[KaggleEnv.LOCAL] = saved

    def sdk_client(
        self, username: str | None = None, key: str | None = None, token: str | None = None
    ) -> KaggleClient:
        """A real `kagglesdk.KaggleClient` aimed here (Basic auth; Bearer when given a token)."""
        from kagglesdk import KaggleClient
        from kagglesdk.kaggle_env import KaggleEnv

        with self.endpoint_patch():
            return KaggleClient(
                env=KaggleEnv.LOCAL,
                username=username or self.username,
                password=key or self.key,
                api_token=token,
            )

    def proxy_env(self) -> dict[str, str]:
        """Env vars that send an unpatched client (kaggle CLI, KaggleApi in a subprocess) here."""
        return {
            "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
            "HTTP_PROXY": self.url,
            "http_proxy": self.url,
            "NO_PROXY": "",
            "no_proxy": "",
            "KAGGLE_USERNAME": self.username,
            "KAGGLE_KEY": self.key,
        }

    def connect(self, monkeypatch: pytest.MonkeyPatch, via: str = "endpoint") -> None:
        """Aim every client built later in this test here, via the endpoint patch or HTTP_PROXY.

        Also drops access-token variables, which kagglesdk would prefer over username/key.
        """
        for name in CREDENTIAL_ENV:
            monkeypatch.delenv(name, raising=False)
        if via == "proxy":
            for name, value in self.proxy_env().items():
                monkeypatch.setenv(name, value)
            return
        from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

        monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
        monkeypatch.setenv("KAGGLE_USERNAME", self.username)
        monkeypatch.setenv("KAGGLE_KEY", self.key)
        monkeypatch.setitem(_env_to_endpoint, KaggleEnv.LOCAL, self.url)

    # ------------------------------------------------------------ faults

    def inject(self, endpoint: str, *faults: Fault, times: int = 1) -> None:
        """Queue faults on an endpoint ("SaveKernel", "download", "upload"...), `times` each."""
        with self.lock:
            self.faults[endpoint].extend(f for f in faults for _ in range(times))

    def take_fault(self, endpoint: str) -> Fault | None:
        with self.lock:
            queue = self.faults.get(endpoint)
            return queue.popleft() if queue else None

    # ------------------------------------------------------------ used by endpoints and runner

    def next_id(self) -> int:
        return next(self._ids)

    def start_session(self, kernel: Kernel, request: dict[str, Any], gpu: bool) -> Session:
        session = Session(
            next(self._session_ids),
            kernel.owner,
            kernel.slug,
            len(kernel.sessions) + 1,
            request,
            gpu,
        )
        kernel.sessions.append(session)
        self.sessions[session.id] = session
        if request.get("kernelExecutionType") == "QUICK_SAVE":
            session.status = "COMPLETE"  # saved, not run
            session.done.set()
            return session
        thread = threading.Thread(
            target=run_session, args=(self, session), name=f"kaggle-emu-{session.id}", daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return session

    def find_dataset_version(self, ref: str) -> DatasetVersion | None:
        """The version a kernel's "owner/slug[/N]" source mounts: N, else the newest ready one."""
        owner, slug, *number = ref.split("/")
        dataset = self.datasets.get((owner, slug))
        return dataset.get_version(int(number[0]) if number else None) if dataset else None

    def find_kernel_output(self, ref: str) -> Session | None:
        """The session whose output a kernel source "owner/slug" mounts: its newest COMPLETE one."""
        owner, slug = ref.split("/")[:2]
        kernel = self.kernels.get((owner, slug))
        done = [s for s in kernel.sessions if s.status == "COMPLETE"] if kernel else []
        return done[-1] if done else None

    def add_user(self, username: str, key: str, *, gpu_quota_seconds: float | None = None) -> None:
        """Another Kaggle user (a team member) with its own key, and its own weekly GPU quota
        (default: ``config.gpu_quota_seconds``); quota and session limits are per user."""
        with self.lock:
            self.credentials[username] = key
            if gpu_quota_seconds is not None:
                self.user_gpu_quota_seconds[username] = gpu_quota_seconds

    def gpu_quota_seconds(self, user: str | None = None) -> float:
        """The weekly GPU quota of ``user`` (default: the emulator's first user)."""
        return self.user_gpu_quota_seconds.get(user or self.username, self.config.gpu_quota_seconds)

    def gpu_seconds_used(self, user: str | None = None) -> float:
        """GPU time ``user`` (default: the first user) spent this week, running sessions included."""
        user = user or self.username
        with self.lock:
            now = time.monotonic()
            running = sum(
                now - s.started
                for s in self.sessions.values()
                if s.gpu and s.started is not None and s.ended is None and s.owner == user
            )
            return self._finished(user) + running

    def _finished(self, user: str) -> float:
        if user == self.username:
            return self.gpu_seconds_finished
        return self.user_gpu_seconds_finished.get(user, 0.0)

    def charge_finished(self, user: str, seconds: float) -> None:
        """Add an ended session's GPU time to its owner's week."""
        with self.lock:
            if user == self.username:
                self.gpu_seconds_finished += seconds
            else:
                self.user_gpu_seconds_finished[user] = self._finished(user) + seconds

    # ------------------------------------------------------------ conveniences for tests

    def live_kernels(self) -> list[Kernel]:
        """Kernels that exist for the API (not deleted)."""
        with self.lock:
            return [k for k in self.kernels.values() if not k.deleted]

    def live_datasets(self) -> list[Dataset]:
        with self.lock:
            return list(self.datasets.values())

    def charged_sessions(self) -> list[Session]:
        """Sessions that were charged GPU time (each counts once, for as long as it ran)."""
        with self.lock:
            return [s for s in self.sessions.values() if s.charged_seconds > 0]

    def add_dataset(self, ref: str, files: dict[str, bytes], *, private: bool = True) -> Dataset:
        """Seed a ready dataset (or a new ready version of one) without going through uploads."""
        owner, slug = ref.split("/")
        with self.lock:
            dataset = self.datasets.setdefault((owner, slug), Dataset(owner, slug, slug, private))
            dataset.versions.append(DatasetVersion(len(dataset.versions) + 1, dict(files)))
            return dataset

    def uploads(self) -> list[str]:
        """Names of the files uploaded so far, one per StartBlobUpload (from the request log)."""
        with self.lock:
            return [r.json.get("name", "") for r in self.requests
                    if r.endpoint == "StartBlobUpload" and r.json]

    def uploaded_bytes(self) -> int:
        """Bytes received by blob PUTs (resumed parts included), from the request log."""
        with self.lock:
            return sum(len(r.body) for r in self.requests if r.endpoint == "upload")

    def dataset_downloads(self) -> list[str]:
        """"owner/slug" of every DownloadDataset call received (one per download started; a
        resumed part is a plain GET of the signed URL, not counted here)."""
        with self.lock:
            return [f"{r.json.get('ownerSlug', '')}/{r.json.get('datasetSlug', '')}"
                    for r in self.requests if r.endpoint == "DownloadDataset" and r.json]

    def dataset_file_gets(self) -> list[str | None]:
        """The Range header (None: the whole file) of every GET of a dataset's signed URL."""
        with self.lock:
            return [r.headers.get("Range") for r in self.requests
                    if r.method == "GET" and "/emu/datasets/" in r.target]

    def dataset_writes(self) -> list[str]:
        """"owner/slug" of every CreateDataset / CreateDatasetVersion call received."""
        with self.lock:
            writes = []
            for r in self.requests:
                if r.endpoint in ("CreateDataset", "CreateDatasetVersion") and r.json:
                    slug = r.json.get("slug") or r.json.get("datasetSlug", "")
                    writes.append(f"{r.json.get('ownerSlug', '')}/{slug}")
            return writes

    def kernel(self, ref: str) -> Kernel:
        owner, slug = ref.split("/")
        return self.kernels[(owner, slug)]

    def session(self, ref: str | int) -> Session:
        """A session by id, by "owner/slug" (latest version) or by "owner/slug/N"."""
        if isinstance(ref, int):
            return self.sessions[ref]
        owner, slug, *number = ref.split("/")
        found = self.kernels[(owner, slug)].version(number[0] if number else None)
        if found is None:
            raise KeyError(ref)
        return found

    def wait(self, ref: str | int, timeout: float = 10.0) -> Session:
        """Block until the session has ended; TimeoutError after `timeout` seconds."""
        session = self.session(ref)
        if not session.done.wait(timeout):
            raise TimeoutError(
                f"Kaggle emulator session {session.id} still {session.status} after {timeout}s"
            )
        return session

    def wait_status(self, ref: str | int, status: str, timeout: float = 10.0) -> Session:
        """Block until the session reaches `status` (e.g. "RUNNING"); it need not exist yet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                session = self.session(ref)
            except KeyError:  # not pushed yet (e.g. a push still stalled by a hang fault)
                session = None
            if session is not None and session.status == status:
                return session
            time.sleep(0.01)
        raise TimeoutError(f"Kaggle emulator session {ref} never reached {status}")
