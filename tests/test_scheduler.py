"""The scheduler's reconcile step in virtual time, with in-memory providers (never sleeps)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from gpupool import db
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.provider import Quota
from gpupool.provider_config import Capabilities
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec, parse_stored
from tests.fakes import FakeProvider, Script

# Every test runs on each state backend (tests/conftest.py: SQLite, PostgreSQL).
pytestmark = pytest.mark.usefixtures("pool_database")

T0 = 1_800_000_000.0
Y, L, F, S = AttemptState.YIELDED, AttemptState.LOST, AttemptState.FAILED, AttemptState.SUCCEEDED


def make(tmp_path: Path, *providers: FakeProvider, **spec: object) -> tuple[Pool, Scheduler, str]:
    pool = Pool(PoolSettings(data_dir=tmp_path / "data"), clock=lambda: T0,
                providers={p.name: p for p in providers})
    (tmp_path / "code").mkdir(parents=True, exist_ok=True)
    fields = {"name": "exp", "run": "python train.py", "workdir": tmp_path / "code",
              "providers": [p.name for p in providers], "checkpoint": {"interval": 600}}
    fields.update(spec)
    experiment = pool.submit(ExperimentSpec.model_validate(fields))
    return pool, Scheduler(pool), experiment.id


def run_until_terminal(pool: Pool, scheduler: Scheduler, experiment_id: str, *, step: float = 30.0,
                       limit: int = 500) -> float:
    now = T0
    for _ in range(limit):
        scheduler.reconcile_once(now)
        if pool.state.experiment(experiment_id).state.terminal:
            return now
        now += step
    raise AssertionError(pool.state.experiment(experiment_id))


def test_hops_resume_from_latest_checkpoint(tmp_path: Path) -> None:
    kaggle = FakeProvider("kaggle", Script([(Y, 300, 100), (L, 200, 50), (S, 100, 30)]))
    pool, scheduler, ident = make(tmp_path, kaggle)
    run_until_terminal(pool, scheduler, ident)
    experiment = pool.state.experiment(ident)
    attempts = pool.state.attempts(ident)
    assert experiment.state == ExperimentState.SUCCEEDED
    assert [a.state for a in attempts] == [Y, L, S]
    assert experiment.hops == 2 and experiment.last_step == 180
    assert attempts[0].checkpoint_in is None
    assert attempts[1].checkpoint_in == attempts[0].checkpoint_out
    assert attempts[2].step_start == 150
    assert experiment.gpu_seconds == pytest.approx(sum(a.gpu_seconds for a in attempts))


def test_refusal_cools_provider_down_and_falls_back(tmp_path: Path) -> None:
    colab = FakeProvider("colab", Script(refuse=1))
    kaggle = FakeProvider("kaggle", Script([(S, 60, 10)]))
    pool, scheduler, ident = make(tmp_path, colab, kaggle)
    report = scheduler.reconcile_once(T0)
    attempts = pool.state.attempts(ident)
    assert [(a.provider, a.state) for a in attempts] == [
        ("colab", AttemptState.UNAVAILABLE), ("kaggle", AttemptState.SUBMITTED)]
    assert report.placed == [attempts[1].id]
    cooldown = pool.state.cooldowns()[("colab", "default")]
    assert cooldown.until > T0 and "no capacity" in cooldown.reason


def test_errors_are_retried_then_fail_with_log_tail(tmp_path: Path) -> None:
    local = FakeProvider("local", Script([(F, 10, 0), (F, 10, 0), (F, 10, 0)]))
    pool, scheduler, ident = make(tmp_path, local, limits={"retries_on_error": 2})
    run_until_terminal(pool, scheduler, ident)
    experiment = pool.state.experiment(ident)
    assert experiment.state == ExperimentState.FAILED
    assert len(pool.state.attempts(ident)) == 3 and "failed 3 times" in (experiment.message or "")


def test_max_hops_and_budget_stop_the_experiment(tmp_path: Path) -> None:
    pool, scheduler, ident = make(tmp_path, FakeProvider("local", Script([(Y, 60, 1)] * 5)),
                                  limits={"max_hops": 2})
    run_until_terminal(pool, scheduler, ident)
    assert "max_hops" in (pool.state.experiment(ident).message or "")
    pool2, scheduler2, ident2 = make(tmp_path / "b", FakeProvider("local", Script([(Y, 3600, 1)] * 5)),
                                     limits={"gpu_hours": 1.5})
    run_until_terminal(pool2, scheduler2, ident2, step=600)
    final = pool2.state.experiment(ident2)
    assert final.state == ExperimentState.FAILED and "budget" in (final.message or "")
    assert len(pool2.state.attempts(ident2)) == 2


def test_quota_too_small_skips_provider(tmp_path: Path) -> None:
    kaggle = FakeProvider("kaggle", quota_hours=0.1)  # 6 minutes: less than one 10-minute slice
    local = FakeProvider("local")
    pool, scheduler, ident = make(tmp_path, kaggle, local)
    scheduler.reconcile_once(T0)
    assert [a.provider for a in pool.state.attempts(ident)] == ["local"]


def test_waits_with_reason_when_nothing_fits(tmp_path: Path) -> None:
    pool, scheduler, ident = make(tmp_path, FakeProvider("kaggle", quota_hours=0.01))
    report = scheduler.reconcile_once(T0)
    assert "quota too small" in report.waiting[ident]
    assert "quota too small" in (pool.state.experiment(ident).wait_reason or "")


def test_concurrency_cap_is_respected(tmp_path: Path) -> None:
    kaggle = FakeProvider("kaggle", max_concurrent=1)
    pool, scheduler, first = make(tmp_path, kaggle)
    second = pool.submit(ExperimentSpec.model_validate(pool.state.experiment(first).spec)).id
    scheduler.reconcile_once(T0)
    assert len(pool.state.attempts(first)) + len(pool.state.attempts(second)) == 1


def test_cancel_ends_attempt_and_experiment(tmp_path: Path) -> None:
    local = FakeProvider("local", Script([(S, 10_000, 10)]))
    pool, scheduler, ident = make(tmp_path, local)
    scheduler.reconcile_once(T0)
    scheduler.cancel(ident, T0 + 60)
    assert pool.state.experiment(ident).state == ExperimentState.CANCELLED
    assert [a.state for a in pool.state.attempts(ident)] == [AttemptState.CANCELLED]
    assert scheduler.reconcile_once(T0 + 120).placed == []


def test_orphaned_running_experiment_is_placed_again(tmp_path: Path) -> None:
    pool, scheduler, ident = make(tmp_path, FakeProvider("local"))
    pool.state.move_experiment(ident, ExperimentState.RUNNING, T0)  # as if a crash left it so
    scheduler.reconcile_once(T0)
    assert len(pool.state.attempts(ident, active=True)) == 1


def test_auto_interval_shrinks_as_losses_are_observed(tmp_path: Path) -> None:
    local = FakeProvider("local", Script([(L, 1800, 10)] * 6), loss_prior_seconds=6 * 3600)
    pool, scheduler, ident = make(tmp_path, local,
                                  checkpoint={"interval": "auto", "min_interval": 60,
                                              "max_interval": 7200})
    spec = ExperimentSpec.model_validate(pool.state.experiment(ident).spec)
    before = scheduler.interval_for(spec, local, None)
    for i in range(40):
        scheduler.reconcile_once(T0 + i * 600)
    latest = pool.store_for(ident).latest()
    after = scheduler.interval_for(spec, local, latest)
    assert before == 600  # no save cost measured yet: the default
    # save 2 s, MTBF ~ (losses' seconds + prior) / (losses + 1) ~ 1 h -> sqrt(2*2*3600) = 120 s
    assert 60 <= after < 300
    launches = [s.launch.checkpoint_interval for s in local.sessions.values()]
    assert launches[-1] < launches[1]


class Crash(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in gpupool catches it."""


