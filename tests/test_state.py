"""The state database: created on first use, one transition function that refuses illegal
moves, at most one active attempt per experiment, charges once, leases, paging, lookups."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from gpupool import db
from gpupool.errors import IllegalTransition, NotFound, StateError
from gpupool.lifecycle import (
    ACTIVE_ATTEMPT,
    ATTEMPT_MOVES,
    EXPERIMENT_MOVES,
    AttemptState,
    ExperimentState,
)
from gpupool.state import State

T0 = 1_700_000_000.0
SPEC = {"name": "exp", "run": "python train.py"}


@pytest.fixture
def db_file(tmp_path) -> Path:
    return tmp_path / "nested" / "dir" / "state.db"


@pytest.fixture
def state(database_url) -> State:
    """A fresh state on each backend (tests/conftest.py: SQLite, then PostgreSQL)."""
    st = State(database_url)
    yield st
    st.close()


def new_experiment(state: State, name: str = "exp", now: float = T0):
    return state.create_experiment(name, dict(SPEC, name=name), bundle="bundle.tar.gz", now=now)


# -- schema --------------------------------------------------------------------------------


def test_sqlite_schema_created_on_first_use_with_wal_and_alembic(db_file):
    state = State(f"sqlite:///{db_file}")
    state.close()
    assert db_file.exists()  # parent directories were created too
    with sqlite3.connect(db_file) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        assert {"experiments", "attempts", "quota_ledger", "events", "provider_health", "leases",
                "alembic_version"} <= tables
        version = conn.execute("select version_num from alembic_version").fetchall()
        assert len(version) == 1 and version[0][0]
        assert conn.execute("pragma journal_mode").fetchone()[0].lower() == "wal"
    state = State(f"sqlite:///{db_file}")
    with state.engine.connect() as conn:
        assert conn.exec_driver_sql("pragma busy_timeout").scalar() >= 1000
        assert conn.exec_driver_sql("pragma foreign_keys").scalar() == 1
    state.close()


def test_reopening_keeps_data_and_does_not_remigrate(database_url):
    first = State(database_url)
    exp = new_experiment(first)
    first.close()
    second = State(database_url)
    try:
        assert second.experiment(exp.id) == exp
        with second.engine.connect() as conn:
            assert conn.exec_driver_sql("select count(*) from alembic_version").scalar() == 1
    finally:
        second.close()


def test_unusable_database_is_a_state_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="state directory"):
        State(f"sqlite:///{blocker / 'sub' / 'state.db'}")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="cannot prepare"):
        State(f"sqlite:///{garbage}")


# -- lifecycle -----------------------------------------------------------------------------


def test_legal_path_through_a_hop(state):
    exp = new_experiment(state)
    assert exp.state is ExperimentState.PENDING
    a1 = state.create_attempt(exp.id, "local", "default", T0 + 1)
    assert a1.state is AttemptState.CREATED and a1.seq == 1
    assert state.experiment(exp.id).state is ExperimentState.RUNNING
    state.move_attempt(a1.id, AttemptState.SUBMITTED, T0 + 2, remote_id="pid-1")
    state.move_attempt(a1.id, AttemptState.RUNNING, T0 + 3, started_at=T0 + 3)
    ended = state.move_attempt(a1.id, AttemptState.YIELDED, T0 + 10, ended_at=T0 + 10,
                               event="session yielded")
    assert ended.state is AttemptState.YIELDED and ended.remote_id == "pid-1"
    assert ended.duration(T0 + 999) == 7
    state.move_experiment(exp.id, ExperimentState.PENDING, T0 + 11)
    a2 = state.create_attempt(exp.id, "local", "default", T0 + 12)
    assert a2.seq == 2 and a2.id != a1.id
    state.move_attempt(a2.id, AttemptState.SUBMITTED, T0 + 13)
    state.move_attempt(a2.id, AttemptState.RUNNING, T0 + 13)
    state.move_attempt(a2.id, AttemptState.SUCCEEDED, T0 + 20)
    done = state.move_experiment(exp.id, ExperimentState.SUCCEEDED, T0 + 21, event="finished")
    assert done.state is ExperimentState.SUCCEEDED and done.updated_at == T0 + 21
    kinds = [e["kind"] for e in state.events(exp.id)]
    assert kinds[0] == "created" and "placed" in kinds and kinds[-1] == "succeeded"
    assert [a.seq for a in state.attempts(exp.id)] == [1, 2]
    assert state.attempts(exp.id, active=True) == []


@pytest.mark.parametrize(
    "path, illegal",
    [
        ([AttemptState.SUBMITTED, AttemptState.RUNNING, AttemptState.SUCCEEDED], AttemptState.RUNNING),
        ([AttemptState.LOST], AttemptState.RUNNING),
        ([AttemptState.SUBMITTED, AttemptState.RUNNING], AttemptState.CREATED),
        ([AttemptState.SUBMITTED, AttemptState.RUNNING], AttemptState.SUBMITTED),
        ([AttemptState.FAILED], AttemptState.SUCCEEDED),
        ([], AttemptState.RUNNING),
    ],
    ids=["succeeded->running", "lost->running", "running->created", "running->submitted",
         "failed->succeeded", "created->running"],
)
def test_illegal_attempt_moves(state, path, illegal):
    exp = new_experiment(state)
    attempt = state.create_attempt(exp.id, "local", "default", T0)
    for target in path:
        state.move_attempt(attempt.id, target, T0)
    with pytest.raises(IllegalTransition) as info:
        state.move_attempt(attempt.id, illegal, T0 + 1, event="should not be logged")
    before = path[-1] if path else AttemptState.CREATED
    assert info.value.current == before.value and info.value.target == illegal.value
    assert attempt.id in str(info.value)
    assert state.attempt(attempt.id).state is before  # unchanged
    assert "should not be logged" not in [e["message"] for e in state.events(exp.id)]


@pytest.mark.parametrize(
    "path, illegal",
    [
        ([ExperimentState.CANCELLED], ExperimentState.SUCCEEDED),
        ([ExperimentState.RUNNING, ExperimentState.SUCCEEDED], ExperimentState.PENDING),
        ([ExperimentState.RUNNING, ExperimentState.SUCCEEDED], ExperimentState.RUNNING),
        ([], ExperimentState.SUCCEEDED),
    ],
    ids=["cancelled->succeeded", "succeeded->pending", "succeeded->running", "pending->succeeded"],
)
def test_illegal_experiment_moves(state, path, illegal):
    exp = new_experiment(state)
    for target in path:
        state.move_experiment(exp.id, target, T0)
    with pytest.raises(IllegalTransition):
        state.move_experiment(exp.id, illegal, T0 + 1)
    assert state.experiment(exp.id).state is (path[-1] if path else ExperimentState.PENDING)


def test_move_tables_cover_every_state_and_terminals_are_final():
    assert set(ATTEMPT_MOVES) == set(AttemptState)
    assert set(EXPERIMENT_MOVES) == set(ExperimentState)
    for state_, moves in ATTEMPT_MOVES.items():
        if state_.terminal:
            assert moves == frozenset(), state_
        assert state_.active == (state_ in ACTIVE_ATTEMPT)
    assert EXPERIMENT_MOVES[ExperimentState.SUCCEEDED] == frozenset()
    assert set(db.ACTIVE_STATES) == {s.value for s in ACTIVE_ATTEMPT}


def test_moves_of_unknown_ids_are_not_found(state):
    with pytest.raises(NotFound):
        state.move_attempt("nope-a1", AttemptState.RUNNING, T0)
    with pytest.raises(NotFound):
        state.move_experiment("nope", ExperimentState.RUNNING, T0)
    with pytest.raises(NotFound):
        state.attempt("nope-a1")


def test_second_active_attempt_is_refused(state):
    exp = new_experiment(state)
    first = state.create_attempt(exp.id, "local", "default", T0)
    state.move_experiment(exp.id, ExperimentState.PENDING, T0 + 1)  # even if the scheduler errs
    with pytest.raises(StateError, match="active attempt"):
        state.create_attempt(exp.id, "kaggle", "default", T0 + 2)
    assert [a.id for a in state.attempts(exp.id)] == [first.id]
    assert state.experiment(exp.id).state is ExperimentState.PENDING  # rolled back together


def test_active_attempt_index_is_enforced_by_the_database(state):
    exp = new_experiment(state)
    state.create_attempt(exp.id, "local", "default", T0)
    with pytest.raises(sa.exc.IntegrityError), state.engine.begin() as conn:
        conn.execute(db.attempts.insert().values(
            id="raw", experiment_id=exp.id, seq=99, provider="x", account="a",
            state="running", created_at=T0, gpu_seconds=0.0))


def test_attempt_on_terminal_experiment_is_illegal(state):
    exp = new_experiment(state)
    state.move_experiment(exp.id, ExperimentState.CANCELLED, T0)
    with pytest.raises(IllegalTransition):
        state.create_attempt(exp.id, "local", "default", T0 + 1)
    assert state.attempts(exp.id) == []


# -- quota, health, leases -----------------------------------------------------------------


def end_lost(state: State, attempt, seconds: float, now: float) -> None:
    """End an attempt the one way the scheduler does, charging ``seconds`` in the same step."""
    state.end_attempt(attempt, AttemptState.LOST, now, message="lost", attempt_fields={},
                      next_state=ExperimentState.PENDING, experiment_fields={}, why="retry",
                      charge_seconds=seconds)


def test_an_ended_attempt_is_charged_once(state):
    exp = new_experiment(state)
    state.move_experiment(exp.id, ExperimentState.RUNNING, T0)
    attempt = state.create_attempt(exp.id, "kaggle", "me", T0, started_at=T0)
    end_lost(state, attempt, 3600.0, T0 + 3600)
    with pytest.raises(IllegalTransition):  # ending it again is refused, in the same transaction
        end_lost(state, attempt, 3600.0, T0 + 3601)
    assert state.charged_seconds("kaggle", "me", since=T0) == 3600.0
    assert state.charged_seconds("kaggle", "other", since=T0) == 0.0
    assert state.charged_seconds("kaggle", "me", since=T0 + 7200) == 0.0


def test_charges_sum_across_attempts(state):
    exp = new_experiment(state)
    for i in range(3):
        state.move_experiment(exp.id, ExperimentState.RUNNING, T0 + i * 100)
        attempt = state.create_attempt(exp.id, "kaggle", "me", T0 + i * 100, started_at=T0 + i * 100)
        end_lost(state, attempt, 50.0 + i, T0 + i * 100 + 50)
    assert state.charged_seconds("kaggle", "me", since=0) == 50.0 + 51.0 + 52.0


def doubling(failures: int) -> float:
    return 60.0 * 2 ** (failures - 1)


def test_cooldowns_count_refusals_until_a_session_starts(state):
    assert state.cool_down("colab", "me", T0, "not opened", backoff=doubling).until == T0 + 60
    second = state.cool_down("colab", "me", T0 + 60, "not opened", backoff=doubling)
    assert (second.failures, second.until) == (2, T0 + 180)  # backed off twice as long
    assert state.cooldowns()[("colab", "me")] == second
    state.clear_cooldown("colab", "me")
    assert state.cooldowns() == {}
    again = state.cool_down("colab", "me", T0 + 250, "again", backoff=doubling, until=T0 + 300)
    assert (again.failures, again.until, again.reason) == (1, T0 + 300, "again")


def test_a_shorter_cooldown_never_shortens_one_in_force(state):
    """Two sessions of one account refused at once: Colab's 6 h "no GPU" rest is not cut to
    the minute of back-off a notebook nobody opened would give."""
    state.cool_down("colab", "me", T0, "no GPU", backoff=doubling, until=T0 + 6 * 3600,
                    quota_spent=True)
    kept = state.cool_down("colab", "me", T0 + 10, "not opened", backoff=doubling)
    assert (kept.until, kept.reason, kept.quota_spent, kept.failures) == (
        T0 + 6 * 3600, "no GPU", True, 2)
    assert state.cooldowns()[("colab", "me")] == kept
    later = state.cool_down("colab", "me", T0 + 6 * 3600 + 1, "not opened", backoff=doubling)
    assert (later.reason, later.quota_spent) == ("not opened", False)  # the old one had ended


def test_lease_second_owner_refused_until_expiry(state):
    assert state.acquire_lease("scheduler", "a", T0, ttl=30)
    assert not state.acquire_lease("scheduler", "b", T0 + 10, ttl=30)
    assert state.acquire_lease("scheduler", "a", T0 + 20, ttl=30)  # renewal extends it
    assert not state.acquire_lease("scheduler", "b", T0 + 45, ttl=30)
    assert state.acquire_lease("scheduler", "b", T0 + 51, ttl=30)  # expired: taken over
    assert not state.acquire_lease("scheduler", "a", T0 + 52, ttl=30)
    assert state.acquire_lease("other-lease", "a", T0 + 52, ttl=30)


def test_release_lease_only_by_owner(state):
    state.acquire_lease("scheduler", "a", T0, ttl=30)
    state.release_lease("scheduler", "b")
    assert not state.acquire_lease("scheduler", "b", T0 + 1, ttl=30)
    state.release_lease("scheduler", "a")
    assert state.acquire_lease("scheduler", "b", T0 + 2, ttl=30)


def test_two_state_objects_share_one_lease(database_url, state):
    other = State(database_url)
    try:
        assert state.acquire_lease("daemon", "one", T0, ttl=60)
        assert not other.acquire_lease("daemon", "two", T0 + 1, ttl=60)
    finally:
        other.close()


# -- listing and lookup --------------------------------------------------------------------


def test_experiments_pages_newest_first(state):
    made = [new_experiment(state, f"exp-{i}", now=T0 + i) for i in range(7)]
    newest_first = [e.id for e in reversed(made)]
    assert [e.id for e in state.experiments()] == newest_first
    assert [e.id for e in state.experiments(limit=3)] == newest_first[:3]
    assert [e.id for e in state.experiments(limit=3, offset=3)] == newest_first[3:6]
    assert [e.id for e in state.experiments(limit=3, offset=6)] == newest_first[6:]
    assert state.experiments(limit=3, offset=9) == []
    assert state.count_experiments() == 7
    state.move_experiment(made[2].id, ExperimentState.CANCELLED, T0 + 10)
    cancelled = state.experiments([ExperimentState.CANCELLED])
    assert [e.id for e in cancelled] == [made[2].id]


def test_lookup_by_unique_prefix_and_name(state):
    exp = new_experiment(state, "alpha")
    other = new_experiment(state, "beta")
    assert state.experiment(exp.id) == exp
    assert state.experiment(exp.id[:-2]).id == exp.id
    assert state.experiment("alp").id == exp.id
    assert state.experiment("beta").id == other.id  # the bare name
    assert state.experiment("alpha").spec == dict(SPEC, name="alpha")


def test_lookup_not_found_and_ambiguous(state):
    new_experiment(state, "run-a")
    new_experiment(state, "run-b")
    with pytest.raises(NotFound, match="no experiment 'zzz'.*gpupool status"):
        state.experiment("zzz")
    with pytest.raises(NotFound, match="several experiments"):
        state.experiment("run-")
    with pytest.raises(NotFound):
        state.experiment("%")  # LIKE wildcards are literal
    assert NotFound("x").exit_code == 3


def test_same_name_twice_picks_the_newest(state):
    older = new_experiment(state, "same", now=T0)
    newer = new_experiment(state, "same", now=T0 + 5)
    assert older.id != newer.id
    assert state.experiment("same").id == newer.id


# -- claims: several schedulers on one database --------------------------------------------


def running_experiments(state: State, count: int) -> list[str]:
    made = []
    for i in range(count):
        exp = new_experiment(state, f"run-{i}", now=T0 + i)
        state.create_attempt(exp.id, "kaggle", "default", T0 + i)
        made.append(exp.id)
    return made


def test_schedulers_split_the_running_experiments_and_a_newcomer_gets_its_share(state):
    made = running_experiments(state, 6)
    a = state.claim_experiments("a", T0, ttl=30, placing=False)
    assert a == set(made)  # alone: all of them
    b = state.claim_experiments("b", T0 + 1, ttl=30, placing=False)
    assert b == set()  # a's claims are live; a lets go of the excess at its next step
    a = state.claim_experiments("a", T0 + 2, ttl=30, placing=False)
    b = state.claim_experiments("b", T0 + 3, ttl=30, placing=False)
    assert len(a) == len(b) == 3 and not a & b
    c = state.claim_experiments("c", T0 + 4, ttl=30, placing=False)
    a = state.claim_experiments("a", T0 + 5, ttl=30, placing=False)
    b = state.claim_experiments("b", T0 + 6, ttl=30, placing=False)
    c = state.claim_experiments("c", T0 + 7, ttl=30, placing=False)
    assert sorted(map(len, (a, b, c))) == [2, 2, 2] and a | b | c == set(made)
    assert not (a & b or b & c or a & c)


def test_claims_of_a_silent_or_dead_scheduler_are_taken_over(state):
    made = running_experiments(state, 2)
    assert state.claim_experiments("a", T0, ttl=30, placing=False) == set(made)
    assert state.claim_experiments("b", T0 + 10, ttl=30, placing=False) == set()
    assert state.claim_experiments("b", T0 + 31, ttl=30, placing=False) == set(made)  # a expired
    assert state.claim_experiments("a", T0 + 32, ttl=30, placing=False) == set()
    dead = {"b"}.__contains__  # b's process is known to be gone: no need to wait for its ttl
    assert state.claim_experiments("a", T0 + 33, ttl=30, placing=False, holder_dead=dead) == set(made)


def test_only_the_placing_scheduler_claims_pending_experiments(state):
    pending = [new_experiment(state, f"p-{i}", now=T0 + i).id for i in range(3)]
    assert state.claim_experiments("a", T0, ttl=30, placing=False) == set()
    assert state.claim_experiments("b", T0, ttl=30, placing=True) == set(pending)
    assert state.claim_experiments("b", T0 + 1, ttl=30, placing=False) == set()  # lost the lease
    assert state.claim_experiments("a", T0 + 2, ttl=30, placing=True) == set(pending)


def test_release_claims_hands_the_work_over_at_once(state):
    made = running_experiments(state, 2)
    state.claim_experiments("a", T0, ttl=30, placing=True)
    state.release_claims("a")
    assert state.claim_experiments("b", T0 + 1, ttl=30, placing=False) == set(made)
    assert all(not hasattr(e, "claimed_by") for e in state.experiments())  # not the experiment's


def test_claims_and_leases_skip_rows_locked_by_another_scheduler(database_url, state):
    """PostgreSQL: a row another scheduler holds locked is skipped, never waited on."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no row locks: it serializes writers instead")
    made = running_experiments(state, 2)
    state.acquire_lease("scheduler", "a", T0, ttl=30)
    with state.engine.connect() as other:
        busy = other.begin()
        other.execute(sa.select(db.experiments.c.id).where(db.experiments.c.id == made[0])
                      .with_for_update())
        other.execute(sa.select(db.leases.c.name).where(db.leases.c.name == "scheduler")
                      .with_for_update())
        assert state.claim_experiments("b", T0 + 40, ttl=30, placing=False) == {made[1]}
        assert state.acquire_lease("scheduler", "b", T0 + 40, ttl=30) is False  # expired, but locked
        busy.rollback()
    assert state.acquire_lease("scheduler", "b", T0 + 41, ttl=30) is True


