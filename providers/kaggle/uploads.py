"""Dataset blob uploads to Kaggle: resumed after a cut, hashed as they are sent, with progress.

Kaggle's blob upload (``StartBlobUpload`` gives a URL) follows the resumable protocol: a PUT
with ``Content-Range: bytes */N`` asks how much of the file the URL holds (308 with ``Range``,
or 200/201 when complete), and a PUT with ``Content-Range: bytes S-E/N`` sends the rest. So a
cut upload goes on from where it stopped instead of starting over, and the bytes the server
kept are hashed again from the local file (not sent again) to keep the sha256 of what it holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupool.errors import ProviderError

if TYPE_CHECKING:
    from .client import KaggleRemote

CHUNK = 1 << 20


def upload_blob(remote: KaggleRemote, path: Path, sha256: str | None = None) -> str:
    """Upload one file as a dataset blob; returns its token. A cut upload resumes where it
    stopped; the bytes sent are hashed on the way, and when they do not match ``sha256`` (the
    file changed after it was hashed) ``ProviderError`` is raised and the token is never used.
    A progress bar (size, rate, ETA) is shown on a terminal for files over
    ``gpupool.inputs.PROGRESS_BYTES``."""
    from kagglesdk.blobs.types.blob_api_service import ApiBlobType, ApiStartBlobUploadRequest

    from gpupool.inputs import progress_bar

    request = ApiStartBlobUploadRequest()
    request.type, request.name = ApiBlobType.DATASET, path.name
    request.content_length = path.stat().st_size
    request.last_modified_epoch_seconds = int(path.stat().st_mtime)
    blobs = remote.sdk.blobs.blob_api_client
    blob = remote.call("start upload", lambda: blobs.start_blob_upload(request))
    upload = _Upload(blob.create_url, path, path.stat().st_size)
    with progress_bar(f"uploading {path.name}", upload.size) as advance:
        remote.call(f"upload {path.name}", lambda: _put(remote, upload, advance))
    sent = upload.digest.hexdigest()
    if sha256 is not None and sent != sha256:
        raise ProviderError("kaggle", f"{path.name} changed while it was uploaded (sha256 "
                                      f"{sent[:12]}…, expected {sha256[:12]}…); run again")
    return str(blob.token)


def _put(remote: KaggleRemote, upload: _Upload, advance: Callable[[int], None]) -> None:
    """Send the bytes the upload URL does not hold yet (all of them the first time)."""
    start = _received(remote, upload) if upload.tried else 0
    upload.tried = True
    upload.hash_up_to(start)  # what the server kept, hashed again locally (not re-sent)
    if start == upload.size and start:
        return
    headers = {"Content-Range": f"bytes {start}-{upload.size - 1}/{upload.size}"} if start else {}
    with open(upload.path, "rb") as handle:
        handle.seek(start)
        body = _SendingFile(handle, upload, advance)
        remote.plain_session().put(upload.url, data=body, headers=headers,
                                   timeout=remote.timeouts).raise_for_status()


def _received(remote: KaggleRemote, upload: _Upload) -> int:
    """How many bytes the upload URL holds: a ``Content-Range: bytes */N`` probe, answered
    308 with the ``Range`` kept so far, or 200/201 when it is complete."""
    answer = remote.plain_session().put(upload.url, data=b"", timeout=remote.timeouts,
                                        headers={"Content-Range": f"bytes */{upload.size}"})
    if answer.status_code in (200, 201):
        return upload.size
    if answer.status_code != 308:
        answer.raise_for_status()
        return 0
    kept = answer.headers.get("Range", "")
    return int(kept.rsplit("-", 1)[1]) + 1 if "-" in kept else 0


@dataclass
class _Upload:
    """One blob upload across its tries: where it goes and the sha256 of the bytes sent."""

    url: str
    path: Path
    size: int
    tried: bool = False
    hashed: int = 0  # bytes of the file ``digest`` covers
    digest: Any = field(default_factory=hashlib.sha256)

    def hash_up_to(self, offset: int) -> None:
        """Make ``digest`` cover the file's first ``offset`` bytes (re-read from disk when a
        cut lost some of what was sent)."""
        if self.hashed == offset:
            return
        self.digest, self.hashed = hashlib.sha256(), 0
        with open(self.path, "rb") as handle:
            while self.hashed < offset:
                chunk = handle.read(min(CHUNK, offset - self.hashed))
                if not chunk:
                    break
                self.digest.update(chunk)
                self.hashed += len(chunk)


class _SendingFile:
    """The rest of a file as a request body: its length known (so it goes with a
    Content-Length), its bytes hashed and counted as requests reads them."""

    def __init__(self, handle: Any, upload: _Upload, advance: Callable[[int], None]):
        self.handle, self.upload, self.advance = handle, upload, advance
        self.size = upload.size - handle.tell()

    def __len__(self) -> int:
        return self.size

    def read(self, amount: int = -1) -> bytes:
        data = self.handle.read(amount)
        self.upload.digest.update(data)
        self.upload.hashed += len(data)
        self.advance(len(data))
        return bytes(data)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk
