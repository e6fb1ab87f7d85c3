"""``gpupool auth colab``: sign in once, save the credentials (0600), prepare the Drive folder.

The one interactive step in the Colab provider, and the first thing a new user meets, so it
walks them through it:

1. Without an OAuth client yet, it prints the steps that create one in the Google Cloud console
   and asks for the downloaded JSON, which it copies into place (0600).
2. With a browser on this machine, it opens it and catches Google's redirect on a loopback
   port (oauth2client's one-request server), for up to 5 minutes. Without one (no display,
   ``--no-browser`` or ``--paste``), or when the browser would not open, it prints the sign-in
   URL and takes the address the browser was sent to, pasted back from any other machine (as
   rclone's ``authorize`` does): Google no longer offers the out-of-band flow. It never says
   a browser was opened when none was.
3. The code is exchanged over an HTTP client with a timeout; Google out of reach is a clear
   error, never a traceback. Afterwards everything runs non-interactively from the saved file.
"""

from __future__ import annotations

import os
import shutil
import sys
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from gpupool.errors import CredentialsError, ProviderError

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
BROWSER_WAIT_SECONDS = 300.0
AGAIN = "run `gpupool auth colab` again"

CLIENT_GUIDE = """\
Colab runs need a Google OAuth client of your own. Create it once (about 5 minutes):
  1. Create a Google Cloud project (any name): https://console.cloud.google.com/projectcreate
  2. Enable the Google Drive API in it:
     https://console.cloud.google.com/apis/library/drive.googleapis.com
  3. Set up the consent screen: https://console.cloud.google.com/auth/overview
     (Get started; audience "External"; then under Audience > Test users add your own address).
  4. Create the client: https://console.cloud.google.com/auth/clients > Create client >
     Application type "Desktop app" > Create, then "Download JSON".
  5. Give that file's path below; gpupool copies it to {path} (mode 0600).
"""

PASTE_GUIDE = """\
Sign in to Google on any machine with a browser:
  1. Open this address, choose your account and allow access to Google Drive:
     {url}
  2. Google then sends the browser to {redirect}... ; that page does not load, which is expected.
     Copy the whole address from the address bar and paste it below.
"""


def sign_in(config: ColabConfig, *, launch_browser: bool = True, paste: bool = False,
            prompt: Callable[[str], str] = input, echo: Callable[[str], None] = print,
            auth_factory: AuthFactory | None = None) -> dict:
    """Run the OAuth flow, save the credentials (0600), then :func:`prepare_drive`.

    Raises ``CredentialsError`` when Google refuses (the message says what to do) and
    ``ProviderError`` when Google cannot be reached."""
    client = client_config(config, prompt, echo)
    path = Path(config.credentials_file)
    if path.exists():
        try:  # signed in before and still valid: nothing to ask (delete the file to switch)
            return prepare_drive(config, auth_factory=auth_factory)
        except CredentialsError:
            echo(f"The saved credentials in {path} no longer work; signing in again.")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    interactive = os.environ.pop("GDRIVE_NON_INTERACTIVE", None)
    try:
        auth = (auth_factory or default_auth_factory)(auth_settings(client, path))
        if paste or not launch_browser or not browser_available():
            if not paste and launch_browser:
                echo("No web browser can be opened on this machine (no display).")
            _paste_flow(auth, prompt, echo)
        else:
            _browser_flow(auth, prompt, echo)
    except credential_errors() as err:
        raise CredentialsError(PROVIDER, f"sign-in failed: {err}; {AGAIN}") from None
    finally:
        if interactive is not None:
            os.environ["GDRIVE_NON_INTERACTIVE"] = interactive
    mask = os.umask(0o077)  # created private, not chmod-ed after a window of being readable
    try:
        auth.SaveCredentialsFile(str(path))
    finally:
        os.umask(mask)
    secure_file(path)
    return prepare_drive(config, auth_factory=auth_factory)


def browser_available() -> bool:
    """Whether a graphical browser can be opened here. On Linux without a display, Python's
    ``webbrowser`` would pick a text browser in this terminal, or nothing, so: no."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


# -- the OAuth client ----------------------------------------------------------------------

def client_config(config: ColabConfig, prompt: Callable[[str], str],
                  echo: Callable[[str], None]) -> dict:
    """The OAuth client; when there is none yet, the steps to create one, then its file."""
    target = Path(config.client_secrets).expanduser()
    if target.exists():
        return load_client_config(target)  # a broken file: its error says what is wrong
    echo(CLIENT_GUIDE.format(path=target))
    try:
        answer = prompt("Path of the downloaded client JSON").strip()
    except EOFError:
        raise CredentialsError(PROVIDER, f"no OAuth client at {target}; follow the steps above, "
                                         f"then {AGAIN}") from None
    source = Path(answer.strip("'\"")).expanduser()
    client = load_client_config(source)
    install_client_file(source, target)
    echo(f"OAuth client saved to {target}")
    return client


def install_client_file(source: Path, target: Path) -> None:
    """Copy the client JSON into place, readable by its owner only (it holds the secret)."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copyfile(source, staging)
    os.chmod(staging, 0o600)
    os.replace(staging, target)


