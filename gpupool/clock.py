"""The one clock gpupool reads time from and sleeps on, injected wherever time matters.

Standard library only: the in-session runtime uses it too. Everything that reads the time or
waits (the pool and its scheduler, provider adapters, ``runtime.Session``) takes a ``Clock``
as a constructor parameter, defaulting to ``SYSTEM_CLOCK``; tests pass ``ManualClock`` (time
moves only when slept or advanced) or a ``SystemClock`` with one part replaced, instead of
patching modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Wall time, monotonic time and sleep, all in seconds.

    Called, it returns the wall clock (epoch seconds, what the state database records);
    ``monotonic()`` measures intervals (deadlines of waits, budgets of reads); ``sleep`` waits.
    """

    def __call__(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The machine's clock. A part may be replaced (a test records sleeps, or fixes the
    epoch) while the others stay real."""

    def __init__(self, now: Callable[[], float] = time.time, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self._now, self._monotonic, self._sleep = now, monotonic, sleep

    def __call__(self) -> float:
        return self._now()

    def monotonic(self) -> float:
        return self._monotonic()

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)


class ManualClock:
    """A clock that moves only when told: ``sleep`` and ``advance`` add to it at once, so code
    that waits runs without waiting. ``slept`` records every sleep (seconds), for tests."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


SYSTEM_CLOCK: Clock = SystemClock()


def as_clock(clock: Clock | Callable[[], float] | None) -> Clock:
    """``clock`` as a full ``Clock``: None is the system clock, and a bare function returning
    epoch seconds (``lambda: T0``) replaces only the wall time, keeping real sleep and
    monotonic time."""
    if clock is None:
        return SYSTEM_CLOCK
    if isinstance(clock, Clock):
        return clock
    return SystemClock(clock)
