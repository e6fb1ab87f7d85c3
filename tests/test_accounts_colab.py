"""A team's Colab accounts: each member's notebooks go to their own Drive (their saved sign-in),
and the message that a notebook waits goes to that member, naming them.

Two Drive emulators stand for two people's Google accounts; the real pydrive2 client talks to each.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpupool.lifecycle import AttemptState
from gpupool.notify import Message, Notifier
from gpupool.pool import Pool
from gpupool.provider import Provider
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool_providers.colab import ColabProvider
from tests.emulators.drive import LoopbackGoogleAuth, write_credentials_file
from tests.emulators.drive.server import DriveEmulator
from tests.providers.colab_support import client_secrets, mlp_spec

ALICE_URL, BOB_URL = "json://localhost:9/alice", "json://localhost:9/bob"


@pytest.fixture(autouse=True)
def no_browser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")


@pytest.fixture
def drives() -> Iterator[dict[str, DriveEmulator]]:
    with DriveEmulator(user_email="alice@example.com") as alice, \
            DriveEmulator(user_email="bob@example.com") as bob:
        yield {"alice": alice, "bob": bob}
        assert not alice.errors + bob.errors


def team(drives: dict[str, DriveEmulator], tmp_path: Path) -> Provider:
    accounts = {}
    for name, drive in drives.items():
        folder = tmp_path / name
        folder.mkdir()
        accounts[name] = {
            "owner": name.title(), "notify": [ALICE_URL if name == "alice" else BOB_URL],
            "client_secrets": str(client_secrets(folder / "client_secrets.json", drive)),
            "credentials_file": write_credentials_file(folder / "credentials.json", drive)}
    section = {"heartbeat_seconds": 0.5, "upload_chunk_bytes": 256 * 1024, "gpu_probe": "true",
               "startup_seconds": 1, "accounts": accounts}
    provider = ColabProvider.from_section(section, tmp_path / "colab-data", time.time)
    for name, member in provider.members.items():  # type: ignore[attr-defined]
        member.auth_factory = lambda s, drive=drives[name]: LoopbackGoogleAuth(drive, settings=s)
        member.sleep = lambda seconds: None
    return provider


def notebooks(drive: DriveEmulator) -> list[str]:
    state = drive.state
    return [f.title for f in state.listing() if f.title.endswith(".ipynb") and not state.is_trashed(f)]


def test_each_members_notebook_goes_to_their_drive_and_to_them(drives, tmp_path: Path) -> None:
    colab = team(drives, tmp_path)
    assert colab.accounts() == ["alice", "bob"] and colab.max_concurrent("bob") == 1
    pool = Pool(PoolSettings(data_dir=tmp_path / "pool"), providers={"colab": colab})
    first = pool.submit(mlp_spec(["colab"]))
    second = pool.submit(mlp_spec(["colab"]))
    report = Scheduler(pool).reconcile_once(time.time())
    assert not report.problems, report.problems

    attempts = [a for e in (first, second) for a in pool.state.attempts(e.id)]
    assert sorted(a.account for a in attempts) == ["alice", "bob"]
    assert all(a.state == AttemptState.SUBMITTED for a in attempts)
    assert len(notebooks(drives["alice"])) == 1 and len(notebooks(drives["bob"])) == 1
    members = colab.members  # type: ignore[attr-defined]
    assert members["alice"].data_dir != members["bob"].data_dir  # records and cool-downs apart

    sent: list[tuple[tuple[str, ...], Message]] = []
    notifier = Notifier(pool, lambda m: sent.append(((), m)) or True,
                        send_to=lambda urls: lambda m: sent.append((tuple(urls), m)) or True)
    notifier.cursor = 0
    notifier.check(time.time())
    personal = {urls: message for urls, message in sent if urls}
    assert set(personal) == {(ALICE_URL,), (BOB_URL,)}
    for url, owner in ((ALICE_URL, "Alice"), (BOB_URL, "Bob")):
        message = personal[(url,)]
        assert message.title.startswith(f"gpupool: {owner}, open this notebook")
        assert f"in {owner}'s account ({owner.lower()})" in message.body
    bob_attempt = next(a for a in attempts if a.account == "bob")
    assert bob_attempt.url in personal[(BOB_URL,)].body
    pool.close()


def test_a_no_gpu_cooldown_is_one_members_own(drives, tmp_path: Path) -> None:
    colab = team(drives, tmp_path)
    members = colab.members  # type: ignore[attr-defined]
    now = time.time()
    members["alice"].cooldowns.set("alice", now + 3600, "no GPU (usage limits)")
    assert not colab.availability("alice", now).ok
    assert colab.availability("bob", now).ok
    assert colab.quota("alice", now, 0.0).remaining_seconds == 0
    assert colab.quota("bob", now, 0.0).remaining_seconds == 4 * 3600
