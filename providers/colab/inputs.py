"""An experiment's inputs on Colab: Drive folders named by content, copied onto the VM.

* A local input goes to ``<folder>/inputs/<sha256>/`` on the user's Drive once per content:
  its files under ``data/`` (resumable uploads), then gpupool's listing of every file's sha256
  written last, so a folder without the listing is an upload cut short and is completed, never
  used. A later attempt, or another experiment with the same data, finds the listing and
  uploads nothing. Hashes come from the local cache (size + mtime): nothing is re-read.
* A Drive input (a file or folder id) is only checked here (it exists and this account can
  read it); the notebook copies it onto the VM's disk through the Drive API (not the FUSE mount).
* A url input is fetched in the notebook and verified (``gpupool.session.inputs``).
* A Kaggle input is downloaded once into the pool's cache by the adapter that owns Kaggle
  (``gpupool.inputs.InputSources``), then goes to Drive like a local input (one folder per
  content).

For other providers' sessions, ``download_drive_input`` brings a Drive input onto this machine.

The notebook (``agent.py``) downloads each input into ``/content/gpupool-inputs/<name>``,
verifies uploaded content byte for byte, makes it read-only and sets ``GPUPOOL_INPUT_<NAME>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupool.errors import InputUnavailable, ProviderError, RemoteNotFound
from gpupool.inputs import (
    Content,
    HashCache,
    InputSources,
    foreign_content,
    hash_content,
    progress_bar,
    reuse_sealed,
    write_sealed,
)
from gpupool.session.inputs import CONTENT_FILE, PACKED_DIR

if TYPE_CHECKING:
    from gpupool.spec import ExperimentSpec, InputSpec

    from .drive import Drive

FOLDER_MIME = "application/vnd.google-apps.folder"


class DriveInputs:
    """Puts an experiment's inputs on Drive, uploading only contents Drive does not hold."""

    def __init__(self, drive: Drive, root_title: str, data_dir: Path,
                 foreign: InputSources | None = None):
        self.drive, self.root_title = drive, root_title
        self.foreign = foreign  # downloads inputs whose source lives at another provider
        self.cache = HashCache(Path(data_dir) / "inputs" / "hashes.json")

    def check(self, spec: ExperimentSpec) -> list[tuple[tuple[Any, ...], str]]:
        """Drive inputs that do not exist or that this account cannot read."""
        return [(("inputs", name, "drive"), f"Drive file or folder {item.drive} does not exist "
                                            "or is not readable by the signed-in account")
                for name, item in spec.inputs.items()
                if item.drive is not None and self._metadata(item.drive) is None]

    def prepare(self, spec: ExperimentSpec) -> dict[str, dict[str, Any]]:
        """The notebook's INPUTS parameter; uploads missing contents first.

        Raises InputUnavailable when an input is gone (a removed folder, a deleted Drive file)."""
        return {name: self._prepare_one(name, item) for name, item in spec.inputs.items()}

    def _prepare_one(self, name: str, item: InputSpec) -> dict[str, Any]:
        if item.local is not None:
            content = hash_content(item.local, self.cache)
            return {"kind": "drive_content", "id": self.ensure_content(content)}
        if item.drive is not None:
            meta = self._metadata(item.drive)
            if meta is None:
                raise InputUnavailable("colab", f"input {name!r}: Drive file or folder "
                                                f"{item.drive} no longer exists or is not readable")
            return {"kind": "drive", "id": item.drive, "title": meta.get("title", name),
                    "is_dir": meta.get("mimeType") == FOLDER_MIME}
        if item.url is not None:
            return {"kind": "url", "url": item.url, "sha256": item.sha256}
        content = foreign_content(self.foreign, "colab", name, item, self.cache)
        return {"kind": "drive_content", "id": self.ensure_content(content)}

    def ensure_content(self, content: Content) -> str:
        """The Drive folder id holding ``content`` (files, then the listing last)."""
        folder = self.drive.folder_path(self.root_title, "inputs", content.sha256)
        if self.drive.find(folder, CONTENT_FILE) is not None:
            return folder
        for entry in content.files:
            parts = entry.path.split("/")
            parent = self.drive.folder_path(PACKED_DIR, *parts[:-1], parent=folder)
            self.drive.put(parent, parts[-1], content.source_of(entry))  # kept if already there
        self.drive.put(folder, CONTENT_FILE, json.dumps(content.listing()).encode(),
                       "application/json")
        return folder

    def _metadata(self, file_id: str) -> dict | None:
        return _metadata(self.drive, file_id)


