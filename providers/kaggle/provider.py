"""The Kaggle provider: one private kernel per attempt, run by the real kagglesdk client.

Per attempt: a private dataset carries the inputs (code bundle, runtime, checkpoint; see
datasets.py), a private kernel with a generated bootstrap script runs them (kernel.py), and the
session's ``/kaggle/working/gpupool`` comes back as its output, from which verified checkpoints
are published (outputs.py). The adapter keeps a small record per attempt (kernel version and
session id) under its data dir; a re-submit after a scheduler crash finds the kernel it pushed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from gpupool.errors import CredentialsError, GpupoolError, ProviderError, ProviderUnavailable
from gpupool.provider import (
    Availability,
    Launch,
    PollResult,
    Provider,
    Quota,
    Submission,
    classify_exit,
    runtime_env,
)
from gpupool.states import AttemptState

from . import outputs
from .client import KaggleRemote, RemoteNotFound
from .config import KAGGLE_CAP_SECONDS, KaggleConfig
from .credentials import HINT, Credentials, find_credentials
from .datasets import CHECKPOINT, CODE, RUNTIME, ensure_dataset, stage_inputs
from .kernel import (
    STATUS_MAP,
    dataset_slug,
    gpu_kind,
    kernel_slug,
    marker,
    render_script,
    save_request,
)

if TYPE_CHECKING:
    from gpupool.manifest import Manifest
    from gpupool.state import Attempt
    from gpupool.store import CheckpointStore

log = logging.getLogger(__name__)
CHECK_TTL = 300.0  # seconds a credentials check or quota answer is reused
QUOTA_TTL = 60.0
LIMIT_WORDS = re.compile(r"exceeded|maximum run time|time limit|timed out|quota|cancel|stopped", re.I)
WEEK = 7 * 86400


class KaggleProvider(Provider):
    name = "kaggle"
    Config = KaggleConfig
    config: KaggleConfig
    status_map = STATUS_MAP

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sleep = time.sleep  # tests swap it: backoff and dataset waits never really sleep
        self._remote: KaggleRemote | None = None
        self._owner: str | None = None
        self._checked: tuple[float, bool, str] | None = None
        self._quota: tuple[float, Quota] | None = None

    # -- credentials and the client ---------------------------------------------------------

    @property
    def remote(self) -> KaggleRemote:
        if self._remote is None:
            self._remote = KaggleRemote(find_credentials(self.config.credentials), self.config,
                                        sleep=lambda s: self.sleep(s))
        return self._remote

    @property
    def owner(self) -> str:
        if self._owner is None:
            creds: Credentials = self.remote.credentials
            self._owner = self.config.username or creds.username or self.remote.introspect_username()
        return self._owner

    def check_credentials(self) -> tuple[bool, str]:
        now = self.clock()
        if self._checked is not None and now - self._checked[0] < CHECK_TTL:
            return self._checked[1], self._checked[2]
        ok, hint = self._check()
        self._checked = (now, ok, hint)
        return ok, hint

    def _check(self) -> tuple[bool, str]:
        try:
            source = self.remote.credentials.source
        except CredentialsError as err:
            return False, str(err).removeprefix("kaggle: ")
        try:
            owner = self.owner
            quota = self._api_quota(self.clock())
        except CredentialsError as err:
            return False, f"credentials from {source} do not work: {err}; {HINT}"
        except GpupoolError as err:
            return False, f"credentials from {source}, but Kaggle did not answer: {err}"
        left = (quota.remaining_seconds or 0) / 3600
        return True, f"user {owner} (credentials from {source}); {left:.1f} GPU-hours left this week"

    # -- what Kaggle offers -----------------------------------------------------------------

    def gpu_kinds(self) -> set[str] | None:
        kind = gpu_kind(self.config.accelerator)
        return {kind} if kind else set()

    def availability(self, account: str, now: float) -> Availability:
        return Availability(True)

    def quota(self, account: str, now: float, charged: float) -> Quota | None:
        try:
            return self._api_quota(now)
        except GpupoolError as err:
            log.warning("kaggle: quota API failed (%s); using the ledger", err)
            return Quota(charged, self.config.weekly_gpu_hours * 3600,
                         self.quota_window_start(now) + WEEK, source="ledger")

    def _api_quota(self, now: float) -> Quota:
        if self._quota is not None and now - self._quota[0] < QUOTA_TTL:
            return self._quota[1]
        answer = self.remote.quota()
        quota = Quota(answer.used_seconds, answer.total_seconds, answer.refresh_time, source="api")
        self._quota = (now, quota)
        return quota

    def quota_window_start(self, now: float) -> float:
        """Kaggle's week starts on Saturday 00:00 UTC."""
        day = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0,
                                                                      microsecond=0)
        days_since_saturday = (day.weekday() - 5) % 7
        return (day - dt.timedelta(days=days_since_saturday)).timestamp()

    # -- attempts ---------------------------------------------------------------------------

    def submit(self, launch: Launch) -> Submission:
        record = self._read_record(launch.attempt_id)
        if record is not None:
            return _submission(record, "already submitted")
        owner, slug = self.owner, kernel_slug(self.config.slug_prefix, launch.attempt_id)
        adopted = self._adopt(launch.attempt_id, owner, slug)
        if adopted is not None:
            return adopted
        dataset = dataset_slug(slug)
        staging = self.data_dir / "staging" / launch.attempt_id
        files = lambda: stage_inputs(launch, staging, self._marker(launch))  # noqa: E731
        ensure_dataset(self.remote, self.config, owner, dataset, files, clock=self._monotonic)
        answer = self._push(launch, owner, slug, dataset)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(answer, Submission):
            return answer
        record = {"owner": owner, "slug": slug, "version": int(answer.version_number or 0) or None,
                  "session_id": _session_id(answer.url), "url": answer.url}
        self._write_record(launch.attempt_id, record)
        return _submission(record, f"kernel {owner}/{slug} pushed")

    def _push(self, launch: Launch, owner: str, slug: str, dataset: str) -> Any:
        request = save_request(
            owner=owner, slug=slug, script=render_script(launch.attempt_id), dataset=dataset,
            private=not self.config.public, accelerator=self._accelerator(launch),
            internet=self.config.enable_internet,
            timeout_seconds=int(min(KAGGLE_CAP_SECONDS, self.config.session_seconds + 300)))
        try:
            answer = self.remote.push(request)
        except ProviderError:
            adopted = self._adopt(launch.attempt_id, owner, slug)  # the push may have landed
            if adopted is None:
                raise
            return adopted
        if answer.error:
            raise ProviderUnavailable(self.name, f"Kaggle refused the kernel: {answer.error}",
                                      _refresh_time(answer.error))
        if answer.invalid_dataset_sources:
            log.warning("kaggle: %s cannot mount %s", slug, answer.invalid_dataset_sources)
        return answer

    def _adopt(self, attempt_id: str, owner: str, slug: str) -> Submission | None:
        """The kernel already pushed for this attempt (a scheduler crashed after pushing)."""
        version = self.remote.current_version(owner, slug)
        if version is None:
            return None
        record = {"owner": owner, "slug": slug, "version": version, "session_id": None, "url": None}
        self._write_record(attempt_id, record)
        return _submission(record, f"found kernel {owner}/{slug} pushed earlier")

    def _accelerator(self, launch: Launch) -> str | None:
        return self.config.accelerator if launch.spec.resources.wants_gpu else None

    def _marker(self, launch: Launch) -> dict[str, Any]:
        env = runtime_env(launch, provider=self.name, session_dir="", restore_dir=None,
                          deadline=None)
        env.pop("GPUPOOL_SESSION_DIR", None)  # set inside the kernel, like the deadline
        restore = launch.restore
        return marker(launch.attempt_id, bundle=CODE, runtime=RUNTIME,
                      checkpoint=CHECKPOINT if restore else None,
                      checkpoint_name=restore.name if restore else None,
                      setup=launch.spec.setup, run=launch.spec.run, env=env,
                      session_seconds=self.planned_session_seconds(launch) or self.config.session_seconds,
                      margin=self.config.margin)

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        record = self._record_of(attempt)
        owner, slug, version = record["owner"], record["slug"], record.get("version")
        status, failure = self.remote.status(owner, slug, version)
        files, log_text = self.remote.outputs(owner, slug, version)
        lines = outputs.log_lines(log_text)
        seen = outputs.progress(outputs.events(lines))
        state = STATUS_MAP.get(status or "")
        if state is None:
            log.warning("kaggle: %s/%s has status %s, unknown to gpupool; still polling",
                        owner, slug, status or failure)
            state = attempt.state if attempt.state.active else AttemptState.RUNNING
            return self._progress(state, seen, f"Kaggle status {status or failure} not understood")
        if not state.terminal:
            return self._progress(state, seen, f"Kaggle: {status}")
        self._quota = None  # the session just spent GPU time: the next placement asks again
        self._save_log(attempt.id, lines)
        return self._ended(status or "", failure, files, lines, seen)

    def _progress(self, state: AttemptState, seen: dict[str, Any], message: str) -> PollResult:
        return PollResult(state, step=seen.get("step"), heartbeat=seen.get("time"),
                          total=seen.get("total"), started_at=seen.get("first_time"), message=message)

    def _ended(self, status: str, failure: str, files: list, lines: list[str],
               seen: dict[str, Any]) -> PollResult:
        if status == "CANCEL_ACKNOWLEDGED":
            return PollResult(AttemptState.CANCELLED, step=seen.get("step"),
                              message="the Kaggle session was cancelled")
        self._scratch().mkdir(parents=True, exist_ok=True)
        found = outputs.read_exit(self.remote, files, self._scratch())
        started = (found.get("started.json") or {}).get("time") or seen.get("first_time")
        ended = found.get("exit.json")
        if ended is not None:
            state, message = classify_exit(ended.get("returncode"), ended.get("outcome"))
        elif outputs.checkpoint_files(files) and (status == "COMPLETE" or LIMIT_WORDS.search(failure)):
            state, message = AttemptState.LOST, f"Kaggle stopped the session: {failure or status}"
        else:
            state, message = AttemptState.FAILED, f"the Kaggle session ended {status}: {failure}"
        if state == AttemptState.FAILED:
            message += "; log ends with:\n" + outputs.tail(lines)
        return PollResult(state, step=seen.get("step"), heartbeat=seen.get("time"),
                          started_at=started, message=message)

    def cancel(self, attempt: Attempt) -> None:
        record = self._record_of(attempt)
        if not record.get("session_id"):
            log.warning("kaggle: no session id recorded for %s; stop it on kaggle.com", attempt.id)
            return
        error = self.remote.cancel(int(record["session_id"]))
        if error:
            log.info("kaggle: cancel %s: %s", attempt.id, error)

    def logs(self, attempt: Attempt) -> str:
        saved = self._log_path(attempt.id)
        if saved.exists():
            return saved.read_text(errors="replace")
        record = self._record_of(attempt)
        try:
            _, log_text = self.remote.outputs(record["owner"], record["slug"], record.get("version"))
        except RemoteNotFound:
            return ""
        return "\n".join(outputs.log_lines(log_text))

    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        record = self._record_of(attempt)
        files, _ = self.remote.outputs(record["owner"], record["slug"], record.get("version"))
        wanted = outputs.checkpoint_files(files)
        if not wanted:
            return []
        self._scratch().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self._scratch()) as tmp:
            outputs.fetch(self.remote, wanted, Path(tmp))  # raises before anything is published
            root = Path(tmp) / outputs.CHECKPOINTS
            return [store.import_local(folder, manifest)
                    for folder, manifest in outputs.verified_checkpoints(root)]

    def cleanup(self, attempt: Attempt) -> None:
        shutil.rmtree(self.data_dir / "staging" / attempt.id, ignore_errors=True)

    # -- local records ----------------------------------------------------------------------

    def _record_of(self, attempt: Attempt) -> dict[str, Any]:
        record = self._read_record(attempt.id)
        if record is not None:
            return record
        owner, slug, version = _parse_remote_id(attempt.remote_id, self.owner,
                                                kernel_slug(self.config.slug_prefix, attempt.id))
        return {"owner": owner, "slug": slug, "version": version, "session_id": None}

    def _record_path(self, attempt_id: str) -> Path:
        return self.data_dir / "attempts" / f"{attempt_id}.json"

    def _read_record(self, attempt_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(attempt_id).read_text())
        except (OSError, ValueError):
            return None

    def _write_record(self, attempt_id: str, record: dict[str, Any]) -> None:
        path = self._record_path(attempt_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def _log_path(self, attempt_id: str) -> Path:
        return self.data_dir / "logs" / f"{attempt_id}.log"

    def _save_log(self, attempt_id: str, lines: list[str]) -> None:
        path = self._log_path(attempt_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")

    def _scratch(self) -> Path:
        return self.data_dir / "downloads"

    @staticmethod
    def _monotonic() -> float:
        return time.monotonic()


def _submission(record: dict[str, Any], message: str) -> Submission:
    remote_id = f"{record['owner']}/{record['slug']}/{record.get('version') or 0}"
    return Submission(remote_id=remote_id, url=record.get("url"), message=message)


def _parse_remote_id(remote_id: str | None, owner: str, slug: str) -> tuple[str, str, int | None]:
    parts = (remote_id or "").split("/")
    if len(parts) == 3 and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2]) or None
    return owner, slug, None


def _session_id(url: str | None) -> int | None:
    """The kernel session id, from the push answer's ``...?scriptVersionId=N`` URL."""
    values = parse_qs(urlsplit(url or "").query).get("scriptVersionId")
    return int(values[0]) if values and values[0].isdigit() else None


def _refresh_time(error: str) -> float | None:
    """When a quota refusal says the quota refreshes (an ISO time in the text), if it does."""
    match = re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", error)
    if not match:
        return None
    return dt.datetime.strptime(match.group(), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc).timestamp()