# Every database transaction of a three-session run (placements, polls, relays, hops).
@pytest.mark.parametrize("crash_at", range(1, 32))
def test_crash_at_any_state_write_loses_and_duplicates_nothing(tmp_path: Path, crash_at: int) -> None:
    """Kill the scheduler at the Nth database write, restart it, and finish the experiment."""
    script = Script([(Y, 300, 100), (L, 200, 50), (S, 100, 30)])
    kaggle = FakeProvider("kaggle", script)
    pool, scheduler, ident = make(tmp_path, kaggle)
    writes = {"n": 0}
    real_begin = pool.state.engine.begin

    def counting_begin():  # type: ignore[no-untyped-def]
        writes["n"] += 1
        if writes["n"] == crash_at:
            raise Crash()
        return real_begin()

    pool.state.engine.begin = counting_begin  # type: ignore[method-assign]
    crashed = False
    now = T0
    for _ in range(200):
        try:
            scheduler.reconcile_once(now)
        except Crash:
            crashed = True
            scheduler = Scheduler(pool)  # a fresh scheduler over the same database
        if pool.state.experiment(ident).state.terminal:
            break
        now += 30
    experiment = pool.state.experiment(ident)
    attempts = pool.state.attempts(ident)
    assert crashed, f"only {writes['n']} writes: crash point {crash_at} never reached"
    assert experiment.state == ExperimentState.SUCCEEDED
    assert len(kaggle.sessions) == len([a for a in attempts if a.remote_id or a.state.terminal])
    assert len(kaggle.sessions) == 3, "a session was started twice or lost"
    assert pool.state.charged_seconds("kaggle", "default", 0) == pytest.approx(
        sum(a.gpu_seconds for a in attempts))
    assert experiment.last_step == 180