# -- a Drive input, downloaded for another provider's session ----------------------------------

def download_drive_input(drive: Drive, file_id: str, dest: Path) -> Path:
    """Drive file or folder ``file_id`` on this machine, under ``dest/<key>/`` where the key
    hashes every file's id, path and md5: downloaded only when that version is not there
    complete already (``<key>.done`` is written last). Each file resumes after a cut (HTTP
    Range) and is checked against Drive's md5Checksum before it is kept.

    Raises InputUnavailable when it does not exist, is not readable, or holds Google Docs
    (which have no bytes to download); ProviderError when Drive keeps failing."""
    meta = _metadata(drive, file_id)
    if meta is None:
        raise InputUnavailable("colab", f"Drive file or folder {file_id} does not exist or is not "
                                        "readable by the signed-in account")
    is_dir = meta.get("mimeType") == FOLDER_MIME
    files = _tree(drive, file_id, "") if is_dir else [(meta["title"], meta)]
    key = hashlib.sha256(json.dumps([[p, m["id"], m.get("md5Checksum")] for p, m in files])
                         .encode()).hexdigest()[:24]
    folder, done = dest / key, dest / f"{key}.done"
    if not reuse_sealed(folder, done):
        _download_tree(drive, files, folder, file_id)
        write_sealed(done, {"id": file_id, "count": len(files)}, folder)
    return folder if is_dir else folder / meta["title"]


def _metadata(drive: Drive, file_id: str) -> dict | None:
    try:
        return dict(drive.execute(drive.service.files().get(fileId=file_id)))
    except RemoteNotFound:
        return None


def _tree(drive: Drive, folder_id: str, prefix: str) -> list[tuple[str, dict]]:
    """(relative path, metadata) of every file under a folder, sorted by path."""
    found: list[tuple[str, dict]] = []
    for child in drive.children(folder_id):
        path = f"{prefix}{child['title']}"
        if child.get("mimeType") == FOLDER_MIME:
            found += _tree(drive, child["id"], path + "/")
        elif child.get("md5Checksum") is None:
            raise InputUnavailable("colab", f"Drive input {folder_id}: {path} is a Google Docs "
                                            "file, which has no bytes to download; export it")
        else:
            found.append((path, child))
    return sorted(found, key=lambda pair: pair[0])


def _download_tree(drive: Drive, files: list[tuple[str, dict]], folder: Path, file_id: str) -> None:
    staging = folder.with_name(folder.name + ".partial")  # kept across runs: resumes there
    total = sum(int(meta.get("fileSize") or 0) for _, meta in files)
    with progress_bar(f"downloading Drive {file_id}", total) as advance:
        for path, meta in files:
            _download_file(drive, meta, staging / path, advance)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def _download_file(drive: Drive, meta: dict, target: Path, advance: Any) -> None:
    size = int(meta.get("fileSize") or 0)
    if target.exists() and target.stat().st_size == size:  # kept only once verified
        advance(size)
        return
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    drive.download_ranges(meta["id"], partial, size, advance)
    if _md5(partial) != meta.get("md5Checksum"):
        partial.unlink()
        raise ProviderError("colab", f"Drive file {meta['id']} ({target.name}) arrived with a "
                                     "different md5 than Drive gives; the next attempt downloads "
                                     "it again")
    partial.chmod(0o444)
    os.replace(partial, target)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
