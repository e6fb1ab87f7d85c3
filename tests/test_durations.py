"""Durations in experiment files: "90s", "10m", "1h30m", numbers as seconds, and back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpupool.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("10m", 600), ("1h30m", 5400), ("2d", 172800), ("1w", 604800), ("1.5h", 5400),
     (" 1h 30m ", 5400), ("45", 45), ("2.5", 2.5), (120, 120), (0.25, 0.25), ("1H", 3600)],
)
def test_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value",
    ["5q", "", "h", "1h30", "-5", "abc", "1e400", "9" * 400, -1, -0.5, True, float("nan"),
     float("inf"), [1], None, 10**400],
    ids=lambda v: repr(v)[:12],
)
def test_parse_rejects_with_value_error(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_bad_unit_message_shows_examples():
    with pytest.raises(ValueError, match="5q.*90s"):
        parse_duration("5q")


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (45, "45s"), (750, "12m30s"), (3600 * 3 + 300, "3h05m"), (86400 + 7200, "1d02h"),
     (-5, "0s"), (59.6, "1m00s")],
)
def test_format(seconds, text):
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**7))
def test_format_then_parse_is_close(seconds):
    back = parse_duration(format_duration(seconds))
    # the short form drops the smallest unit above one hour / one day
    tolerance = 0 if seconds < 3600 else (60 if seconds < 86400 else 3600)
    assert abs(back - seconds) <= tolerance
