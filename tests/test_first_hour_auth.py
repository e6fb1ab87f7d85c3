"""Setting up credentials in the first hour: `gpupool auth colab` on a machine without a
browser (the Drive emulator's OAuth endpoints stand in for Google's), and `gpupool auth kaggle`
checking a key against the Kaggle emulator before saving it at 0600."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpupool.cli import cli
from gpupool.errors import CredentialsError, ProviderError
from gpupool.pool import Pool
from gpupool.settings import PoolSettings
from gpupool_providers.colab import ColabConfig, ColabProvider
from gpupool_providers.colab.auth import browser_available, sign_in
from tests.emulators.drive import LoopbackGoogleAuth, drive_emulator_fixture  # noqa: F401
from tests.emulators.kaggle import KaggleEmulator
from tests.providers.colab_support import client_secrets

KAGGLE_KEY = "kaggle-key-5d1e-never-shown"


@pytest.fixture(autouse=True)
def headless(monkeypatch, tmp_path):
    """A machine without a display, where opening a browser would be a lie."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(webbrowser, "open", lambda *a, **k: pytest.fail("a browser was opened"))
    monkeypatch.setattr(webbrowser, "open_new_tab", lambda *a, **k: pytest.fail("a browser was opened"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name in [k for k in os.environ if k.startswith("GPUPOOL_")]:
        monkeypatch.delenv(name)


class Person:
    """Answers the prompts as a person would: the path of the client JSON they downloaded, then
    the address their browser (on another machine) was sent to after they clicked Allow."""

    def __init__(self, drive, downloaded: Path | None = None, tamper=None):
        self.drive, self.downloaded, self.tamper = drive, downloaded, tamper
        self.shown: list[str] = []
        self.asked: list[str] = []

    def echo(self, text: str) -> None:
        self.shown.append(str(text))

    def prompt(self, question: str) -> str:
        self.asked.append(question)
        if "client JSON" in question:
            return str(self.downloaded)
        url = re.search(r"https://accounts\.google\.com/\S+", "\n".join(self.shown)).group(0)
        address = self._follow_to_redirect(url)
        return self.tamper(address) if self.tamper else address

    def _follow_to_redirect(self, url: str) -> str:
        """The browser's part: Google's consent page redirects to the loopback address."""
        emulated = url.replace("https://accounts.google.com", self.drive.base_url)

        class Stop(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        opener = urllib.request.build_opener(Stop)
        try:
            opener.open(emulated, timeout=30)
        except urllib.error.HTTPError as redirect:
            assert redirect.code == 302, redirect.read()
            return redirect.headers["Location"]
        raise AssertionError("the consent page did not redirect")


def colab_config(tmp_path: Path) -> ColabConfig:
    return ColabConfig(client_secrets=tmp_path / "config" / "client_secrets.json",
                       credentials_file=tmp_path / "config" / "credentials.json")


def installed_client(tmp_path: Path, drive) -> Path:
    """The OAuth client already in place (as after the first `gpupool auth colab`)."""
    (tmp_path / "config").mkdir(exist_ok=True)
    return client_secrets(tmp_path / "config" / "client_secrets.json", drive)


def loopback(drive):
    return lambda settings: LoopbackGoogleAuth(drive, settings=settings)


def test_headless_sign_in_walks_through_the_client_and_takes_the_pasted_address(drive_emulator, tmp_path):
    downloaded = client_secrets(tmp_path / "Downloads-client.json", drive_emulator)
    config = colab_config(tmp_path)
    person = Person(drive_emulator, downloaded)
    assert not browser_available()
    result = sign_in(config, prompt=person.prompt, echo=person.echo,
                     auth_factory=loopback(drive_emulator))
    shown = "\n".join(person.shown)
    assert "console.cloud.google.com/apis/library/drive.googleapis.com" in shown
    assert '"Desktop app"' in shown and "No web browser can be opened" in shown
    assert "has been opened" not in shown
    assert result["user"] == drive_emulator.state.user_email
    for path in (config.client_secrets, config.credentials_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    saved = json.loads(config.credentials_file.read_text())
    assert drive_emulator.state.refresh_token_valid(saved["refresh_token"])
    assert drive_emulator.state.find("gpupool")  # the Drive folder was prepared


def test_pasting_just_the_code_works_too(drive_emulator, tmp_path):
    installed_client(tmp_path, drive_emulator)
    person = Person(drive_emulator, tamper=lambda address: address.split("code=")[1].split("&")[0])
    result = sign_in(colab_config(tmp_path), paste=True, prompt=person.prompt, echo=person.echo,
                     auth_factory=loopback(drive_emulator))
    assert result["folder"] == "gpupool" and person.asked == ["Address (or just the code)"]


def test_google_out_of_reach_is_a_clear_error_not_a_traceback(drive_emulator, tmp_path):
    installed_client(tmp_path, drive_emulator)
    person = Person(drive_emulator)
    with pytest.raises(ProviderError, match="cannot reach Google's sign-in service") as caught:
        sign_in(colab_config(tmp_path), prompt=person.prompt, echo=person.echo,
                auth_factory=lambda s: LoopbackGoogleAuth("http://127.0.0.1:9", settings=s))
    assert "gpupool auth colab" in str(caught.value)
    assert not (tmp_path / "config" / "credentials.json").exists()


def test_refused_access_and_a_spent_code_say_what_to_do(drive_emulator, tmp_path):
    installed_client(tmp_path, drive_emulator)
    denied = Person(drive_emulator, tamper=lambda a: "http://localhost:8080/?error=access_denied")
    with pytest.raises(CredentialsError, match="access_denied.*choose Allow"):
        sign_in(colab_config(tmp_path), prompt=denied.prompt, echo=denied.echo,
                auth_factory=loopback(drive_emulator))
    spent = Person(drive_emulator, tamper=lambda a: "http://localhost:8080/?code=4%2F0Aspent")
    with pytest.raises(CredentialsError, match="Google refused the code"):
        sign_in(colab_config(tmp_path), prompt=spent.prompt, echo=spent.echo,
                auth_factory=loopback(drive_emulator))


def test_auth_colab_command_without_input_ends_cleanly(tmp_path):
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "providers": {"colab": {
        "client_secrets": str(tmp_path / "none.json"), "credentials_file": str(tmp_path / "c.json")}}}))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, "-m", "gpupool", "--config", str(pool_file), "auth", "colab"],
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: colab: no OAuth client at" in result.stderr and "follow the steps" in result.stderr
    assert "Desktop app" in result.stdout and "has been opened" not in result.stdout


