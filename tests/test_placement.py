"""Placement: where the next attempt goes, as a table of cases; every reason a provider is
refused; quota slices; Kaggle's weekly reset through the scheduler and the provider's ledger
fallback; concurrency caps; and no two attempts of one experiment ever active at once (a
randomized run of the scheduler over fake providers in virtual time). Back-off; intervals."""

from __future__ import annotations

import datetime as dt
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupool import db
from gpupool.durations import format_duration
from gpupool.errors import ProviderError
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.placement import (
    DEFAULT_INTERVAL,
    Candidate,
    Place,
    Wait,
    backoff_seconds,
    checkpoint_interval,
    choose,
    refusal,
)
from gpupool.pool import Pool
from gpupool.provider import Launch, Submission
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import CheckpointPolicy, ExperimentSpec, Resources
from gpupool_providers.kaggle import KaggleProvider
from tests.fakes import FakeProvider, Script

NOW = 1_700_000_000.0
SLICE = 600.0  # one checkpoint interval


def cand(provider: str, account: str = "default", **kw) -> Candidate:
    return Candidate(provider=provider, account=account, **kw)


@dataclass
class Case:
    preferences: list[str]
    candidates: list[Candidate]
    place: tuple[str, str] | None = None  # (provider, account), or None for Wait
    reason_has: list[str] = field(default_factory=list)
    until: float | None = None
    gpu: str = "any"


