"""The Colab provider: one notebook on the user's Drive per attempt, run by a person.

Colab's free tier has no API to start a runtime and its terms forbid driving the notebook UI,
so ``submit`` prepares everything on Drive and hands back the notebook's Colab link; a person
opens it and presses Run all. From then on the notebook reports through files in the attempt's
Drive folder (see ``agent.py`` for the layout), which ``poll`` and ``collect`` read.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupool.bundle import pack_runtime
from gpupool.clock import SYSTEM_CLOCK, Clock
from gpupool.errors import CancelFailed, CheckpointError, CredentialsError, GpupoolError, ProviderError
from gpupool.lifecycle import AttemptState
from gpupool.manifest import MANIFEST, Manifest, ManifestError, check_name, read_local, verify_local
from gpupool.provider import (
    Launch,
    PollResult,
    Provider,
    Quota,
    Submission,
    classify_exit,
    runtime_env,
)
from gpupool.provider_config import Capabilities, ProviderModel
from gpupool.session.contract import OUTCOME_INPUT_PROBLEM

from . import drive as gdrive
from . import notebook
from .config import ColabConfig
from .inputs import DriveInputs, download_drive_input
from .records import AttemptRecords

if TYPE_CHECKING:
    from gpupool.spec import ExperimentSpec, InputSpec
    from gpupool.state import Attempt
    from gpupool.store import CheckpointStore

COLAB_URL = "https://colab.research.google.com/drive/{}"
WINDOW_SECONDS = 24 * 3600
STOP_FILE = "cancel.json"
# what an attempt folder keeps after collection: the log (``gpupool logs`` reads it) and the
# stop request (a session that beats again after it was given up must still see it)
KEPT_AFTER_COLLECT = frozenset({"log.txt", STOP_FILE})
STOP_ACTION = ("open {url} in the browser tab where it runs and use Runtime > Disconnect and "
               "delete runtime (or close the tab)")


class ColabProvider(Provider):
    name = "colab"
    Config = ColabConfig
    config: ColabConfig
    status_map = {
        "starting": AttemptState.RUNNING,
        "running": AttemptState.RUNNING,
        "no-gpu": AttemptState.UNAVAILABLE,
        "failed": AttemptState.FAILED,
        OUTCOME_INPUT_PROBLEM: AttemptState.FAILED,  # final: see poll()
        "stopped": AttemptState.CANCELLED,
    }
    input_kinds = frozenset({"local", "drive", "url", "kaggle"})  # kaggle: downloaded, then as local
    input_sources = frozenset({"drive"})  # downloaded for other providers' sessions
    capabilities = Capabilities(
        needs_person="Colab's free tier needs a person to open and run each attempt's notebook",
        exact_quota=False, interactive_sign_in=True)  # Colab publishes no quota: a guess

    def __init__(self, config: ColabConfig, data_dir: Path,
                 clock: Clock | Callable[[], float] = SYSTEM_CLOCK, *,
                 auth_factory: gdrive.AuthFactory | None = None):
        """``clock`` (``gpupool.clock``): the time read and slept on, e.g. between Drive
        retries; ``auth_factory`` builds the Google sign-in (tests: a loopback one)."""
        super().__init__(config, data_dir, clock)
        self.auth_factory = auth_factory
        self.records = AttemptRecords(self.data_dir / "attempts")
        self._drive: gdrive.Drive | None = None

    # -- Drive ------------------------------------------------------------------------------

    def drive(self) -> gdrive.Drive:
        if self._drive is None:
            client = gdrive.load_client_config(self.config.client_secrets)
            auth = gdrive.open_auth(client, self.config.credentials_file, self.auth_factory,
                                    timeout=self.config.request_timeout)
            self._drive = gdrive.Drive(auth, sleep=self.clock.sleep,
                                       chunk_bytes=self.config.upload_chunk_bytes)
        return self._drive

    def inputs(self) -> DriveInputs:
        return DriveInputs(self.drive(), self.config.folder, self.data_dir,
                           foreign=self.sources)

    def check_inputs(self, spec: ExperimentSpec) -> list[tuple[tuple[Any, ...], str]]:
        """Also: every Drive input exists and is readable by the signed-in account. When
        Drive cannot be asked now, the check is left to the attempt (it fails with the reason)."""
        problems = super().check_inputs(spec)
        if problems or not any(item.drive for item in spec.inputs.values()):
            return problems
        try:
            return self.inputs().check(spec)
        except CredentialsError as err:  # no account to read them with: say so now
            return [(("inputs", name, "drive"), f"cannot read Drive input {item.drive}: "
                                                f"{str(err).removeprefix('colab: ')}")
                    for name, item in spec.inputs.items() if item.drive is not None]
        except GpupoolError:
            return []

    def download_input(self, item: InputSpec, dest: Path) -> Path:
        """A Drive file or folder for another provider's session (``download_drive_input``)."""
        return download_drive_input(self.drive(), str(item.drive), dest)

    def attempts_folder(self) -> str:
        return self.drive().folder_path(self.config.folder, "attempts")

    # -- what Colab offers -----------------------------------------------------------------

    def authorize(self, *, launch_browser: bool = True, paste: bool = False,
                  prompt: Any = input, echo: Any = print, **_: Any) -> str:
        """The one interactive sign-in (``gpupool auth colab``); see ``auth.py``. Options
        meant for other providers are ignored."""
        from .auth import sign_in

        result = sign_in(self.config, launch_browser=launch_browser, paste=paste, prompt=prompt,
                         echo=echo, auth_factory=self.auth_factory)
        self._drive = None
        return (f"signed in to Google Drive as {result['user']}; folder '{result['folder']}' is "
                f"ready; credentials saved to {result['credentials_file']} (mode 0600)")

    def check_credentials(self) -> tuple[bool, str]:
        try:
            self.drive()
        except CredentialsError as err:
            return False, str(err)
        return True, f"saved Google credentials at {self.config.credentials_file}"


    def quota_window_start(self, now: float) -> float:
        """The estimate is per rolling day: the last 24 hours."""
        return rolling_day(now)[0]

    def forecast_model(self) -> ProviderModel:
        """The generic model plus the estimated daily quota over a rolling day, and how long a
        notebook waits for its person (``start_timeout``)."""
        return replace(super().forecast_model(), quota_window=rolling_day,
                       quota_seconds=self.config.estimated_gpu_hours_per_day * 3600,
                       start_timeout=self.config.start_timeout)

    def quota(self, account: str, now: float, charged: float) -> Quota:
        """Colab publishes no quota: gpupool's estimate per rolling day (``estimated_gpu_hours_
        per_day``) against the ledger's ``charged`` seconds. After a "no GPU" report it counts
        as spent until the cool-down ends (``gpupool.quota``, the estimate rule)."""
        return Quota(charged, self.config.estimated_gpu_hours_per_day * 3600, source="estimate")

    # -- attempts --------------------------------------------------------------------------

    def submit(self, launch: Launch) -> Submission:
        record = self.records.get(launch.attempt_id)
        if record is not None:  # submitted before a scheduler crash
            return self._submission(record)
        drive = self.drive()
        folder = drive.folder(self.attempts_folder(), _folder_title(launch.attempt_id))
        try:
            record = self._prepare(launch, folder)
        except GpupoolError:
            _quietly(drive.delete, folder)  # a refused submit leaves nothing on Drive
            raise
        self.records.put(launch.attempt_id, record)
        return self._submission(record)

    def _prepare(self, launch: Launch, folder: str) -> dict:
        """Upload the runtime, the code, the checkpoint to restore and the notebook."""
        drive = self.drive()
        with tempfile.TemporaryDirectory(prefix="gpupool-colab-") as tmp:
            runtime = Path(tmp) / "runtime.tar.gz"
            pack_runtime(runtime)
            drive.put(folder, "runtime.tar.gz", runtime, "application/gzip")
            drive.put(folder, "bundle.tar.gz", Path(launch.bundle), "application/gzip")
            if launch.restore is not None:
                self._upload_restore(launch, folder, Path(tmp) / "restore")
        params = self._parameters(launch, folder)
        params["INPUTS"] = self.inputs().prepare(launch.spec)
        body = notebook.dumps(notebook.render(params, experiment=launch.spec.name))
        title = f"gpupool-{launch.spec.name}-{launch.attempt_id}.ipynb"
        created = drive.put(folder, title, body, gdrive.COLAB_MIME)
        return {"folder_id": folder, "notebook_id": created["id"], "submitted": launch.now,
                "url": COLAB_URL.format(created["id"])}

    def _submission(self, record: dict) -> Submission:
        minutes = round(self.config.start_timeout / 60)
        return Submission(remote_id=record["notebook_id"], url=record["url"], message=(
            f"open {record['url']} and press Runtime > Run all within {minutes} min "
            "(otherwise gpupool runs it elsewhere)"))

    def _upload_restore(self, launch: Launch, folder: str, local: Path) -> None:
        manifest = launch.restore
        assert manifest is not None
        launch.store.download(manifest, local)
        drive = self.drive()
        target = drive.folder_path("restore", manifest.name, parent=folder)
        for entry in manifest.files:
            parts = entry.path.split("/")
            parent = drive.folder_path(*parts[:-1], parent=target)
            drive.put(parent, parts[-1], local / entry.path)
        drive.put(target, MANIFEST, manifest.to_json().encode(), "application/json")

    def _parameters(self, launch: Launch, folder: str) -> dict[str, Any]:
        env = runtime_env(launch, provider=self.name)  # the notebook adds the session's own
        return {
            "ATTEMPT_ID": launch.attempt_id, "EXPERIMENT_ID": launch.experiment_id,
            "ATTEMPT_FOLDER_ID": folder, "FOLDER_TITLE": self.config.folder,
            "RUN": launch.spec.run, "SETUP": launch.spec.setup, "SESSION_ENV": env,
            "RESTORE_NAME": launch.restore.name if launch.restore else None,
            "SESSION_SECONDS": self.planned_session_seconds(launch) or self.config.session_seconds,
            "DEADLINE_MARGIN": self.config.deadline_margin,
            "HEARTBEAT_SECONDS": self.config.heartbeat_seconds,
            "UPLOAD_CHUNK_BYTES": self.config.upload_chunk_bytes,
            "KEEP_LAST": launch.spec.checkpoint.keep_last,
            "GPU_REQUIRED": launch.spec.resources.wants_gpu, "GPU_PROBE": self.config.gpu_probe,
        }

    def _folder(self, attempt: Attempt) -> str | None:
        record = self.records.get(attempt.id)
        if record is not None:
            return str(record["folder_id"])
        found = self.drive().find(self.attempts_folder(), _folder_title(attempt.id))
        return found["id"] if found else None

    def read_status(self, attempt: Attempt) -> dict | None:
        folder = self._folder(attempt)
        item = self.drive().find(folder, "status.json") if folder else None
        if item is None:
            return None
        try:
            return json.loads(self.drive().read(item["id"]))
        except ValueError:
            return None  # caught mid-update: read again at the next poll

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        status = self.read_status(attempt)
        if status is None:
            return self._not_started(attempt, now)
        state = status.get("state")
        common: dict[str, Any] = dict(step=status.get("step"), total=status.get("total"),
                                      heartbeat=status.get("time"), started_at=status.get("started"))
        if state == "finished":
            ended, message = _classify_exit(status)
            return PollResult(ended, message=message, **common)
        if state == "drive-error":
            return self._drive_error(attempt, status, now, common)
        if state == "stopped":
            return PollResult(AttemptState.CANCELLED, message=status.get("message"), **common)
        if state == "no-gpu":  # Colab's usage limits: its quota is spent for a while
            return PollResult(AttemptState.UNAVAILABLE, message="Colab gave no GPU (usage limits "
                              "reached?)", unavailable_until=now + self.config.no_gpu_cooldown,
                              quota_spent=True, **common)
        if state == "failed":
            return PollResult(AttemptState.FAILED, message=status.get("message"), **common)
        if state == OUTCOME_INPUT_PROBLEM:  # an input gone or wrong: another try cannot help
            return PollResult(AttemptState.FAILED, message=status.get("message"), final=True,
                              **common)
        if now - float(status.get("time") or 0) > self.config.heartbeat_timeout:
            return PollResult(AttemptState.LOST, message=(
                f"no heartbeat from the notebook for {self.config.heartbeat_timeout:.0f} s "
                "(runtime disconnected or recycled)"), **common)
        trouble = status.get("upload_error")  # shown by `gpupool status` while it lasts
        return PollResult(self.status_map.get(str(state), AttemptState.RUNNING),
                          message=f"checkpoint upload failing: {trouble}" if trouble else None,
                          **common)

    def _drive_error(self, attempt: Attempt, status: dict, now: float, common: dict) -> PollResult:
        """The notebook cannot save checkpoints: Drive is full (Colab rests until space is
        freed; the run goes elsewhere meanwhile), or Drive refused its sign-in (lost)."""
        message = str(status.get("message") or "checkpoints cannot be saved to Drive")
        if status.get("reason") == "storage-full":
            message = (f"{message}; Drive storage is full (Trash counts too): free space "
                       "on the Google account, gpupool deletes its own old files")
            return PollResult(AttemptState.UNAVAILABLE, message=message,
                              unavailable_until=now + self.config.drive_full_cooldown, **common)
        return PollResult(AttemptState.LOST, message=message, **common)

    def _not_started(self, attempt: Attempt, now: float) -> PollResult:
        """Submitted and not opened: waiting, or given up after ``start_timeout`` (UNAVAILABLE
        with no end of its own: the scheduler backs off, longer after each in a row)."""
        record = self.records.get(attempt.id) or {}
        since = float(record.get("submitted") or attempt.created_at)
        if now - since > self.config.start_timeout:
            return PollResult(AttemptState.UNAVAILABLE, message=(
                f"notebook not opened in time ({self.config.start_timeout:.0f} s)"))
        return PollResult(AttemptState.SUBMITTED,
                          message=f"waiting for someone to open {attempt.url or 'the notebook'}")

    def cancel(self, attempt: Attempt) -> None:
        """Ask the notebook to stop: ``cancel.json`` in its folder, which the notebook looks
        for at every heartbeat (and before it trains); it then saves and stops training.

        Colab has no API to stop a runtime, so this is a request: a notebook that never beats
        again never reads it. Raises ``CancelFailed`` (with what the person must do) when the
        request cannot be written to Drive."""
        try:
            folder = self._folder(attempt)
            if folder is None:
                return  # nothing was ever put on Drive: nothing can run
            drive = self.drive()
            drive.put(folder, STOP_FILE, b'{"cancel": true}', "application/json")
        except ProviderError as err:  # RemoteNotFound too: the attempt's folder is gone
            raise CancelFailed(self.name, f"could not ask attempt {attempt.id}'s notebook to "
                                          f"stop ({err})",
                               action=STOP_ACTION.format(url=attempt.url or "the notebook")
                               ) from None

    def logs(self, attempt: Attempt) -> str:
        folder = self._folder(attempt)
        item = self.drive().find(folder, "log.txt") if folder else None
        text = self.drive().read(item["id"]).decode(errors="replace") if item else ""
        status = self.read_status(attempt) or {}
        if status.get("message"):
            text += f"\n[gpupool] {status['message']}\n"
        return text

    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        """Download complete checkpoints (with a manifest), verify them, publish to ``store``."""
        folder = self._folder(attempt)
        drive = self.drive()
        checkpoints = drive.find(folder, "checkpoints") if folder else None
        if checkpoints is None:
            return []
        have = {m.name for m in store.list()}
        staging = self.data_dir / "collect" / attempt.id
        collected: list[Manifest] = []
        corrupt: list[str] = []
        try:
            for item in sorted(drive.children(checkpoints["id"]), key=lambda i: i["title"]):
                if item["title"] in have or drive.find(item["id"], MANIFEST) is None:
                    continue  # already collected, or torn (its manifest never arrived)
                try:  # Drive titles are untrusted: "../x" or "/x" would escape the staging folder
                    local = staging / check_name(item["title"])
                    manifest = self._download_checkpoint(item["id"], local)
                    if manifest.name != item["title"]:
                        raise ManifestError(f"its manifest names {manifest.name}")
                except ManifestError as err:
                    corrupt.append(f"{item['title']!r}: {err}")
                    continue
                collected.append(store.import_local(local, manifest))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if corrupt:
            raise CheckpointError("checkpoints on Drive skipped as corrupt: " + "; ".join(corrupt))
        return collected

    def _download_checkpoint(self, folder_id: str, local: Path) -> Manifest:
        """Manifest first, then each file it lists; raises ``ManifestError`` on any mismatch."""
        drive = self.drive()
        found = drive.find(folder_id, MANIFEST)
        if found is None:
            raise ManifestError(f"no manifest in Drive folder {folder_id}")
        drive.download(found["id"], local / MANIFEST)
        manifest = read_local(local)
        for entry in manifest.files:
            parent: str | None = folder_id
            for part in entry.path.split("/"):
                found = drive.find(parent, part) if parent else None
                parent = found["id"] if found else None
            if parent is None:
                raise ManifestError(f"{entry.path} is missing")
            drive.download(parent, local / entry.path)
        verify_local(local, manifest)
        return manifest

    def cleanup(self, attempt: Attempt) -> None:
        """Delete, for good, what the ended attempt put on Drive (inputs, checkpoints already
        collected, the notebook, its status) but the log and the stop request. Best effort:
        what fails now stays for the person to remove."""
        folder = self._folder(attempt)
        if folder is None:
            return
        drive = self.drive()
        try:
            for item in drive.children(folder):
                if item["title"] not in KEPT_AFTER_COLLECT:
                    drive.delete(item["id"])
        except ProviderError:
            pass


def _classify_exit(status: dict) -> tuple[AttemptState, str]:
    """``classify_exit`` with who stopped the command, when the session's ``exit.json``
    recorded it and the core takes the argument (it does from issue 12 on)."""
    args = (status.get("returncode"), status.get("outcome"))
    if "stopped_by" in status and "stopped_by" in inspect.signature(classify_exit).parameters:
        return classify_exit(*args, stopped_by=status.get("stopped_by"))  # type: ignore[call-arg]
    return classify_exit(*args)


def _quietly(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except GpupoolError:
        pass


def _folder_title(attempt_id: str) -> str:
    return f"attempt-{attempt_id}"


def rolling_day(now: float) -> tuple[float, float | None]:
    """(start, reset) of the window Colab's estimated quota is counted over: the last 24 hours,
    epoch seconds; a rolling window has no reset time (None)."""
    return now - WINDOW_SECONDS, None