def test_auth_colab_through_the_cli_prints_where_it_saved(drive_emulator, tmp_path):
    installed_client(tmp_path, drive_emulator)
    config = colab_config(tmp_path)
    pool = Pool(PoolSettings(data_dir=tmp_path / "data"), providers={"colab": ColabProvider(
        config, tmp_path / "colab", time.time, auth_factory=loopback(drive_emulator))})
    person = Person(drive_emulator)
    answer = person.prompt  # the URL is printed by the command itself: read it back from echo
    import click

    original_echo = click.echo

    def echo(message=None, *args, **kwargs):
        person.echo(str(message))
        original_echo(message, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(click, "echo", echo)
        patch.setattr(click, "prompt", lambda question, **kw: answer(question))  # the person
        result = CliRunner().invoke(cli, ["auth", "colab"], obj={"pool": pool})
    assert result.exit_code == 0, result.output
    assert f"credentials saved to {config.credentials_file} (mode 0600)" in result.output
    pool.close()


# -- `gpupool auth kaggle` ------------------------------------------------------------------------

@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    with KaggleEmulator("alice", KAGGLE_KEY, workdir=tmp_path / "emu") as emulator:
        emulator.connect(monkeypatch)
        monkeypatch.delenv("KAGGLE_USERNAME")
        monkeypatch.delenv("KAGGLE_KEY")
        yield emulator


def kaggle_pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                    "providers": {"kaggle": {"max_retries": 0}}}))
    return path


def test_auth_kaggle_checks_the_key_then_saves_it_private(kaggle, tmp_path):
    result = CliRunner().invoke(cli, ["--config", str(kaggle_pool(tmp_path)), "auth", "kaggle"],
                                input=f"alice\n{KAGGLE_KEY}\n")
    assert result.exit_code == 0, (result.output, result.exception)
    saved = tmp_path / "kaggle-config" / "kaggle.json"
    assert json.loads(saved.read_text()) == {"username": "alice", "key": KAGGLE_KEY}
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert "Kaggle accepted the key: user alice" in result.output
    assert KAGGLE_KEY not in result.output
    assert [p.name for p in saved.parent.iterdir()] == ["kaggle.json"]  # no trial file left


def test_auth_kaggle_refuses_a_wrong_key_and_saves_nothing(kaggle, tmp_path):
    wrong = "wrong-key-0000-also-secret"
    result = CliRunner().invoke(cli, ["--config", str(kaggle_pool(tmp_path)), "auth", "kaggle",
                                      "--username", "alice"], input=f"{wrong}\n")
    assert isinstance(result.exception, CredentialsError), (result.output, result.exception)
    assert "do not work" in str(result.exception)
    assert wrong not in result.output + str(result.exception)
    assert list((tmp_path / "kaggle-config").glob("*")) == []