def test_session_is_planned_to_end_before_the_quota_runs_out(tmp_path: Path) -> None:
    kaggle = FakeProvider("kaggle", quota_hours=2.0, session_seconds=9 * 3600)
    pool, scheduler, ident = make(tmp_path, kaggle)
    scheduler.reconcile_once(T0)
    launch = next(iter(kaggle.sessions.values())).launch
    assert launch.quota_seconds == pytest.approx(2 * 3600)
    assert kaggle.planned_session_seconds(launch) == pytest.approx(2 * 3600)  # not the 9 h cap
    unlimited = FakeProvider("local", session_seconds=600)
    assert unlimited.planned_session_seconds(launch.__class__(**{**launch.__dict__,
                                                                  "quota_seconds": None})) == 600


def test_an_estimated_quota_does_not_shorten_the_session(tmp_path: Path) -> None:
    class Estimated(FakeProvider):
        capabilities = Capabilities(exact_quota=False)  # declared: its quota is a guess

        def quota(self, account: str, now: float, charged: float) -> Quota | None:
            return Quota(charged, 2 * 3600, source="estimate")  # Colab publishes none: a guess

    colab = Estimated("colab", session_seconds=12 * 3600)
    pool, scheduler, ident = make(tmp_path, colab)
    scheduler.reconcile_once(T0)
    launch = next(iter(colab.sessions.values())).launch
    assert launch.quota_seconds is None
    assert colab.planned_session_seconds(launch) == 12 * 3600


# -- issue 12: stopping what was started (kind 2) -------------------------------------------


def test_cancel_that_cannot_stop_the_session_says_so_and_keeps_tracking_it(tmp_path: Path) -> None:
    kaggle = FakeProvider("kaggle", Script([(S, 600, 10)], cancel_fails=True))
    pool, scheduler, ident = make(tmp_path, kaggle)
    scheduler.reconcile_once(T0)
    scheduler.reconcile_once(T0 + 30)
    done = scheduler.cancel(ident, T0 + 60)
    assert done.experiment.state == ExperimentState.CANCELLED  # nothing new is placed
    assert [f.action for f in done.failures] == [f"stop {ident}-a1 on the service's web page"]
    [attempt] = pool.state.attempts(ident)
    assert attempt.state == AttemptState.RUNNING, "a session still running is never called stopped"
    assert any(e["kind"] == "cancel-failed" for e in pool.state.events(ident))
    for now in (T0 + 120, T0 + 400):
        assert scheduler.reconcile_once(now).placed == []
        assert pool.state.attempt(attempt.id).state == AttemptState.RUNNING  # still polled
    scheduler.reconcile_once(T0 + 700)  # the session really ends: collected and charged
    ended = pool.state.attempt(attempt.id)
    assert ended.state == AttemptState.SUCCEEDED and ended.checkpoint_out
    assert ended.gpu_seconds == pytest.approx(700)
    assert pool.state.charged_seconds("kaggle", "default", 0) == pytest.approx(700)
    final = pool.state.experiment(ident)
    assert final.state == ExperimentState.CANCELLED and final.last_checkpoint == ended.checkpoint_out
    assert kaggle.cancels == [attempt.id], "the stop was asked once, not every step"


