"""The Colab provider and its notebook agent when Drive misbehaves (issue 12): inserts whose
answer is lost, stop requests, a full Drive, stalled transfers."""

from __future__ import annotations

import json
import threading
import time
import webbrowser
from pathlib import Path

import pytest

from gpupool.errors import CancelFailed, RemoteNotFound
from gpupool.lifecycle import AttemptState
from gpupool.manifest import publish_local
from gpupool.scheduler import Scheduler
from gpupool_providers.colab.agent import Heartbeat, Reporter, Uploader, check_stop, install
from gpupool_providers.colab.agent_drive import DriveREST
from tests.emulators.drive import FOLDER_MIME, drive_emulator_fixture, faults  # noqa: F401
from tests.providers.colab_support import make_pool, make_provider, mlp_spec

MB = 1024 * 1024


@pytest.fixture(autouse=True)
def no_browser(monkeypatch):
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    monkeypatch.setattr(webbrowser, "open", lambda *a, **k: pytest.fail("a browser was opened"))


def submitted(drive_emulator, tmp_path, **settings):
    colab = make_provider(drive_emulator, tmp_path, **settings)
    pool = make_pool(tmp_path, colab=colab)
    experiment = pool.submit(mlp_spec(["colab"]))
    Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    assert attempt.state == AttemptState.SUBMITTED, attempt.end_reason
    return colab, pool, experiment, attempt


def agent_drive(drive, **kwargs) -> DriveREST:
    token = drive.state.issue_access_token()
    return DriveREST(drive.base_url, lambda: token, chunk=256 * 1024, sleep=lambda s: None,
                     **kwargs)


def live(drive_emulator, title, parent=None):
    return [f for f in drive_emulator.state.find(title, parent=parent)
            if not drive_emulator.state.is_trashed(f)]


def session_checkpoint(session: Path, step: int, size: int = 300_000, keep: int | None = None):
    """A checkpoint as the runtime publishes it in the session folder (older ones pruned
    locally to ``keep``, as the runtime does)."""
    staging = session / f"staging-{step}"
    staging.mkdir(parents=True)
    (staging / "state.pt").write_bytes(bytes([step % 251]) * size)
    root = session / "checkpoints"
    manifest = publish_local(staging, root, step=step, attempt="a1", provider="colab")
    if keep is not None:
        import shutil

        for old in sorted(root.glob("ckpt-*"))[:-keep]:
            shutil.rmtree(old)
    return manifest


class Agent:
    """The notebook's threads against one attempt folder, driven by the test (no kernel)."""

    def __init__(self, drive_emulator, colab, attempt, tmp_path, keep_last=None, **drive_options):
        self.folder = colab.records.get(attempt.id)["folder_id"]
        self.session = tmp_path / "agent-session"
        (self.session / "checkpoints").mkdir(parents=True)
        self.drive = agent_drive(drive_emulator, **drive_options)
        self.reporter = Reporter(self.drive, self.folder, tmp_path)
        self.uploader = Uploader(self.drive, self.folder, self.session, self.reporter, 0.05,
                                 keep_last=keep_last)
        self.stops: list[str] = []
        self.heartbeat = Heartbeat(self.reporter, self.session, self.uploader, 0.05,
                                   lambda: self.stops.append("stop"))


# -- kind 1: a non-idempotent call whose outcome is unknown is resolved by asking --------------

@pytest.mark.parametrize("lost", [faults.lost_answer(500), faults.lost_answer()],
                         ids=["answer-500", "answer-reset"])
def test_provider_folder_insert_with_lost_answer_makes_one_folder(drive_emulator, tmp_path, lost):
    colab = make_provider(drive_emulator, tmp_path)
    drive_emulator.inject("files.insert", lost, times=2)
    first = colab.drive().folder_path("gpupool", "attempts")
    assert colab.drive().folder_path("gpupool", "attempts") == first
    assert len(live(drive_emulator, "gpupool")) == 1
    assert len(live(drive_emulator, "attempts")) == 1


