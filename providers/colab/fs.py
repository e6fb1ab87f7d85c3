"""``gdrive://folder/sub``: the checkpoint store on Google Drive, through PyDrive2's fsspec class.

PyDrive2's ``GDriveFileSystem`` is not in fsspec's registry (iterative/PyDrive2#375); gpupool
registers this subclass under ``gdrive`` through the ``fsspec.specs`` entry point (or
:func:`register`), so ``CheckpointStore("gdrive://gpupool/checkpoints")`` works. Paths map to
``root/<folder>/...`` in My Drive; parent folders are created on upload. Drive keeps duplicates
under one name and reads are not seekable, which the store already copes with: names are
unique, the manifest is written last, and checkpoints are downloaded before they are loaded.
Credentials are the ones ``gpupool auth colab`` saved, unless ``google_auth`` is given.

What this class changes in PyDrive2's behaviour, and why:

* every request has a timeout (``request_timeout``, 60 s like the provider; PyDrive2 sets none,
  so a stalled upload blocked an import forever) and a bounded retry (``retries``) that also
  covers timeouts and resets (PyDrive2 retries only 5xx and rate limits, up to 16 times);
* creating a folder or a file is never repeated blindly: PyDrive2 re-sends an insert whose
  answer was a 5xx, making two objects of one name. Here an upload goes through one resumable
  session (a lost answer is resolved by asking the session), and before any insert is sent
  again Drive is asked what exists under that name; a file put where one exists replaces it;
* deletion is for good (``trash_only=False``): trashed files still count against the quota.
"""

from __future__ import annotations

import errno
import http.client
import threading
import time
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import IO, Any

from pydrive2.fs import GDriveFileSystem

from gpupool.errors import CredentialsError, RemoteNotFound

from .config import DEFAULT_CLIENT_SECRETS, DEFAULT_CREDENTIALS
from .drive import (
    AUTH_HINT,
    FOLDER_MIME,
    PROVIDER,
    RETRYABLE_REASONS,
    Drive,
    credential_errors,
    load_client_config,
    open_auth,
)

PROTOCOL = "gdrive"
REQUEST_TIMEOUT = 60.0


