"""The checkpoint manifest, and publishing a checkpoint directory on a local disk.

Standard library only: this module runs inside every training session (through
``gpupool.runtime``), where gpupool's dependencies may not be installed.

A checkpoint is a directory named ``ckpt-<step>-<unique>`` holding the training files and a
``manifest.json`` written last. The manifest lists every file with its size and sha256, so a
checkpoint without a manifest is incomplete and one whose files do not match is corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpupool.errors import ManifestError as ManifestError  # raised here, defined with the others

MANIFEST = "manifest.json"
PREFIX = "ckpt-"
FORMAT = 1
CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    step: int
    created: float
    files: tuple[FileEntry, ...]
    experiment: str = ""
    attempt: str = ""
    provider: str = ""
    final: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        data = asdict(self)
        data["format"] = FORMAT
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
            files = tuple(FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"])
            manifest = cls(
                name=str(data["name"]), step=int(data["step"]), created=float(data["created"]),
                files=files, experiment=str(data.get("experiment", "")),
                attempt=str(data.get("attempt", "")), provider=str(data.get("provider", "")),
                final=bool(data.get("final", False)), metadata=dict(data.get("metadata") or {}),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"malformed manifest: {err}") from None
        check_name(manifest.name)
        for entry in manifest.files:
            check_relative_path(entry.path)
        return manifest


def check_name(name: str) -> str:
    """Checkpoint names are single safe path components starting with ``ckpt-``."""
    if not name.startswith(PREFIX) or not all(c.isalnum() or c in "-_." for c in name) or ".." in name:
        raise ManifestError(f"unsafe checkpoint name {name!r}")
    return name


def check_relative_path(path: str) -> str:
    """Reject paths that would escape the checkpoint directory."""
    norm = posixpath.normpath(path)
    if (
        not path or path.startswith(("/", "\\")) or "\\" in path or ":" in path
        or norm.startswith("..") or norm != path or norm == "." or path == MANIFEST
    ):
        raise ManifestError(f"unsafe file path {path!r} in manifest")
    return path


def new_name(step: int) -> str:
    """A unique, sortable name: step first (zero padded), then time and randomness."""
    return f"{PREFIX}{step:012d}-{int(time.time() * 1000):013d}-{secrets.token_hex(4)}"


def step_of(name: str) -> int:
    """The training step a checkpoint name carries (see ``new_name``); ``ManifestError`` if
    ``name`` is not a checkpoint name."""
    digits = name[len(PREFIX) : len(PREFIX) + 12]
    if not name.startswith(PREFIX) or len(digits) != 12 or not digits.isdigit():
        raise ManifestError(f"{name!r} is not a checkpoint name")
    return int(digits)


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in ``CHUNK``-byte pieces into one reused buffer."""
    digest, buffer = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def scan_files(directory: Path) -> tuple[FileEntry, ...]:
    """Every regular file under ``directory`` (symlinks refused) with its size and hash."""
    entries = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise ManifestError(f"{path} is a symlink; checkpoints hold regular files only")
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(directory).as_posix()
            entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    return tuple(entries)


def verify_local(directory: Path, manifest: Manifest) -> None:
    """Raise ``ManifestError`` unless every file in ``directory`` matches the manifest."""
    for entry in manifest.files:
        path = directory / entry.path
        if not path.is_file() or path.is_symlink():
            raise ManifestError(f"{entry.path} is missing")
        if path.stat().st_size != entry.size:
            raise ManifestError(f"{entry.path} has {path.stat().st_size} bytes, expected {entry.size}")
        if sha256_file(path) != entry.sha256:
            raise ManifestError(f"{entry.path} does not match its sha256")


def read_local(directory: Path) -> Manifest:
    try:
        return Manifest.from_json((directory / MANIFEST).read_bytes())
    except OSError as err:
        raise ManifestError(f"no readable manifest in {directory}: {err}") from None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(directory: Path, errors: list[OSError]) -> None:
    """fsync every regular file under ``directory``; an error is kept in ``errors`` (this runs
    in a thread) and raised by the caller."""
    try:
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
    except OSError as err:
        errors.append(err)


def publish_local(staging: Path, root: Path, *, step: int, final: bool = False, **info: Any) -> Manifest:
    """Seal ``staging`` as a checkpoint under ``root``: hash, write the manifest last, rename.

    The rename is the commit point; a crash before it leaves only a staging directory, which
    readers ignore because its name does not start with ``ckpt-``.
    """
    name = new_name(step)
    metadata = dict(info.pop("metadata", {}) or {})
    # The flush to disk runs in a thread while this one hashes (both release the GIL), so the
    # seal costs about the slower of the two, not their sum; both end before the manifest.
    sync_errors: list[OSError] = []
    syncing = threading.Thread(target=_fsync_tree, args=(staging, sync_errors), name="gpupool-fsync")
    syncing.start()
    try:
        files = scan_files(staging)
    finally:
        syncing.join()
    if sync_errors:
        raise sync_errors[0]
    manifest = Manifest(name=name, step=step, created=time.time(), files=files,
                        final=final, metadata=metadata, **info)
    seal(staging, manifest, root)
    return manifest


def seal(staging: Path, manifest: Manifest, root: Path) -> None:
    """Write ``manifest`` into ``staging`` durably (files already fsynced), then rename the
    folder to ``root/<manifest.name>``: the rename is the commit point."""
    tmp = staging / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, staging / MANIFEST)
    _fsync_dir(staging)
    root.mkdir(parents=True, exist_ok=True)
    os.replace(staging, root / manifest.name)
    _fsync_dir(root)


def list_local(root: Path) -> list[Manifest]:
    """Complete checkpoints under ``root`` (those with a parseable manifest), newest first."""
    found: list[Manifest] = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        if child.name.startswith(PREFIX) and child.is_dir():
            try:
                found.append(read_local(child))
            except ManifestError:
                continue
    return sorted(found, key=lambda m: (m.step, m.created, m.name), reverse=True)
