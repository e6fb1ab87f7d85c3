"""``gdrive://folder/sub``: the checkpoint store on Google Drive, through PyDrive2's fsspec class.

PyDrive2's ``GDriveFileSystem`` is not in fsspec's registry (iterative/PyDrive2#375); gpupool
registers this subclass under ``gdrive`` through the ``fsspec.specs`` entry point (or
:func:`register`), so ``CheckpointStore("gdrive://gpupool/checkpoints")`` works. Paths map to
``root/<folder>/...`` in My Drive; parent folders are created on upload. Drive keeps duplicates
under one name and reads are not seekable, which the store already copes with: names are
unique, the manifest is written last, and checkpoints are downloaded before they are loaded.
Credentials are the ones ``gpupool auth colab`` saved, unless ``google_auth`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydrive2.fs import GDriveFileSystem

from .config import DEFAULT_CLIENT_SECRETS, DEFAULT_CREDENTIALS
from .drive import load_client_config, open_auth

PROTOCOL = "gdrive"


class DriveFileSystem(GDriveFileSystem):
    protocol = PROTOCOL

    def __init__(self, google_auth: Any = None, client_secrets: str | None = None,
                 credentials_file: str | None = None, trash_only: bool = False, **kwargs: Any):
        if google_auth is None:
            client = load_client_config(Path(client_secrets or DEFAULT_CLIENT_SECRETS))
            google_auth = open_auth(client, Path(credentials_file or DEFAULT_CREDENTIALS))
        # deleted checkpoints leave Drive at once: Trash counts toward the 15 GB quota
        super().__init__("root", google_auth=google_auth, trash_only=trash_only, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3:]
        path = path.strip("/")
        if path == "root" or path.startswith("root/"):
            return path
        return f"root/{path}" if path else "root"

    def unstrip_protocol(self, name: str) -> str:
        rest = name[len("root/"):] if name.startswith("root/") else name
        return f"{PROTOCOL}://{rest}"


def register() -> None:
    """Make ``gdrive://`` URLs use this class (what the entry point does at fsspec import)."""
    import fsspec

    fsspec.register_implementation(PROTOCOL, DriveFileSystem, clobber=True)
