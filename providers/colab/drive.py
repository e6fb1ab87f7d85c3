"""Google Drive access for the scheduler's side: saved OAuth user credentials, retries, folders,
resumable uploads.

Built on PyDrive2's ``GoogleAuth`` (saved credentials, token refresh) and the Drive v2 service it
builds; every request goes through :meth:`Drive.execute`, which retries Drive's rate limits,
5xx answers and dropped connections with jittered exponential backoff, and turns expired or
revoked credentials into a ``CredentialsError`` that says to run ``gpupool auth colab``.

The seam for tests is ``auth_factory``: a callable building the ``GoogleAuth`` from a settings
dict (tests pass one whose ``_build_http`` goes to a loopback emulator). PyDrive2 is imported
only when a ``Drive`` is opened.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import http.client
import io
import json
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gpupool.errors import CredentialsError, ProviderError, RemoteNotFound

PROVIDER = "colab"
DRIVE_SCOPE = "https://www.googleapis.com/auth/drive"
FOLDER_MIME = "application/vnd.google-apps.folder"
COLAB_MIME = "application/vnd.google.colaboratory"
RETRYABLE_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "backendError"}
AUTH_HINT = "run `gpupool auth colab` to sign in again"
SERVICE_ACCOUNT_HINT = (
    "a service account is configured, but service accounts have no Drive storage quota "
    "(uploads to My Drive fail with storageQuotaExceeded); use an OAuth client of type "
    "'Desktop app' and run `gpupool auth colab`"
)

AuthFactory = Callable[[dict], Any]
Sleep = Callable[[float], None]


def default_auth_factory(settings: dict) -> Any:
    from pydrive2.auth import GoogleAuth

    return GoogleAuth(settings=settings)


def load_client_config(path: Path) -> dict:
    """The OAuth client from a client_secrets.json ("installed" or "web" application)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CredentialsError(PROVIDER, (
            f"no OAuth client at {path}: create a 'Desktop app' OAuth client in the Google "
            "Cloud console (Drive API enabled), save its JSON there, then run `gpupool auth colab`"
        )) from None
    except ValueError as err:
        raise CredentialsError(PROVIDER, f"{path} is not JSON ({err})") from None
    if data.get("type") == "service_account":
        raise CredentialsError(PROVIDER, f"{path}: {SERVICE_ACCOUNT_HINT}")
    client = data.get("installed") or data.get("web")
    if not client or "client_id" not in client or "client_secret" not in client:
        raise CredentialsError(PROVIDER, f"{path} holds no OAuth client (installed/web)")
    return client


def auth_settings(client: dict, credentials_file: Path) -> dict:
    """PyDrive2 settings for saved user credentials with a refresh token."""
    return {
        "client_config_backend": "settings",
        "client_config": {
            "client_id": client["client_id"],
            "client_secret": client["client_secret"],
            "auth_uri": client.get("auth_uri", "https://accounts.google.com/o/oauth2/auth"),
            "token_uri": client.get("token_uri", "https://oauth2.googleapis.com/token"),
            "revoke_uri": "https://oauth2.googleapis.com/revoke",
            "redirect_uri": "http://localhost:8080/",
        },
        "save_credentials": True,
        "save_credentials_backend": "file",
        "save_credentials_file": str(credentials_file),
        "get_refresh_token": True,
        "oauth_scope": [DRIVE_SCOPE],
    }


def secure_file(path: Path) -> None:
    """Credentials are readable by their owner only."""
    if Path(path).exists():
        os.chmod(path, 0o600)


def credential_errors() -> tuple[type[BaseException], ...]:
    """What oauth2client and PyDrive2 raise when Google refuses the saved credentials."""
    from oauth2client.client import AccessTokenRefreshError
    from pydrive2.auth import AuthenticationError, InvalidCredentialsError, RefreshError

    return (AccessTokenRefreshError, RefreshError, InvalidCredentialsError, AuthenticationError)


