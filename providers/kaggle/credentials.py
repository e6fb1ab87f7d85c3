"""Finding Kaggle credentials where the kaggle client looks for them, without printing them.

Order (the client's: access tokens before legacy keys): an explicitly configured kaggle.json,
``$KAGGLE_API_TOKEN`` (the token or a file holding it), ``~/.kaggle/access_token``,
``$KAGGLE_USERNAME`` + ``$KAGGLE_KEY``, then ``kaggle.json`` in ``$KAGGLE_CONFIG_DIR``,
``$XDG_CONFIG_HOME/kaggle`` or ``~/.kaggle``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpupool.accounts import team_sign_in_hint
from gpupool.errors import ConfigError, CredentialsError

log = logging.getLogger(__name__)

HINT = ("run `gpupool auth kaggle` (it checks your API key and saves it), or put it in "
        "~/.kaggle/kaggle.json, or set KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY")


@dataclass(frozen=True)
class Credentials:
    """A legacy key (username + key, HTTP Basic) or an access token (Bearer)."""

    source: str  # where they were found, safe to show
    username: str | None = None
    key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def secrets(self) -> list[str]:
        return [s for s in (self.key, self.token) if s]


def find_credentials(explicit: Path | None = None) -> Credentials:
    """The first credentials found; ``CredentialsError`` (with a hint) when there are none."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_dir():  # a KAGGLE_CONFIG_DIR-style folder: its kaggle.json
            path = path / "kaggle.json"
        found = _from_json(path)
        if found is None:
            raise CredentialsError("kaggle", f"no username/key in {explicit}; {HINT}")
        return found
    for finder in (_token_env, _token_file, _key_env, _key_file):
        found = finder()
        if found is not None:
            return found
    raise CredentialsError("kaggle", f"no Kaggle credentials found; {HINT}")


def _token_env() -> Credentials | None:
    value = os.environ.get("KAGGLE_API_TOKEN", "").strip()
    if not value:
        return None
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        token = path.read_text().strip()
        return Credentials(f"KAGGLE_API_TOKEN (file {path})", token=token) if token else None
    return Credentials("KAGGLE_API_TOKEN", token=value)


def _token_file() -> Credentials | None:
    for name in ("access_token", "access_token.txt"):
        path = Path("~/.kaggle").expanduser() / name
        if path.is_file() and path.read_text().strip():
            return Credentials(str(path), token=path.read_text().strip())
    return None


def _key_env() -> Credentials | None:
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return Credentials("KAGGLE_USERNAME/KAGGLE_KEY", username=user, key=key)
    return None


def config_dir() -> Path:
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"]).expanduser()
    if os.environ.get("XDG_CONFIG_HOME"):
        xdg = Path(os.environ["XDG_CONFIG_HOME"]) / "kaggle"
        if (xdg / "kaggle.json").is_file():
            return xdg
    return Path("~/.kaggle").expanduser()


def _key_file() -> Credentials | None:
    return _from_json(config_dir() / "kaggle.json")


def _from_json(path: Path) -> Credentials | None:
    try:
        data = json.loads(path.read_text())
        user, key = str(data["username"]), str(data["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("kaggle: %s is readable by other users of this machine; run chmod 600 %s",
                    path, path)
    return Credentials(str(path), username=user, key=key) if user and key else None


# -- `gpupool auth kaggle` -----------------------------------------------------------------------

Check = Callable[[Path], tuple[bool, str]]


def sign_in(provider: Any, *, username: str | None = None, key_file: Path | None = None,
            prompt: Callable[..., Any] = input, echo: Callable[[str], None] = print) -> str:
    """``gpupool auth kaggle``: ask for (or read) the key, check it against Kaggle with a private
    trial file, then move that file into place (0600). Returns what to tell the person.

    ``prompt(text, hide_input=True)`` asks for the key without echoing it (click's prompt).
    Raises ``ConfigError`` for a team's pool: each member signs in with their own pool."""
    if provider.accounts() != ["default"]:
        raise ConfigError(team_sign_in_hint("kaggle", provider.accounts(), "credentials"))
    if key_file is not None:
        username, key = read_key_file(key_file)
    else:
        echo("Your API key: kaggle.com > Settings > API > Create New Token (the username and key "
             "are in the kaggle.json it downloads).")
        username = username or str(prompt("Kaggle username"))
        key = str(prompt("Kaggle API key (not shown)", hide_input=True))

    def check(path: Path) -> tuple[bool, str]:
        trial = type(provider)(provider.config.model_copy(update={"credentials": path}),
                               provider.data_dir, provider.clock)
        return trial.check_credentials()

    target = credentials_path(provider.config.credentials)
    hint = save_checked(username or "", key, target, check)
    lines = [f"Kaggle accepted the key: {hint}", f"saved to {target} (mode 0600)"]
    shadowing = overriding_environment()
    if shadowing and provider.config.credentials is None:
        lines.append(f"note: {', '.join(shadowing)} set in this environment take precedence over "
                     "the saved file; unset them to use it")
    return "\n".join(lines)


def credentials_path(explicit: Path | None = None) -> Path:
    """Where ``gpupool auth kaggle`` saves: the configured file, else the client's kaggle.json."""
    return Path(explicit).expanduser() if explicit is not None else config_dir() / "kaggle.json"


def read_key_file(path: Path) -> tuple[str, str]:
    """(username, key) from a kaggle.json downloaded from kaggle.com > Settings > API."""
    found = _from_json(Path(path).expanduser())
    if found is None or not found.username or not found.key:
        raise CredentialsError("kaggle", f"{path} holds no username and key; download it again "
                                         "from kaggle.com > Settings > API > Create New Token")
    return found.username, found.key


def save_checked(username: str, key: str, target: Path, check: Check) -> str:
    """Write the credentials to a private file beside ``target``, ``check`` them against the
    Kaggle API with that file, and only then move it into place (mode 0600).

    Returns the check's hint; raises ``CredentialsError`` when Kaggle refuses them (nothing is
    saved then). The key is never printed: messages name the file, not its contents."""
    username, key = username.strip(), key.strip()
    if not username or not key:
        raise CredentialsError("kaggle", "both a username and an API key are needed")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    trial = target.with_name(f".{target.name}.{os.getpid()}.trial")
    _write_private(trial, json.dumps({"username": username, "key": key}))
    try:
        ok, hint = check(trial)
        if not ok:
            raise CredentialsError("kaggle", hint.replace(str(trial), "the credentials given"))
        os.replace(trial, target)
    finally:
        trial.unlink(missing_ok=True)
    return hint.replace(str(trial), str(target))


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only from the first byte (no chmod window)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def overriding_environment() -> list[str]:
    """Variables the kaggle client reads before kaggle.json: a saved file is not used while set."""
    names = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY")
    return [name for name in names if os.environ.get(name)]