CASES = {
    "first-preference-wins": Case(
        ["kaggle", "local"], [cand("local"), cand("kaggle")], place=("kaggle", "default")),
    "preference-order-not-candidate-order": Case(
        ["local", "kaggle"], [cand("kaggle"), cand("local")], place=("local", "default")),
    "unlisted-provider-never-used": Case(
        ["kaggle"], [cand("local")], reason_has=["kaggle: not configured"]),
    "not-configured-falls-through": Case(
        ["colab", "local"], [cand("colab", configured=False), cand("local")],
        place=("local", "default")),
    "missing-candidate-falls-through": Case(
        ["colab", "local"], [cand("local")], place=("local", "default")),
    "bad-credentials": Case(
        ["kaggle", "local"],
        [cand("kaggle", credentials_ok=False, credentials_hint="run `gpupool auth kaggle`"),
         cand("local")], place=("local", "default")),
    "bad-credentials-reason": Case(
        ["kaggle"], [cand("kaggle", credentials_ok=False, credentials_hint="run `gpupool auth kaggle`")],
        reason_has=["kaggle: run `gpupool auth kaggle`"], until=NOW),
    "bad-credentials-no-hint": Case(
        ["kaggle"], [cand("kaggle", credentials_ok=False)], reason_has=["credentials not usable"],
        until=NOW),
    "cooldown-until": Case(
        ["colab"], [cand("colab", unavailable_until=NOW + 300, unavailable_reason="usage limits")],
        reason_has=["colab: usage limits", f"retry in {format_duration(300)}"], until=NOW + 300),
    "cooldown-over-places-again": Case(
        ["colab"], [cand("colab", unavailable_until=NOW - 1, unavailable_reason="usage limits")],
        place=("colab", "default")),
    "cooldown-falls-through": Case(
        ["colab", "kaggle"], [cand("colab", unavailable_until=NOW + 300), cand("kaggle")],
        place=("kaggle", "default")),
    "unavailable-window": Case(
        ["local"], [cand("local", available=False, unavailable_reason="outside 22:00-08:00 window")],
        reason_has=["local: outside 22:00-08:00 window"], until=NOW),
    "concurrency-cap-reached": Case(
        ["kaggle"], [cand("kaggle", active=2, max_concurrent=2)],
        reason_has=["kaggle: 2 of 2 sessions in use"], until=NOW),
    "concurrency-cap-not-reached": Case(
        ["kaggle"], [cand("kaggle", active=1, max_concurrent=2)], place=("kaggle", "default")),
    "second-account-used-when-first-full": Case(
        ["kaggle"], [cand("kaggle", "alice", active=1, max_concurrent=1), cand("kaggle", "bob")],
        place=("kaggle", "bob")),
    "quota-too-small": Case(
        ["kaggle"],
        [cand("kaggle", remaining_seconds=SLICE + 59, startup_seconds=60, quota_resets_at=NOW + 7200)],
        reason_has=[f"quota too small ({format_duration(SLICE + 59)} left",
                    f"resets in {format_duration(7200)}"],
        until=NOW + 7200),
    "quota-exactly-enough": Case(
        ["kaggle"], [cand("kaggle", remaining_seconds=SLICE + 60, startup_seconds=60)],
        place=("kaggle", "default")),
    "quota-unlimited": Case(["local"], [cand("local", remaining_seconds=None)], place=("local", "default")),
    "quota-too-small-falls-through": Case(
        ["kaggle", "local"], [cand("kaggle", remaining_seconds=10), cand("local")],
        place=("local", "default")),
    "gpu-kind-mismatch": Case(
        ["kaggle"], [cand("kaggle", gpu_kinds=frozenset({"P100", "T4"}))], gpu="A100",
        reason_has=["kaggle: no A100 GPU (has P100, T4)"]),
    "gpu-kind-match": Case(
        ["kaggle"], [cand("kaggle", gpu_kinds=frozenset({"P100", "T4"}))], gpu="T4",
        place=("kaggle", "default")),
    "gpu-kind-match-ignores-case": Case(
        ["local"], [cand("local", gpu_kinds=frozenset({"Tesla T4"}))], gpu="t4",
        place=("local", "default")),
    "gpu-unknown-kinds-ok": Case(["colab"], [cand("colab", gpu_kinds=None)], gpu="T4",
                                 place=("colab", "default")),
    "no-gpu-refused": Case(
        ["local"], [cand("local", gpu_kinds=frozenset())], reason_has=["local: no GPU"]),
    "cpu-fallback": Case(
        ["local"], [cand("local", gpu_kinds=frozenset(), cpu_only_ok=True)], place=("local", "default")),
    "cpu-experiment-anywhere": Case(
        ["local"], [cand("local", gpu_kinds=frozenset())], gpu="none", place=("local", "default")),
    "all-refuse": Case(
        ["colab", "kaggle", "local", "paperspace"],
        [cand("colab", unavailable_until=NOW + 900, unavailable_reason="usage limits"),
         cand("kaggle", "me", remaining_seconds=5, quota_resets_at=NOW + 3600),
         cand("local", gpu_kinds=frozenset())],
        reason_has=["colab: usage limits", "kaggle[me]: quota too small", "local: no GPU",
                    "paperspace: not configured"],
        until=NOW + 900),
    "nothing-listed": Case([], [cand("local")], reason_has=["no provider listed"]),
    "a-full-provider-is-not-outwaited-by-a-quota-reset": Case(
        ["kaggle", "local"],
        [cand("kaggle", remaining_seconds=0, quota_resets_at=NOW + 2 * 86400),
         cand("local", active=1, max_concurrent=1)],
        reason_has=["kaggle: quota too small", "local: 1 of 1 sessions in use"], until=NOW),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_choose(case: Case):
    result = choose(case.preferences, Resources(gpu=case.gpu), case.candidates, SLICE, NOW)
    if case.place is not None:
        assert result == Place(*case.place)
        return
    assert isinstance(result, Wait)
    for fragment in case.reason_has:
        assert fragment in result.reason, result.reason
    assert result.until == case.until


def test_wait_reason_has_one_part_per_refusal():
    candidates = [cand("colab", configured=False), cand("kaggle", "a", active=1, max_concurrent=1),
                  cand("kaggle", "b", active=1, max_concurrent=1)]
    result = choose(["colab", "kaggle"], Resources(), candidates, SLICE, NOW)
    assert isinstance(result, Wait)
    parts = result.reason.split("; ")
    assert [p.split(":")[0] for p in parts] == ["colab", "kaggle[a]", "kaggle[b]"]


def test_refusal_is_none_for_a_fit_candidate():
    assert refusal(cand("local"), Resources(), SLICE, NOW) == (None, None)


def test_wait_reason_splits_on_semicolons_into_one_part_per_provider():
    candidates = [cand("colab", unavailable_until=NOW + 60, unavailable_reason="not opened"),
                  cand("kaggle", remaining_seconds=5, quota_resets_at=NOW + 3600)]
    result = choose(["colab", "kaggle"], Resources(), candidates, SLICE, NOW)
    assert isinstance(result, Wait)
    assert result.reason.split("; ") == ["colab: not opened (retry in 1m00s)",
                                         "kaggle: quota too small (5s left, resets in 1h00m)"]


def test_wait_until_is_the_earliest_change():
    candidates = [cand("a", unavailable_until=NOW + 500), cand("b", unavailable_until=NOW + 200),
                  cand("c", remaining_seconds=0, quota_resets_at=NOW + 100)]
    result = choose(["a", "b", "c"], Resources(), candidates, SLICE, NOW)
    assert result == Wait(result.reason, NOW + 100)


# -- every reason a provider is refused ----------------------------------------------------

# Each way `refusal` can say no, with the fragment the user reads and when to look again:
# NOW = at any moment (look every step), None = only a configuration change helps.
REASONS = {
    "not-configured": (cand("x", configured=False), "not configured", None),
    "credentials": (cand("x", credentials_ok=False, credentials_hint="run `gpupool auth x`"),
                    "run `gpupool auth x`", NOW),
    "cooldown": (cand("x", unavailable_until=NOW + 90, unavailable_reason="usage limits"),
                 "usage limits (retry in 1m30s)", NOW + 90),
    "cooldown-without-reason": (cand("x", unavailable_until=NOW + 90), "unavailable (retry in", NOW + 90),
    "window-without-end": (cand("x", available=False, unavailable_reason="outside 22:00-07:00"),
                           "outside 22:00-07:00", NOW),
    "window-with-end": (cand("x", available=False, unavailable_reason="outside 22:00-07:00",
                             unavailable_until=NOW + 3600), "outside 22:00-07:00 (retry in 1h", NOW + 3600),
    "concurrency-cap": (cand("x", active=1, max_concurrent=1), "1 of 1 sessions in use", NOW),
    "gpu-kind": (cand("x", gpu_kinds=frozenset({"P100"})), "no T4 GPU (has P100)", None),
    "no-gpu": (cand("x", gpu_kinds=frozenset()), "no GPU", None),
    "quota-no-reset-known": (cand("x", remaining_seconds=0), "quota too small (0s left)", None),
    "quota-with-reset": (cand("x", remaining_seconds=360, quota_resets_at=NOW + 86400 + 3 * 3600),
                         "quota too small (6m00s left, resets in 1d03h", NOW + 86400 + 3 * 3600),
}


@pytest.mark.parametrize("candidate, says, until", REASONS.values(), ids=list(REASONS))
def test_every_refusal_says_why_and_until_when(candidate: Candidate, says: str, until):
    why, when = refusal(candidate, Resources(gpu="T4"), SLICE, NOW)
    assert why is not None and says in why, why
    assert when == until


@pytest.mark.parametrize("candidate", [c for c, _, _ in REASONS.values()], ids=list(REASONS))
def test_every_refusal_falls_back_to_the_next_preference(candidate: Candidate):
    result = choose(["x", "local"], Resources(gpu="T4"), [candidate, cand("local")], SLICE, NOW)
    assert result == Place("local", "default")


def test_refusal_checks_run_in_a_fixed_order():
    """A provider refused for several reasons reports the first that applies, so the user fixes
    credentials before being told about quota."""
    everything = cand("x", credentials_ok=False, credentials_hint="creds", available=False,
                      active=3, max_concurrent=1, remaining_seconds=0, gpu_kinds=frozenset())
    assert refusal(everything, Resources(), SLICE, NOW)[0] == "creds"


# -- quota too small for a useful slice -----------------------------------------------------

@pytest.mark.parametrize("remaining, startup, slice_, fits", [
    (SLICE + 60, 60, SLICE, True),           # exactly one interval plus start-up
    (SLICE + 59.9, 60, SLICE, False),        # a hair short
    (SLICE, 0, SLICE, True),                 # no start-up time (local)
    (3600, 300, 3600, False),                # a person must open the notebook: 5 min more
    (3 * 3600, 180, 3600, True),
    (0, 0, 1, False),                        # nothing left at all
    (None, 10**6, 10**6, True),              # unlimited
], ids=["exact", "short", "no-startup", "startup-counts", "plenty", "empty", "unlimited"])
def test_quota_must_cover_a_checkpoint_interval_plus_startup(remaining, startup, slice_, fits):
    candidate = cand("kaggle", remaining_seconds=remaining, startup_seconds=startup)
    result = choose(["kaggle"], Resources(), [candidate], slice_, NOW)
    assert (result == Place("kaggle", "default")) is fits, result


def test_longer_checkpoint_interval_needs_more_quota():
    candidate = cand("kaggle", remaining_seconds=1800, startup_seconds=60)
    assert isinstance(choose(["kaggle"], Resources(), [candidate], 600, NOW), Place)
    assert isinstance(choose(["kaggle"], Resources(), [candidate], 3600, NOW), Wait)


# -- the scheduler around placement (virtual time, fake providers) ---------------------------

T0 = 1_800_000_000.0


def pool_with(tmp: Path, *providers, clock=lambda: T0) -> Pool:
    return Pool(PoolSettings(data_dir=tmp / "data"), clock=clock,
                providers={p.name: p for p in providers})


def submit(pool: Pool, tmp: Path, providers: list[str], **fields: object) -> str:
    (tmp / "code").mkdir(exist_ok=True)
    spec = {"name": "exp", "run": "python train.py", "workdir": tmp / "code", "providers": providers,
            "checkpoint": {"interval": 600}, **fields}
    return pool.submit(ExperimentSpec.model_validate(spec)).id


def test_concurrency_cap_queues_the_second_experiment_until_a_slot_frees(tmp_path: Path):
    local = FakeProvider("local", Script([(AttemptState.SUCCEEDED, 300, 10)] * 2), max_concurrent=1)
    kaggle = FakeProvider("kaggle", quota_hours=0.01)  # too little, and no reset in sight
    pool = pool_with(tmp_path, kaggle, local)
    first = submit(pool, tmp_path, ["kaggle", "local"])
    second = submit(pool, tmp_path, ["kaggle", "local"])
    scheduler = Scheduler(pool)
    report = scheduler.reconcile_once(T0)
    assert len(report.placed) == 1 and second in report.waiting
    assert "local: 1 of 1 sessions in use" in report.waiting[second]
    assert "kaggle: quota too small" in report.waiting[second]
    assert pool.state.experiment(second).not_before == T0  # look again at every step
    scheduler.reconcile_once(T0 + 200)
    assert pool.state.attempts(second) == []  # still full
    scheduler.reconcile_once(T0 + 330)  # the first session ended: its slot goes to the second
    assert pool.state.experiment(first).state == ExperimentState.SUCCEEDED
    assert [a.provider for a in pool.state.attempts(second)] == ["local"]
    assert kaggle.submits == 0


def test_cap_counts_attempts_of_every_experiment_per_account(tmp_path: Path):
    kaggle = FakeProvider("kaggle", Script([(AttemptState.SUCCEEDED, 3600, 1)] * 5), max_concurrent=2)
    pool = pool_with(tmp_path, kaggle)
    ids = [submit(pool, tmp_path, ["kaggle"]) for _ in range(3)]
    report = Scheduler(pool).reconcile_once(T0)
    assert len(report.placed) == 2 and list(report.waiting) == [ids[2]]
    assert "kaggle: 2 of 2 sessions in use" in report.waiting[ids[2]]


# -- Kaggle's weekly window: Saturday 00:00 UTC ----------------------------------------------

SAT = dt.datetime(2026, 1, 10, tzinfo=dt.timezone.utc).timestamp()  # a Saturday
WEEK = 7 * 86400
HOUR = 3600.0


class LedgerOnlyKaggle(KaggleProvider):
    """The real Kaggle adapter with its quota API down, so its quota comes from gpupool's own
    ledger over Kaggle's week; sessions are not really started."""

    def check_credentials(self) -> tuple[bool, str]:
        return True, "test"

    def _api_quota(self, now: float):  # type: ignore[no-untyped-def]
        raise ProviderError("kaggle", "quota API down")

    def submit(self, launch: Launch) -> Submission:
        return Submission(remote_id=launch.attempt_id)


@pytest.mark.parametrize("when, week_start", [
    (SAT, SAT), (SAT + 1, SAT), (SAT - 1, SAT - WEEK), (SAT + 6 * 86400 + 86399, SAT),
    (SAT + WEEK, SAT + WEEK), (SAT + 3.5 * 86400, SAT),
], ids=["sat-midnight", "just-after", "fri-23:59:59", "fri-end", "next-sat", "midweek"])
@pytest.mark.parametrize("tz", ["UTC", "Pacific/Kiritimati", "America/Los_Angeles"])
def test_kaggle_week_starts_saturday_utc_in_any_local_zone(when, week_start, tz, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        provider = LedgerOnlyKaggle(KaggleProvider.Config(), tmp_path, lambda: when)
        assert provider.quota_window_start(when) == week_start
    finally:
        monkeypatch.undo()
        time.tzset()


def charge(pool: Pool, seconds: float, ended_at: float, attempt_id: str) -> None:
    with pool.state.engine.begin() as conn:
        conn.execute(db.quota_ledger.insert().values(
            provider="kaggle", account="default", attempt_id=attempt_id,
            started_at=ended_at - seconds, ended_at=ended_at, seconds=seconds))


def test_ledger_charges_before_the_weekly_reset_stop_counting(tmp_path: Path):
    kaggle = LedgerOnlyKaggle(KaggleProvider.Config(startup_seconds=60), tmp_path / "kaggle",
                              lambda: SAT)
    pool = pool_with(tmp_path, kaggle)
    charge(pool, 20 * HOUR, SAT - WEEK - 1, "last-week")  # ended a second before this week
    charge(pool, 29.9 * HOUR, SAT - 5 * HOUR, "this-week")
    ident = submit(pool, tmp_path, ["kaggle"])
    scheduler = Scheduler(pool)
    spec = ExperimentSpec.model_validate(pool.state.experiment(ident).spec)

    friday = SAT - 4 * HOUR
    [view] = scheduler.candidates(spec, friday)
    assert view.remaining_seconds == pytest.approx(0.1 * HOUR)  # last week's 20 h do not count
    assert view.quota_resets_at == SAT
    report = scheduler.reconcile_once(friday)
    assert report.waiting[ident] == "kaggle: quota too small (6m00s left, resets in 4h00m)"
    assert pool.state.experiment(ident).not_before == SAT
    assert scheduler.reconcile_once(SAT - 1).placed == []  # not even asked before the reset

    [view] = scheduler.candidates(spec, SAT)
    assert view.remaining_seconds == pytest.approx(30 * HOUR) and view.quota_resets_at == SAT + WEEK
    report = scheduler.reconcile_once(SAT)
    assert len(report.placed) == 1 and pool.state.attempts(ident)[0].provider == "kaggle"
    assert pool.state.experiment(ident).wait_reason is None


def test_ledger_fallback_spans_the_kaggle_week(tmp_path: Path):
    kaggle = LedgerOnlyKaggle(KaggleProvider.Config(), tmp_path, lambda: SAT)
    fallback = kaggle.quota("default", SAT + HOUR, charged=7 * HOUR)
    assert fallback.source == "ledger" and fallback.used_seconds == 7 * HOUR
    assert fallback.resets_at == SAT + WEEK and fallback.total_seconds == 30 * HOUR


# -- never two attempts of one experiment at once --------------------------------------------

def test_database_refuses_a_second_active_attempt_even_if_the_scheduler_tried(tmp_path: Path):
    """If the state were corrupted so a running experiment looks pending, the scheduler's
    placement hits the unique index and reports a problem instead of starting a second session."""
    local = FakeProvider("local", Script([(AttemptState.SUCCEEDED, 3600, 10)]))
    pool = pool_with(tmp_path, local)
    ident = submit(pool, tmp_path, ["local"])
    scheduler = Scheduler(pool)
    scheduler.reconcile_once(T0)
    with pool.state.engine.begin() as conn:  # the corruption: bypasses the transition function
        conn.execute(db.experiments.update().where(db.experiments.c.id == ident)
                     .values(state=ExperimentState.PENDING.value))
    report = scheduler.reconcile_once(T0 + 60)
    assert report.placed == [] and any("active attempt" in p for p in report.problems)
    assert len(pool.state.attempts(ident, active=True)) == 1 and local.submits == 1


OUTCOMES = st.tuples(
    st.sampled_from([AttemptState.YIELDED, AttemptState.LOST, AttemptState.FAILED,
                     AttemptState.SUCCEEDED, AttemptState.UNAVAILABLE]),
    st.sampled_from([0.0, 30.0, 300.0, 2000.0]), st.integers(0, 40))
PROVIDERS = st.tuples(st.lists(OUTCOMES, max_size=6), st.integers(0, 2),
                      st.sampled_from([None, 1, 2]), st.sampled_from([None, 0.05, 1.0]))
NAMES = ["colab", "kaggle", "local"]  # fakes under the installed names (submit checks them)
ACTIONS = st.lists(  # (what, seconds to advance, which experiment): mostly steps of the clock
    st.tuples(st.sampled_from(["step"] * 8 + ["restart", "cancel"]),
              st.sampled_from([1.0, 30.0, 400.0, 4000.0]), st.integers(0, 2)),
    min_size=5, max_size=40)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(providers=st.lists(PROVIDERS, min_size=1, max_size=3),
       experiments=st.lists(st.permutations(NAMES), min_size=1, max_size=3),
       actions=ACTIONS)
def test_random_runs_never_overlap_attempts_or_exceed_caps(providers, experiments, actions):
    with tempfile.TemporaryDirectory() as tmp:
        fakes = [FakeProvider(NAMES[i], Script(list(outcomes), refuse=refuse), max_concurrent=cap,
                              quota_hours=quota, startup_seconds=0)
                 for i, (outcomes, refuse, cap, quota) in enumerate(providers)]
        names = {f.name for f in fakes}
        pool = pool_with(Path(tmp), *fakes)
        ids = [submit(pool, Path(tmp), [p for p in order if p in names],
                      limits={"max_hops": 8, "retries_on_error": 1}) for order in experiments]
        scheduler, now = Scheduler(pool), T0
        for action, seconds, which in actions:
            if action == "restart":
                scheduler = Scheduler(pool)  # stateless: a new one picks up where it left off
            elif action == "cancel":
                scheduler.cancel(ids[which % len(ids)], now)
            else:
                now += seconds
                scheduler.reconcile_once(now)
            check_invariants(pool, fakes, ids)


def check_invariants(pool: Pool, fakes: list[FakeProvider], ids: list[str]) -> None:
    active = pool.state.attempts(active=True)
    for ident in ids:
        attempts = pool.state.attempts(ident)
        assert sum(a.state.active for a in attempts) <= 1, attempts
        for earlier, later in zip(attempts, attempts[1:], strict=False):
            assert earlier.ended_at is not None and earlier.ended_at <= later.created_at
        produced = [a.checkpoint_out for a in attempts[:-1] if a.checkpoint_out]
        if attempts and attempts[-1].remote_id:  # submitted: restored from the newest checkpoint
            assert attempts[-1].checkpoint_in == (produced[-1] if produced else None)
        experiment = pool.state.experiment(ident)
        if experiment.state.terminal:
            assert not any(a.state.active for a in attempts)
    for fake in fakes:
        running = [a for a in active if a.provider == fake.name]
        assert fake.config.max_concurrent is None or len(running) <= fake.config.max_concurrent
    with pool.state.engine.connect() as conn:
        charged = [r.attempt_id for r in conn.execute(db.quota_ledger.select())]
    assert len(charged) == len(set(charged))


# -- back-off ------------------------------------------------------------------------------


def test_backoff_grows_and_caps():
    values = [backoff_seconds(n, base=60, cap=3600) for n in range(1, 10)]
    assert values[:4] == [60, 120, 240, 480]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == 3600
    assert backoff_seconds(0, base=60) == 60


@given(st.integers(min_value=-5, max_value=100_000))
def test_backoff_never_overflows_and_stays_in_bounds(failures):
    value = backoff_seconds(failures, base=30, cap=7200)
    assert 30 <= value <= 7200 and math.isfinite(value)


# -- checkpoint interval -------------------------------------------------------------------


def test_fixed_interval_is_used_as_given():
    policy = CheckpointPolicy(interval="45m")
    assert checkpoint_interval(policy, save_seconds=5, mean_seconds_between_losses=100) == 2700


@pytest.mark.parametrize(
    "save, mtbf",
    [(10.0, 3600.0), (30.0, 4 * 3600.0), (2.0, 600.0)],
    ids=["short-save", "long-run", "fragile"],
)
def test_auto_interval_follows_young_daly(save, mtbf):
    policy = CheckpointPolicy(interval="auto", min_interval=1, max_interval=10**6)
    assert checkpoint_interval(policy, save, mtbf) == pytest.approx(math.sqrt(2 * save * mtbf))


@pytest.mark.parametrize(
    "save, mtbf, expected",
    [(0.1, 10.0, 60.0), (600.0, 100 * 3600.0, 3600.0), (None, None, DEFAULT_INTERVAL),
     (10.0, None, DEFAULT_INTERVAL)],
    ids=["floor", "ceiling", "no-data", "no-losses-yet"],
)
def test_auto_interval_bounded(save, mtbf, expected):
    policy = CheckpointPolicy(interval="auto", min_interval="1m", max_interval="1h")
    assert checkpoint_interval(policy, save, mtbf) == expected


def test_auto_default_bounded_by_policy():
    policy = CheckpointPolicy(interval="auto", min_interval="20m", max_interval="1h")
    assert checkpoint_interval(policy, None, None) == 1200
