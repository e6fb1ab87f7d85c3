"""Outputs and the final checkpoint come back with `gpupool pull` from any store (a local
folder, fsspec memory, Google Drive through the emulator); snapshots are taken when the trainer
asks and once more when it ends, never from a torn file; trackers continue across sessions."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gpupool import runtime
from gpupool.errors import CheckpointError
from gpupool.manifest import list_local
from gpupool.session import bootstrap
from gpupool.session.snapshot import Background, Folders, Snapshotter
from gpupool.store import CheckpointStore
from gpupool_providers.colab.fs import register
from tests.emulators.drive import (  # noqa: F401 - fixture
    LoopbackGoogleAuth,
    drive_emulator_fixture,
    emulator_settings,
    write_credentials_file,
)


def two_snapshots(tmp_path: Path) -> tuple[Snapshotter, list]:
    work = tmp_path / "code"
    (work / "ckpt").mkdir(parents=True)
    (work / "final").mkdir()
    snapper = Snapshotter(Folders(work, "ckpt", ("final",)), tmp_path / "session", info={},
                          keep_last=5)
    (work / "ckpt" / "last.pt").write_bytes(b"step 1")
    first = snapper.snapshot(trusted=True)
    (work / "ckpt" / "last.pt").write_bytes(b"step 2")
    (work / "final" / "model.pt").write_bytes(b"the trained model")
    second = snapper.snapshot(trusted=True, final=True)
    return snapper, [first, second]


def relay(snapper: Snapshotter, manifests: list, store: CheckpointStore) -> None:
    for manifest in manifests:
        store.import_local(snapper.root / manifest.name, manifest)


def check_pull(store: CheckpointStore, manifests: list, tmp_path: Path) -> None:
    latest = store.pick()
    assert latest.name == manifests[1].name and latest.final
    written = store.pull(latest, tmp_path / "latest")
    assert written == [tmp_path / "latest" / "ckpt", tmp_path / "latest" / "final"]
    assert (tmp_path / "latest" / "final" / "model.pt").read_bytes() == b"the trained model"
    assert (tmp_path / "latest" / "ckpt" / "last.pt").read_bytes() == b"step 2"
    chosen = store.pick(manifests[0].step)
    store.pull(chosen, tmp_path / "chosen")
    assert (tmp_path / "chosen" / "ckpt" / "last.pt").read_bytes() == b"step 1"
    assert not (tmp_path / "chosen" / "final").exists()
    assert not list((tmp_path / "latest").glob(".gpupool-pull-*")), "no staging left behind"
    with pytest.raises(CheckpointError, match="steps stored: 1, 2"):
        store.pick(99)


def test_pull_from_a_local_store(tmp_path):
    snapper, manifests = two_snapshots(tmp_path)
    store = CheckpointStore(str(tmp_path / "store")).child("exp-1")
    relay(snapper, manifests, store)
    check_pull(store, manifests, tmp_path)


def test_pull_from_a_memory_store(tmp_path):
    snapper, manifests = two_snapshots(tmp_path)
    store = CheckpointStore(f"memory://byo-{os.getpid()}-{time.time_ns()}").child("exp-1")
    relay(snapper, manifests, store)
    check_pull(store, manifests, tmp_path)


def test_pull_from_google_drive(tmp_path, drive_emulator, monkeypatch):
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    register()
    creds = write_credentials_file(tmp_path / "creds.json", drive_emulator)
    auth = LoopbackGoogleAuth(drive_emulator, settings=emulator_settings(drive_emulator, creds))
    snapper, manifests = two_snapshots(tmp_path)
    store = CheckpointStore("gdrive://gpupool-byo/checkpoints", google_auth=auth).child("exp-1")
    relay(snapper, manifests, store)
    check_pull(store, manifests, tmp_path)


def test_a_corrupt_latest_is_skipped_by_pull(tmp_path):
    snapper, manifests = two_snapshots(tmp_path)
    store = CheckpointStore(str(tmp_path / "store")).child("exp-1")
    relay(snapper, manifests, store)
    (tmp_path / "store" / "exp-1" / manifests[1].name / "final" / "model.pt").write_bytes(b"rot")
    assert store.pick().name == manifests[0].name


# -- when snapshots are taken ----------------------------------------------------------------

def background(tmp_path: Path) -> tuple[Background, Path, Path]:
    work = tmp_path / "code"
    (work / "ckpt").mkdir(parents=True)
    session = tmp_path / "session"
    snapper = Snapshotter(Folders(work, "ckpt", ()), session, info={}, keep_last=3, quiet=3600)
    runner = Background(snapper, interval=3600, request_file=session / runtime.SNAPSHOT_REQUEST,
                        log=lambda line: None, poll=0.01)
    return runner, work, session


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_request_snapshot_publishes_without_waiting_for_the_quiet_period(tmp_path):
    runner, work, session_dir = background(tmp_path)
    runner.start()
    (work / "ckpt" / "last.pt").write_bytes(b"saved")
    session = runtime.Session(env={runtime.ENV_SESSION_DIR: str(session_dir)}, install_sigterm=False)
    started = time.monotonic()
    session.request_snapshot()
    assert time.monotonic() - started < 1.0  # cheap: it never waits for the copy
    wait_for(lambda: list_local(session_dir / "checkpoints"), "the requested snapshot")
    runner.finish(0, time.time(), clean_codes=(0, 75))
    [manifest] = list_local(session_dir / "checkpoints")
    assert [f.path for f in manifest.files] == ["ckpt/last.pt"]


def test_after_a_kill_a_file_written_just_before_is_not_published(tmp_path):
    runner, work, session_dir = background(tmp_path)
    runner.start()
    (work / "ckpt" / "last.pt").write_bytes(b"maybe torn")
    assert runner.finish(-9, time.time(), clean_codes=(0, 75)) is None
    assert not list_local(session_dir / "checkpoints")


def test_after_a_clean_exit_the_folder_is_published_at_once(tmp_path):
    runner, work, session_dir = background(tmp_path)
    runner.start()
    (work / "ckpt" / "last.pt").write_bytes(b"complete")
    manifest = runner.finish(0, time.time(), clean_codes=(0, 75))
    assert manifest is not None and manifest.final


# -- trackers --------------------------------------------------------------------------------

def test_wandb_continues_one_run_per_experiment():
    env = {"GPUPOOL_EXPERIMENT": "mnist-3f2a1c"}
    bootstrap.tracker_environment(env)
    assert env["WANDB_RUN_ID"] == "mnist-3f2a1c" and env["WANDB_RESUME"] == "allow"
    own = {"GPUPOOL_EXPERIMENT": "mnist-3f2a1c", "WANDB_RUN_ID": "mine", "WANDB_RESUME": "must"}
    bootstrap.tracker_environment(own)
    assert own["WANDB_RUN_ID"] == "mine" and own["WANDB_RESUME"] == "must"


def test_a_runtime_script_keeps_its_own_checkpoints_as_the_latest(tmp_path):
    runner, work, session_dir = background(tmp_path)
    logged: list[str] = []
    runner.log = logged.append
    runner.start()
    session = runtime.Session(env={runtime.ENV_SESSION_DIR: str(session_dir)}, install_sigterm=False)
    with session.checkpoint(7) as folder:
        (folder / "state.pt").write_bytes(b"runtime state")
    (work / "ckpt" / "last.pt").write_bytes(b"x")
    assert runner.finish(0, time.time(), clean_codes=(0, 75)) is None
    [only] = list_local(session_dir / "checkpoints")
    assert only.step == 7 and not only.metadata.get("snapshot")
    assert any("gpupool.runtime checkpoints" in line for line in logged)


def test_a_local_store_links_files_unchanged_since_the_previous_checkpoint(tmp_path):
    snapper, manifests = two_snapshots(tmp_path)  # final/ is new in the second, ckpt/ changed
    (tmp_path / "code" / "ckpt" / "extra.bin").write_bytes(b"e")
    third = snapper.snapshot(trusted=True)
    store = CheckpointStore(str(tmp_path / "store")).child("exp-1")
    relay(snapper, [*manifests, third], store)
    root = tmp_path / "store" / "exp-1"
    old, new = (root / m.name / "final" / "model.pt" for m in (manifests[1], third))
    assert old.stat().st_ino == new.stat().st_ino
    store.delete(manifests[1].name)  # pruning one leaves the other whole
    store.verify(third)
    assert store.pick().name == third.name
