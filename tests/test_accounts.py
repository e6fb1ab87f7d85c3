"""A team's accounts: a provider section lists each member's own account (credentials and owner);
placement, quota, cool-downs and `gpupool quota` work per account.

Runs the real kagglesdk client against the Kaggle emulator with two users (alice and bob), each
with their own key, weekly GPU quota and batch GPU session limit.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpupool.cli import cli, main
from gpupool.clock import SystemClock
from gpupool.errors import SpecError
from gpupool.lifecycle import AttemptState
from gpupool.pool import Pool
from gpupool.preflight import check_providers
from gpupool.scheduler import Scheduler
from gpupool.settings import load_settings
from gpupool.spec import ExperimentSpec, load_experiment
from tests.emulators.kaggle import KaggleEmulator

HOUR = 3600.0
ROOT = Path(__file__).resolve().parents[1]
NOW = time.time()  # the scheduler's fixed clock, near the emulator's (its quota week is real)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nobody's-kaggle"))
    for name in [k for k in os.environ if k.startswith("GPUPOOL_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def kaggle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KaggleEmulator]:
    """Kaggle with two users; each may run one GPU session at a time (the limit is per user)."""
    with KaggleEmulator("alice", "alice-key", workdir=tmp_path / "kaggle-emu",
                        max_gpu_sessions=1) as emulator:
        emulator.add_user("bob", "bob-key", gpu_quota_seconds=20 * HOUR)
        emulator.connect(monkeypatch)
        for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):  # only each member's own file counts
            monkeypatch.delenv(name)
        yield emulator


def kaggle_json(folder: Path, username: str, key: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kaggle.json"
    path.write_text(json.dumps({"username": username, "key": key}))
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


def team_pool_file(tmp: Path, alice_extra: dict | None = None, bob_extra: dict | None = None) -> Path:
    """alice gives the path of her kaggle.json, bob the folder holding his (a KAGGLE_CONFIG_DIR)."""
    alice = kaggle_json(tmp / "alice", "alice", "alice-key")
    kaggle_json(tmp / "bob-kaggle", "bob", "bob-key")
    kaggle = {
        "request_timeout": 5.0, "max_retries": 1, "backoff_base": 0, "startup_seconds": 60,
        "dataset_poll_seconds": 0,
        "accounts": {
            "alice": {"owner": "Alice Liddell", "credentials": str(alice), **(alice_extra or {})},
            "bob": {"owner": "Bob Marley", "credentials": str(tmp / "bob-kaggle"),
                    **(bob_extra or {})},
        },
    }
    path = tmp / "pool.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), "providers": {
        "kaggle": kaggle, "local": {"enabled": False}}}))
    return path


def experiment(name: str, **fields: object) -> ExperimentSpec:
    return ExperimentSpec(name=name, workdir=ROOT / "configs" / "examples" / "mlp",
                          run="python -c 'import time; time.sleep(60)'", providers=["kaggle"],
                          checkpoint={"interval": "10m"}, **fields)


def open_pool(config: Path) -> Pool:
    return Pool(load_settings(config), clock=SystemClock(sleep=lambda seconds: None))


def invoke(config: Path, *args: str) -> str:
    result = CliRunner(env={"COLUMNS": "300"}).invoke(cli, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def placed(pool: Pool, experiment_id: str) -> list[tuple[str, str]]:
    return [(a.provider, a.account) for a in pool.state.attempts(experiment_id)]


# -- placement, quota and cool-downs per account ---------------------------------------------

def test_two_accounts_each_take_one_experiment(kaggle: KaggleEmulator, tmp_path: Path) -> None:
    config = team_pool_file(tmp_path, {"max_concurrent": 1}, {"max_concurrent": 1})
    pool = open_pool(config)
    experiments = [pool.submit(experiment(n)) for n in ("exp-one", "exp-two", "exp-three")]
    report = Scheduler(pool).reconcile_once(NOW)
    assert not report.problems, report.problems

    where = sorted(placed(pool, e.id) for e in experiments)
    assert where == [[], [("kaggle", "alice")], [("kaggle", "bob")]]  # one each; one waits
    [third] = [e for e in experiments if not placed(pool, e.id)]
    owners = sorted(s.owner for s in kaggle.sessions.values() if s.live)
    assert owners == ["alice", "bob"]  # each kernel ran under its member's own token
    waiting = pool.state.experiment(third.id).wait_reason or ""
    assert "kaggle[alice]: 1 of 1 sessions in use" in waiting
    assert "kaggle[bob]: 1 of 1 sessions in use" in waiting
    pool.close()


def test_each_accounts_quota_allows_one_session(kaggle: KaggleEmulator, tmp_path: Path) -> None:
    """5 h left on each account, 9 h sessions: a second session on one account would plan on
    hours the first may spend, so the second experiment goes to the other member."""
    kaggle.gpu_seconds_finished = 25 * HOUR  # alice: 5 h left of 30
    kaggle.user_gpu_seconds_finished["bob"] = 15 * HOUR  # bob: 5 h left of 20
    config = team_pool_file(tmp_path)  # max_concurrent: 2 each (Kaggle's own limit is 1 here)
    pool = open_pool(config)
    experiments = [pool.submit(experiment(n)) for n in ("exp-one", "exp-two", "exp-three")]
    report = Scheduler(pool).reconcile_once(NOW)
    assert not report.problems, report.problems

    where = sorted(placed(pool, e.id) for e in experiments)
    assert where == [[], [("kaggle", "alice")], [("kaggle", "bob")]]
    assert sorted(s.owner for s in kaggle.sessions.values()) == ["alice", "bob"]  # no refusal
    [third] = [e for e in experiments if not placed(pool, e.id)]
    waiting = pool.state.experiment(third.id).wait_reason or ""
    assert "kaggle[alice]: quota too small (0s left, resets in 7d" in waiting, waiting
    assert "kaggle[bob]: quota too small (0s left, resets in 7d" in waiting, waiting
    pool.close()


def test_quota_is_each_members_own(kaggle: KaggleEmulator, tmp_path: Path) -> None:
    """alice's week is spent: the experiment goes to bob, and `gpupool quota` shows both."""
    kaggle.gpu_seconds_finished = 29.95 * HOUR  # alice: 3 minutes left of 30 h
    config = team_pool_file(tmp_path)
    pool = open_pool(config)
    exp = pool.submit(experiment("exp-quota"))
    Scheduler(pool).reconcile_once(NOW)
    assert placed(pool, exp.id) == [("kaggle", "bob")]
    [session] = kaggle.sessions.values()
    assert session.owner == "bob"
    pool.close()

    rows = {row["account"]: row for row in json.loads(invoke(config, "quota", "--json"))
            if row["provider"] == "kaggle"}
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"]["total_hours"] == 30 and rows["alice"]["remaining_hours"] < 0.1
    assert rows["bob"]["total_hours"] == 20 and rows["bob"]["remaining_hours"] > 19.9
    assert all(row["source"] == "api" for row in rows.values())
    table = invoke(config, "quota")
    assert "alice" in table and "bob" in table


