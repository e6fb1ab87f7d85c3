"""Checkpoint manifests and the store: sealed directories, verified "latest", torn and corrupt
checkpoints skipped, unsafe manifests refused, retention, relays and downloads that verify."""

from __future__ import annotations

import copy
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from gpupool.errors import CheckpointError, CorruptCheckpoint, GpupoolError, UnsafePath
from gpupool.manifest import (
    MANIFEST,
    PREFIX,
    FileEntry,
    Manifest,
    ManifestError,
    check_relative_path,
    list_local,
    new_name,
    publish_local,
    read_local,
    scan_files,
    sha256_file,
    step_of,
    verify_local,
)
from gpupool.store import CheckpointStore

# -- helpers -------------------------------------------------------------------------------


def staged(tmp_path: Path, files: dict[str, bytes]) -> Path:
    staging = tmp_path / f".staging-{secrets.token_hex(4)}"
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return staging


def files_for(step: int) -> dict[str, bytes]:
    return {"state.bin": f"state-{step}".encode() * 100, "sub/extra.txt": f"extra {step}".encode()}


class Reports:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, what: Manifest | str, reason: str) -> None:
        self.calls.append((what.name if isinstance(what, Manifest) else what, reason))


@pytest.fixture
def memory_url() -> Iterator[str]:
    bucket = f"gpupool-test-{secrets.token_hex(6)}"
    yield f"memory://{bucket}/exp"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)
    assert not any(k.startswith(f"/{bucket}") for k in fs.store)


def open_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path, name: str = "store",
               **options: object) -> CheckpointStore:
    """A fresh store of ``kind``: "memory", "local", or "s3" (moto's S3 server, through s3fs:
    no rename there, so the manifest written last is the only commit point)."""
    if kind == "s3":
        server = request.getfixturevalue("s3")
        return CheckpointStore(f"s3://{server.bucket()}/{name}", **server.options, **options)
    if kind == "memory":  # one per test, removed after it by the memory_url fixture
        return CheckpointStore(request.getfixturevalue("memory_url"), **options)
    return CheckpointStore(str(tmp_path / name), **options)


@pytest.fixture(params=["memory", "local", "s3"])
def store(request, tmp_path) -> CheckpointStore:
    return open_store(request.param, request, tmp_path, on_corrupt=Reports())


def add(store: CheckpointStore, tmp_path: Path, step: int, files: dict[str, bytes] | None = None) -> Manifest:
    """Publish a checkpoint the way sessions do: seal it locally, then import it."""
    local_root = tmp_path / f"session-{secrets.token_hex(3)}"
    manifest = publish_local(staged(tmp_path, files or files_for(step)), local_root, step=step,
                             experiment="exp", attempt="exp-a1", provider="local")
    return store.import_local(local_root / manifest.name, manifest)


def another_process(store: CheckpointStore) -> CheckpointStore:
    """The same store as a process sees it that has no record of what this one verified."""
    reader = copy.copy(store)
    reader._verified, reader.on_corrupt = {}, Reports()
    return reader


def overwrite(store: CheckpointStore, name: str, rel: str, data: bytes) -> None:
    store.fs.makedirs(os.path.dirname(store._path(name, rel)), exist_ok=True)
    with store.fs.open(store._path(name, rel), "wb") as handle:
        handle.write(data)


def flip_byte(store: CheckpointStore, name: str, rel: str) -> None:
    data = bytearray(store.fs.cat_file(store._path(name, rel)))
    data[len(data) // 2] ^= 0x01
    overwrite(store, name, rel, bytes(data))


# -- manifest and publish_local ------------------------------------------------------------


def test_publish_local_seals_a_directory(tmp_path):
    staging = staged(tmp_path, files_for(7))
    root = tmp_path / "ckpts"
    manifest = publish_local(staging, root, step=7, experiment="e", attempt="a", provider="p",
                             metadata={"loss": 0.5})
    assert not staging.exists()  # renamed into place, not copied
    target = root / manifest.name
    assert manifest.name.startswith(PREFIX) and target.is_dir()
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "state.bin", "sub"]
    assert not list(target.glob("*.tmp"))
    on_disk = read_local(target)
    assert on_disk == manifest
    assert on_disk.step == 7 and on_disk.metadata == {"loss": 0.5}
    assert {f.path: f.size for f in on_disk.files} == {k: len(v) for k, v in files_for(7).items()}
    assert dict((f.path, f.sha256) for f in on_disk.files)["state.bin"] == sha256_file(target / "state.bin")
    verify_local(target, on_disk)
    assert list_local(root) == [manifest]


