"""The checkpoint store on Google Drive (``gdrive://``) against the Drive emulator."""

from __future__ import annotations

import pytest

from gpupool.errors import CheckpointError
from gpupool.manifest import publish_local
from gpupool.store import CheckpointStore
from gpupool_providers.colab.fs import register
from tests.emulators.drive import (  # noqa: F401 - fixture
    LoopbackGoogleAuth,
    drive_emulator_fixture,
    emulator_settings,
    faults,
    write_credentials_file,
)


@pytest.fixture
def auth(drive_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    register()
    creds = write_credentials_file(tmp_path / "creds.json", drive_emulator)
    return LoopbackGoogleAuth(drive_emulator, settings=emulator_settings(drive_emulator, creds))


def local_checkpoint(tmp_path, step, size=300_000):
    staging = tmp_path / f"staging-{step}"
    (staging / "opt").mkdir(parents=True)
    (staging / "model.pt").write_bytes(bytes([step % 256]) * size)
    (staging / "opt" / "state.pt").write_bytes(b"o" * 1000)
    return publish_local(staging, tmp_path / "local", step=step, attempt="a1", provider="colab")


def test_publish_latest_and_relay_between_local_and_drive(auth, tmp_path, drive_emulator):
    drive = CheckpointStore("gdrive://gpupool-test/checkpoints", google_auth=auth).child("exp-1")
    drive.check_writable()
    assert drive.latest() is None
    first, second = local_checkpoint(tmp_path, 10), local_checkpoint(tmp_path, 20)
    for manifest in (first, second):
        drive.import_local(tmp_path / "local" / manifest.name, manifest)
    assert [m.step for m in drive.list()] == [20, 10]
    assert drive.latest() == second
    assert drive_emulator.state.find("gpupool-test")  # under My Drive

    local = CheckpointStore(str(tmp_path / "relay")).child("exp-1")
    local.import_local(drive, second)
    assert local.latest() == second
    back = CheckpointStore("gdrive://gpupool-test/other", google_auth=auth).child("exp-1")
    back.import_local(local, second)
    assert back.latest() == second
    restored = back.download(second, tmp_path / "restored")
    assert (restored / "model.pt").read_bytes() == bytes([20]) * 300_000

    assert drive.prune(1) == [first.name]
    assert [m.name for m in drive.list()] == [second.name]


def test_a_checkpoint_without_manifest_is_invisible_and_a_corrupt_one_skipped(auth, tmp_path):
    store = CheckpointStore("gdrive://gpupool-test/ck", google_auth=auth)
    good = local_checkpoint(tmp_path, 5)
    store.import_local(tmp_path / "local" / good.name, good)
    torn = local_checkpoint(tmp_path, 9)
    store.fs.put_file(str(tmp_path / "local" / torn.name / "model.pt"),
                      f"{store.root}/{torn.name}/model.pt")
    assert store.latest() == good  # no manifest: not a checkpoint
    bad = local_checkpoint(tmp_path, 7)
    (tmp_path / "local" / bad.name / "model.pt").write_bytes(b"tampered")
    store.fs.put_file(str(tmp_path / "local" / bad.name / "model.pt"),
                      f"{store.root}/{bad.name}/model.pt")
    store.fs.put_file(str(tmp_path / "local" / bad.name / "opt" / "state.pt"),
                      f"{store.root}/{bad.name}/opt/state.pt")
    with store.fs.open(f"{store.root}/{bad.name}/manifest.json", "wb") as handle:
        handle.write(bad.to_json().encode())
    skipped = []
    store.on_corrupt = lambda what, why: skipped.append(why)
    assert store.latest() == good and skipped


def test_a_checkpoint_deleted_on_drive_meanwhile_is_missing_not_a_foreign_error(auth, tmp_path,
                                                                                drive_emulator):
    """Drive's 404 for a file whose id was just looked up (another machine pruned it) enters
    as fsspec's FileNotFoundError, which the store maps on: that checkpoint is skipped as
    missing and the previous one is used. Before, PyDrive2's ApiRequestError escaped
    ``latest()`` (issue 13 item 2)."""
    store = CheckpointStore("gdrive://gpupool-test/gone", google_auth=auth)
    old, new = local_checkpoint(tmp_path, 5), local_checkpoint(tmp_path, 6)
    for manifest in (old, new):
        store.import_local(tmp_path / "local" / manifest.name, manifest)
    skipped: list[str] = []
    store.on_corrupt = lambda what, why: skipped.append(why)
    drive_emulator.inject("files.get", faults.http_error(404, "notFound", "File not found"))
    assert store.latest() == old  # recorded as verified: a size check only, which met the 404
    assert skipped == ["model.pt is missing"]
    drive_emulator.inject("*", faults.http_error(404, "notFound", "File not found"), times=20)
    with pytest.raises(FileNotFoundError):
        store.fs.open(f"{store.root}/{new.name}/model.pt", "rb").read()


def test_a_manifest_deleted_on_drive_while_listed_is_absent_not_corrupt(auth, tmp_path,
                                                                         drive_emulator):
    """A manifest gone between listing and reading is a checkpoint being deleted (pruned
    elsewhere): invisible, as a torn one is, and not reported as corrupt."""
    store = CheckpointStore("gdrive://gpupool-test/pruned", google_auth=auth)
    only = local_checkpoint(tmp_path, 3)
    store.import_local(tmp_path / "local" / only.name, only)
    reported: list[str] = []
    store.on_corrupt = lambda what, why: reported.append(why)
    drive_emulator.inject("files.download", faults.http_error(404, "notFound", "File not found"))
    assert store.list() == [] and reported == []
    assert store.list() == [only]


def test_drive_unreachable_once_retries_are_spent_is_a_checkpoint_error(auth, tmp_path,
                                                                        drive_emulator):
    """A listing that keeps failing (Drive's 500s past the client's retries) leaves the store
    as gpupool's CheckpointError naming the store, not PyDrive2's ApiRequestError, so the
    CLI prints it and the scheduler records it and tries again."""
    store = CheckpointStore("gdrive://gpupool-test/down", google_auth=auth, retries=0)
    only = local_checkpoint(tmp_path, 4)
    store.import_local(tmp_path / "local" / only.name, only)
    drive_emulator.inject("files.list", faults.server_error(500), times=5)
    with pytest.raises(CheckpointError, match="gdrive://gpupool-test/down: cannot read"):
        store.latest()
    drive_emulator.faults.clear()  # Drive is back
    assert store.latest() == only


def test_a_manifest_drive_fails_to_send_is_not_skipped_for_an_older_checkpoint(auth, tmp_path,
                                                                               drive_emulator):
    """A manifest that could not be read (Drive's 500 past the retries) is neither reported
    as corrupt nor skipped: skipping it made ``latest()`` hand the next session an older
    checkpoint. The store raises CheckpointError and the scheduler asks again next step."""
    store = CheckpointStore("gdrive://gpupool-test/flaky", google_auth=auth, retries=0)
    old, new = local_checkpoint(tmp_path, 1), local_checkpoint(tmp_path, 2)
    for manifest in (old, new):
        store.import_local(tmp_path / "local" / manifest.name, manifest)
    reported: list[str] = []
    store.on_corrupt = lambda what, why: reported.append(why)
    drive_emulator.inject("files.download", faults.server_error(500))
    with pytest.raises(CheckpointError, match="cannot read"):
        store.latest()
    assert reported == []
    assert store.latest() == new


def test_auth_setup_saves_credentials_0600_and_creates_the_folder(drive_emulator, tmp_path,
                                                                   monkeypatch):
    import stat

    from gpupool_providers.colab.auth import prepare_drive
    from tests.providers.colab_support import make_provider

    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    colab = make_provider(drive_emulator, tmp_path, folder="my-gpupool")
    colab.config.credentials_file.chmod(0o644)
    result = prepare_drive(colab.config, auth_factory=colab.auth_factory)
    assert result["user"] == "tester@example.com"
    assert stat.S_IMODE(colab.config.credentials_file.stat().st_mode) == 0o600
    [folder] = drive_emulator.state.find("my-gpupool")
    assert drive_emulator.state.find("attempts", parent=folder.id)
    assert prepare_drive(colab.config, auth_factory=colab.auth_factory) == result  # idempotent


def test_authorize_with_saved_credentials_needs_no_browser(drive_emulator, tmp_path, monkeypatch):
    import webbrowser

    from tests.providers.colab_support import make_provider

    monkeypatch.setattr(webbrowser, "open", lambda *a, **k: pytest.fail("browser opened"))
    colab = make_provider(drive_emulator, tmp_path)
    message = colab.authorize(launch_browser=False)
    assert "tester@example.com" in message and "0600" in message
    assert colab.check_credentials()[0]


def test_refused_credentials_are_a_clear_error_not_a_traceback(auth, drive_emulator):
    from gpupool.errors import CredentialsError

    drive_emulator.revoke_refresh_token()
    store = CheckpointStore("gdrive://gpupool-test/ck", google_auth=auth,
                            skip_instance_cache=True)
    with pytest.raises(CredentialsError, match="gpupool auth colab"):
        store.latest()