def test_cooldown_of_one_account_leaves_the_other(kaggle: KaggleEmulator, tmp_path: Path) -> None:
    """gpupool allows alice 2 sessions; Kaggle allows 1: its refusal cools alice down only."""
    config = team_pool_file(tmp_path)
    pool = open_pool(config)
    scheduler = Scheduler(pool)
    first = pool.submit(experiment("exp-first"))
    scheduler.reconcile_once(NOW)
    assert placed(pool, first.id) == [("kaggle", "alice")], pool.state.experiment(first.id)

    second = pool.submit(experiment("exp-second"))
    scheduler.reconcile_once(NOW + 1)  # alice has a free slot for gpupool; Kaggle refuses it
    refused, taken = pool.state.attempts(second.id)
    assert (refused.account, refused.state) == ("alice", AttemptState.UNAVAILABLE)
    assert "Maximum batch GPU session count" in (refused.end_reason or "")
    assert taken.account == "bob"  # the same step: alice cools down, bob is free
    cooldowns = pool.state.cooldowns()
    assert ("kaggle", "alice") in cooldowns and ("kaggle", "bob") not in cooldowns

    alice_only = pool.submit(experiment("exp-third", accounts={"kaggle": ["alice"]}))
    scheduler.reconcile_once(NOW + 2)  # alice's cool-down is hers: it waits, nothing is pushed
    assert placed(pool, alice_only.id) == []
    reason = pool.state.experiment(alice_only.id).wait_reason or ""
    assert reason.startswith("kaggle[alice]: Kaggle refused the kernel") and "retry in" in reason
    assert sorted(s.owner for s in kaggle.sessions.values() if s.live) == ["alice", "bob"]
    pool.close()