def test_manifest_is_written_after_the_files(tmp_path, monkeypatch):
    """The manifest's mtime is not older than any file's, and it is the last file created."""
    import gpupool.manifest as m

    order: list[str] = []
    real_replace = os.replace

    def spy(src, dst):
        order.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(m.os, "replace", spy)
    manifest = publish_local(staged(tmp_path, files_for(1)), tmp_path / "root", step=1)
    assert order == [MANIFEST, manifest.name]  # manifest sealed, then the directory renamed


def test_names_are_unique_and_sort_by_step(tmp_path):
    root = tmp_path / "root"
    made = [publish_local(staged(tmp_path, {"f": b"x"}), root, step=s) for s in (2, 10, 2)]
    assert len({m.name for m in made}) == 3
    assert [m.step for m in list_local(root)] == [10, 2, 2]


def test_list_local_ignores_staging_and_torn(tmp_path):
    root = tmp_path / "root"
    good = publish_local(staged(tmp_path, {"f": b"x"}), root, step=1)
    (root / f"{PREFIX}000000000009-torn").mkdir()  # no manifest: a crash before sealing
    (root / ".staging-abc").mkdir()
    (root / f"{PREFIX}000000000010-bad").mkdir()
    (root / f"{PREFIX}000000000010-bad" / MANIFEST).write_text("{not json")
    assert list_local(root) == [good]
    assert list_local(tmp_path / "absent") == []


@pytest.mark.parametrize(
    "path", ["../x", "/abs", "a/../../x", "a/./b", "C:x", "a\\b", "", ".", MANIFEST, "a//b"]
)
def test_unsafe_paths_are_rejected(path):
    with pytest.raises(ManifestError):
        check_relative_path(path)


@pytest.mark.parametrize("path", ["../x", "/abs", "sub/../../etc/passwd"])
def test_manifest_with_unsafe_path_is_rejected(path):
    manifest = Manifest(name=f"{PREFIX}1-2-3", step=1, created=1.0,
                        files=(FileEntry(path, 1, "0" * 64),))
    with pytest.raises(ManifestError, match="unsafe"):
        Manifest.from_json(manifest.to_json())


@pytest.mark.parametrize("name", ["../ckpt-1", "ckpt-1/../../x", "other-1", "ckpt-a/b"])
def test_manifest_with_unsafe_name_is_rejected(name):
    manifest = Manifest(name=name, step=1, created=1.0, files=())
    with pytest.raises(ManifestError):
        Manifest.from_json(manifest.to_json())


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"name": "ckpt-1"}', "nope"])
def test_malformed_manifest_json(text):
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.from_json(text)


def test_symlink_in_checkpoint_is_refused(tmp_path):
    staging = staged(tmp_path, {"real": b"data"})
    secret = tmp_path / "secret"
    secret.write_text("outside")
    (staging / "link").symlink_to(secret)
    with pytest.raises(ManifestError, match="symlink"):
        scan_files(staging)
    with pytest.raises(ManifestError, match="symlink"):
        publish_local(staging, tmp_path / "root", step=1)
    assert list_local(tmp_path / "root") == []


def test_verify_local_refuses_a_symlink_in_place_of_a_file(tmp_path):
    root = tmp_path / "root"
    manifest = publish_local(staged(tmp_path, {"f": b"data"}), root, step=1)
    target = root / manifest.name / "f"
    copy = tmp_path / "copy"
    copy.write_bytes(b"data")
    target.unlink()
    target.symlink_to(copy)  # same bytes, but a link
    with pytest.raises(ManifestError, match="missing"):
        verify_local(root / manifest.name, manifest)


def test_verify_local_detects_a_changed_byte(tmp_path):
    root = tmp_path / "root"
    manifest = publish_local(staged(tmp_path, {"f": b"abcdef"}), root, step=1)
    (root / manifest.name / "f").write_bytes(b"abcdeF")
    with pytest.raises(ManifestError, match="sha256"):
        verify_local(root / manifest.name, manifest)


# -- the store -----------------------------------------------------------------------------


def test_latest_is_the_newest_that_verifies(store, tmp_path):
    assert store.latest() is None
    added = [add(store, tmp_path, step) for step in (3, 1, 2)]
    assert [m.step for m in store.list()] == [3, 2, 1]
    assert store.latest() == added[0]
    assert store.get(added[1].name) == added[1]
    assert store.on_corrupt.calls == []


