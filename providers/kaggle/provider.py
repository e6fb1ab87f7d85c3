"""The Kaggle provider: one private kernel per attempt, run by the real kagglesdk client.

Per attempt: a private kernel with a generated bootstrap script (kernel.py) mounts the code
dataset (one per content of the code and gpupool's runtime, shared by every attempt that runs
the same code), a dataset with the checkpoint it resumes from (its own; none on a first
attempt) and the experiment's inputs (inputs.py); see datasets.py and registry.py. The
session's ``/kaggle/working/gpupool`` comes back as its output, from which verified checkpoints
are published (outputs.py). The adapter keeps a small record per attempt (kernel version and
session id) under its data dir; a re-submit after a scheduler crash finds the kernel it pushed.

A push that gets no clear answer (a 5xx, a timeout, a reset) may still have started a session,
so it is never sent again: Kaggle is asked whether the attempt's kernel exists, now and at each
poll for ``push_settle_seconds``, and a kernel that shows up is adopted (polled, collected,
charged, cancelled, deleted like any other). Only then is the attempt given up as unavailable.
Kernels and datasets are deleted once the attempt is done with them (janitor.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupool.errors import (
    CancelFailed,
    ConfigError,
    CredentialsError,
    GpupoolError,
    ProviderUnavailable,
)
from gpupool.lifecycle import AttemptState
from gpupool.provider import (
    Availability,
    Launch,
    PollResult,
    Provider,
    Quota,
    Submission,
    runtime_env,
)
from gpupool.provider_config import Capabilities, ProviderModel

from . import livelog, outputs
from .client import KaggleRemote, KernelStatus, OutcomeUnknown, RemoteNotFound, detail
from .config import KAGGLE_CAP_SECONDS, WEEK, KaggleConfig, week_start, week_window
from .credentials import HINT, Credentials, find_credentials
from .datasets import download_input, ship_checkpoint, ship_code
from .inputs import InputPlan, InputShipper
from .janitor import Janitor, Leftover, drop_made, release_ended
from .kernel import (
    STATUS_MAP,
    dataset_slug,
    gpu_kind,
    kernel_slug,
    marker,
    render_script,
    save_request,
)
from .records import Records
from .registry import Registry

if TYPE_CHECKING:
    from gpupool.manifest import Manifest
    from gpupool.spec import ExperimentSpec, InputSpec
    from gpupool.state import Attempt
    from gpupool.store import CheckpointStore

log = logging.getLogger(__name__)
CHECK_TTL = 300.0  # seconds a credentials check or quota answer is reused
QUOTA_TTL = 60.0
ENDED = frozenset({"COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED"})
STOPPING = frozenset({"CANCEL_REQUESTED", *ENDED})
CANCEL_CHECKS = 3  # status reads to confirm a cancel took (Kaggle may take a moment)


class KaggleProvider(Provider):
    name = "kaggle"
    Config = KaggleConfig
    config: KaggleConfig
    status_map = STATUS_MAP
    capabilities = Capabilities(interactive_sign_in=True)
    input_kinds = frozenset({"local", "kaggle", "url", "drive"})  # drive: downloaded, then as local
    input_sources = frozenset({"kaggle"})  # downloaded for other providers' sessions

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._remote: KaggleRemote | None = None
        self._owner: str | None = None
        self._checked: tuple[float, bool, str] | None = None
        self._quota: tuple[float, Quota] | None = None
        self._janitor: Janitor | None = None
        self._shipper: InputShipper | None = None
        self.records = Records(self.data_dir)
        self.registry = Registry(self.data_dir / "datasets.json")

    # -- credentials and the client ---------------------------------------------------------

    @property
    def remote(self) -> KaggleRemote:
        if self._remote is None:
            self._remote = KaggleRemote(find_credentials(self.config.credentials), self.config,
                                        sleep=self.clock.sleep)
        return self._remote

    @property
    def shipper(self) -> InputShipper:
        if self._shipper is None:
            self._shipper = InputShipper(self.remote, self.config, self.owner, self.data_dir,
                                         clock=self.clock.monotonic, foreign=self.sources,
                                         registry=self.registry)
        return self._shipper

    @property
    def janitor(self) -> Janitor:
        if self._janitor is None:
            self._janitor = Janitor(self.remote, self.data_dir / "leftovers.json")
        return self._janitor

    @property
    def owner(self) -> str:
        if self._owner is None:
            creds: Credentials = self.remote.credentials
            self._owner = self.config.username or creds.username or self.remote.introspect_username()
        return self._owner

    def login(self) -> str | None:
        """The Kaggle user of the configured credentials (read locally; None if none found)."""
        try:
            return (self.config.username or find_credentials(self.config.credentials).username
                    or None)
        except CredentialsError:
            return None

    def authorize(self, *, username: str | None = None, key_file: Path | None = None,
                  prompt: Any = input, echo: Any = print, **_: Any) -> str:
        """The one sign-in (``gpupool auth kaggle``): check the API key, save it at 0600;
        see ``credentials.sign_in``. Options meant for other providers are ignored."""
        from .credentials import sign_in

        try:
            return sign_in(self, username=username, key_file=key_file, prompt=prompt, echo=echo)
        except EOFError:
            raise ConfigError("no key was typed (no input); run `gpupool auth kaggle` in a terminal, "
                              "or pass --key-file kaggle.json") from None

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
            return False, detail(err)
        try:
            owner = self.owner
            quota = self._api_quota(self.clock())
        except CredentialsError as err:
            return False, f"credentials from {source} do not work: {detail(err)}; {HINT}"
        except GpupoolError as err:
            return False, f"credentials from {source}, but Kaggle did not answer: {detail(err)}"
        left = (quota.remaining_seconds or 0) / 3600
        return True, f"user {owner} (credentials from {source}); {left:.1f} GPU-hours left this week"

    def check_inputs(self, spec: ExperimentSpec) -> list[tuple[tuple[Any, ...], str]]:
        """Also: every Kaggle input exists and is readable with this account. When Kaggle
        cannot be asked now, the check is left to the attempt (it fails with the reason)."""
        problems = super().check_inputs(spec)
        if problems or not spec.inputs:
            return problems
        try:
            return self.shipper.check(spec)
        except CredentialsError as err:  # no account to read them with: say so now
            return [(("inputs", name, "kaggle"), f"cannot read Kaggle dataset {item.kaggle}: "
                                                 f"{detail(err)}")
                    for name, item in spec.inputs.items() if item.kaggle is not None]
        except GpupoolError as err:
            log.warning("kaggle: cannot check the Kaggle inputs now (%s)", detail(err))
            return []

    def download_input(self, item: InputSpec, dest: Path) -> Path:
        """A Kaggle dataset for another provider's session (see ``datasets.download_input``)."""
        return download_input(self.remote, str(item.kaggle), dest)

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
            log.warning("kaggle: quota API failed (%s); using the ledger", detail(err))
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
        """Kaggle's week starts on Saturday 00:00 UTC (``week_start``)."""
        return week_start(now)

    def forecast_model(self) -> ProviderModel:
        """The generic model plus the weekly quota (``weekly_gpu_hours``) over Kaggle's week."""
        return replace(super().forecast_model(), quota_window=week_window,
                       quota_seconds=self.config.weekly_gpu_hours * 3600)

    # -- attempts ---------------------------------------------------------------------------

    def submit(self, launch: Launch) -> Submission:
        self.sweep()
        record = self.records.read(launch.attempt_id)
        if record is not None:
            return _submission(record, "already submitted")
        owner, slug = self.owner, kernel_slug(self.config.slug_prefix, launch.attempt_id)
        adopted = self._adopt(launch.attempt_id, owner, slug, "found kernel {ref} pushed earlier")
        if adopted is not None:
            return adopted
        # Inputs first, before anything is created for the attempt; they are the experiment's
        # (uploaded once per content, kept while it runs), so a refused push keeps them.
        plan = self.shipper.prepare(launch.spec, launch.experiment_id)
        made: list[str] = []  # datasets this attempt creates: gone again if nothing runs
        staging = self.data_dir / "staging" / launch.attempt_id
        try:
            code, files = ship_code(self.remote, self.config, owner, self.registry, launch,
                                    staging / "code", made, clock=self.clock.monotonic)
            checkpoint = ship_checkpoint(self.remote, self.config, owner, dataset_slug(slug),
                                         launch, staging / "checkpoint", made,
                                         clock=self.clock.monotonic)
            script = render_script(self._marker(launch, plan, code, files, checkpoint))
            sources = [code, *([checkpoint] if checkpoint else []), *plan.sources]
            return self._push(launch, owner, slug, script, sources, made)
        except GpupoolError:
            self._drop_made(launch.experiment_id, owner, slug, made)
            own = dataset_slug(slug) if dataset_slug(slug) in made else ""
            self.janitor.delete(Leftover(launch.attempt_id, owner, slug, own))
            raise

    def _drop_made(self, experiment: str, owner: str, slug: str, made: list[str]) -> None:
        """Nothing runs for this attempt: the shared datasets it made go (janitor.drop_made);
        its own checkpoint dataset, and any kernel, go through the janitor's list."""
        drop_made(self.remote, self.registry, experiment, owner,
                  [name for name in made if name != dataset_slug(slug)], self.clock())

    def _push(self, launch: Launch, owner: str, slug: str, script: str, sources: list[str],
              made: list[str]) -> Submission:
        request = save_request(
            owner=owner, slug=slug, script=script, sources=sources,
            private=not self.config.public, accelerator=self._accelerator(launch),
            internet=self.config.enable_internet,
            timeout_seconds=int(min(KAGGLE_CAP_SECONDS, self.config.session_seconds + 300)))
        try:
            answer, session_id = self.remote.push(request)
        except OutcomeUnknown as err:
            return self._unclear_push(launch, owner, slug, err, made)
        if answer.error:
            raise ProviderUnavailable(self.name, f"Kaggle refused the kernel: {answer.error}",
                                      _refresh_time(answer.error))
        if answer.invalid_dataset_sources:
            log.warning("kaggle: %s cannot mount %s", slug, answer.invalid_dataset_sources)
        record = {"owner": owner, "slug": slug, "version": int(answer.version_number or 0) or None,
                  "session_id": session_id, "url": answer.url or None, "pushed_at": launch.now,
                  "dataset": dataset_slug(slug) if launch.restore else ""}
        self.records.write(launch.attempt_id, record)
        return _submission(record, f"kernel {owner}/{slug} pushed")

    def _unclear_push(self, launch: Launch, owner: str, slug: str, err: OutcomeUnknown,
                      made: list[str]) -> Submission:
        """The push may have landed: adopt its kernel if Kaggle shows it, else keep asking at
        each poll (the attempt stays submitted, so nothing else is placed meanwhile)."""
        log.warning("kaggle: %s; asking Kaggle whether kernel %s/%s exists", detail(err), owner, slug)
        try:
            adopted = self._adopt(launch.attempt_id, owner, slug,
                                  "the push got no clear answer; found its kernel {ref}")
        except GpupoolError:
            adopted = None  # cannot ask now: the polls ask
        if adopted is not None:
            return adopted
        record = {"owner": owner, "slug": slug, "version": None, "session_id": None, "url": None,
                  "unconfirmed_since": launch.now, "made": made,
                  "dataset": dataset_slug(slug) if launch.restore else ""}
        self.records.write(launch.attempt_id, record)
        return _submission(record, f"the push got no clear answer ({detail(err)}); "
                                   "waiting to see whether Kaggle started the kernel")

    def _adopt(self, attempt_id: str, owner: str, slug: str, message: str) -> Submission | None:
        """Take over the kernel already pushed for this attempt (its push got no answer, or a
        scheduler crashed after pushing); None when Kaggle shows no such kernel."""
        version = self.remote.current_version(owner, slug)
        if version is None:
            return None
        record = {"owner": owner, "slug": slug, "version": version, "session_id": None, "url": None}
        self.records.write(attempt_id, record)
        return _submission(record, message.format(ref=f"{owner}/{slug} v{version}"))

    def _accelerator(self, launch: Launch) -> str | None:
        return self.config.accelerator if launch.spec.resources.wants_gpu else None

    def _marker(self, launch: Launch, plan: InputPlan, code: str, files: dict[str, str],
                checkpoint: str | None) -> dict[str, Any]:
        env = runtime_env(launch, provider=self.name)  # the kernel adds its session folder
        restore = launch.restore
        return marker(launch.attempt_id, code=code, code_files=files, checkpoint=checkpoint,
                      checkpoint_name=restore.name if restore else None,
                      setup=launch.spec.setup, run=launch.spec.run, env=env,
                      session_seconds=self.planned_session_seconds(launch) or self.config.session_seconds,
                      margin=self.config.margin, inputs=plan.items)

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        record = self._record_of(attempt)
        if record.get("unconfirmed_since") is not None:
            waiting = self._confirm_push(attempt.id, record, now)
            if waiting is not None:
                return waiting
        owner, slug, version = record["owner"], record["slug"], record.get("version")
        try:
            status = self.remote.status(owner, slug, version)
        except RemoteNotFound:
            return self._vanished(attempt, record, now)
        if status.session_id and not record.get("session_id"):
            self.records.write(attempt.id, {**record, "session_id": status.session_id})
        files, log_text = self.remote.outputs(owner, slug, version)
        lines = outputs.log_lines(log_text)
        state = STATUS_MAP.get(status.name or "")
        if not lines and state == AttemptState.RUNNING:  # Kaggle lists a log only at the end
            lines = livelog.log_so_far(self.remote, record, self.config, live=True,
                                       clock=self.clock.monotonic)
        seen = outputs.progress(outputs.events(lines))
        if state is None:
            log.warning("kaggle: %s/%s has status %s, unknown to gpupool; still polling",
                        owner, slug, status.name or status.failure)
            state = attempt.state if attempt.state.active else AttemptState.RUNNING
            return self._progress(state, seen,
                                  f"Kaggle status {status.name or status.failure} not understood")
        if not state.terminal:
            return self._progress(state, seen, f"Kaggle: {status.name}")
        self._quota = None  # the session just spent GPU time: the next placement asks again
        self.records.save_log(attempt.id, lines)
        self._scratch().mkdir(parents=True, exist_ok=True)
        return outputs.ending(self.remote, status, files, lines, seen, self._scratch())

    def _confirm_push(self, attempt_id: str, record: dict[str, Any], now: float) -> PollResult | None:
        """For a push that got no clear answer: None once its kernel shows up (adopted), else
        "still submitted" until ``push_settle_seconds`` have passed, then unavailable."""
        owner, slug = record["owner"], record["slug"]
        version = self.remote.current_version(owner, slug)
        if version is not None:
            record.update(version=version, unconfirmed_since=None)
            self.records.write(attempt_id, record)
            log.info("kaggle: the unanswered push of %s/%s landed (v%d); adopted", owner, slug, version)
            return None
        waited = now - float(record["unconfirmed_since"])
        settle = self.config.push_settle_seconds
        if waited < settle:
            return PollResult(AttemptState.SUBMITTED,
                              message=f"push got no clear answer {waited:.0f}s ago; waiting "
                                      f"(up to {settle:g}s) for Kaggle to show kernel {owner}/{slug}")
        return PollResult(AttemptState.UNAVAILABLE,
                          message=f"the push got no clear answer and no kernel {owner}/{slug} "
                                  f"appeared within {settle:g}s; nothing runs on Kaggle for it")

    def _vanished(self, attempt: Attempt, record: dict[str, Any], now: float) -> PollResult:
        """Kaggle does not show the kernel. Right after a push that may be its eventual
        consistency; a kernel seen running that disappears was deleted (or lost) on Kaggle."""
        ref = f"{record['owner']}/{record['slug']}"
        pushed = record.get("pushed_at")
        settling = pushed is not None and now - float(pushed) < self.config.push_settle_seconds
        if attempt.state == AttemptState.SUBMITTED and settling:
            return PollResult(AttemptState.SUBMITTED, message=f"Kaggle does not show {ref} yet")
        return PollResult(AttemptState.LOST, message=f"Kaggle no longer has kernel {ref} "
                                                     "(deleted on kaggle.com?)")

    def _progress(self, state: AttemptState, seen: dict[str, Any], message: str) -> PollResult:
        return PollResult(state, step=seen.get("step"), heartbeat=seen.get("time"),
                          total=seen.get("total"), started_at=seen.get("first_time"), message=message)

    def cancel(self, attempt: Attempt) -> None:
        """Stop the attempt's session, or raise CancelFailed saying what the person must do.

        Returns only when the session is stopping or already over. Kaggle stops a session by
        its id (``CancelKernelSession``), which its public API does not reveal today (status
        and push answers carry none; kaggle-cli #1169, PR #1174): the id is used when an
        answer carries ``kernelSessionId``, and otherwise the person is told where to stop it.
        """
        record = self._record_of(attempt)
        action = f"stop it at https://www.kaggle.com/code/{record['owner']}/{record['slug']}"
        try:
            self._cancel(attempt, record, action)
        except CancelFailed:
            raise
        except GpupoolError as err:  # Kaggle did not answer: what runs, runs on
            raise CancelFailed(self.name, f"could not reach Kaggle to stop {record['slug']}: "
                                          f"{detail(err)}", action) from None

    def _cancel(self, attempt: Attempt, record: dict[str, Any], action: str) -> None:
        owner, slug, version = record["owner"], record["slug"], record.get("version")
        if record.get("unconfirmed_since") is not None and version is None:
            if self.remote.current_version(owner, slug) is None:
                raise CancelFailed(self.name, f"the push of {owner}/{slug} got no clear answer "
                                              "and Kaggle shows no kernel yet",
                                   f"if it appears, {action}")
        try:
            status = self.remote.status(owner, slug, version)
        except RemoteNotFound:
            return  # no kernel: nothing runs
        if status.name not in STOPPING:
            self._request_stop(record, status, action)
        self.janitor.remember(Leftover(attempt.id, owner, slug, _own_dataset(record),
                                       after_end=True))

    def _request_stop(self, record: dict[str, Any], status: KernelStatus, action: str) -> None:
        ref = f"{record['owner']}/{record['slug']}"
        session_id = record.get("session_id") or status.session_id
        if not session_id:
            raise CancelFailed(self.name, f"Kaggle's API does not give the session id of kernel "
                                          f"{ref}, so gpupool cannot stop it", action)
        try:
            error = self.remote.cancel(int(session_id))
        except GpupoolError as err:
            raise CancelFailed(self.name, f"cancelling {ref} failed: {detail(err)}", action) from None
        for check in range(CANCEL_CHECKS):
            now = self.remote.status(record["owner"], record["slug"], record.get("version"))
            if now.name in STOPPING:
                return
            if check + 1 < CANCEL_CHECKS:
                self.clock.sleep(self.config.backoff_base)
        raise CancelFailed(self.name, f"Kaggle did not stop {ref} ({error or now.name})", action)

    def logs(self, attempt: Attempt) -> str:
        """The session's log: the saved copy once it ended, else what Kaggle shows now (a
        running session's live stream so far, in whole lines); "" when none can be read."""
        saved = self.records.log_path(attempt.id)
        if saved.exists():
            return saved.read_text(errors="replace")
        try:
            record = self._record_of(attempt)
        except GpupoolError as err:  # e.g. no credentials to name the kernel's owner
            log.warning("kaggle: cannot find the kernel of %s (%s)", attempt.id, detail(err))
            return ""
        lines = livelog.log_so_far(self.remote, record, self.config, live=attempt.state.active,
                                   clock=self.clock.monotonic)
        return "".join(line + "\n" for line in lines)

    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        record = self._record_of(attempt)
        try:
            files, _ = self.remote.outputs(record["owner"], record["slug"], record.get("version"))
        except RemoteNotFound:
            return []  # no kernel (its push never landed): nothing to collect
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
        """After collect: keep the log locally, then delete the attempt's kernel and dataset
        (retried later when Kaggle does not answer now)."""
        shutil.rmtree(self.data_dir / "staging" / attempt.id, ignore_errors=True)
        if self.config.keep_remote_objects:
            return
        record = self._record_of(attempt)
        if record.get("version") is None:  # its push never landed: as for a refused push
            self._drop_made(attempt.experiment_id, record["owner"], record["slug"],
                            record.get("made", []))
        item = Leftover(attempt.id, record["owner"], record["slug"], _own_dataset(record))
        if self._keep_log(item):
            self.janitor.delete(item)
        else:
            self.janitor.remember(item)
        self.sweep()

    def release(self, ended: Callable[[str], bool], now: float) -> None:
        """Shared datasets of experiments that ended are freed (janitor.release_ended; code at
        once, inputs after ``unused_input_days``), unless ``keep_remote_objects``."""
        if not self.config.keep_remote_objects:
            keep = {"code": 0.0, "input": self.config.unused_input_days * 86400}
            release_ended(lambda: (self.remote, self.owner), self.registry, ended, now, keep)

    def sweep(self) -> None:
        """Retry deletions that failed before, and those that waited for a session to end."""
        for item in self.janitor.pending():
            try:
                if item.after_end and not self._session_over(item):
                    continue
            except GpupoolError:
                continue
            if self._keep_log(item):
                self.janitor.delete(item)

    def _session_over(self, item: Leftover) -> bool:
        try:
            return self.remote.status(item.owner, item.kernel, None).name in ENDED
        except RemoteNotFound:
            return True

    def _keep_log(self, item: Leftover) -> bool:
        """Save the attempt's log locally before its kernel goes; False when Kaggle cannot
        give it now (the deletion waits, so ``gpupool logs`` keeps working)."""
        if self.records.log_path(item.attempt).exists():
            return True
        try:
            _, log_text = self.remote.outputs(item.owner, item.kernel, None)
        except RemoteNotFound:
            return True  # no kernel, no log
        except GpupoolError:
            return False
        self.records.save_log(item.attempt, outputs.log_lines(log_text))
        return True

    # -- local records ----------------------------------------------------------------------

    def _record_of(self, attempt: Attempt) -> dict[str, Any]:
        record = self.records.read(attempt.id)
        if record is not None:
            return record
        owner, slug, version = _parse_remote_id(attempt.remote_id, self.owner,
                                                kernel_slug(self.config.slug_prefix, attempt.id))
        return {"owner": owner, "slug": slug, "version": version, "session_id": None}

    def _scratch(self) -> Path:
        return self.data_dir / "downloads"


def _submission(record: dict[str, Any], message: str) -> Submission:
    remote_id = f"{record['owner']}/{record['slug']}/{record.get('version') or 0}"
    return Submission(remote_id=remote_id, url=record.get("url"), message=message)


def _own_dataset(record: dict[str, Any]) -> str:
    """The attempt's checkpoint dataset ("" when it had none; older records: by its slug)."""
    return str(record.get("dataset", dataset_slug(record["slug"])))


def _parse_remote_id(remote_id: str | None, owner: str, slug: str) -> tuple[str, str, int | None]:
    parts = (remote_id or "").split("/")
    if len(parts) == 3 and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2]) or None
    return owner, slug, None


def _refresh_time(error: str) -> float | None:
    """When a quota refusal says the quota refreshes (an ISO time in the text), if it does."""
    match = re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", error)
    if not match:
        return None
    return dt.datetime.strptime(match.group(), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc).timestamp()