def test_experiment_limited_to_some_members(kaggle: KaggleEmulator, tmp_path: Path) -> None:
    config = team_pool_file(tmp_path)
    pool = open_pool(config)
    only_bob = pool.submit(experiment("exp-bob", accounts={"kaggle": ["bob"]}))
    nobody = pool.submit(experiment("exp-carol", accounts={"kaggle": ["carol"]}))
    Scheduler(pool).reconcile_once(NOW)
    assert placed(pool, only_bob.id) == [("kaggle", "bob")]  # alice comes first, but is not named
    assert placed(pool, nobody.id) == []
    assert "kaggle[carol]: not configured" in (pool.state.experiment(nobody.id).wait_reason or "")
    pool.close()


# -- the pool file and the experiment file ---------------------------------------------------

def write_pool(tmp: Path, kaggle: dict) -> Path:
    path = tmp / "pool.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"),
                                    "providers": {"kaggle": kaggle}}, sort_keys=False))
    return path


@pytest.mark.parametrize(("accounts", "section", "says"), [
    ({"a": {"owner": "Ann", "credentials": "a.json"}, "b": {"owner": "ann ", "credentials": "b.json"}},
     {}, "accounts 'a' and 'b' have the same owner"),
    ({"a": {"owner": "Ann", "credentials": "x.json"}, "b": {"owner": "Ben", "credentials": "x.json"}},
     {}, "accounts 'a' and 'b' have the same credentials"),
    ({"a": {"owner": "Ann", "username": "ann"}, "b": {"owner": "Ben", "username": "ANN"}},
     {}, "same credentials"),
    ({"a": {"owner": "Ann", "credentials": "a.json"}, "b": {"owner": "Ben"}},
     {}, "'b': each member's own credentials"),
    ({"a": {"owner": "Ann", "credentials": "a.json"}}, {"credentials": "team.json"},
     "give credentials and username under each account"),
    ({"a": {"owner": "Ann", "credentials": "a.json", "max_concurrent": 3}}, {}, "less than or equal to 2"),
    ({"a": {"credentials": "a.json"}}, {}, "Field required"),
    ({"a b": {"owner": "Ann", "credentials": "a.json"}}, {}, "account name 'a b'"),
    ({"a": {"owner": "Ann", "credentials": "a.json", "notify": ["nonsense-secret"]}}, {},
     "entries 0 are not notification URLs"),
])
def test_bad_accounts_are_named_in_the_pool_file(tmp_path: Path, accounts: dict, section: dict,
                                                  says: str) -> None:
    config = write_pool(tmp_path, {**section, "accounts": accounts})
    with pytest.raises(SpecError) as caught:
        load_settings(config)
    text = str(caught.value)
    assert says in text and "providers.kaggle" in text and "line" in text, text
    assert "secret" not in text


def test_one_account_form_is_account_default(tmp_path: Path) -> None:
    pool = Pool(load_settings(write_pool(tmp_path, {"max_concurrent": 1})))
    provider = pool.provider("kaggle")
    assert provider.accounts() == ["default"] and provider.max_concurrent("default") == 1
    assert provider.owner_of("default") is None
    pool.close()


def test_members_keep_apart_their_data_and_limits(tmp_path: Path) -> None:
    config = team_pool_file(tmp_path, {"max_concurrent": 1})
    pool = Pool(load_settings(config))
    team = pool.provider("kaggle")
    assert team.name == "kaggle" and team.accounts() == ["alice", "bob"]
    assert team.max_concurrent("alice") == 1 and team.max_concurrent("bob") == 2
    assert team.owner_of("bob") == "Bob Marley"
    alice, bob = team.members["alice"], team.members["bob"]  # type: ignore[attr-defined]
    assert alice.data_dir != bob.data_dir and alice.data_dir.parent.name == "accounts"
    assert alice.config.credentials != bob.config.credentials
    assert alice.config.request_timeout == bob.config.request_timeout == 5.0  # the section's
    pool.close()


def test_experiment_accounts_are_checked_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp-limit\nrun: python train.py\nproviders: [local]\n"
                    "accounts:\n  kaggle: [alice]\n")
    with pytest.raises(SpecError) as caught:
        load_experiment(path, check_workdir=False)
    text = str(caught.value)
    assert "accounts" in text and "'kaggle' is not in providers" in text and "line 5" in text, text

    path.write_text("name: exp-limit\nrun: python train.py\nproviders: [kaggle]\n"
                    "accounts: {kaggle: [alice, alice]}\n")
    with pytest.raises(SpecError, match="lists an account twice"):
        load_experiment(path, check_workdir=False)
    spec = ExperimentSpec(name="exp-ok", run="x", providers=["kaggle", "local"],
                          accounts={"kaggle": ["bob"]})
    assert spec.allows_account("kaggle", "bob") and not spec.allows_account("kaggle", "alice")
    assert spec.allows_account("local", "default")


