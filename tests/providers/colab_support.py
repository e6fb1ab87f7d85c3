"""Shared setup for the Colab provider tests: saved credentials for the Drive emulator, a
provider wired to it, a pool, and "the person pressing Run all" (papermill in a real kernel)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from gpupool.clock import Clock, SystemClock
from gpupool.pool import Pool
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from gpupool_providers.colab import ColabConfig, ColabProvider
from tests.emulators.drive import GOOGLE_TOKEN_URI, LoopbackGoogleAuth, write_credentials_file

MLP = Path(__file__).resolve().parents[2] / "configs" / "examples" / "mlp"
TINY = {"TOTAL_STEPS": "100", "HIDDEN": "8", "BATCH": "16", "OMP_NUM_THREADS": "1"}


def client_secrets(path: Path, drive) -> Path:
    path.write_text(json.dumps({"installed": {
        "client_id": drive.client_id, "client_secret": drive.client_secret,
        "token_uri": GOOGLE_TOKEN_URI, "auth_uri": "https://accounts.google.com/o/oauth2/auth"}}))
    return path


def make_provider(drive, tmp_path: Path, clock: Clock | None = None, **overrides) -> ColabProvider:
    """A Colab adapter on the Drive emulator; its sleeps (Drive retries) return at once
    unless ``clock`` says otherwise."""
    secrets = client_secrets(tmp_path / "client_secrets.json", drive)
    creds = write_credentials_file(tmp_path / "credentials.json", drive)
    settings = dict(client_secrets=secrets, credentials_file=Path(creds), heartbeat_seconds=0.5,
                    upload_chunk_bytes=256 * 1024, gpu_probe="true", startup_seconds=1)
    settings.update(overrides)
    return ColabProvider(ColabConfig(**settings), tmp_path / "colab-data",
                         clock or SystemClock(sleep=lambda seconds: None),
                         auth_factory=lambda s: LoopbackGoogleAuth(drive, settings=s))


def make_pool(tmp_path: Path, **providers) -> Pool:
    settings = PoolSettings(data_dir=tmp_path / "pool")
    return Pool(settings, providers=providers)


def mlp_spec(providers: list[str], **env: str) -> ExperimentSpec:
    return ExperimentSpec(name="mlp-colab", workdir=MLP, run="python train.py",
                          providers=providers, checkpoint={"interval": "1s", "keep_last": 3},
                          limits={"max_hops": 5, "retries_on_error": 0},
                          env={**TINY, **env})


def notebook_id(url: str) -> str:
    return url.rsplit("/", 1)[1]


class Person(threading.Thread):
    """Opens the notebook from Drive and runs it in a real Jupyter kernel (papermill)."""

    def __init__(self, drive, url: str, work: Path, **parameters):
        super().__init__(name="person-running-colab", daemon=True)
        self.drive, self.url, self.work = drive, url, Path(work)
        self.parameters = {"DRIVE_BASE_URL": drive.base_url,
                           "DRIVE_TOKEN": drive.state.issue_access_token(),
                           "WORK_DIR": str(self.work / "content"), "RELEASE_RUNTIME": False,
                           **parameters}
        self.error: BaseException | None = None

    def run(self) -> None:
        import papermill

        self.work.mkdir(parents=True, exist_ok=True)
        source = self.work / "notebook.ipynb"
        source.write_bytes(self.drive.state.get(notebook_id(self.url)).content)
        try:
            papermill.execute_notebook(str(source), str(self.work / "out.ipynb"),
                                       parameters=self.parameters, kernel_name="python3",
                                       progress_bar=False, cwd=str(self.work),
                                       execution_timeout=120)
        except BaseException as err:  # noqa: BLE001 - surfaced to the test
            self.error = err


def run_until(scheduler, predicate, timeout: float = 90, every: float = 0.3):
    """Reconcile with the real clock until ``predicate()`` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        scheduler.reconcile_once(time.time())
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("timed out waiting for the scheduler")
