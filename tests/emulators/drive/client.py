"""The seam that points the unmodified PyDrive2 / googleapiclient / oauth2client stack at the
emulator.

PyDrive2 builds ``build("drive", "v2", http=...)`` from the bundled static discovery document,
whose rootUrl is ``https://www.googleapis.com/``; oauth2client posts refresh grants to the
credentials' ``token_uri`` (``https://oauth2.googleapis.com/token`` or
``https://accounts.google.com/o/oauth2/token``). :class:`LoopbackHttp` is an ``httplib2.Http``
that rewrites those origins to ``http://127.0.0.1:<port>`` before sending and refuses any
other non-loopback host, so a test can never reach the network. Everything above the socket
(discovery, media upload, OAuth refresh, PyDrive2, ``GDriveFileSystem``) is the real code.

Typical use::

    with DriveEmulator() as drive:
        creds = write_credentials_file(tmp_path / "creds.json", drive)
        auth = LoopbackGoogleAuth(drive, settings=emulator_settings(drive, creds))
        gdrive = GoogleDrive(auth)                 # or GDriveFileSystem("root/x", google_auth=auth)

or, without PyDrive2, ``build("drive", "v2", http=credentials.authorize(loopback_http(drive)),
static_discovery=True)``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import httplib2
from pydrive2.auth import GoogleAuth

GOOGLE_ORIGINS = (
    "https://www.googleapis.com",  # Drive API, media upload/download, batch
    "https://oauth2.googleapis.com",  # token_uri / revoke_uri in current client secrets
    "https://accounts.google.com",  # /o/oauth2/token: PyDrive2's default token_uri
)
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class LoopbackRefused(ValueError):
    """A request would have left the machine (a host that is neither Google nor loopback)."""


def _base_url(target) -> str:
    return target if isinstance(target, str) else target.base_url


class LoopbackHttp(httplib2.Http):
    """``httplib2.Http`` that sends Google's origins to the emulator at ``base_url``.

    Like PyDrive2's own ``_build_http``, 308 is not followed as a redirect: Drive uses it for
    "Resume Incomplete" during resumable uploads.
    """

    def __init__(self, base_url: str, timeout: float | None = None) -> None:
        super().__init__(timeout=timeout)
        self.base_url = base_url.rstrip("/")
        self.redirect_codes: frozenset[int] = frozenset(httplib2.REDIRECT_CODES) - {308}

    def rewrite(self, uri: str) -> str:
        for origin in GOOGLE_ORIGINS:
            if uri == origin or uri.startswith(origin + "/"):
                return self.base_url + uri[len(origin):]
        if urlsplit(uri).hostname not in LOOPBACK_HOSTS:
            raise LoopbackRefused(f"refusing to send a test request to {uri}")
        return uri

    def request(self, uri, method="GET", body=None, headers=None,
                redirections=httplib2.DEFAULT_MAX_REDIRECTS, connection_type=None):
        return super().request(self.rewrite(uri), method, body, headers, redirections,
                               connection_type)


def loopback_http(target, timeout: float | None = None) -> LoopbackHttp:
    """An unauthorized Http for the emulator (``target``: a DriveEmulator or its base URL)."""
    return LoopbackHttp(_base_url(target), timeout=timeout)


class LoopbackGoogleAuth(GoogleAuth):
    """PyDrive2's ``GoogleAuth`` whose every Http object (the service's, the per-thread ones
    from ``Get_Http_Object`` and the one used to refresh tokens) goes to the emulator."""

    def __init__(self, target, settings_file: str = "settings.yaml",
                 http_timeout: float | None = None, settings: dict | None = None) -> None:
        self.loopback_url = _base_url(target)
        super().__init__(settings_file=settings_file, http_timeout=http_timeout,
                         settings=settings)

    def _build_http(self) -> LoopbackHttp:
        return LoopbackHttp(self.loopback_url, timeout=self.http_timeout)


def emulator_settings(drive, credentials_file: str | os.PathLike) -> dict:
    """PyDrive2 settings for saved user credentials, with Google's real endpoint URLs
    (the seam rewrites them) and ``get_refresh_token`` as a CLI would use."""
    return {
        "client_config_backend": "settings",
        "client_config": {
            "client_id": drive.client_id,
            "client_secret": drive.client_secret,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": GOOGLE_TOKEN_URI,
            "revoke_uri": "https://oauth2.googleapis.com/revoke",
            "redirect_uri": "http://localhost:8080/",
        },
        "save_credentials": True,
        "save_credentials_backend": "file",
        "save_credentials_file": str(credentials_file),
        "get_refresh_token": True,
        "oauth_scope": ["https://www.googleapis.com/auth/drive"],
    }


def credentials_json(drive, *, refresh_token: str | None = None, access_token: str | None = None,
                     expired: bool = True, token_uri: str | None = None) -> str:
    """An oauth2client ``OAuth2Credentials`` JSON document, as ``SaveCredentialsFile`` writes.

    By default the access token is already expired, so the first call refreshes it through the
    emulator's token endpoint. ``token_uri`` defaults to the emulator's own URL; pass
    ``GOOGLE_TOKEN_URI`` to exercise the rewrite of Google's host instead.
    """
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    expiry = now - timedelta(hours=1) if expired else now + timedelta(hours=1)
    return json.dumps({
        "_module": "oauth2client.client", "_class": "OAuth2Credentials",
        "access_token": access_token or "ya29.stale-emulator-token",
        "client_id": drive.client_id, "client_secret": drive.client_secret,
        "refresh_token": refresh_token or drive.refresh_token,
        "token_expiry": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "token_uri": token_uri or drive.token_uri,
        "revoke_uri": "https://oauth2.googleapis.com/revoke",
        "user_agent": None, "id_token": None, "id_token_jwt": None,
        "token_response": None, "token_info_uri": "https://oauth2.googleapis.com/tokeninfo",
        "scopes": ["https://www.googleapis.com/auth/drive"], "invalid": False,
    })


def write_credentials_file(path: str | os.PathLike, drive, **kwargs) -> str:
    """Write :func:`credentials_json` to ``path`` (for ``save_credentials_file``)."""
    with open(path, "w") as handle:
        handle.write(credentials_json(drive, **kwargs))
    return str(path)