def test_each_member_is_checked_with_their_own_token(kaggle: KaggleEmulator, tmp_path: Path) -> None:
    """Each member's check names their own Kaggle user, found from their own token."""
    pool = open_pool(team_pool_file(tmp_path))
    team = pool.provider("kaggle")
    ok_alice, hint_alice = team.check_account("alice")
    ok_bob, hint_bob = team.check_account("bob")
    assert ok_alice and "user alice" in hint_alice
    assert ok_bob and "user bob" in hint_bob and "20.0 GPU-hours left" in hint_bob
    ok, hint = team.check_credentials()
    assert ok and "alice (Alice Liddell)" in hint and "bob (Bob Marley)" in hint
    assert "alice-key" not in hint + hint_alice and "bob-key" not in hint + hint_bob
    pool.close()


def test_one_login_listed_twice_is_used_once(kaggle: KaggleEmulator, tmp_path: Path) -> None:
    """Two entries whose files both hold alice's key: the second is refused, never placed."""
    config = team_pool_file(tmp_path)
    kaggle_json(tmp_path / "bob-kaggle", "alice", "alice-key")  # "bob" brought alice's token
    pool = open_pool(config)
    ok, hint = pool.provider("kaggle").check_account("bob")
    assert not ok and "signs in as alice, like account 'alice'" in hint
    assert "alice-key" not in hint
    exps = [pool.submit(experiment(name)) for name in ("exp-a", "exp-b", "exp-c")]
    Scheduler(pool).reconcile_once(NOW)
    assert {a.account for e in exps for a in pool.state.attempts(e.id)} == {"alice"}
    assert [s.owner for s in kaggle.sessions.values()] == ["alice"]
    pool.close()


def test_preflight_counts_the_accounts_the_experiment_may_use(kaggle: KaggleEmulator,
                                                              tmp_path: Path) -> None:
    """One member's broken token does not stop the team; an experiment limited to it is told."""
    config = team_pool_file(tmp_path)
    kaggle_json(tmp_path / "bob-kaggle", "bob", "not-bobs-key")
    pool = open_pool(config)
    [anyone] = check_providers(pool, experiment("exp-any"))
    assert anyone.usable and anyone.reason.startswith("alice: user alice")
    assert "bob: credentials from" in anyone.reason and "do not work" in anyone.reason
    [only_bob] = check_providers(pool, experiment("exp-bob", accounts={"kaggle": ["bob"]}))
    assert not only_bob.usable and only_bob.fix == "gpupool auth kaggle"
    [carol] = check_providers(pool, experiment("exp-carol", accounts={"kaggle": ["carol"]}))
    assert not carol.usable and carol.reason == "the pool lists no account carol"
    assert "providers.kaggle.accounts" in (carol.fix or "")
    pool.close()


@pytest.mark.parametrize(("provider", "field"), [("kaggle", "credentials"),
                                                  ("colab", "credentials_file")])
def test_auth_on_a_teams_pool_says_how_members_sign_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        provider: str, field: str) -> None:
    member = {"owner": "Ann", field: str(tmp_path / "ann.json")}
    config = write_pool(tmp_path, {"accounts": {"ann": member}})
    text = config.read_text().replace("kaggle:", f"{provider}:")
    config.write_text(text)
    monkeypatch.setattr("sys.argv", ["gpupool", "--config", str(config), "auth", provider])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"lists members' {provider} accounts (ann)" in err
    assert f"providers.{provider}.accounts.<name>.{field}" in err


def test_reserved_seconds_counts_what_running_sessions_may_still_spend() -> None:
    from types import SimpleNamespace

    from gpupool.quota import reserved_seconds

    def running(deadline=None, started=None, created=0.0):
        return SimpleNamespace(deadline=deadline, started_at=started, created_at=created)

    now = 10_000.0
    assert reserved_seconds([], now, 3600) == 0
    assert reserved_seconds([running(deadline=now + 600)], now, 3600) == 600
    assert reserved_seconds([running(deadline=now - 5)], now, 3600) == 0  # past its deadline
    assert reserved_seconds([running(started=now - 1000)], now, 3600) == 2600
    assert reserved_seconds([running(created=now - 100)], now, 3600) == 3500  # not started yet
    assert reserved_seconds([running(started=now - 1000)], now, None) == 0  # no cap: unknown
    assert reserved_seconds([running(deadline=now + 60), running(started=now)], now, 100) == 160
