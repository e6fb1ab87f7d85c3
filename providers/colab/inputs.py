"""An experiment's inputs on Colab: Drive folders named by content, copied onto the VM.

* A local input goes to ``<folder>/inputs/<sha256>/`` on the user's Drive once per content:
  its files under ``data/`` (resumable uploads), then gpupool's listing of every file's sha256
  written last, so a folder without the listing is an upload cut short and is completed, never
  used. A later attempt, or another experiment with the same data, finds the listing and
  uploads nothing. Hashes come from the local cache (size + mtime): nothing is re-read.
* A Drive input (a file or folder id) is only checked here (it exists and this account can
  read it); the notebook copies it onto the VM's disk through the Drive API (not the FUSE mount).
* A url input is fetched in the notebook and verified (``gpupool.session_inputs``).

The notebook (``agent.py``) downloads each input into ``/content/gpupool-inputs/<name>``,
verifies uploaded content byte for byte, makes it read-only and sets ``GPUPOOL_INPUT_<NAME>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupool.errors import InputUnavailable
from gpupool.inputs import Content, HashCache, hash_content
from gpupool.session_inputs import CONTENT_FILE, PACKED_DIR

if TYPE_CHECKING:
    from gpupool.spec import ExperimentSpec, InputSpec

    from .drive import Drive

FOLDER_MIME = "application/vnd.google-apps.folder"


class DriveInputs:
    """Puts an experiment's inputs on Drive, uploading only contents Drive does not hold."""

    def __init__(self, drive: Drive, root_title: str, data_dir: Path):
        self.drive, self.root_title = drive, root_title
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
        raise InputUnavailable("colab", f"input {name!r}: {item.kind} inputs cannot be brought "
                                        "to a Colab session yet")

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
        try:
            return dict(self.drive.execute(self.drive.service.files().get(fileId=file_id)))
        except FileNotFoundError:
            return None
