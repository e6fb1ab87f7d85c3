"""The scheduler's reconcile step in virtual time, with in-memory providers (never sleeps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpupool.pool import Pool
from gpupool.provider import Quota
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from gpupool.states import AttemptState, ExperimentState
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
    health = pool.state.health()[("colab", "default")]
    assert health["unavailable_until"] > T0 and "no capacity" in health["reason"]


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
        def quota(self, account: str, now: float, charged: float) -> Quota | None:
            return Quota(charged, 2 * 3600, source="estimate")  # Colab publishes none: a guess

    colab = Estimated("colab", session_seconds=12 * 3600)
    pool, scheduler, ident = make(tmp_path, colab)
    scheduler.reconcile_once(T0)
    launch = next(iter(colab.sessions.values())).launch
    assert launch.quota_seconds is None
    assert colab.planned_session_seconds(launch) == 12 * 3600