# -- the two ways to get a code --------------------------------------------------------------

def _browser_flow(auth: Any, prompt: Callable[[str], str], echo: Callable[[str], None]) -> None:
    """Open the browser at the sign-in page and catch Google's redirect on a loopback port
    (oauth2client's one-request server). Says it opened the browser only when it did; when
    it could not, falls back to the paste flow."""
    from oauth2client.tools import ClientRedirectHandler, ClientRedirectServer

    wait_seconds = BROWSER_WAIT_SECONDS
    server = ClientRedirectServer(("127.0.0.1", 0), ClientRedirectHandler)
    try:
        auth.GetFlow()
        auth.flow.redirect_uri = f"http://127.0.0.1:{server.server_address[1]}/"
        url = auth.GetAuthUrl()
        if not webbrowser.open(url, new=2):
            echo("Could not open a web browser on this machine.")
            _paste_flow(auth, prompt, echo)
            return
        echo(f"Opened your web browser to sign in to Google; waiting up to {wait_seconds:.0f} s "
             f"for you to allow access. If no page appeared, open this address:\n{url}")
        code = _wait_for_redirect(server, wait_seconds)
    finally:
        server.server_close()
    exchange_code(auth, code)


def _wait_for_redirect(server: Any, wait_seconds: float) -> str:
    """The code from the browser's visit to the loopback server (other requests, such as a
    favicon, are answered and ignored)."""
    import time

    server.timeout = 1.0
    give_up = time.monotonic() + wait_seconds
    while time.monotonic() < give_up:
        server.handle_request()  # returns after one request, or after server.timeout
        answer = dict(server.query_params)
        if "error" in answer or "code" in answer:
            return code_from("?" + urlencode(answer))
    raise CredentialsError(PROVIDER, f"no answer from the browser within {wait_seconds:.0f} s; "
                                     "run `gpupool auth colab --no-browser` to paste the "
                                     "address instead")


def _paste_flow(auth: Any, prompt: Callable[[str], str], echo: Callable[[str], None]) -> None:
    auth.GetFlow()
    auth.flow.redirect_uri = REDIRECT
    echo(PASTE_GUIDE.format(url=auth.GetAuthUrl(), redirect=REDIRECT))
    try:
        answer = prompt("Address (or just the code)").strip()
    except EOFError:
        raise CredentialsError(PROVIDER, f"no address was pasted; {AGAIN}") from None
    exchange_code(auth, code_from(answer))


def code_from(answer: str) -> str:
    """The ``code`` in a pasted redirect address, or the answer itself if it is a bare code."""
    if "://" not in answer and "code=" not in answer:
        if not answer:
            raise CredentialsError(PROVIDER, f"nothing was pasted; {AGAIN}")
        return unquote(answer)  # copied from the address bar, its "/" reads "%2F"
    query = parse_qs(urlsplit(answer).query or answer.partition("?")[2])
    if "error" in query:
        raise CredentialsError(PROVIDER, f"Google answered {query['error'][0]!r} (access was not "
                                         f"allowed); {AGAIN} and choose Allow")
    if not query.get("code"):
        raise CredentialsError(PROVIDER, f"the pasted address has no code= in it; paste the whole "
                                         f"address the browser ended on; {AGAIN}")
    return query["code"][0]


def exchange_code(auth: Any, code: str) -> None:
    """Trade the one-time code for credentials, over the auth's own HTTP client (with its
    timeout; oauth2client's default one has none), then build the Drive service."""
    from oauth2client.client import FlowExchangeError

    try:
        auth.credentials = auth.flow.step2_exchange(code, http=auth._build_http())
        auth.Authorize()
    except FlowExchangeError as err:
        raise CredentialsError(PROVIDER, f"Google refused the code ({err}); a code works once "
                                         f"and only for a few minutes: {AGAIN}") from None
    except _network_errors() as err:
        raise _unreachable(err) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    import httplib2

    return (httplib2.HttpLib2Error, OSError)


def _unreachable(err: BaseException) -> ProviderError:
    return ProviderError(PROVIDER, f"cannot reach Google's sign-in service ({type(err).__name__}: "
                                   f"{err}); check the network or proxy (HTTPS_PROXY), then {AGAIN}")


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