def test_cancel_that_stops_the_session_reports_no_failure(tmp_path: Path) -> None:
    local = FakeProvider("local", Script([(S, 10_000, 10)]))
    pool, scheduler, ident = make(tmp_path, local)
    scheduler.reconcile_once(T0)
    done = scheduler.cancel(ident, T0 + 60)
    assert done.failures == [] and done.experiment.state == ExperimentState.CANCELLED
    assert local.cancels == [f"{ident}-a1"]


@pytest.mark.parametrize("cancel_fails", [False, True])
def test_every_lost_session_is_told_to_stop(tmp_path: Path, cancel_fails: bool) -> None:
    """Issue 12: a Colab attempt marked lost (stale heartbeat) was never told to stop and
    trained on unseen; a refusal to stop is recorded, and the experiment goes on."""
    colab = FakeProvider("colab", Script([(L, 300, 10), (Y, 300, 10), (S, 60, 10)],
                                         cancel_fails=cancel_fails))
    pool, scheduler, ident = make(tmp_path, colab)
    run_until_terminal(pool, scheduler, ident)
    attempts = pool.state.attempts(ident)
    assert pool.state.experiment(ident).state == ExperimentState.SUCCEEDED
    assert colab.cancels == [attempts[0].id], "only the lost session, once"
    refused = [e for e in pool.state.events(ident) if e["kind"] == "cancel-failed"]
    assert len(refused) == int(cancel_fails)
    if cancel_fails:
        assert refused[0]["attempt_id"] == attempts[0].id and "stop it" not in refused[0]["message"]


def test_a_stop_call_that_fails_otherwise_is_reported_as_not_stopped(tmp_path: Path) -> None:
    from gpupool.errors import ProviderError

    class Unreachable(FakeProvider):
        def cancel(self, attempt):  # type: ignore[no-untyped-def]
            self.cancels.append(attempt.id)
            raise ProviderError("kaggle", "connection reset while cancelling")

    kaggle = Unreachable("kaggle", Script([(S, 600, 10)]))
    pool, scheduler, ident = make(tmp_path, kaggle)
    scheduler.reconcile_once(T0)
    done = scheduler.cancel(ident, T0 + 60)
    [failure] = done.failures
    assert str(failure).startswith("kaggle: connection reset while cancelling")
    assert f"gpupool cancel {ident}" in failure.action
    assert pool.state.attempts(ident, active=True) and scheduler.reconcile_once(T0 + 90).problems == []
    scheduler.reconcile_once(T0 + 700)
    assert pool.state.attempts(ident)[0].state == AttemptState.SUCCEEDED  # collected when it ended


