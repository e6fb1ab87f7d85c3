"""A loopback Google Drive v2 (+ OAuth token endpoint) emulator for the real client stack.

Public API::

    DriveEmulator            context manager; .state (DriveState), .inject(endpoint, fault),
                             .base_url, .token_uri, .refresh_token, .calls(endpoint), .errors
    DriveState / DriveFile   files (id, title, mime_type, parents, content, md5_checksum,
                             file_size, created, modified, trashed), tokens, request log
    faults                   rate_limit(), too_many_requests(), server_error(500|503),
                             service_unavailable(), token_expired(), connection_reset(),
                             cut_upload(after_bytes), http_error(status, reason, message)
    LoopbackHttp, loopback_http(emulator)      httplib2.Http rewriting Google's hosts
    LoopbackGoogleAuth(emulator, settings=…)   pydrive2 GoogleAuth using LoopbackHttp
    emulator_settings, credentials_json, write_credentials_file   saved-credential helpers
    drive_emulator_fixture   pytest fixture named ``drive_emulator`` (import it into a test
                             module or a conftest.py)

See client.py for the seam, faults.py for endpoint names, uploads.py for the resumable protocol.
"""

from . import faults
from .client import (
    GOOGLE_TOKEN_URI,
    LoopbackGoogleAuth,
    LoopbackHttp,
    LoopbackRefused,
    credentials_json,
    emulator_settings,
    loopback_http,
    write_credentials_file,
)
from .faults import Fault, FaultPlan
from .fixtures import drive_emulator_fixture
from .server import DriveEmulator
from .state import COLAB_MIME, FOLDER_MIME, DriveFile, DriveState

__all__ = [
    "COLAB_MIME", "FOLDER_MIME", "GOOGLE_TOKEN_URI", "DriveEmulator", "DriveFile",
    "DriveState", "Fault", "FaultPlan", "LoopbackGoogleAuth", "LoopbackHttp",
    "LoopbackRefused", "credentials_json", "drive_emulator_fixture", "emulator_settings",
    "faults",
    "loopback_http", "write_credentials_file",
]