def open_auth(client: dict, credentials_file: Path, factory: AuthFactory | None = None,
              timeout: float | None = None) -> Any:
    """A ``GoogleAuth`` from saved credentials, refreshed; never starts a browser flow.
    ``timeout`` bounds each HTTP request (PyDrive2 sets none: a stalled one blocks forever)."""
    os.environ.setdefault("GDRIVE_NON_INTERACTIVE", "1")
    auth = (factory or default_auth_factory)(auth_settings(client, credentials_file))
    if timeout is not None:
        auth.http_timeout = timeout  # read when its Http objects are built, in Authorize()
    if not Path(credentials_file).exists():
        raise CredentialsError(PROVIDER, f"no saved credentials at {credentials_file}; "
                                         "run `gpupool auth colab`")
    try:
        auth.LoadCredentialsFile(str(credentials_file))
        if auth.credentials is None:
            raise CredentialsError(PROVIDER, f"{credentials_file} is unreadable; {AUTH_HINT}")
        if auth.access_token_expired:
            auth.Refresh()
            auth.SaveCredentialsFile(str(credentials_file))
        auth.Authorize()
    except credential_errors() as err:
        raise CredentialsError(PROVIDER, f"Google refused the saved credentials ({err}); "
                                         f"{AUTH_HINT}") from None
    secure_file(credentials_file)
    return auth