def test_torn_checkpoint_is_never_latest(store, tmp_path):
    good = add(store, tmp_path, 1)
    torn = f"{PREFIX}{99:012d}-0000000000000-deadbeef"
    store.fs.makedirs(store._path(torn), exist_ok=True)
    overwrite(store, torn, "state.bin", b"half written")
    assert store.latest() == good
    assert [m.name for m in store.list()] == [good.name]
    assert store.on_corrupt.calls == []  # torn is normal while a write is in flight
    with pytest.raises(CheckpointError, match=torn):
        store.get(torn)


def test_flipped_byte_falls_back_to_previous(store, tmp_path):
    older = add(store, tmp_path, 1)
    newest = add(store, tmp_path, 2)
    flip_byte(store, newest.name, "state.bin")
    reader = another_process(store)  # a process with no record: hashes
    assert reader.latest() == older
    assert len(reader.on_corrupt.calls) == 1
    name, reason = reader.on_corrupt.calls[0]
    assert name == newest.name
    assert "state.bin" in reason
    assert reader.latest(verify=False) == newest  # listing alone does not hash
    with pytest.raises(CorruptCheckpoint) as info:
        store.verify(newest)
    assert info.value.name == newest.name


def test_a_checkpoint_is_hashed_once_by_the_store_that_took_it_in(store, tmp_path, monkeypatch):
    """Issue 13 item 6: import hashes in transit; ``latest`` then trusts that record (sizes
    only) instead of reading every byte again, and a rot after that is refused on download."""
    newest = add(store, tmp_path, 1)
    reads: list[str] = []
    real_open = store.fs.open
    monkeypatch.setattr(store.fs, "open", lambda path, mode="rb", **kw: (
        reads.append(path) if "r" in mode and not path.endswith("manifest.json") else None,
        real_open(path, mode, **kw))[1])
    assert store.latest() == newest and store.pick(1) == newest
    assert reads == []
    flip_byte(store, newest.name, "state.bin")
    with pytest.raises(CorruptCheckpoint, match="state.bin"):
        store.download(newest, tmp_path / "restore")


def test_the_record_is_shared_with_child_stores_and_checks_sizes(store, tmp_path):
    experiment = store.child("exp-1")
    older = add(experiment, tmp_path, 1)
    newest = add(experiment, tmp_path, 2)
    overwrite(experiment, newest.name, "state.bin", b"short")
    again = store.child("exp-1")
    assert again.latest() == older  # recorded, but a size differs: refused without hashing
    assert "bytes" in store.on_corrupt.calls[0][1]


def test_missing_file_is_corrupt(store, tmp_path):
    older = add(store, tmp_path, 1)
    newest = add(store, tmp_path, 2)
    store.fs.rm(store._path(newest.name, "sub/extra.txt"))
    assert store.latest() == older
    assert "missing" in store.on_corrupt.calls[0][1]


def test_truncated_file_is_corrupt(store, tmp_path):
    add(store, tmp_path, 1)
    newest = add(store, tmp_path, 2)
    overwrite(store, newest.name, "state.bin", b"short")
    assert store.latest().step == 1


def test_every_checkpoint_corrupt_gives_none(store, tmp_path):
    only = add(store, tmp_path, 1)
    flip_byte(store, only.name, "state.bin")
    reader = another_process(store)  # no record of it: hashes
    assert reader.latest() is None
    assert [c[0] for c in reader.on_corrupt.calls] == [only.name]


@pytest.mark.parametrize("bad_path", ["../x", "/abs"])
def test_store_skips_manifest_with_unsafe_path(store, tmp_path, bad_path):
    good = add(store, tmp_path, 1)
    evil = f"{PREFIX}{50:012d}-0000000000000-00000000"
    manifest = Manifest(name=evil, step=50, created=1.0, files=(FileEntry(bad_path, 1, "0" * 64),))
    overwrite(store, evil, MANIFEST, manifest.to_json().encode())
    assert store.latest() == good
    assert store.on_corrupt.calls and store.on_corrupt.calls[0][0] == evil
    assert "unsafe" in store.on_corrupt.calls[0][1]


def test_manifest_naming_another_checkpoint_is_skipped(store, tmp_path):
    good = add(store, tmp_path, 1)
    impostor = f"{PREFIX}{60:012d}-0000000000000-00000000"
    overwrite(store, impostor, MANIFEST, good.to_json().encode())  # copied manifest, wrong dir
    assert [m.name for m in store.list()] == [good.name]
    assert store.on_corrupt.calls[0][0] == impostor


