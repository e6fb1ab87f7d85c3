"""How much GPU time an account has left: the one place the rule is written.

The scheduler (placement, and the limit a new session is told), ``gpupool quota`` and a
team's accounts all ask ``gpu_seconds_left``. All figures are seconds of GPU time (the CLI
shows hours); times are epoch seconds. Four facts combine, each from its own owner:

1. the window: ``Provider.quota_window_start(now)``, where the account's usage is summed
   from (Kaggle's week from Saturday 00:00 UTC, Colab's rolling day; 0: ever);
2. the ledger: ``State.charged_seconds``, GPU-seconds the state database charged the
   account for its sessions that ended in that window (each ended session once);
3. the provider's answer: ``Provider.quota(account, now, charged)`` with the ledger's sum,
   exact from the provider's own API (source ``api``), the ledger against an allowance the
   provider publishes (``ledger``), or gpupool's guess where none is published
   (``estimate``: Colab); None when unlimited;
4. the running sessions: what the account's active attempts may still spend, each up to
   its deadline or, with none known, the provider's session cap (``reserved_seconds``).

The estimate rule: an estimated quota (an adapter whose ``capabilities.exact_quota`` is
false, as Colab's) places sessions like any other, but never cuts one
short (a new session is told no limit from a guess), and while the provider itself said the
account's quota is spent (a cool-down with ``quota_spent``, Colab's "no GPU") the estimate
counts as spent until that cool-down ends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gpupool.provider import Provider, Quota

if TYPE_CHECKING:
    from gpupool.state import Attempt, Cooldown, State


@dataclass(frozen=True)
class QuotaLeft:
    """One account's GPU time now.

    ``quota``: the provider's answer with the estimate rule applied (None: unlimited);
    ``reserved_seconds``: what the account's running sessions may still spend; ``exact``:
    False for a guess (the adapter declares ``capabilities.exact_quota``), which may place a
    session but not limit one."""

    provider: str
    account: str
    quota: Quota | None
    reserved_seconds: float = 0.0
    exact: bool = True

    @property
    def source(self) -> str:
        """Where the figures come from: ``api``, ``ledger``, ``estimate`` or ``unlimited``."""
        return self.quota.source if self.quota is not None else "unlimited"

    @property
    def remaining_seconds(self) -> float | None:
        """Left in the current window (seconds), running sessions not deducted; None: unlimited."""
        return self.quota.remaining_seconds if self.quota is not None else None

    @property
    def resets_at(self) -> float | None:
        """When the window's allowance comes back (epoch seconds), if known."""
        return self.quota.resets_at if self.quota is not None else None

    @property
    def placeable_seconds(self) -> float | None:
        """Left for a new session once the running ones spend what they may (seconds, >= 0);
        None: unlimited. Placement skips the account when this cannot hold a useful slice."""
        remaining = self.remaining_seconds
        return None if remaining is None else max(0.0, remaining - self.reserved_seconds)

    @property
    def session_limit_seconds(self) -> float | None:
        """The GPU time a session starting now may be told it has (seconds): what is
        placeable, unless that is a guess or unlimited (None)."""
        return self.placeable_seconds if self.exact else None


def gpu_seconds_left(state: State, provider: Provider, account: str, now: float, *,
                     starting: str | None = None) -> QuotaLeft:
    """The GPU time ``account`` on ``provider`` has left at ``now`` (epoch seconds), from the
    window, the ledger, the provider's answer and the running sessions (module docstring).

    ``starting``: the id of an attempt being started now, which reserves nothing for itself.
    Raises what ``Provider.quota`` raises (adapters fall back to the ledger on their own
    API's errors) and ``StateError`` when the state database cannot be read."""
    charged = state.charged_seconds(provider.name, account, provider.quota_window_start(now))
    quota = provider.quota(account, now, charged)
    exact = provider.capabilities.exact_quota
    if quota is not None and not exact:
        quota = estimate_after_refusal(quota, state.cooldowns().get((provider.name, account)), now)
    running = [a for a in state.attempts(active=True, on=(provider.name, account))
               if a.id != starting]
    return QuotaLeft(provider.name, account, quota,
                     reserved_seconds(running, now, provider.session_seconds()), exact)


def estimate_after_refusal(estimate: Quota, cooldown: Cooldown | None, now: float) -> Quota:
    """An estimate with the provider's own word over it: spent until the cool-down ends when
    the provider said the account's quota is used up; else unchanged."""
    if cooldown is None or not cooldown.quota_spent or not cooldown.in_force(now):
        return estimate
    total = estimate.total_seconds
    used = estimate.used_seconds if total is None else max(estimate.used_seconds, total)
    return replace(estimate, used_seconds=used, resets_at=cooldown.until)


def reserved_seconds(attempts: list[Attempt], now: float, session_seconds: float | None) -> float:
    """GPU seconds the account's running ``attempts`` may still spend: each up to its deadline,
    or, with none known, to the provider's session length (seconds). A new session gets only
    the quota left beyond them, so two sessions never both plan on the same remaining hours."""
    ahead = 0.0
    for attempt in attempts:
        if attempt.deadline is not None:
            ahead += max(0.0, attempt.deadline - now)
        elif session_seconds is not None:
            began = attempt.started_at if attempt.started_at is not None else attempt.created_at
            ahead += max(0.0, session_seconds - max(0.0, now - began))
    return ahead
