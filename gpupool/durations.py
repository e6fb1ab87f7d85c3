"""Human durations ("90s", "10m", "1h30m", "2d") to seconds and back."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a number (seconds) or a string such as ``"1h30m"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30m or 2h, not a boolean")
    if isinstance(value, (int, float)):
        if isinstance(value, int) and abs(value) > 10**15:
            raise ValueError(f"{value} seconds is not a sensible duration")
        return _finite(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 30m or 2h, not {type(value).__name__}")
    text = value.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return _finite(float(text), value)
    if not text or _PART.sub("", text):
        raise ValueError(f"{value!r} is not a duration; write e.g. 90s, 10m, 1h30m, 2d")
    return _finite(float(sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))), value)


def _finite(seconds: float, value: object) -> float:
    # nan slips past every comparison and inf never elapses: both are mistakes in a file
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """A short human form: ``3h05m``, ``12m30s``, ``45s``."""
    seconds = int(round(max(seconds, 0)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _seconds(value: object) -> object:
    """Pydantic's before-validator: durations as text become seconds; other values pass on."""
    if isinstance(value, str):
        return parse_duration(value)
    return value


# A field of seconds that also takes "30m" or "1h30m", as experiment files do.
Seconds = Annotated[float, BeforeValidator(_seconds)]
