"""Where the next attempt goes: a pure function of the experiment and the providers' state.

No I/O and no clock of its own: the scheduler (and ``gpupool plan``) build ``Candidate`` views
and call ``choose``; tests call it with tables of cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gpupool.durations import format_duration
from gpupool.spec import CheckpointPolicy, Resources

DEFAULT_INTERVAL = 600.0


@dataclass(frozen=True)
class Candidate:
    """One provider account as placement sees it."""

    provider: str
    account: str
    configured: bool = True
    credentials_ok: bool = True
    credentials_hint: str = ""
    available: bool = True
    unavailable_reason: str = ""
    unavailable_until: float | None = None
    active: int = 0
    max_concurrent: int | None = None
    remaining_seconds: float | None = None  # None: unlimited
    quota_resets_at: float | None = None
    gpu_kinds: frozenset[str] | None = None  # None: cannot tell
    cpu_only_ok: bool = False  # runs GPU experiments on the CPU (local fallback)
    startup_seconds: float = 60.0


@dataclass(frozen=True)
class Place:
    provider: str
    account: str
    # why each provider preferred before it was not chosen (for `status`; not part of the decision)
    passed_over: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Wait:
    reason: str
    # The earliest time something may change: ``now`` when it may at any moment (a session
    # frees a slot, credentials are fixed), None when only a configuration change would help.
    until: float | None = None


def choose(
    preferences: list[str], resources: Resources, candidates: list[Candidate],
    min_slice_seconds: float, now: float,
) -> Place | Wait:
    """The first candidate, in the experiment's preference order, that can take a useful slice.

    A useful slice is at least one checkpoint interval plus start-up; a provider whose quota
    cannot give that is skipped, so placement never plans past remaining quota.
    """
    reasons: list[str] = []
    wake: list[float] = []
    for name in preferences:
        options = [c for c in candidates if c.provider == name]
        if not options:
            reasons.append(f"{name}: not configured")
            continue
        for candidate in options:
            why, until = refusal(candidate, resources, min_slice_seconds, now)
            if why is None:
                return Place(candidate.provider, candidate.account, tuple(reasons))
            # A provider's own errors already start with its name ("kaggle: ..."): say it once.
            reasons.append(f"{_label(candidate)}: {why.removeprefix(candidate.provider + ': ')}")
            if until is not None:
                wake.append(until)
    return Wait("; ".join(reasons) or "no provider listed", min(wake) if wake else None)


def refusal(
    c: Candidate, resources: Resources, min_slice: float, now: float
) -> tuple[str | None, float | None]:
    """Why ``c`` cannot take the experiment now (None if it can), and until when."""
    if not c.configured:
        return "not configured", None
    if not c.credentials_ok:  # the user may fix them at any moment
        return c.credentials_hint or "credentials not usable", now
    if c.unavailable_until is not None and c.unavailable_until > now:
        reason = c.unavailable_reason or "unavailable"
        return f"{reason} (retry {_at(c.unavailable_until, now)})", c.unavailable_until
    if not c.available:  # no known end (a known one is a cooldown, above): look every step
        return c.unavailable_reason or "unavailable", now
    if c.max_concurrent is not None and c.active >= c.max_concurrent:  # frees when one ends
        return f"{c.active} of {c.max_concurrent} sessions in use", now
    gpu_problem = _gpu_mismatch(c, resources)
    if gpu_problem:
        return gpu_problem, None
    if c.remaining_seconds is not None and c.remaining_seconds < min_slice + c.startup_seconds:
        left = format_duration(c.remaining_seconds)
        resets = f", resets {_at(c.quota_resets_at, now)}" if c.quota_resets_at else ""
        return f"quota too small ({left} left{resets})", c.quota_resets_at
    return None, None


def _gpu_mismatch(c: Candidate, resources: Resources) -> str | None:
    if not resources.wants_gpu or c.gpu_kinds is None:
        return None
    if not c.gpu_kinds:
        return None if c.cpu_only_ok else "no GPU"
    wanted = resources.gpu.lower()
    if wanted == "any" or any(wanted in kind.lower() for kind in c.gpu_kinds):
        return None
    return f"no {resources.gpu} GPU (has {', '.join(sorted(c.gpu_kinds))})"


def _label(c: Candidate) -> str:
    return c.provider if c.account == "default" else f"{c.provider}[{c.account}]"


def _at(when: float | None, now: float) -> str:
    if when is None:
        return "unknown"
    return f"in {format_duration(when - now)}"


def backoff_seconds(failures: int, base: float = 60.0, cap: float = 6 * 3600.0) -> float:
    """Exponential back-off for a provider that keeps refusing: 1, 2, 4 ... minutes, capped."""
    return min(cap, base * 2.0 ** min(max(0, failures - 1), 64))  # 2**64: no float overflow


def checkpoint_interval(policy: CheckpointPolicy, save_seconds: float | None,
                        mean_seconds_between_losses: float | None) -> float:
    """The interval to checkpoint at: fixed, or Young/Daly's sqrt(2 * save cost * MTBF)."""
    if policy.interval != "auto":
        return float(policy.interval)
    if not save_seconds or not mean_seconds_between_losses:
        optimum = DEFAULT_INTERVAL
    else:
        optimum = math.sqrt(2.0 * save_seconds * mean_seconds_between_losses)
    return min(policy.max_interval, max(policy.min_interval, optimum))