@pytest.mark.parametrize("lost", [faults.lost_answer(503), faults.lost_answer()],
                         ids=["answer-503", "answer-reset"])
def test_provider_upload_whose_last_answer_is_lost_makes_one_file(drive_emulator, tmp_path, lost):
    colab = make_provider(drive_emulator, tmp_path)
    data = bytes(range(256)) * 2000  # two chunks; the second (last) one's answer is lost
    drive_emulator.inject("upload.chunk", faults.Fault())  # the first chunk goes through
    drive_emulator.inject("upload.chunk", lost)
    item = colab.drive().upload("root", "one.bin", data)
    [only] = live(drive_emulator, "one.bin")
    assert only.id == item["id"] and only.content == data


def test_agent_folder_and_uploads_with_lost_answers_make_one_object_each(drive_emulator,
                                                                          tmp_path):
    drive = agent_drive(drive_emulator)
    drive_emulator.inject("files.insert", faults.lost_answer(500))
    folder = drive.folder("root", "checkpoints")
    assert drive.folder("root", "checkpoints") == folder
    path = tmp_path / "manifest.json"
    path.write_bytes(b"{}" * 1000)
    drive_emulator.inject("upload.chunk", faults.lost_answer())
    drive.upload(folder, "manifest.json", path)
    drive.upload(folder, "manifest.json", path)  # sent again by a later sync: kept, not doubled
    assert len(live(drive_emulator, "checkpoints")) == 1
    assert len(live(drive_emulator, "manifest.json")) == 1
    path.write_bytes(b"new")  # other bytes under one name replace the old file
    drive.upload(folder, "manifest.json", path)
    assert [f.content for f in live(drive_emulator, "manifest.json")] == [b"new"]


