"""The Colab provider against the Drive emulator: submit, poll, collect, quota, faults, secrets."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import webbrowser
from pathlib import Path

import pytest

from gpupool.clock import SystemClock
from gpupool.errors import CredentialsError
from gpupool.lifecycle import AttemptState
from gpupool.manifest import publish_local
from gpupool.provider import Launch
from gpupool.quota import gpu_seconds_left
from gpupool.scheduler import Scheduler
from gpupool_providers.colab.agent import DriveFailure, DriveREST, Uploader
from tests.emulators.drive import DriveEmulator, drive_emulator_fixture, faults  # noqa: F401
from tests.providers.colab_support import make_pool, make_provider, mlp_spec, notebook_id


@pytest.fixture(autouse=True)
def no_browser(monkeypatch):
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a browser was opened")

    monkeypatch.setattr(webbrowser, "open", refuse)


def submit(pool, scheduler, spec):
    experiment = pool.submit(spec)
    scheduler.reconcile_once(time.time())
    return experiment, pool.state.attempts(experiment.id)[0]


def folder_of(colab, attempt) -> str:
    return colab.records.get(attempt.id)["folder_id"]


def write_status(drive, colab, attempt, **doc):
    folder = folder_of(colab, attempt)
    data = json.dumps({"time": time.time(), "started": time.time(), **doc}).encode()
    existing = colab.drive().find(folder, "status.json")
    if existing:
        colab.drive().update(existing["id"], data)
    else:
        colab.drive().upload(folder, "status.json", data, "application/json")


def test_submit_puts_a_colab_notebook_on_drive_and_is_idempotent(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    experiment, attempt = submit(pool, Scheduler(pool), mlp_spec(["colab"]))
    item = drive_emulator.state.get(notebook_id(attempt.url))
    assert item.mime_type == "application/vnd.google.colaboratory"
    nb = json.loads(item.content)
    assert nb["metadata"]["accelerator"] == "GPU"
    assert [c["metadata"].get("tags") for c in nb["cells"]][1] == ["parameters"]
    assert "Run all" in attempt.detail
    launch = Launch(attempt.id, experiment.id, "default", mlp_spec(["colab"]),
                    Path(experiment.bundle), pool.store_for(experiment.id), None, 60, time.time())
    assert colab.submit(launch).url == attempt.url
    assert colab.poll(pool.state.attempts(experiment.id)[0], time.time()).state == \
        AttemptState.SUBMITTED


def test_poll_reads_heartbeats_and_declares_stale_sessions_lost(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path, heartbeat_timeout=60)
    pool = make_pool(tmp_path, colab=colab)
    _, attempt = submit(pool, Scheduler(pool), mlp_spec(["colab"]))
    write_status(drive_emulator, colab, attempt, state="running", step=42, total=100)
    result = colab.poll(attempt, time.time())
    assert (result.state, result.step, result.total) == (AttemptState.RUNNING, 42, 100)
    assert colab.poll(attempt, time.time() + 61).state == AttemptState.LOST
    write_status(drive_emulator, colab, attempt, state="finished", returncode=0, outcome="done")
    assert colab.poll(attempt, time.time()).state == AttemptState.SUCCEEDED
    colab.cancel(attempt)
    assert colab.drive().find(folder_of(colab, attempt), "cancel.json") is not None


def test_quota_is_an_estimate_and_no_gpu_cools_colab_down(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path, estimated_gpu_hours_per_day=2,
                          no_gpu_cooldown=3600)
    quota = colab.quota("default", time.time(), charged=1800)
    assert (quota.source, quota.remaining_seconds) == ("estimate", 5400)
    assert colab.quota_window_start(1000.0) == 1000.0 - 86400
    pool = make_pool(tmp_path, colab=colab)
    scheduler = Scheduler(pool)
    _, attempt = submit(pool, scheduler, mlp_spec(["colab"]))
    write_status(drive_emulator, colab, attempt, state="no-gpu")
    now = time.time()
    result = colab.poll(attempt, now)  # Colab says when, through the interface's answer
    assert (result.state, result.unavailable_until, result.quota_spent) == (
        AttemptState.UNAVAILABLE, now + 3600, True)
    scheduler.reconcile_once(now)  # the scheduler records the cool-down: the one owner
    [view] = scheduler.candidates(mlp_spec(["colab"]), now + 60)
    assert (view.unavailable_until, view.unavailable_reason) == (
        now + 3600, "Colab gave no GPU (usage limits reached?)")
    spent = gpu_seconds_left(pool.state, colab, "default", now + 60)
    assert (spent.remaining_seconds, spent.resets_at, spent.source) == (0, now + 3600, "estimate")
    after = gpu_seconds_left(pool.state, colab, "default", now + 3601)
    assert after.remaining_seconds == pytest.approx(7200, abs=5) and after.resets_at is None
    [view] = scheduler.candidates(mlp_spec(["colab"]), now + 3601)
    assert view.available and view.unavailable_until is None and view.remaining_seconds > 7000
    assert not (colab.data_dir / "cooldowns.json").exists()


def test_notebooks_not_opened_back_off_longer_each_time_and_spend_no_quota(drive_emulator,
                                                                          tmp_path):
    colab = make_provider(drive_emulator, tmp_path, start_timeout=10)
    pool = make_pool(tmp_path, colab=colab)
    scheduler = Scheduler(pool)
    experiment = pool.submit(mlp_spec(["colab"]))
    t = time.time()
    rests = []
    for _ in range(3):
        scheduler.reconcile_once(t)  # a notebook goes to Drive; nobody opens it
        t += 11
        scheduler.reconcile_once(t)  # given up: Colab rests, then the experiment waits
        cooldown = pool.state.cooldowns()[("colab", "default")]
        assert "not opened in time" in cooldown.reason and not cooldown.quota_spent
        rests.append(cooldown.until - t)
        assert gpu_seconds_left(pool.state, colab, "default", t).remaining_seconds == 4 * 3600
        t = cooldown.until + 1
    assert rests == [60, 120, 240]
    assert [a.state for a in pool.state.attempts(experiment.id)] == [AttemptState.UNAVAILABLE] * 3


def test_revoked_credentials_give_a_clear_error_and_no_browser(drive_emulator, tmp_path):
    drive_emulator.state.revoke_refresh_token()
    colab = make_provider(drive_emulator, tmp_path)
    ok, hint = colab.check_credentials()
    assert not ok and "gpupool auth colab" in hint
    with pytest.raises(CredentialsError, match="gpupool auth colab"):
        colab.drive()


def test_service_account_is_refused_with_the_storage_quota_reason(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path)
    colab.config.client_secrets.write_text(json.dumps({"type": "service_account"}))
    ok, hint = colab.check_credentials()
    assert not ok and "no Drive storage quota" in hint


def test_rate_limits_5xx_and_resets_are_retried_with_backoff(drive_emulator, tmp_path):
    slept: list[float] = []
    colab = make_provider(drive_emulator, tmp_path, SystemClock(sleep=slept.append))
    drive_emulator.inject("files.list", faults.rate_limit(), times=2)
    drive_emulator.inject("files.insert", faults.server_error(503))
    drive_emulator.inject("files.list", faults.too_many_requests())
    drive_emulator.inject("upload.chunk", faults.connection_reset())
    pool = make_pool(tmp_path, colab=colab)
    experiment, attempt = submit(pool, Scheduler(pool), mlp_spec(["colab"]))
    assert attempt.state == AttemptState.SUBMITTED, attempt.end_reason
    assert len(slept) >= 4 and all(0 < s <= 32 for s in slept)
    bundle = drive_emulator.state.find("bundle.tar.gz")[0]
    assert bundle.content == Path(experiment.bundle).read_bytes()


def test_provider_upload_resumes_after_a_cut_chunk(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path)
    data = bytes(range(256)) * 4000  # ~1 MB: four 256 KiB chunks
    drive_emulator.inject("upload.chunk", faults.cut_upload(after_bytes=100_000))
    item = colab.drive().upload("root", "big.bin", data)
    assert drive_emulator.state.get(item["id"]).content == data


def checkpoint_dir(tmp_path: Path, step: int = 7) -> Path:
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "state.pt").write_bytes(b"x" * 700_000)
    (staging / "sub" / "extra.bin").write_bytes(b"extra")
    root = tmp_path / "session" / "checkpoints"
    publish_local(staging, root, step=step, attempt="a1", provider="colab")
    return tmp_path / "session"


def agent_drive(drive, **kwargs) -> DriveREST:
    return DriveREST(drive.base_url, lambda token=drive.state.issue_access_token(): token,
                     chunk=256 * 1024, sleep=lambda s: None, **kwargs)


class _NoReport:
    def status(self, *a, **k): ...

    def log(self, *a, **k): ...


def test_checkpoint_uploaded_by_the_notebook_is_collected_verified(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    experiment, attempt = submit(pool, Scheduler(pool), mlp_spec(["colab"]))
    session = checkpoint_dir(tmp_path)
    drive_emulator.inject("upload.chunk", faults.cut_upload(after_bytes=50_000))  # resumed
    uploader = Uploader(agent_drive(drive_emulator), folder_of(colab, attempt), session,
                        _NoReport(), 1)
    uploader.sync()
    store = pool.store_for(experiment.id)
    [manifest] = colab.collect(attempt, store)
    assert store.latest() == manifest and manifest.step == 7
    assert colab.collect(attempt, store) == []  # idempotent


def test_an_interrupted_checkpoint_upload_is_never_collected(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    experiment, attempt = submit(pool, Scheduler(pool), mlp_spec(["colab"]))
    session = checkpoint_dir(tmp_path)
    drive_emulator.inject("upload.chunk", faults.cut_upload(after_bytes=50_000), times=50)
    uploader = Uploader(agent_drive(drive_emulator, retries=1), folder_of(colab, attempt),
                        session, _NoReport(), 1)
    with pytest.raises(DriveFailure):
        uploader.sync()
    drive_emulator.faults.clear()
    assert drive_emulator.state.find("checkpoints")  # the folder and part of it exist...
    assert colab.collect(attempt, pool.store_for(experiment.id)) == []  # ...but no manifest
    assert pool.store_for(experiment.id).latest() is None


def test_nothing_uploaded_holds_the_refresh_token_or_client_secret(tmp_path):
    secret = "MARKER-client-secret-0f9e"
    with DriveEmulator(client_secret=secret) as drive:
        colab = make_provider(drive, tmp_path)
        pool = make_pool(tmp_path, colab=colab)
        experiment = pool.submit(mlp_spec(["colab"]))
        store = pool.store_for(experiment.id)
        store.import_local(checkpoint_dir(tmp_path) / "checkpoints" / store_name(tmp_path),
                           _manifest(tmp_path))
        Scheduler(pool).reconcile_once(time.time())
        markers = [secret.encode(), drive.refresh_token.encode()]
        blobs = [f.content for f in drive.state.files.values() if f.content]
        assert any(b"application/vnd.google.colaboratory" not in b for b in blobs)
        for blob in blobs:
            for text in _expand(blob):
                assert not any(marker in text for marker in markers)
        assert drive.state.find("restore")


def store_name(tmp_path: Path) -> str:
    return _manifest(tmp_path).name


def _manifest(tmp_path: Path):
    from gpupool.manifest import list_local

    return list_local(tmp_path / "session" / "checkpoints")[0]


def _expand(blob: bytes) -> list[bytes]:
    """The blob, and each member if it is a .tar.gz."""
    if not blob.startswith(b"\x1f\x8b"):
        return [blob]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()]
    return [gzip.decompress(blob), *members]
