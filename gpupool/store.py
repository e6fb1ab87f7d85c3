"""The checkpoint store: immutable checkpoint directories on any fsspec filesystem.

Layout under the store's root::

    <experiment-id>/ckpt-000000001200-1732350000000-9f2c4e1a/
        state.pt ...            training files, written once, never overwritten
        manifest.json           written last: the checkpoint exists once this does

Two words for the two ways a checkpoint enters: a provider *collects* a session's checkpoints
(``Provider.collect``: from the session's folder, Kaggle's output or Drive, through
``import_local`` with a local folder); the store *relays* a checkpoint from another store
(``import_local`` with a store as its source, a verified store-to-store copy).

Who guarantees "verified" (one sha256 per byte per copy made, never a re-read to check):

* the session seals a checkpoint (``gpupool.manifest.publish_local``): the manifest's sizes and
  sha256 are computed there, once, and are the reference for every later copy;
* the store verifies a checkpoint once, when it *enters* the store (``import_local``, from a
  session's folder or from another store): each chunk is hashed while it is written and the
  manifest is written last, only when every file matched. A manifest in the store is therefore
  the store's record that its bytes were verified;
* ``latest`` and ``pick`` trust that record for checkpoints this process saw enter or verified
  (a shared, per-root record; files must still be present with their listed sizes), and hash a
  checkpoint they have no record of once, then record it, so a restarted scheduler still skips
  bit rot that happened while it was away;
* the scheduler hashes the checkpoint it hands to a new session once more
  (``latest(rehash=True)``, once per attempt), so bit rot at rest since it was recorded makes
  it fall back to the previous checkpoint instead of failing the session;
* a download (``download``, ``pull``) hashes each chunk while it is written to the local disk,
  so a file that rotted at rest after it was recorded is refused there, never restored.

Torn checkpoints (no manifest) are never visible; corrupt ones are skipped and reported through
``on_corrupt``.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import posixpath
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec

from gpupool.errors import CheckpointError, CorruptCheckpoint, StoreUnreachable, UnsafePath
from gpupool.manifest import (
    CHUNK,
    MANIFEST,
    PREFIX,
    Manifest,
    ManifestError,
    check_name,
    check_relative_path,
)

CorruptHandler = Callable[[Manifest | str, str], None]


class CheckpointStore:
    """Checkpoints of one experiment under ``url`` (a local path or any fsspec URL)."""

    def __init__(self, url: str, *, on_corrupt: CorruptHandler | None = None, **storage_options: Any):
        self.url = url
        self.fs, self.root = _filesystem(url, storage_options)
        self.on_corrupt = on_corrupt
        # Checkpoint path -> file sizes, for checkpoints whose every byte this process hashed
        # (on entry or by ``verify``); shared with ``child`` stores. See the module docstring.
        self._verified: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    def child(self, name: str) -> CheckpointStore:
        """The store of one experiment, under a sub-folder of this one."""
        _safe(check_relative_path, name)
        sub = CheckpointStore.__new__(CheckpointStore)
        sub.url, sub.fs, sub.root = posixpath.join(self.url, name), self.fs, self._path(name)
        sub.on_corrupt, sub._verified = self.on_corrupt, self._verified
        return sub

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # -- reading ----------------------------------------------------------------------------

    def list(self) -> list[Manifest]:
        """Checkpoints with a parseable manifest, newest first (files not yet verified)."""
        manifests = []
        for name in self._checkpoint_dirs():
            manifest = self._read_manifest(name)
            if manifest is not None:
                manifests.append(manifest)
        return sorted(manifests, key=lambda m: (m.step, m.created, m.name), reverse=True)

    def _checkpoint_dirs(self) -> builtins.list[str]:
        self._forget_listing()
        try:
            with self._reading("its list of checkpoints"):
                entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(str(e).rstrip("/")) for e in entries)
        return [n for n in names if n.startswith(PREFIX)]

    def _read_manifest(self, name: str) -> Manifest | None:
        path = self._path(name, MANIFEST)
        self._forget_listing(name)
        try:
            with self._reading(f"{name}/{MANIFEST}"), self.fs.open(path, "rb") as handle:
                manifest = Manifest.from_json(handle.read())
        except FileNotFoundError:
            return None  # still being written, torn, or being deleted: never visible
        except ManifestError as err:
            self._report(name, f"unreadable manifest: {err}")
            return None
        if manifest.name != name:
            self._report(name, f"manifest names {manifest.name}")
            return None
        return manifest

    def _forget_listing(self, *parts: str) -> None:
        """Drop the filesystem's cached listing of a folder: object stores (s3fs, gcsfs) keep
        listings in memory, and another machine may have published or deleted a checkpoint
        since; a stale listing would resume from an old checkpoint (no-op for local files)."""
        self.fs.invalidate_cache(self._path(*parts))

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Where the store's filesystem is read for a decision: fsspec's ``FileNotFoundError``
        is left to the caller (a missing file means something); any other I/O failure (Drive
        or S3 unreachable once its client's retries are spent) becomes ``StoreUnreachable``,
        so nothing foreign leaves the store and a scheduler step records it and tries again."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as err:
            raise StoreUnreachable(f"checkpoint store {self.url}: cannot read {what} ({err}); "
                                  "gpupool tries again at its next step") from None

    def verify(self, manifest: Manifest) -> None:
        """Raise ``CorruptCheckpoint`` unless every file has the size and sha256 listed, and
        ``StoreUnreachable`` when the store cannot be read."""
        self._forget_listing(manifest.name)
        for entry in manifest.files:
            path = self._path(manifest.name, entry.path)
            try:
                with self._reading(f"{manifest.name}/{entry.path}"):
                    digest, size = _hash_stream(self.fs, path)
            except FileNotFoundError:
                raise CorruptCheckpoint(manifest.name, f"{entry.path} is missing") from None
            if size != entry.size or digest != entry.sha256:
                raise CorruptCheckpoint(manifest.name, f"{entry.path} does not match its manifest")
        self._verified[self._path(manifest.name)] = _sizes(manifest)

    def _check(self, manifest: Manifest) -> None:
        """``verify``, unless this store already hashed these bytes: then only check that every
        file is there with its size (a listing, no read). Raises ``CorruptCheckpoint``."""
        if self._verified.get(self._path(manifest.name)) != _sizes(manifest):
            self.verify(manifest)
            return
        for entry in manifest.files:
            try:
                with self._reading(f"{manifest.name}/{entry.path}"):
                    size = self.fs.size(self._path(manifest.name, entry.path))
            except FileNotFoundError:
                raise CorruptCheckpoint(manifest.name, f"{entry.path} is missing") from None
            if size != entry.size:
                raise CorruptCheckpoint(manifest.name, f"{entry.path} has {size} bytes, not {entry.size}")

    def latest(self, *, verify: bool = True, rehash: bool = False) -> Manifest | None:
        """The newest complete checkpoint that verifies; corrupt ones are reported and skipped.
        Raises ``StoreUnreachable`` when the store cannot be read (see ``_reading``).

        ``rehash``: hash its bytes again even if this store recorded them as verified (the
        checkpoint a new session will resume from: bit rot at rest since it entered the store
        must make gpupool fall back to the previous checkpoint, not hand a session bad bytes)."""
        if not verify:
            return next(iter(self.list()), None)
        return next(self._sound(self.list(), rehash=rehash), None)

    def _sound(self, manifests: Iterable[Manifest], *, rehash: bool = False) -> Iterator[Manifest]:
        """``manifests`` that pass ``_check`` (or a full ``verify`` with ``rehash``), lazily;
        the others are reported and skipped."""
        for manifest in manifests:
            try:
                self.verify(manifest) if rehash else self._check(manifest)
            except CorruptCheckpoint as err:
                self._report(manifest, err.reason)
                continue
            yield manifest

    def get(self, name: str) -> Manifest:
        manifest = self._read_manifest(name)
        if manifest is None:
            raise CheckpointError(f"no complete checkpoint named {name} in {self.url}")
        return manifest

    def pick(self, step: int | None = None) -> Manifest:
        """The newest verified checkpoint, or the newest verified one at ``step``; raises
        ``CheckpointError`` naming the steps there are when none matches."""
        at_step = (m for m in self.list() if step is None or m.step == step)
        found = next(self._sound(at_step), None)
        if found is not None:
            return found
        steps = sorted({m.step for m in self.list()})
        what = f"at step {step}" if step is not None else "at all"
        have = f"; steps stored: {', '.join(map(str, steps))}" if steps else ""
        raise CheckpointError(f"no verified checkpoint {what} in {self.url}{have}")

    def pull(self, manifest: Manifest, target: Path) -> builtins.list[Path]:
        """Download ``manifest`` (verified) and put its files in ``target``: a snapshot of a
        script's folders as they were in the workdir (``checkpoints/last.pt``, ``final/...``),
        a runtime checkpoint under ``target/checkpoint``. Returns the top-level paths written."""
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".gpupool-pull-", dir=target))
        try:
            self.download(manifest, staging)
            (staging / MANIFEST).unlink()
            base = target if manifest.metadata.get("snapshot") else target / "checkpoint"
            for entry in manifest.files:
                destination = base / entry.path
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / entry.path, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not manifest.metadata.get("snapshot"):
            return [target / "checkpoint"]
        return sorted({target / entry.path.split("/", 1)[0] for entry in manifest.files})

    def _report(self, what: Manifest | str, reason: str) -> None:
        if self.on_corrupt is not None:
            self.on_corrupt(what, reason)

    # -- writing ----------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Write and remove a probe file, so an unusable store fails before any training."""
        probe = self._path(f".probe-{secrets.token_hex(4)}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as handle:
                handle.write(b"gpupool")
            self.fs.rm(probe)
        except (OSError, PermissionError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint store {self.url} is not writable ({err}); "
                "fix its permissions or set store_url in the pool configuration"
            ) from None

    def import_local(self, source: Path | CheckpointStore, manifest: Manifest) -> Manifest:
        """Copy a checkpoint into this store: from a session's local folder (``source`` a
        directory: a provider collecting it) or from another store (a relay). Every byte is
        hashed while it is written and the manifest is written last, only when all match
        (``CorruptCheckpoint`` otherwise, leaving nothing behind). A checkpoint already here is
        left as it is."""
        _check_paths(manifest)
        if self._read_manifest(manifest.name) is not None:
            return manifest  # immutable: already here
        if isinstance(source, CheckpointStore):
            src_fs, src_root = source.fs, source._path(manifest.name)
        else:
            src_fs, src_root = fsspec.filesystem("file"), str(source)
        unchanged = self._linkable_files()
        for entry in manifest.files:
            dst = self._path(manifest.name, entry.path)
            previous = unchanged.get((entry.path, entry.size, entry.sha256))
            if previous is not None and _hardlink(previous, dst):
                continue  # the same bytes, written and verified for the previous checkpoint
            src = posixpath.join(src_root, entry.path)
            if not isinstance(source, CheckpointStore) and os.path.islink(src):
                self._discard(manifest.name)  # a session's folder holds regular files only
                raise CorruptCheckpoint(manifest.name, f"{entry.path} is a symlink")
            self._copy_verified(src_fs, src, dst, entry.size, entry.sha256, manifest.name)
        self._write_manifest(manifest)
        self._verified[self._path(manifest.name)] = _sizes(manifest)
        return manifest

    def _linkable_files(self) -> dict[tuple[str, int, str], str]:
        """On a local-disk store, the newest checkpoint's files by (path, size, sha256): a file
        unchanged since then (a folder snapshot's untouched files) is hard-linked, not copied."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if "file" not in protocol:
            return {}
        newest = self.list()[:1]
        return {(e.path, e.size, e.sha256): self._path(m.name, e.path) for m in newest for e in m.files}

    def download(self, manifest: Manifest, directory: Path) -> Path:
        """Copy a checkpoint to a local directory, hashing each chunk while it is written, and
        write its manifest last; returns the directory. Raises ``CorruptCheckpoint`` naming the
        first file whose size or sha256 differs from the manifest (bit rot at rest)."""
        _check_paths(manifest)
        directory = Path(directory)
        local = fsspec.filesystem("file")
        for entry in manifest.files:
            target = directory / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                digest, size = _stream(self.fs, self._path(manifest.name, entry.path), local, str(target))
            except FileNotFoundError:
                raise CorruptCheckpoint(manifest.name, f"{entry.path} is missing") from None
            if size != entry.size or digest != entry.sha256:
                raise CorruptCheckpoint(manifest.name, f"{entry.path} does not match its manifest")
        (directory / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        return directory

    def _copy_verified(self, src_fs: Any, src: str, dst: str, size: int, sha: str, name: str) -> None:
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        try:
            digest, copied = _stream(src_fs, src, self.fs, dst)
        except FileNotFoundError:
            self._discard(name)
            raise CorruptCheckpoint(name, f"{src} is missing") from None
        if copied != size or digest != sha:
            self._discard(name)
            raise CorruptCheckpoint(name, f"{posixpath.basename(dst)} changed in transit")

    def _write_manifest(self, manifest: Manifest) -> None:
        with self.fs.open(self._path(manifest.name, MANIFEST), "wb") as handle:
            handle.write(manifest.to_json().encode())

    def _discard(self, name: str) -> None:
        try:
            self.fs.rm(self._path(name), recursive=True)
        except (FileNotFoundError, OSError):
            pass

    def delete(self, name: str) -> None:
        """Remove a checkpoint: its manifest first, so it stops being visible at once."""
        try:
            self.fs.rm(self._path(name, MANIFEST))
        except FileNotFoundError:
            pass
        self._discard(name)

    def prune(self, keep_last: int, *, protect: Iterable[str] = ()) -> builtins.list[str]:
        """Delete all but the newest ``keep_last`` checkpoints (never one in ``protect``)."""
        keep = {m.name for m in self.list()[:keep_last]} | set(protect)
        removed = [m.name for m in self.list() if m.name not in keep]
        for name in removed:
            self.delete(name)
        return removed


def _safe(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except ManifestError as err:
        raise UnsafePath(str(err)) from None


def _check_paths(manifest: Manifest) -> None:
    """Manifests built in code skip ``from_json``'s checks; nothing may escape its directory."""
    _safe(check_name, manifest.name)
    for entry in manifest.files:
        _safe(check_relative_path, entry.path)


def _filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise CheckpointError(f"cannot open checkpoint store {url}: {err}") from None
    return fs, root.rstrip("/") or "/"


def _hash_stream(fs: Any, path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _sizes(manifest: Manifest) -> tuple[int, ...]:
    return tuple(entry.size for entry in manifest.files)


def _hardlink(source: str, target: str) -> bool:
    try:
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        os.link(source, target)
    except OSError:
        return False  # pruned meanwhile, or another filesystem: copy instead
    return True


def _stream(src_fs: Any, src: str, dst_fs: Any, dst: str) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` in fixed-size chunks (constant memory); return the sha256 and
    size of what was written. Between two local files the kernel copies (as
    ``shutil.copyfile`` does: measured about 7x faster than a read/write loop on the 2-core
    VM) and each copied chunk is read back from the page cache and hashed, so the hash is of
    the bytes that landed."""
    if _is_local(src_fs) and _is_local(dst_fs) and hasattr(os, "sendfile"):
        try:
            return _kernel_copy_hashed(src, dst)
        except _NoKernelCopy:
            pass  # this filesystem pair refuses sendfile: copy through user space
    return _copy_hashed(src_fs, src, dst_fs, dst)


class _NoKernelCopy(Exception):
    pass


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _kernel_copy_hashed(src: str, dst: str) -> tuple[str, int]:
    digest, size, buffers = hashlib.sha256(), 0, (bytearray(CHUNK), bytearray(CHUNK))
    with _Hasher(digest) as hasher, open(src, "rb") as reader, open(dst, "wb") as writer, \
            open(dst, "rb", buffering=0) as back:
        while True:
            try:
                sent = os.sendfile(writer.fileno(), reader.fileno(), size, CHUNK)
            except OSError as err:
                if size == 0 and err.errno in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):
                    raise _NoKernelCopy() from None
                raise
            if not sent:
                break
            buffer = buffers[hasher.turn]
            hasher.add(memoryview(buffer)[:_read_into(back, buffer, sent)])
            size += sent
    return digest.hexdigest(), size


def _copy_hashed(src_fs: Any, src: str, dst_fs: Any, dst: str) -> tuple[str, int]:
    """Any fsspec pair: read a chunk, write it while a second thread hashes it."""
    digest, size, buffers = hashlib.sha256(), 0, (bytearray(CHUNK), bytearray(CHUNK))
    with _Hasher(digest) as hasher, src_fs.open(src, "rb") as reader, \
            dst_fs.open(dst, "wb") as writer:
        while True:
            buffer = buffers[hasher.turn]
            read = _read_into(reader, buffer, CHUNK)
            if not read:
                break
            chunk = memoryview(buffer)[:read]
            hasher.add(chunk)
            writer.write(chunk)
            size += read
    return digest.hexdigest(), size


class _Hasher:
    """Hashes chunks in order in one thread (hashlib releases the GIL on large buffers), so
    hashing hides behind the I/O. Callers alternate two buffers (``turn``): a buffer is filled
    again only after ``add`` of the next one waited for its hash to end."""

    def __init__(self, digest: Any) -> None:
        self.digest, self.turn = digest, 0
        self._pool = ThreadPoolExecutor(1)
        self._pending: Future[None] | None = None

    def add(self, chunk: memoryview) -> None:
        self._wait()
        self._pending = self._pool.submit(self.digest.update, chunk)
        self.turn ^= 1

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()


def _read_into(reader: Any, buffer: bytearray, want: int) -> int:
    """Read up to ``want`` bytes into ``buffer`` (short only at the end); returns the count."""
    view, filled = memoryview(buffer), 0
    while filled < want:
        read = reader.readinto(view[filled:want])
        if not read:
            break
        filled += read
    return filled