class DriveFileSystem(GDriveFileSystem):
    protocol = PROTOCOL

    def __init__(self, google_auth: Any = None, client_secrets: str | None = None,
                 credentials_file: str | None = None, trash_only: bool = False,
                 request_timeout: float = REQUEST_TIMEOUT, retries: int = 6,
                 retry_delay: float = 0.5, upload_chunk_bytes: int = 8 * 1024 * 1024,
                 sleep: Callable[[float], None] = time.sleep, **kwargs: Any):
        """``retries`` temporary failures are retried per request, ``retry_delay`` seconds
        doubling (at most 20 s) slept on ``sleep`` (tests record it instead of waiting)."""
        if google_auth is None:
            client = load_client_config(Path(client_secrets or DEFAULT_CLIENT_SECRETS))
            google_auth = open_auth(client, Path(credentials_file or DEFAULT_CREDENTIALS),
                                    timeout=request_timeout)
        else:
            _bound_requests(google_auth, request_timeout)
        super().__init__("root", google_auth=google_auth, trash_only=trash_only, **kwargs)
        self.retries, self.retry_delay, self.sleep = retries, retry_delay, sleep
        self.upload_chunk_bytes = upload_chunk_bytes
        self._api: Drive | None = None

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

    # -- requests: bounded retries ---------------------------------------------------------

    def _drive(self) -> Drive:
        """gpupool's Drive client on the same credentials (signed in as PyDrive2 would)."""
        if self._api is None:
            self._retry(self._sign_in)
            self._api = Drive(self.client.auth, retries=self.retries, base_delay=self.retry_delay,
                              max_delay=20.0, chunk_bytes=self.upload_chunk_bytes, sleep=self.sleep)
        return self._api

    def _sign_in(self) -> None:
        auth = self.client.auth
        if auth.access_token_expired:
            auth.LocalWebserverAuth()  # non-interactive: refreshes the saved credentials
        if auth.service is None:
            auth.Authorize()

    def _retry(self, call: Callable[[], Any], *, gone_is_done: bool = False) -> Any:
        """``call()``, sent again after a temporary failure, at most ``retries`` times; the
        last error is raised as it is (timeouts and resets are ``OSError``s), but refused
        credentials become a ``CredentialsError`` that says how to sign in again, and Drive's
        404 (an object deleted since its id was looked up, e.g. a checkpoint another machine
        pruned) becomes ``FileNotFoundError``: the one error fsspec's users, the checkpoint
        store among them, expect for a missing path."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except credential_errors() as err:
                raise CredentialsError(PROVIDER, f"Google refused the saved credentials "
                                                 f"({err}); {AUTH_HINT}") from None
            except Exception as err:
                if _status(err) == 404 or isinstance(err, RemoteNotFound):
                    if gone_is_done and attempt > 0:
                        return None  # an earlier try did it; its answer was lost
                    raise _missing(err) from None
                if not _temporary(err) or attempt == self.retries:
                    raise
                self.sleep(min(20.0, self.retry_delay * 2 ** attempt))
        raise AssertionError("unreachable")

    def _gdrive_list(self, query: str) -> Iterator[dict]:
        param = {"q": query, "maxResults": 1000}
        param.update(self._list_params)
        pages = self.client.ListFile(param)
        return chain.from_iterable(iter(lambda: self._retry(lambda: next(pages, None)), None))

    def info(self, path: str) -> dict:
        return self._retry(lambda: _unwrapped("info")(self, path))

    def _gdrive_get_file(self, item_id: str, rpath: str, callback: Any = None,
                         block_size: int | None = None) -> None:
        self._retry(lambda: _unwrapped("_gdrive_get_file")(self, item_id, rpath,
                                                           callback, block_size))

    def _gdrive_open_file(self, item_id: str) -> Any:
        return self._retry(lambda: _unwrapped("_gdrive_open_file")(self, item_id))

    def _gdrive_delete_file(self, item_id: str) -> None:
        self._retry(lambda: _unwrapped("_gdrive_delete_file")(self, item_id), gone_is_done=True)

    # -- inserts: once ---------------------------------------------------------------------

    def _gdrive_create_dir(self, parent_id: str, title: str) -> dict:
        drive = self._drive()
        body = {"title": title, "mimeType": FOLDER_MIME, "parents": [{"id": parent_id}]}
        try:
            return drive.create_once(parent_id, title,
                                     lambda: drive.service.files().insert(body=body).execute(),
                                     same=lambda i: i.get("mimeType") == FOLDER_MIME,
                                     known_absent=True)  # PyDrive2 has just looked
        except RemoteNotFound as err:  # the parent folder was deleted meanwhile
            raise _missing(err) from None

    def _gdrive_upload_fobj(self, title: str, parent_id: str, stream: IO[bytes],
                            callback: Any = None) -> dict:
        """Upload ``stream`` as ``title`` in ``parent_id``: one resumable session, and one
        live file of that name afterwards (one with these bytes already there is kept)."""
        try:
            return self._drive().put(parent_id, title, stream)
        except RemoteNotFound as err:  # the parent folder was deleted meanwhile
            raise _missing(err) from None


def _unwrapped(name: str) -> Callable[..., Any]:
    """PyDrive2's method without its own retry decorator (it re-sends 5xx up to 16 times)."""
    method = getattr(GDriveFileSystem, name)
    return getattr(method, "__wrapped__", method)


def _bound_requests(auth: Any, timeout: float) -> None:
    """Give a caller's ``GoogleAuth`` a request timeout if it has none (read when its Http
    objects are built: drop the ones built without it)."""
    if auth.http_timeout is None:
        auth.http_timeout = timeout
        auth.thread_local = threading.local()
        auth.http = auth.service = None  # rebuilt by the next call (PyDrive2's LoadAuth)


def _missing(err: Exception) -> FileNotFoundError:
    """Drive's 404 as fsspec's users expect a missing path (``CheckpointStore`` maps it on)."""
    return FileNotFoundError(errno.ENOENT, f"Drive has no such file or folder ({err})")


def _status(err: Exception) -> int | None:
    error = getattr(err, "error", None)
    return int(error.get("code", 0)) if isinstance(error, dict) else None


def _temporary(err: Exception) -> bool:
    """A failure worth another try: 429/5xx, a rate-limit 403, a timeout or a reset."""
    from pydrive2.files import ApiRequestError

    if isinstance(err, ApiRequestError):
        code = _status(err) or 0
        return code == 429 or code >= 500 or (
            code == 403 and err.GetField("reason") in RETRYABLE_REASONS)
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    import httplib2

    return isinstance(err, (OSError, http.client.HTTPException, httplib2.HttpLib2Error))


def register() -> None:
    """Make ``gdrive://`` URLs use this class (what the entry point does at fsspec import)."""
    import fsspec

    fsspec.register_implementation(PROTOCOL, DriveFileSystem, clobber=True)