def test_auth_kaggle_takes_the_downloaded_kaggle_json(kaggle, tmp_path):
    downloaded = tmp_path / "Downloads" / "kaggle.json"
    downloaded.parent.mkdir()
    downloaded.write_text(json.dumps({"username": "alice", "key": KAGGLE_KEY}))
    downloaded.chmod(0o600)
    result = CliRunner().invoke(cli, ["--config", str(kaggle_pool(tmp_path)), "auth", "kaggle",
                                      "--key-file", str(downloaded)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "kaggle-config" / "kaggle.json").exists() and KAGGLE_KEY not in result.output


def test_revoked_saved_credentials_lead_to_a_new_sign_in(drive_emulator, tmp_path):
    from tests.emulators.drive import write_credentials_file

    installed_client(tmp_path, drive_emulator)
    config = colab_config(tmp_path)
    write_credentials_file(config.credentials_file, drive_emulator)
    drive_emulator.revoke_refresh_token()
    person = Person(drive_emulator)
    result = sign_in(config, prompt=person.prompt, echo=person.echo,
                     auth_factory=loopback(drive_emulator))
    assert "no longer work; signing in again" in "\n".join(person.shown)
    assert result["user"] == drive_emulator.state.user_email
    saved = json.loads(config.credentials_file.read_text())
    assert saved["refresh_token"] != drive_emulator.refresh_token  # a new grant, not the revoked one


# -- with a browser on this machine -----------------------------------------------------------

class Browser:
    """The person's browser: given the sign-in address, it shows Google's consent page (the
    emulator's), and follows the redirect to gpupool's loopback server, as a real one does."""

    def __init__(self, drive, opens: bool = True):
        self.drive, self.opens = drive, opens
        self.visits: list[str] = []

    def open(self, url: str, new: int = 0, autoraise: bool = True) -> bool:
        self.visits.append(url)
        if not self.opens:
            return False
        import threading

        def visit() -> None:
            location = Person(self.drive)._follow_to_redirect(url)
            urllib.request.urlopen(location, timeout=30).read()

        threading.Thread(target=visit, daemon=True).start()
        return True


def with_display(monkeypatch, browser: Browser) -> None:
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(webbrowser, "get", lambda *a: browser)
    monkeypatch.setattr(webbrowser, "open", browser.open)


def test_with_a_browser_the_redirect_is_caught_on_a_loopback_port(drive_emulator, tmp_path, monkeypatch):
    installed_client(tmp_path, drive_emulator)
    browser = Browser(drive_emulator)
    with_display(monkeypatch, browser)
    person = Person(drive_emulator)
    result = sign_in(colab_config(tmp_path), prompt=person.prompt, echo=person.echo,
                     auth_factory=loopback(drive_emulator))
    assert result["user"] == drive_emulator.state.user_email
    assert len(browser.visits) == 1 and "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in browser.visits[0]
    assert "Opened your web browser" in "\n".join(person.shown) and person.asked == []


def test_a_browser_that_would_not_open_is_not_claimed_to_have_opened(drive_emulator, tmp_path, monkeypatch):
    installed_client(tmp_path, drive_emulator)
    browser = Browser(drive_emulator, opens=False)
    with_display(monkeypatch, browser)
    person = Person(drive_emulator)
    sign_in(colab_config(tmp_path), prompt=person.prompt, echo=person.echo,
            auth_factory=loopback(drive_emulator))
    shown = "\n".join(person.shown)
    assert "Could not open a web browser" in shown and "Opened your" not in shown
    assert person.asked == ["Address (or just the code)"]  # it fell back to pasting


def test_a_person_who_never_answers_in_the_browser_gets_a_way_out(drive_emulator, tmp_path, monkeypatch):
    import gpupool_providers.colab.auth as colab_auth

    installed_client(tmp_path, drive_emulator)
    with_display(monkeypatch, Browser(drive_emulator))
    monkeypatch.setattr(webbrowser, "open", lambda *a, **k: True)  # opened; nobody clicks Allow
    monkeypatch.setattr(colab_auth, "BROWSER_WAIT_SECONDS", 0.2)
    person = Person(drive_emulator)
    with pytest.raises(CredentialsError, match="no answer from the browser.*--no-browser"):
        sign_in(colab_config(tmp_path), prompt=person.prompt, echo=person.echo,
                auth_factory=loopback(drive_emulator))



def test_auth_kaggle_with_no_input_is_a_clear_error_and_the_cli_imports_no_provider(kaggle, tmp_path):
    """No stdin (CI, a pipe): a clear exit-2 message, no traceback; and `gpupool auth` goes
    through the provider's own authorize() hook (the core imports no provider by name)."""
    import ast

    from gpupool.errors import ConfigError

    result = CliRunner().invoke(cli, ["--config", str(kaggle_pool(tmp_path)), "auth", "kaggle",
                                      "--username", "alice"], input="")
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2, result.output
    assert "no key was typed" in str(result.exception)  # main() prints it as one `error:` line
    tree = ast.parse((Path(__file__).parents[1] / "gpupool" / "cli.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in imported if m and m.split(".")[0] in ("providers", "gpupool_providers")]
