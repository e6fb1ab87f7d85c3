"""``gpupool auth colab``: sign in once, save the credentials (0600), prepare the Drive folder.

The one interactive step in the Colab provider. PyDrive2's loopback-redirect flow
(``LocalWebserverAuth``) opens a browser, or prints the URL with ``launch_browser=False`` (for
a machine without one: forward the port with ``ssh -L 8080:localhost:8080``). With ``paste``
the user copies the ``code`` from the address the browser was sent to, since Google no longer
allows the out-of-band flow. Afterwards everything runs non-interactively from the saved file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gpupool.errors import CredentialsError

from .config import ColabConfig
from .drive import (
    PROVIDER,
    AuthFactory,
    Drive,
    auth_settings,
    credential_errors,
    default_auth_factory,
    load_client_config,
    open_auth,
    secure_file,
)

REDIRECT = "http://localhost:8080/"


def sign_in(config: ColabConfig, *, launch_browser: bool = True, paste: bool = False,
            prompt: Callable[[str], str] = input, echo: Callable[[str], None] = print,
            auth_factory: AuthFactory | None = None) -> dict:
    """Run the OAuth flow, save the credentials, then :func:`prepare_drive`."""
    client = load_client_config(config.client_secrets)
    path = Path(config.credentials_file)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    interactive = os.environ.pop("GDRIVE_NON_INTERACTIVE", None)
    try:
        auth = (auth_factory or default_auth_factory)(auth_settings(client, path))
        if paste:
            _paste_flow(auth, prompt, echo)
        else:
            auth.LocalWebserverAuth(launch_browser=launch_browser)
    except credential_errors() as err:
        raise CredentialsError(PROVIDER, f"sign-in failed: {err}") from None
    finally:
        if interactive is not None:
            os.environ["GDRIVE_NON_INTERACTIVE"] = interactive
    auth.SaveCredentialsFile(str(path))
    secure_file(path)
    return prepare_drive(config, auth_factory=auth_factory)


def _paste_flow(auth: Any, prompt: Callable[[str], str], echo: Callable[[str], None]) -> None:
    auth.GetFlow()
    auth.flow.redirect_uri = REDIRECT
    echo("Open this URL, allow access, then copy the address your browser ends up on "
         f"(it starts with {REDIRECT}, the page itself will not load):\n{auth.GetAuthUrl()}")
    answer = prompt("Address or code").strip()
    code = parse_qs(urlsplit(answer).query).get("code", [answer])[0]
    auth.Auth(code)


def prepare_drive(config: ColabConfig, *, auth_factory: AuthFactory | None = None,
                  drive: Drive | None = None) -> dict:
    """With saved credentials: create gpupool's Drive folder and check access."""
    if drive is None:
        client = load_client_config(config.client_secrets)
        drive = Drive(open_auth(client, config.credentials_file, auth_factory))
    folder = drive.folder_path(config.folder, "attempts")
    about = drive.about()
    secure_file(config.credentials_file)
    return {"user": (about.get("user") or {}).get("emailAddress") or about.get("name"),
            "folder": config.folder, "attempts_folder_id": folder,
            "credentials_file": str(config.credentials_file)}