def test_child_refuses_escaping_names(store):
    with pytest.raises(UnsafePath):
        store.child("../other")
    with pytest.raises(UnsafePath):
        store.child("/abs")
    assert store.child("exp-1").root.endswith("/exp-1")


@pytest.mark.parametrize("bad_path", ["../escaped", "/tmp/escaped-abs"])
def test_download_and_relay_refuse_unsafe_manifests_built_in_code(store, tmp_path, bad_path):
    ckpt = add(store, tmp_path, 1)
    evil = Manifest(name=ckpt.name, step=1, created=1.0, files=(FileEntry(bad_path, 1, "0" * 64),))
    target = tmp_path / "restore" / "inner"
    with pytest.raises(UnsafePath):
        store.download(evil, target)
    assert not (target.parent / "escaped").exists()
    other = CheckpointStore(str(tmp_path / "other"))
    with pytest.raises(UnsafePath):
        other.import_local(store, evil)
    with pytest.raises(UnsafePath):
        other.import_local(tmp_path, evil)
    assert other.list() == []


def test_prune_keeps_newest_and_protected(store, tmp_path):
    made = [add(store, tmp_path, step) for step in range(1, 7)]
    removed = store.prune(2, protect=[made[0].name])
    assert sorted(removed) == sorted(m.name for m in made[1:4])
    assert sorted(m.step for m in store.list()) == [1, 5, 6]
    for name in removed:
        assert not store.fs.exists(store._path(name))
    assert store.prune(2, protect=[made[0].name]) == []
    assert store.latest().step == 6


def test_delete_removes_visibility_first(store, tmp_path):
    one = add(store, tmp_path, 1)
    store.delete(one.name)
    assert store.list() == []
    assert not store.fs.exists(store._path(one.name))
    store.delete(one.name)  # idempotent


def test_download_verifies(store, tmp_path):
    ckpt = add(store, tmp_path, 4)
    out = store.download(ckpt, tmp_path / "restore")
    assert (out / "state.bin").read_bytes() == files_for(4)["state.bin"]
    assert (out / "sub" / "extra.txt").read_bytes() == files_for(4)["sub/extra.txt"]
    assert read_local(out) == ckpt
    flip_byte(store, ckpt.name, "sub/extra.txt")
    with pytest.raises(CorruptCheckpoint, match="extra.txt"):
        store.download(ckpt, tmp_path / "restore2")


RELAYS = ["memory->local", "local->memory", "s3->local", "local->s3"]


def relay_pair(direction: str, request: pytest.FixtureRequest,
               tmp_path: Path) -> tuple[CheckpointStore, CheckpointStore]:
    """(source, destination) stores for a relay written as "kind->kind"."""
    source, dest = direction.split("->")
    return (open_store(source, request, tmp_path, "source"),
            open_store(dest, request, tmp_path, "dest"))


@pytest.mark.parametrize("direction", RELAYS)
def test_relay_copies_and_verifies(request, tmp_path, direction):
    source, dest = relay_pair(direction, request, tmp_path)
    ckpt = add(source, tmp_path, 5)
    assert dest.import_local(source, ckpt) == ckpt
    assert dest.latest() == ckpt
    for entry in ckpt.files:
        assert dest.fs.cat_file(dest._path(ckpt.name, entry.path)) == \
            source.fs.cat_file(source._path(ckpt.name, entry.path))
    assert dest.import_local(source, ckpt) == ckpt  # already there: a no-op


@pytest.mark.parametrize("direction", RELAYS)
def test_relay_of_tampered_source_leaves_nothing(request, tmp_path, direction):
    source, dest = relay_pair(direction, request, tmp_path)
    ckpt = add(source, tmp_path, 5)
    flip_byte(source, ckpt.name, "state.bin")  # changed after the manifest was written
    with pytest.raises(CorruptCheckpoint) as info:
        dest.import_local(source, ckpt)
    assert info.value.name == ckpt.name
    assert dest.list() == [] and dest.latest() is None
    assert not dest.fs.exists(dest._path(ckpt.name))


@pytest.mark.parametrize("direction", ["memory->local", "s3->local"])
def test_relay_of_missing_source_file(request, tmp_path, direction):
    source, dest = relay_pair(direction, request, tmp_path)
    ckpt = add(source, tmp_path, 1)
    source.fs.rm(source._path(ckpt.name, "sub/extra.txt"))
    with pytest.raises(CorruptCheckpoint, match="missing"):
        dest.import_local(source, ckpt)
    assert dest.list() == []