def test_checkpoint_pushed_again_after_a_failure_is_not_duplicated(drive_emulator, tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    first = Agent(drive_emulator, colab, attempt, tmp_path)
    session_checkpoint(first.session, 100)
    drive_emulator.inject("upload.chunk", faults.Fault())
    drive_emulator.inject("upload.chunk", faults.lost_answer(500), times=3)
    first.uploader.round()
    assert first.uploader.error is None
    # the same checkpoint pushed again (a sync whose outcome was not recorded, a re-run cell)
    again = Uploader(first.drive, first.folder, first.session, first.reporter, 1)
    again.round()
    for title in ("checkpoints", "state.pt", "manifest.json"):
        assert len(live(drive_emulator, title)) == 1, title
    [manifest] = colab.collect(attempt, pool.store_for(experiment.id))
    assert manifest.step == 100


def test_a_submit_repeated_after_a_crash_leaves_one_of_each_file(drive_emulator, tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    (colab.records.root / f"{attempt.id}.json").unlink()  # crashed before recording it
    from gpupool.provider import Launch

    launch = Launch(attempt.id, experiment.id, "default", mlp_spec(["colab"]),
                    Path(experiment.bundle), pool.store_for(experiment.id), None, 60, time.time())
    again = colab.submit(launch)
    notebooks = [f for f in drive_emulator.state.listing() if f.title.endswith(".ipynb")]
    assert [f.id for f in notebooks] == [again.url.rsplit("/", 1)[1]]  # one live link
    folder = live(drive_emulator, f"attempt-{attempt.id}")
    assert len(folder) == 1
    titles = [f.title for f in drive_emulator.state.children(folder[0].id)]
    assert sorted(titles) == sorted(set(titles)) and len(titles) == 3, titles


# -- kind 2: an attempt gpupool gives up on is told to stop, or gpupool says it cannot --------

def test_heartbeat_sees_the_stop_request_while_an_upload_stalls(drive_emulator, tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    agent = Agent(drive_emulator, colab, attempt, tmp_path)
    agent.heartbeat.beat()
    session_checkpoint(agent.session, 10)
    release = threading.Event()
    drive_emulator.inject("upload.chunk", faults.stall_until(release))
    agent.uploader.start()
    try:
        while drive_emulator.held == 0:  # wait until the upload is stuck
            time.sleep(0.01)
        colab.cancel(attempt)  # the scheduler gave the attempt up (lost) and asks it to stop
        agent.heartbeat.beat()
        assert agent.stops == ["stop"]
        assert agent.uploader.stopping.is_set()  # nothing more is pushed for a given-up attempt
        assert colab.read_status(attempt)["state"] == "stopped"
        assert drive_emulator.held == 1  # the heartbeat did not wait for the stalled upload
    finally:
        release.set()
        agent.uploader.stopping.set()
        agent.uploader.join()


def test_a_notebook_started_after_its_attempt_was_stopped_does_not_train(drive_emulator,
                                                                         tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    agent = Agent(drive_emulator, colab, attempt, tmp_path)
    check_stop(agent.reporter)  # no stop request: goes on
    colab.cancel(attempt)
    colab.cancel(attempt)  # asked twice: still one request
    assert len(live(drive_emulator, "cancel.json")) == 1
    with pytest.raises(SystemExit, match="stopped this attempt"):
        check_stop(agent.reporter)
    assert colab.read_status(attempt)["state"] == "stopped"


def test_a_session_whose_attempt_was_cleaned_up_stops(drive_emulator, tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    agent = Agent(drive_emulator, colab, attempt, tmp_path)
    agent.heartbeat.beat()
    colab.cleanup(attempt)  # the attempt ended on gpupool's side: its status file is gone
    agent.heartbeat.beat()
    assert agent.stops == ["stop"]


def test_cancel_that_cannot_reach_drive_raises_cancel_failed_with_the_action(drive_emulator,
                                                                            tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    drive_emulator.inject("*", faults.server_error(500), times=200)
    with pytest.raises(CancelFailed) as caught:
        colab.cancel(attempt)
    assert "Disconnect and delete runtime" in caught.value.action
    assert attempt.url in caught.value.action


def test_drive_answering_404_is_gpupools_error_not_a_missing_local_file(drive_emulator, tmp_path):
    """Issue 13 item 2: Drive's 404 enters as ``RemoteNotFound`` (a ProviderError naming
    colab), not as the builtin FileNotFoundError a missing local file raises."""
    colab = make_provider(drive_emulator, tmp_path)
    drive = colab.drive()
    with pytest.raises(RemoteNotFound) as caught:
        drive.read("no-such-file")
    assert not isinstance(caught.value, OSError) and str(caught.value).startswith("colab: ")
    drive.delete("no-such-file")  # deleting what is gone already is done, not an error


def test_stop_request_reaches_a_running_notebook_which_saves_and_stops(drive_emulator, tmp_path):
    from tests.providers.colab_support import Person

    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    experiment = pool.submit(mlp_spec(["colab"], TOTAL_STEPS="100000000"))
    Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    person = Person(drive_emulator, attempt.url, tmp_path / "session")
    person.start()
    while (colab.read_status(attempt) or {}).get("step") is None:  # training has begun
        assert person.is_alive(), person.error
        time.sleep(0.2)
    colab.cancel(attempt)
    person.join(120)
    assert not person.is_alive() and person.error is None, person.error
    status = colab.read_status(attempt)
    assert status["state"] == "stopped", status
    assert status["step"] < 100000000
    assert colab.poll(attempt, time.time()).state == AttemptState.CANCELLED


# -- kind 3: storage does not fill up ----------------------------------------------------------

def test_keep_last_holds_on_drive_during_the_session(drive_emulator, tmp_path):
    """The case: 6 MB quota, 1 MB checkpoints, keep_last 2, 8 checkpoints -> step 800."""
    drive_emulator.state.quota_bytes = 6 * MB
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    agent = Agent(drive_emulator, colab, attempt, tmp_path, keep_last=2)
    for step in range(100, 900, 100):
        session_checkpoint(agent.session, step, size=MB, keep=2)
        agent.uploader.round()
        assert agent.uploader.error is None, (step, agent.uploader.error)
        checkpoints = live(drive_emulator, "checkpoints")[0]
        assert len(drive_emulator.state.children(checkpoints.id)) <= 2
    store = pool.store_for(experiment.id)
    collected = colab.collect(attempt, store)
    assert store.latest().step == 800
    assert sorted(m.step for m in collected) == [700, 800]
    assert drive_emulator.state.bytes_used(in_trash_only=True) == 0


def test_cleanup_deletes_for_good_and_keeps_only_the_log_and_stop_request(drive_emulator,
                                                                         tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    agent = Agent(drive_emulator, colab, attempt, tmp_path)
    agent.heartbeat.beat()
    (agent.session / "log.txt").write_text("training...\n")
    session_checkpoint(agent.session, 5)
    agent.uploader.round()
    colab.cancel(attempt)
    colab.collect(attempt, pool.store_for(experiment.id))
    colab.cleanup(attempt)
    folder = drive_emulator.state.get(agent.folder)
    left = sorted(f.title for f in drive_emulator.state.children(folder.id))
    assert left == ["cancel.json", "log.txt"]
    assert drive_emulator.state.bytes_used(in_trash_only=True) == 0
    assert "training..." in colab.logs(attempt)


def test_a_refused_submit_leaves_nothing_on_drive(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path)
    colab.drive().folder_path("gpupool", "attempts")
    drive_emulator.state.quota_bytes = drive_emulator.state.bytes_used() + 20_000
    pool = make_pool(tmp_path, colab=colab)
    experiment = pool.submit(mlp_spec(["colab"]))
    Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    assert attempt.state != AttemptState.SUBMITTED
    [attempts] = live(drive_emulator, "attempts")
    assert drive_emulator.state.children(attempts.id) == []


# -- kind 8: a session that cannot do its work says so at once --------------------------------

def test_drive_full_is_reported_within_one_heartbeat_and_stops_training(drive_emulator,
                                                                       tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path, heartbeat_timeout=600)
    agent = Agent(drive_emulator, colab, attempt, tmp_path)
    agent.heartbeat.beat()
    drive_emulator.state.quota_bytes = drive_emulator.state.bytes_used() + 100_000
    session_checkpoint(agent.session, 50, size=MB)
    agent.uploader.round()
    assert agent.uploader.fatal is not None
    agent.heartbeat.beat()  # the next heartbeat
    assert agent.stops == ["stop"]
    agent.heartbeat.beat()  # later beats keep the reason (and stop training only once)
    assert agent.stops == ["stop"]
    now = time.time()
    result = colab.poll(attempt, now)
    assert result.state == AttemptState.UNAVAILABLE
    assert "Drive storage is full" in result.message
    assert "disconnected" not in result.message
    rest = now + colab.config.drive_full_cooldown
    assert result.unavailable_until == rest and not result.quota_spent  # space, not GPU time
    Scheduler(pool).reconcile_once(now)  # ends the attempt: the account rests until then
    cooldown = pool.state.cooldowns()[("colab", attempt.account)]
    assert cooldown.until == rest and "Drive storage is full" in cooldown.reason


def test_refused_credentials_are_reported_within_one_heartbeat(drive_emulator, tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    agent = Agent(drive_emulator, colab, attempt, tmp_path)
    agent.heartbeat.beat()
    session_checkpoint(agent.session, 50)
    drive_emulator.inject("files.insert", faults.token_expired(), times=20)
    agent.uploader.round()
    drive_emulator.faults.clear()
    agent.heartbeat.beat()
    result = colab.poll(attempt, time.time())
    assert result.state == AttemptState.LOST
    assert "401" in result.message and "disconnected" not in result.message


@pytest.mark.parametrize("signed_in", [False, True], ids=["fresh-auth", "auth-in-use"])
def test_gdrive_store_import_is_not_blocked_by_a_stalled_upload(drive_emulator, tmp_path,
                                                                signed_in):
    from gpupool.store import CheckpointStore
    from gpupool_providers.colab.fs import register
    from tests.emulators.drive import LoopbackGoogleAuth, emulator_settings, write_credentials_file

    register()
    creds = write_credentials_file(tmp_path / "creds.json", drive_emulator)
    auth = LoopbackGoogleAuth(drive_emulator, settings=emulator_settings(drive_emulator, creds))
    if signed_in:  # its Http objects exist already, built without a timeout
        auth.LocalWebserverAuth()
        auth.Authorize()
    store = CheckpointStore("gdrive://gpupool/ck", google_auth=auth, request_timeout=1,
                            retry_delay=0, skip_instance_cache=True)
    manifest = session_checkpoint(tmp_path / "local", 3)
    release = threading.Event()
    drive_emulator.inject("upload.chunk", faults.stall_until(release))
    try:
        store.import_local(tmp_path / "local" / "checkpoints" / manifest.name, manifest)
        assert drive_emulator.held == 1  # finished while the stalled request still hangs
    finally:
        release.set()
    assert store.latest() == manifest
    for title in ("state.pt", "manifest.json", manifest.name):
        assert len(live(drive_emulator, title)) == 1, title


@pytest.mark.parametrize("lost", [faults.lost_answer(500), faults.lost_answer()],
                         ids=["answer-500", "answer-reset"])
def test_gdrive_store_with_lost_insert_answers_has_one_object_per_name(drive_emulator, tmp_path,
                                                                       lost):
    """The case: a folder insert whose answer is lost made two folders of one name, and two
    manifest.json in one checkpoint folder."""
    from gpupool.store import CheckpointStore
    from gpupool_providers.colab.fs import register
    from tests.emulators.drive import LoopbackGoogleAuth, emulator_settings, write_credentials_file

    register()
    creds = write_credentials_file(tmp_path / "creds.json", drive_emulator)
    auth = LoopbackGoogleAuth(drive_emulator, settings=emulator_settings(drive_emulator, creds))
    slept: list[float] = []
    store = CheckpointStore("gdrive://gpupool/ck", google_auth=auth, retry_delay=0.5,
                            sleep=slept.append, skip_instance_cache=True)
    manifest = session_checkpoint(tmp_path / "local", 4)
    drive_emulator.inject("files.insert", lost, times=3)
    drive_emulator.inject("upload.chunk", lost, times=3)
    store.import_local(tmp_path / "local" / "checkpoints" / manifest.name, manifest)
    assert store.latest() == manifest
    assert slept and all(0 < s <= 20 for s in slept)  # backed off, on the store's own sleep
    for title in ("gpupool", "ck", manifest.name, "state.pt", "manifest.json"):
        assert len(live(drive_emulator, title)) == 1, title
    assert store.prune(0) == [manifest.name]
    assert drive_emulator.state.bytes_used() == 0  # deleted for good, not trashed


def test_a_failing_upload_is_shown_while_the_session_keeps_beating(drive_emulator, tmp_path):
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    agent = Agent(drive_emulator, colab, attempt, tmp_path, retries=1)
    agent.heartbeat.beat()
    session_checkpoint(agent.session, 20)
    drive_emulator.inject("files.list", faults.service_unavailable(), times=8)
    agent.uploader.round()  # Drive answers 503 past the retries: try again next round
    drive_emulator.faults.clear()
    assert agent.uploader.error is not None and agent.uploader.fatal is None
    agent.heartbeat.beat()
    result = colab.poll(attempt, time.time())
    assert result.state == AttemptState.RUNNING and agent.stops == []
    assert "checkpoint upload failing" in result.message and "503" in result.message
    agent.uploader.round()
    agent.heartbeat.beat()
    assert colab.poll(attempt, time.time()).message is None


def test_heartbeats_go_on_while_the_session_downloads_its_inputs(drive_emulator, tmp_path,
                                                                  monkeypatch):
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # prepare() adds the runtime it unpacked
    colab, pool, experiment, attempt = submitted(drive_emulator, tmp_path)
    agent = Agent(drive_emulator, colab, attempt, tmp_path)
    agent.reporter.status("starting")
    first = colab.read_status(attempt)["time"]
    params = {"ATTEMPT_FOLDER_ID": agent.folder, "SESSION_ENV": {}, "SESSION_SECONDS": 60,
              "DEADLINE_MARGIN": 0, "RUN": "true", "HEARTBEAT_SECONDS": 0.05}
    release = threading.Event()
    drive_emulator.inject("files.download", faults.stall_until(release))  # a slow download
    work = tmp_path / "work"
    installing = threading.Thread(target=install, args=(agent.drive, agent.reporter, params, work))
    installing.start()
    try:
        while drive_emulator.held == 0:
            time.sleep(0.01)
        deadline = time.monotonic() + 20  # bounds a failure only; a pass comes in 0.05 s
        while colab.read_status(attempt)["time"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        status = colab.read_status(attempt)
        assert status["time"] > first and status["state"] == "starting"
        assert drive_emulator.held == 1  # while the download still hangs
    finally:
        release.set()
        installing.join()
    assert (work / "runtime" / "gpupool").is_dir()


@pytest.mark.parametrize("status, reason, kind", [
    (403, "storageQuotaExceeded", "storage-full"), (401, "authError", "credentials"),
    (403, "insufficientPermissions", "credentials"), (403, "dailyLimitExceeded", None),
    (403, "userRateLimitExceeded", None), (404, "notFound", "gone"), (500, "backendError", None)])
def test_the_agent_tells_lasting_drive_failures_from_passing_ones(status, reason, kind):
    from gpupool_providers.colab.agent_drive import DriveFailure

    body = json.dumps({"error": {"errors": [{"reason": reason}], "code": status}}).encode()
    assert DriveFailure("x", status, body).kind == kind


def test_the_restore_copy_is_freed_once_the_session_pushed_its_own(drive_emulator, tmp_path):
    from gpupool_providers.colab.agent import restore

    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    experiment = pool.submit(mlp_spec(["colab"]))
    earlier = session_checkpoint(tmp_path / "earlier", 40)
    pool.store_for(experiment.id).import_local(
        tmp_path / "earlier" / "checkpoints" / earlier.name, earlier)
    Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    agent = Agent(drive_emulator, colab, attempt, tmp_path)
    work = tmp_path / "work"
    assert restore(agent.drive, agent.folder, earlier.name, work).name == earlier.name
    assert live(drive_emulator, "restore")
    own = session_checkpoint(agent.session, 60)
    agent.uploader.round()
    assert not live(drive_emulator, "restore")  # its quota is free again
    # the person runs the notebook again after a disconnect: it resumes from its own newest
    assert restore(agent.drive, agent.folder, earlier.name, work).name == own.name


def test_who_stopped_the_command_reaches_classify_exit_only_when_recorded(monkeypatch):
    import gpupool_providers.colab.provider as colab_provider

    seen = []

    def classify_exit(returncode, outcome, stopped_by="not-recorded"):
        seen.append(stopped_by)
        return AttemptState.LOST, "x"

    monkeypatch.setattr(colab_provider, "classify_exit", classify_exit)
    colab_provider._classify_exit({"returncode": -15, "outcome": None, "stopped_by": "signal"})
    colab_provider._classify_exit({"returncode": -15, "outcome": None})  # an older notebook
    assert seen == ["signal", "not-recorded"]
