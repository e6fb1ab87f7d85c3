"""Placement: where the next attempt goes, as a table of cases; back-off; checkpoint interval."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpupool.durations import format_duration
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
from gpupool.spec import CheckpointPolicy, Resources

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


def test_wait_until_is_the_earliest_change():
    candidates = [cand("a", unavailable_until=NOW + 500), cand("b", unavailable_until=NOW + 200),
                  cand("c", remaining_seconds=0, quota_resets_at=NOW + 100)]
    result = choose(["a", "b", "c"], Resources(), candidates, SLICE, NOW)
    assert result == Wait(result.reason, NOW + 100)


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
