"""A team's Colab accounts: each member's notebooks go to their own Drive (their saved sign-in),
and the message that a notebook waits goes to that member, naming them.

Two Drive emulators stand for two people's Google accounts; the real pydrive2 client talks to each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpupool.clock import SystemClock
from gpupool.lifecycle import AttemptState
from gpupool.notify import Message, Notifier
from gpupool.pool import Pool
from gpupool.provider import Provider
from gpupool.quota import gpu_seconds_left
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
    provider = ColabProvider.from_section(section, tmp_path / "colab-data",
                                          SystemClock(sleep=lambda seconds: None))
    for name, member in provider.members.items():  # type: ignore[attr-defined]
        member.auth_factory = lambda s, drive=drives[name]: LoopbackGoogleAuth(drive, settings=s)
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
    """Alice's notebook reports no GPU: the scheduler rests her account only (in the state
    database, like every provider's cool-down), and her estimated quota counts as spent."""
    colab = team(drives, tmp_path)
    members = colab.members  # type: ignore[attr-defined]
    pool = Pool(PoolSettings(data_dir=tmp_path / "pool"), providers={"colab": colab})
    scheduler = Scheduler(pool)
    experiments = [pool.submit(mlp_spec(["colab"])) for _ in range(2)]
    now = time.time()
    scheduler.reconcile_once(now)
    [alices] = [a for e in experiments for a in pool.state.attempts(e.id) if a.account == "alice"]
    alice = members["alice"]
    folder = alice.records.get(alices.id)["folder_id"]
    alice.drive().upload(folder, "status.json", json.dumps(
        {"state": "no-gpu", "time": now, "started": now}).encode(), "application/json")
    scheduler.reconcile_once(now + 1)
    assert pool.state.attempt(alices.id).state == AttemptState.UNAVAILABLE
    assert set(pool.state.cooldowns()) == {("colab", "alice")}
    views = {c.account: c for c in scheduler.candidates(mlp_spec(["colab"]), now + 2)}
    assert views["alice"].unavailable_until == pytest.approx(now + 1 + 6 * 3600)
    assert "no GPU" in views["alice"].unavailable_reason
    assert views["bob"].unavailable_until is None
    assert gpu_seconds_left(pool.state, colab, "alice", now + 2).remaining_seconds == 0
    assert gpu_seconds_left(pool.state, colab, "bob", now + 2).remaining_seconds == 4 * 3600
    assert not (tmp_path / "colab-data" / "accounts" / "alice" / "cooldowns.json").exists()
    pool.close()
