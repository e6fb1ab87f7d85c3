"""gpupool.clock: the one clock, its fakes, and how a bare time function is taken."""

from __future__ import annotations

import time
from pathlib import Path

from gpupool.clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock, as_clock


def test_manual_clock_moves_only_when_slept_or_advanced():
    clock = ManualClock(start=100.0)
    assert clock() == clock.monotonic() == 100.0
    clock.sleep(5)
    clock.advance(2.5)
    clock.advance(-10)  # time does not run backwards
    assert clock() == 107.5 and clock.slept == [5]


def test_a_bare_function_replaces_the_wall_time_only():
    clock = as_clock(lambda: 42.0)
    assert isinstance(clock, Clock) and clock() == 42.0
    before = time.monotonic()
    clock.sleep(0.01)  # real: a fixed epoch must not make waits spin
    assert clock.monotonic() - before >= 0.01


def test_system_clock_parts_are_replaceable_and_default_to_the_machine():
    slept: list[float] = []
    clock = SystemClock(sleep=slept.append)
    clock.sleep(30)
    assert slept == [30] and abs(clock() - time.time()) < 60
    assert as_clock(None) is SYSTEM_CLOCK and as_clock(clock) is clock


def test_adapters_default_to_the_system_clock_and_take_an_injected_one(tmp_path: Path):
    from gpupool_providers.colab import ColabConfig, ColabProvider
    from gpupool_providers.kaggle import KaggleProvider
    from gpupool_providers.kaggle.config import KaggleConfig

    clock = ManualClock()
    for cls, config in ((KaggleProvider, KaggleConfig()), (ColabProvider, ColabConfig())):
        assert cls(config, tmp_path / cls.name).clock is SYSTEM_CLOCK
        assert cls(config, tmp_path / cls.name, clock).clock is clock
