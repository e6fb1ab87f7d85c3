"""GPU time left has one owner (``gpupool.quota.gpu_seconds_left``): the window, the ledger, the
provider's answer with the estimate rule, and what running sessions may still spend. The
scheduler, `gpupool quota` and a team's accounts read it; cool-downs are the state database's.
In virtual time with in-memory providers (never sleeps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.placement import backoff_seconds
from gpupool.pool import Pool
from gpupool.provider import Availability, Quota
from gpupool.provider_config import Capabilities
from gpupool.quota import gpu_seconds_left
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from gpupool.views import quota_rows
from tests.fakes import FakeProvider

pytestmark = pytest.mark.usefixtures("pool_database")  # each state backend (tests/conftest.py)

T0 = 1_800_000_000.0
HOUR = 3600.0
DAY = 24 * HOUR


class RollingDay(FakeProvider):
    """A provider whose usage counts over the last 24 h, with an exact or a guessed allowance."""

    def __init__(self, name: str, *, source: str = "ledger", **config: object):
        super().__init__(name, **config)
        self.source = source
        # a guessed allowance is declared by the adapter, as Colab's class does
        self.capabilities = Capabilities(exact_quota=source != "estimate")  # type: ignore[misc]

    def quota_window_start(self, now: float) -> float:
        return now - DAY

    def quota(self, account: str, now: float, charged: float) -> Quota | None:
        return Quota(charged, 4 * HOUR, source=self.source)


class Windowed(FakeProvider):
    """A provider closed by its own rule (a local time window) until ``T0 + HOUR``."""

    def availability(self, account: str, now: float) -> Availability:
        return Availability(False, "outside the local windows 22:00-07:00", until=T0 + HOUR)


def make_pool(tmp_path: Path, *providers: FakeProvider) -> Pool:
    (tmp_path / "code").mkdir(exist_ok=True)
    return Pool(PoolSettings(data_dir=tmp_path / "data"), clock=lambda: T0,
                providers={p.name: p for p in providers})


def submit(pool: Pool, tmp_path: Path, provider: str) -> str:
    spec = ExperimentSpec.model_validate({
        "name": "exp", "run": "python train.py", "workdir": tmp_path / "code",
        "providers": [provider], "checkpoint": {"interval": 600}})
    return pool.submit(spec).id


def session(pool: Pool, experiment_id: str, provider: str, start: float, end: float | None,
            deadline: float | None = None) -> str:
    """An attempt that ran from ``start``; ended (and charged) at ``end``, or still running."""
    state = pool.state
    attempt = state.create_attempt(experiment_id, provider, "default", start, started_at=start,
                                   deadline=deadline)
    attempt = state.move_attempt(attempt.id, AttemptState.SUBMITTED, start)
    attempt = state.move_attempt(attempt.id, AttemptState.RUNNING, start)
    if end is not None:
        state.end_attempt(attempt, AttemptState.YIELDED, end, message="yielded", why="resuming",
                          attempt_fields={"gpu_seconds": end - start},
                          next_state=ExperimentState.PENDING, experiment_fields={},
                          charge_seconds=end - start)
    return attempt.id


def test_left_is_the_window_minus_the_ledger_minus_what_running_sessions_may_spend(tmp_path):
    provider = RollingDay("kaggle", session_seconds=2 * HOUR)
    pool = make_pool(tmp_path, provider)
    ident = submit(pool, tmp_path, "kaggle")
    session(pool, ident, "kaggle", T0 - 2 * DAY, T0 - 2 * DAY + HOUR)  # before the window
    session(pool, ident, "kaggle", T0 - HOUR, T0 - 0.5 * HOUR)  # in it: 30 min charged
    running = session(pool, ident, "kaggle", T0, None, deadline=T0 + 1.5 * HOUR)

    left = gpu_seconds_left(pool.state, provider, "default", T0)
    assert (left.source, left.exact) == ("ledger", True)
    assert left.remaining_seconds == 3.5 * HOUR  # 4 h allowance, 30 min charged in the window
    assert left.reserved_seconds == 1.5 * HOUR  # the running session, up to its deadline
    assert left.placeable_seconds == left.session_limit_seconds == 2 * HOUR
    starting = gpu_seconds_left(pool.state, provider, "default", T0, starting=running)
    assert starting.session_limit_seconds == 3.5 * HOUR  # a session reserves nothing for itself
    [row] = [r for r in quota_rows(pool, T0) if r["provider"] == "kaggle"]  # `gpupool quota`
    assert (row["remaining_hours"], row["running_hours"], row["source"]) == (3.5, 1.5, "ledger")
    pool.close()


def test_an_estimate_places_but_never_limits_and_is_spent_only_when_the_provider_says_so(
        tmp_path):
    provider = RollingDay("colab", source="estimate")
    pool = make_pool(tmp_path, provider)
    left = gpu_seconds_left(pool.state, provider, "default", T0)
    assert (left.placeable_seconds, left.session_limit_seconds) == (4 * HOUR, None)

    pool.state.cool_down("colab", "default", T0, "notebook not opened in time",
                         backoff=backoff_seconds)  # a person away: no word on the quota
    assert gpu_seconds_left(pool.state, provider, "default", T0 + 1).remaining_seconds == 4 * HOUR
    pool.state.cool_down("colab", "default", T0 + 2, "Colab gave no GPU", backoff=backoff_seconds,
                         until=T0 + 6 * HOUR, quota_spent=True)
    spent = gpu_seconds_left(pool.state, provider, "default", T0 + 3)
    assert (spent.remaining_seconds, spent.resets_at) == (0, T0 + 6 * HOUR)
    after = gpu_seconds_left(pool.state, provider, "default", T0 + 6 * HOUR + 1)
    assert (after.remaining_seconds, after.resets_at) == (4 * HOUR, None)
    pool.close()


def test_an_exact_quota_stands_through_a_cooldown(tmp_path):
    provider = RollingDay("kaggle", source="api")
    pool = make_pool(tmp_path, provider)
    pool.state.cool_down("kaggle", "default", T0, "refused", backoff=backoff_seconds,
                         until=T0 + HOUR, quota_spent=True)
    assert gpu_seconds_left(pool.state, provider, "default", T0).remaining_seconds == 4 * HOUR
    pool.close()


def test_an_unlimited_provider_has_no_figures(tmp_path):
    provider = FakeProvider("local")
    pool = make_pool(tmp_path, provider)
    left = gpu_seconds_left(pool.state, provider, "default", T0)
    assert (left.source, left.remaining_seconds, left.placeable_seconds) == ("unlimited", None, None)
    [row] = [r for r in quota_rows(pool, T0) if r["provider"] == "local"]
    assert row["total_hours"] is None and row["running_hours"] is None
    pool.close()


def test_an_ended_cooldown_does_not_hide_the_providers_own_answer(tmp_path):
    """A refusal long ago left its record (its count sets the next back-off): the experiment
    waits for the provider's window, with its reason, not for an old refusal's."""
    provider = Windowed("local")
    pool = make_pool(tmp_path, provider)
    ident = submit(pool, tmp_path, "local")
    pool.state.cool_down("local", "default", T0 - HOUR, "no capacity right now",
                         backoff=backoff_seconds)
    Scheduler(pool).reconcile_once(T0)
    experiment = pool.state.experiment(ident)
    assert "outside the local windows 22:00-07:00" in (experiment.wait_reason or "")
    assert "no capacity" not in (experiment.wait_reason or "")
    assert experiment.not_before == T0 + HOUR
    pool.close()


def test_failed_attempts_is_stored_in_the_column_it_always_had(tmp_path):
    pool = make_pool(tmp_path, FakeProvider("local"))
    ident = submit(pool, tmp_path, "local")
    pool.state.update_experiment(ident, T0, failed_attempts=2)
    assert pool.state.experiment(ident).failed_attempts == 2
    with pool.state.engine.connect() as conn:  # older gpupools read the same column
        assert conn.execute(sa.text("select errors from experiments")).scalar_one() == 2
    pool.close()