def test_s3_checkpoint_published_elsewhere_is_seen_at_once(request, tmp_path):
    """Another machine (its own s3fs client) publishes a newer checkpoint: a scheduler that
    listed the store before must not resume from the old one out of its listing cache, and a
    checkpoint deleted elsewhere must not stay "latest"."""
    server = request.getfixturevalue("s3")
    here = open_store("s3", request, tmp_path)
    elsewhere = CheckpointStore(here.url, **server.options, skip_instance_cache=True)
    older = add(here, tmp_path, 1)
    assert here.latest() == older
    newer = add(elsewhere, tmp_path, 2)
    assert here.latest() == newer
    assert [m.name for m in here.list()] == [newer.name, older.name]
    elsewhere.delete(newer.name)
    assert here.latest() == older


def test_s3_upload_cut_midway_is_never_visible(request, tmp_path):
    """S3 has no rename: a checkpoint whose copy died mid-file (the object left as far as it
    got, no manifest) or whose manifest write died is not listed, and "latest" stays put."""
    store = open_store("s3", request, tmp_path)
    good = add(store, tmp_path, 1)
    torn = f"{PREFIX}{2:012d}-0000000000000-0badc0de"
    with pytest.raises(RuntimeError), store.fs.open(store._path(torn, "state.bin"), "wb") as handle:
        handle.write(b"x" * 1024)
        raise RuntimeError("the relay died here")
    assert [m.name for m in store.list()] == [good.name]
    overwrite(store, torn, MANIFEST, b'{"name": "' + torn.encode())  # half a manifest
    assert store.latest() == good


def test_import_local_of_changed_directory_publishes_nothing(store, tmp_path):
    root = tmp_path / "session"
    manifest = publish_local(staged(tmp_path, files_for(1)), root, step=1)
    (root / manifest.name / "state.bin").write_bytes(b"changed after sealing")
    with pytest.raises(CorruptCheckpoint):
        store.import_local(root / manifest.name, manifest)
    assert store.list() == []


def test_check_writable_passes_and_leaves_no_probe(store):
    store.check_writable()
    leftovers = [p for p in store.fs.find(store.root) if ".probe-" in str(p)]  # S3 has no folders
    assert leftovers == []


def test_check_writable_refuses_an_unwritable_place(tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits: put the store under a regular file
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        url = str(blocker / "store")
    else:
        readonly = tmp_path / "ro"
        readonly.mkdir()
        readonly.chmod(0o500)
        url = str(readonly / "store")
    try:
        with pytest.raises(CheckpointError) as info:
            CheckpointStore(url).check_writable()
    finally:
        if os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o700)
    message = str(info.value)
    assert url in message and "not writable" in message and "store_url" in message
    assert isinstance(info.value, GpupoolError)


def test_unknown_protocol_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="cannot open"):
        CheckpointStore("nosuchproto-xyz://bucket/x")


def test_manifest_json_round_trip():
    manifest = Manifest(name=f"{PREFIX}1-2-ab", step=3, created=4.5,
                        files=(FileEntry("a/b", 2, "f" * 64),), experiment="e", final=True,
                        metadata={"k": [1, 2]})
    data = json.loads(manifest.to_json())
    assert data["format"] == 1
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.total_bytes == 2


def test_step_of_reads_the_step_a_checkpoint_name_carries():
    assert step_of(new_name(1200)) == 1200
    assert step_of(new_name(0)) == 0
    for bad in ["ckpt-12", "snap-000000001200-1-a", "ckpt-00000000x200-1-a"]:
        with pytest.raises(ManifestError, match="not a checkpoint name"):
            step_of(bad)


def test_import_refuses_a_symlink_in_a_session_folder(store, tmp_path):
    """The import is the one hash of that copy, so it also refuses what verify_local refused."""
    root = tmp_path / "session"
    manifest = publish_local(staged(tmp_path, {"state.bin": b"secret"}), root, step=1)
    secret = tmp_path / "elsewhere"
    secret.write_bytes(b"secret")
    (root / manifest.name / "state.bin").unlink()
    (root / manifest.name / "state.bin").symlink_to(secret)
    with pytest.raises(CorruptCheckpoint, match="symlink"):
        store.import_local(root / manifest.name, manifest)
    assert store.list() == []