class Drive:
    """The Drive v2 calls gpupool needs, each retried with backoff."""

    def __init__(self, auth: Any, *, sleep: Sleep = time.sleep, retries: int = 6,
                 base_delay: float = 0.5, max_delay: float = 32.0,
                 chunk_bytes: int = 8 * 1024 * 1024):
        self.auth = auth
        self.service = auth.service
        self.sleep = sleep
        self.retries = retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.chunk_bytes = chunk_bytes

    # -- retries ------------------------------------------------------------------------

    def execute(self, request: Any) -> Any:
        return self.retry(request.execute)

    def retry(self, call: Callable[[], Any]) -> Any:
        """Run ``call``; retry what Drive says is temporary; map the rest to gpupool errors."""
        return self._retry_each(call)

    def _retry_each(self, call: Callable[[], Any], look: Callable[[int], Any] | None = None) -> Any:
        """``call()`` until it returns, retrying what Drive says is temporary (with backoff) and
        mapping the rest, or the last failure, to gpupool errors. Before each try, ``look(attempt)``
        (outside the retried part) may answer instead: what an earlier try already did."""
        for attempt in range(self.retries + 1):
            found = look(attempt) if look is not None else None
            if found is not None:
                return found
            try:
                return call()
            except Exception as err:  # noqa: BLE001 - classified right below
                why = self._classify(err)
                if why is None or attempt == self.retries:
                    raise self._final(err, why) from None
                self.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def _delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _classify(self, err: Exception) -> str | None:
        """Why ``err`` is worth retrying, or None when it is not."""
        from googleapiclient.errors import HttpError

        if isinstance(err, HttpError):
            status = int(err.resp.status)
            if status == 429 or status >= 500:
                return f"HTTP {status}"
            if status == 403 and _reason(err) in RETRYABLE_REASONS:
                return _reason(err)
            return None
        if isinstance(err, (ConnectionError, socket.timeout, TimeoutError)):
            return type(err).__name__
        if isinstance(err, http.client.HTTPException):  # e.g. IncompleteRead: a cut response
            return type(err).__name__
        import httplib2

        if isinstance(err, httplib2.HttpLib2Error) and not isinstance(err, httplib2.RedirectLimit):
            return type(err).__name__
        return None

    def _final(self, err: Exception, why: str | None) -> Exception:
        from googleapiclient.errors import HttpError

        if isinstance(err, credential_errors()):
            return CredentialsError(PROVIDER, f"Google refused the saved credentials ({err}); "
                                              f"{AUTH_HINT}")
        if isinstance(err, HttpError):
            status, reason = int(err.resp.status), _reason(err)
            if status == 401:
                return CredentialsError(PROVIDER, f"Drive rejected the credentials; {AUTH_HINT}")
            if reason == "storageQuotaExceeded":
                return ProviderError(PROVIDER, "Drive storage is full (free accounts have 15 GB; "
                                               "Trash counts); free some space")
            if status == 404:  # gpupool's own error: never mistaken for a missing local file
                return RemoteNotFound(PROVIDER, f"Drive has no such file or folder ({reason})")
            return ProviderError(PROVIDER, f"Drive answered {status} {reason or ''}".strip()
                                 + (f" after {self.retries} retries" if why else ""))
        if why is not None:
            return ProviderError(PROVIDER, f"Drive unreachable ({why}) after {self.retries} retries")
        return err

    # -- files and folders --------------------------------------------------------------

    def list(self, query: str) -> list[dict]:
        items, token = [], None
        while True:
            page = self.execute(self.service.files().list(
                q=query, maxResults=1000, pageToken=token))
            items += page.get("items", [])
            token = page.get("nextPageToken")
            if not token:
                return items

    def children(self, parent: str) -> builtins.list[dict]:
        return self.list(f"'{parent}' in parents and trashed=false")

    def find(self, parent: str, title: str) -> dict | None:
        """The newest live file called ``title`` in ``parent`` (Drive allows duplicates)."""
        found = [i for i in self.list(_title_query(parent, title)) if i.get("title") == title]
        found.sort(key=lambda i: (i.get("modifiedDate", ""), i["id"]))
        return found[-1] if found else None

    def folder(self, parent: str, title: str) -> str:
        """The id of folder ``title`` in ``parent``, created (once) when missing."""
        body = {"title": title, "mimeType": FOLDER_MIME, "parents": [{"id": parent}]}
        item = self.create_once(parent, title, lambda: self.service.files().insert(body=body).execute(),
                                same=lambda i: i.get("mimeType") == FOLDER_MIME)
        return str(item["id"])

    def create_once(self, parent: str, title: str, send: Callable[[], dict],
                    same: Callable[[dict], bool] = lambda item: True, *,
                    known_absent: bool = False) -> dict:
        """Run the insert ``send()`` so that at most one live ``title`` results in ``parent``.

        An insert is not idempotent: when its outcome is unknown (a 5xx, a timeout or a reset
        may come after Drive did it), Drive is asked for a live ``title`` that ``same`` accepts
        before it is sent again, and one found is the result (``known_absent``: the caller just
        looked, so the first send needs no look). Raises ``ProviderError`` (or
        ``CredentialsError``) once the retries are spent or the failure is not temporary."""
        def look(attempt: int) -> dict | None:
            found = [] if known_absent and attempt == 0 else [
                i for i in self.list(_title_query(parent, title))
                if i.get("title") == title and same(i)]
            return max(found, key=lambda i: (i.get("modifiedDate", ""), i["id"])) if found else None

        return dict(self._retry_each(send, look))

    def folder_path(self, *titles: str, parent: str = "root") -> str:
        for title in titles:
            parent = self.folder(parent, title)
        return parent

    def upload(self, parent: str, title: str, source: Path | bytes | IO[bytes],
               mime: str = "application/octet-stream") -> dict:
        """Create a file by resumable upload (chunked; a dropped chunk resumes, not restarts).
        A chunk whose answer is lost is sent again to the same upload session, which Drive
        finishes once: it never makes a second file."""
        from googleapiclient.http import MediaIoBaseUpload

        if isinstance(source, Path):
            stream: Any = open(source, "rb")
        elif isinstance(source, bytes):
            stream = io.BytesIO(source)
        else:
            source.seek(0)  # googleapiclient sends the whole stream: a retry starts over
            stream = contextlib.nullcontext(source)
        with stream as handle:
            media = MediaIoBaseUpload(handle, mimetype=mime, chunksize=self.chunk_bytes,
                                      resumable=True)
            body = {"title": title, "mimeType": mime, "parents": [{"id": parent}]}
            request = self.service.files().insert(body=body, media_body=media)
            return self._resume(request)

    def put(self, parent: str, title: str, source: Path | bytes | IO[bytes],
            mime: str = "application/octet-stream") -> dict:
        """Upload ``source`` as ``title`` in ``parent``, leaving one live file of that name:
        one holding these bytes already (an earlier upload whose answer was lost, a submit
        repeated after a crash) is kept and nothing is sent; others of that name are deleted
        once the new one is there."""
        md5, size = _digest(source)

        def same(item: dict) -> bool:
            return item.get("md5Checksum") == md5 and int(item.get("fileSize") or -1) == size

        existing = [i for i in self.list(_title_query(parent, title)) if i.get("title") == title]
        item = next((i for i in existing if same(i)), None) or self.create_once(
            parent, title, lambda: self.upload(parent, title, source, mime), same,
            known_absent=True)
        for other in existing:
            if other["id"] != item["id"]:
                self.delete(other["id"])
        return item

    def update(self, file_id: str, data: bytes, mime: str = "application/json") -> dict:
        """Replace a small mutable file's content (status files only, never checkpoints)."""
        from googleapiclient.http import MediaIoBaseUpload

        media = MediaIoBaseUpload(io.BytesIO(data), mimetype=mime, resumable=True,
                                  chunksize=self.chunk_bytes)
        return self._resume(self.service.files().update(fileId=file_id, media_body=media))

    def _resume(self, request: Any) -> dict:
        response = None
        while response is None:
            _, response = self.retry(request.next_chunk)
        return response

    def download(self, file_id: str, target: Path) -> Path:
        from googleapiclient.http import MediaIoBaseDownload

        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            downloader = MediaIoBaseDownload(handle, self.service.files().get_media(fileId=file_id),
                                             chunksize=self.chunk_bytes)
            done = False
            while not done:
                _, done = self.retry(downloader.next_chunk)
        return target

    def download_ranges(self, file_id: str, target: Path, size: int,
                        advance: Callable[[int], None] = lambda n: None) -> None:
        """Fetch ``size`` bytes of ``file_id`` into ``target`` by HTTP Range requests of
        ``chunk_bytes`` each, after the bytes ``target`` already holds (a download cut
        earlier, even by another run, goes on where it stopped); a cut range is retried."""
        have = target.stat().st_size if target.exists() else 0
        if have > size:  # not a prefix of this file
            target.unlink()
            have = 0
        with open(target, "ab") as out:
            while have < size:
                request = self.service.files().get_media(fileId=file_id)
                request.headers["range"] = f"bytes={have}-{min(size, have + self.chunk_bytes) - 1}"
                data = self.retry(request.execute)
                if not data:
                    raise ProviderError(PROVIDER, f"Drive sent no bytes of {file_id} after {have}")
                out.write(data)
                have += len(data)
                advance(len(data))

    def read(self, file_id: str) -> bytes:
        return self.retry(lambda: self.service.files().get_media(fileId=file_id).execute())

    def delete(self, file_id: str) -> None:
        """Delete for good (a folder with all it holds). Not trash: trashed files still count
        against the account's storage quota until the trash is emptied. Gone already is fine."""
        try:
            self.execute(self.service.files().delete(fileId=file_id))
        except RemoteNotFound:
            pass

    def about(self) -> dict:
        return self.execute(self.service.about().get())


def _digest(source: Path | bytes | IO[bytes]) -> tuple[str, int]:
    """md5 (what Drive reports as ``md5Checksum``) and size of what an upload would send."""
    digest, size = hashlib.md5(), 0
    stream: Any = (open(source, "rb") if isinstance(source, Path) else
                   io.BytesIO(source) if isinstance(source, bytes) else source)
    if not isinstance(source, (Path, bytes)):
        stream.seek(0)
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    if isinstance(source, Path):
        stream.close()
    return digest.hexdigest(), size


def _title_query(parent: str, title: str) -> str:
    escaped = title.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{parent}' in parents and title='{escaped}' and trashed=false"


def _reason(err: Any) -> str | None:
    try:
        details = json.loads(err.content.decode())["error"]["errors"]
        return str(details[0].get("reason"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