def test_cancel_from_the_command_line_exits_non_zero_with_the_action(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gpupool.cli import cli

    kaggle = FakeProvider("kaggle", Script([(S, 600, 10)], cancel_fails=True))
    pool, scheduler, ident = make(tmp_path, kaggle)
    scheduler.reconcile_once(T0)
    result = CliRunner().invoke(cli, ["cancel", ident], obj={"pool": pool})
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1, text
    assert "could NOT be stopped" in text and f"stop {ident}-a1 on the service's web page" in text
    assert "every session stopped" not in text
    assert pool.state.attempts(ident, active=True), "the session stays tracked"


# -- issue 12: sessions that make no progress (kind 4) --------------------------------------


def test_sessions_that_publish_no_new_checkpoint_stop_the_experiment(tmp_path: Path) -> None:
    local = FakeProvider("local", Script([(Y, 60, 10)] + [(L, 60, 0)] * 20))
    pool, scheduler, ident = make(tmp_path, local, limits={"max_hops": 50})
    run_until_terminal(pool, scheduler, ident)
    experiment = pool.state.experiment(ident)
    assert experiment.state == ExperimentState.FAILED
    assert len(pool.state.attempts(ident)) == 4  # one with progress, then the limit of 3
    assert "3 sessions in a row published no new checkpoint" in (experiment.message or "")
    assert "max_sessions_without_checkpoint" in (experiment.message or "")


def test_the_no_progress_limit_is_the_experiments_own(tmp_path: Path) -> None:
    local = FakeProvider("local", Script([(Y, 60, 0)] * 20))
    pool, scheduler, ident = make(tmp_path, local, limits={"max_sessions_without_checkpoint": 5})
    run_until_terminal(pool, scheduler, ident)
    assert len(pool.state.attempts(ident)) == 5


def test_errors_count_in_a_row_and_reset_when_a_checkpoint_is_published(tmp_path: Path) -> None:
    """A kill gpupool did not cause is an error; retries_on_error bounds errors in a row
    without progress, so a run killed several times after saving still finishes."""
    local = FakeProvider("local", Script([(F, 60, 10)] * 5 + [(S, 60, 10)]))
    pool, scheduler, ident = make(tmp_path, local, limits={"retries_on_error": 1})
    run_until_terminal(pool, scheduler, ident)
    experiment = pool.state.experiment(ident)
    assert experiment.state == ExperimentState.SUCCEEDED and experiment.failed_attempts == 5
    stuck = FakeProvider("local", Script([(F, 60, 10), (F, 60, 0), (F, 60, 0), (S, 60, 10)]))
    pool, scheduler, ident = make(tmp_path / "b", stuck, limits={"retries_on_error": 1})
    run_until_terminal(pool, scheduler, ident)
    experiment = pool.state.experiment(ident)
    assert experiment.state == ExperimentState.FAILED
    assert len(pool.state.attempts(ident)) == 2
    assert "failed 2 times in a row without a new checkpoint" in (experiment.message or "")


def test_unavailable_attempts_neither_count_nor_break_a_streak(tmp_path: Path) -> None:
    from gpupool.scheduler import no_progress_streaks
    from gpupool.state import Attempt

    def ended(state: AttemptState, out: str | None = None) -> Attempt:
        return Attempt(id="x", experiment_id="e", seq=1, provider="p", account="a", state=state,
                       remote_id=None, url=None, end_reason=None, created_at=0, started_at=None,
                       ended_at=None, deadline=None, last_heartbeat=None, step_start=None,
                       step=None, total_steps=None, rate=None, checkpoint_in=None,
                       checkpoint_out=out, gpu_seconds=0, detail=None)

    U, C = AttemptState.UNAVAILABLE, AttemptState.CANCELLED
    history = [ended(Y, "c1"), ended(L), ended(U), ended(F), ended(C), ended(Y)]
    assert no_progress_streaks(history) == (1, 3)
    assert no_progress_streaks([ended(F), ended(F, "c2"), ended(F)]) == (2, 1)
    assert no_progress_streaks([]) == (0, 0)


# -- issue 12: one experiment's fault stays its own (kind 7) --------------------------------


def test_a_stored_spec_that_no_longer_validates_fails_only_its_experiment(tmp_path: Path) -> None:
    local = FakeProvider("local", Script([(S, 60, 10)] * 3))
    pool, scheduler, broken = make(tmp_path, local)
    healthy = pool.submit(ExperimentSpec.model_validate(pool.state.experiment(broken).spec)).id
    with pool.state.engine.begin() as conn:  # as an older or newer gpupool would have stored it
        spec = dict(pool.state.experiment(broken).spec, limits={"max_hops": "many"}, gpus=2)
        conn.execute(db.experiments.update().where(db.experiments.c.id == broken)
                     .values(spec=json.dumps(spec)))
    report = scheduler.reconcile_once(T0)  # raised a pydantic error before: nothing moved
    assert [a.experiment_id for a in pool.state.attempts(active=True)] == [healthy]
    failed = pool.state.experiment(broken)
    assert failed.state == ExperimentState.FAILED
    assert "no longer validates" in (failed.message or "") and "gpupool run" in (failed.message or "")
    assert "limits.max_hops" in (failed.message or "") and "gpus" in (failed.message or "")
    assert any(broken in p for p in report.problems)
    run_until_terminal(pool, scheduler, healthy)
    assert pool.state.experiment(healthy).state == ExperimentState.SUCCEEDED


def test_a_stored_spec_broken_while_its_session_runs_stops_and_keeps_it(tmp_path: Path) -> None:
    local = FakeProvider("local", Script([(S, 600, 10)]))
    pool, scheduler, ident = make(tmp_path, local)
    scheduler.reconcile_once(T0)
    with pool.state.engine.begin() as conn:
        conn.execute(db.experiments.update().where(db.experiments.c.id == ident)
                     .values(spec=json.dumps({"name": "exp"})))  # no `run`: invalid
    scheduler.reconcile_once(T0 + 700)  # its session ended: finishing it needs the spec
    scheduler.reconcile_once(T0 + 730)
    experiment = pool.state.experiment(ident)
    [attempt] = pool.state.attempts(ident)
    assert experiment.state == ExperimentState.FAILED and "no longer validates" in (experiment.message or "")
    assert attempt.state.terminal and attempt.gpu_seconds > 0


def test_the_stored_spec_is_validated_once_however_many_steps_read_it(tmp_path: Path) -> None:
    """Issue 13 item 2: the scheduler re-validated the stored spec dict at every use (four
    places a step); now it is parsed where it leaves the database, once per stored spec."""
    local = FakeProvider("local", Script([(Y, 300, 10), (L, 200, 5), (S, 100, 5)]))
    pool, scheduler, ident = make(tmp_path, local)
    before = parse_stored.cache_info().misses
    run_until_terminal(pool, scheduler, ident)
    assert pool.state.experiment(ident).state == ExperimentState.SUCCEEDED
    assert parse_stored.cache_info().misses - before == 1


def test_a_broken_stored_spec_stalls_no_other_experiment_in_the_same_step(tmp_path: Path) -> None:
    """Issue 13 item 2: the spec is parsed once where it leaves the database; one that no
    longer validates fails its experiment only, while in the same step another experiment's
    session ends and is finished, and a pending one is placed."""
    local = FakeProvider("local", Script([(S, 600, 10)] * 3))
    pool, scheduler, broken = make(tmp_path, local)
    spec = pool.state.experiment(broken).parsed_spec
    healthy = pool.submit(spec).id
    scheduler.reconcile_once(T0)  # both run; the broken one's attempt is reconciled first
    waiting = pool.submit(spec).id
    with pool.state.engine.begin() as conn:
        conn.execute(db.experiments.update().where(db.experiments.c.id == broken)
                     .values(spec=json.dumps({"name": "exp", "gpus": 2})))
    report = scheduler.reconcile_once(T0 + 700)
    failed = pool.state.experiment(broken)
    assert failed.state == ExperimentState.FAILED
    assert "no longer validates" in (failed.message or "") and "gpupool run" in (failed.message or "")
    assert pool.state.experiment(healthy).state == ExperimentState.SUCCEEDED
    assert [a.state for a in pool.state.attempts(waiting)] == [AttemptState.SUBMITTED]
    assert [p for p in report.problems if broken not in p] == []


class FlakyLocal(LocalFileSystem):
    """A local store whose listing fails while ``down`` (Drive or S3 unreachable)."""

    protocol = "flaky"
    down = False

    @classmethod
    def _strip_protocol(cls, path):  # type: ignore[no-untyped-def]
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def ls(self, path, detail=True, **kwargs):  # type: ignore[no-untyped-def]
        if FlakyLocal.down:
            raise ConnectionResetError("the store's server reset the connection")
        return super().ls(path, detail=detail, **kwargs)


def test_an_unreachable_store_at_a_session_end_leaves_it_to_be_collected_later(tmp_path: Path) -> None:
    """Issue 13 item 2: the store's read failure is StoreUnreachable (gpupool's), which the
    scheduler does not take for corrupt output: the attempt is neither ended nor charged
    until its checkpoint could be collected at a later step."""
    fsspec.register_implementation("flaky", FlakyLocal, clobber=True)
    local = FakeProvider("local", Script([(Y, 600, 10), (S, 60, 5)]))
    pool = Pool(PoolSettings(data_dir=tmp_path / "data", store_url=f"flaky://{tmp_path}/store"),
                clock=lambda: T0, providers={"local": local})
    (tmp_path / "code").mkdir()
    ident = pool.submit(ExperimentSpec.model_validate(
        {"name": "exp", "run": "python train.py", "workdir": tmp_path / "code",
         "providers": ["local"], "checkpoint": {"interval": 600}})).id
    scheduler = Scheduler(pool)
    scheduler.reconcile_once(T0)
    FlakyLocal.down = True
    try:
        report = scheduler.reconcile_once(T0 + 700)
    finally:
        FlakyLocal.down = False
    [attempt] = pool.state.attempts(ident)
    assert attempt.state == AttemptState.SUBMITTED and not report.finished
    assert any("cannot read" in p for p in report.problems)
    assert not pool.state.events(ident, kinds=["corrupt-checkpoint"])
    run_until_terminal(pool, scheduler, ident)
    first, _ = pool.state.attempts(ident)
    assert first.state == Y and first.checkpoint_out is not None
    assert pool.state.experiment(ident).state == ExperimentState.SUCCEEDED


def test_an_unexpected_exception_in_one_experiment_does_not_stop_the_others(tmp_path: Path) -> None:
    class Broken(FakeProvider):
        def poll(self, attempt, now):  # type: ignore[no-untyped-def]
            raise KeyError("status")  # a bug, or an answer outside the happy path

    pool = Pool(PoolSettings(data_dir=tmp_path / "data"), clock=lambda: T0,
                providers={"kaggle": Broken("kaggle"), "local": FakeProvider("local")})
    (tmp_path / "code").mkdir()
    specs = [ExperimentSpec.model_validate({"name": name, "run": "x", "workdir": tmp_path / "code",
                                            "providers": [provider]})
             for name, provider in (("bad", "kaggle"), ("good", "local"))]
    bad, good = (pool.submit(spec).id for spec in specs)
    scheduler = Scheduler(pool)
    scheduler.reconcile_once(T0)
    report = scheduler.reconcile_once(T0 + 30)
    assert report.problems == [f"{bad}-a1: unexpected KeyError: 'status'"]
    assert any(e["kind"] == "problem" and "KeyError" in e["message"] for e in pool.state.events(bad))
    run_until_terminal(pool, scheduler, good)
    assert pool.state.experiment(good).state == ExperimentState.SUCCEEDED


def test_provider_names_are_not_repeated_in_messages(tmp_path: Path) -> None:
    from gpupool.errors import ProviderError, ProviderUnavailable

    assert str(ProviderError("kaggle", str(ProviderError("kaggle", "boom")))) == "kaggle: boom"
    kaggle = FakeProvider("kaggle", Script(refuse=1))
    pool, scheduler, ident = make(tmp_path, kaggle)
    scheduler.reconcile_once(T0)
    experiment = pool.state.experiment(ident)
    assert experiment.wait_reason == "kaggle: no capacity right now (retry in 1m00s)"
    shown = [e["message"] for e in pool.state.events(ident)]
    shown.append(pool.state.cooldowns()[("kaggle", "default")].reason)
    assert "kaggle unavailable: no capacity right now" in shown
    assert not [m for m in shown if "kaggle: kaggle" in m or "unavailable: kaggle" in m], shown
    assert str(ProviderUnavailable("kaggle", "kaggle: kaggle: quota")) == "kaggle: quota"