def test_a_cancelled_experiment_whose_session_still_runs_is_still_claimed(state):
    """Its attempt must still be polled, stopped and charged by some scheduler."""
    exp = new_experiment(state)
    state.create_attempt(exp.id, "kaggle", "default", T0)
    state.move_experiment(exp.id, ExperimentState.CANCELLED, T0 + 1)
    assert state.claim_experiments("a", T0 + 2, ttl=30, placing=False) == {exp.id}


# -- concurrency ---------------------------------------------------------------------------

OPEN_WHEN_TOLD = """
import sys
from gpupool.state import State
print("ready", flush=True)
sys.stdin.readline()  # the test releases every process at once
State(sys.argv[1]).close()
print("opened", flush=True)
"""


def test_processes_opening_a_new_database_together_all_succeed_and_migrate_once(tmp_path):
    """Issue 12 (kind 9): two gpupool commands on a new data folder failed 4 times in 5 with
    `table alembic_version already exists`; the migration is serialized and runs once."""
    import subprocess
    import sys

    db_path = tmp_path / "fresh" / "state.db"
    processes = [
        subprocess.Popen([sys.executable, "-c", OPEN_WHEN_TOLD, f"sqlite:///{db_path}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for _ in range(6)
    ]
    for process in processes:  # every one imported gpupool and waits at the barrier
        assert process.stdout.readline().strip() == "ready"
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [p.returncode for p in processes] == [0] * 6, outputs
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("select count(*) from alembic_version").fetchone()[0] == 1
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        assert {"experiments", "attempts", "events"} <= tables
