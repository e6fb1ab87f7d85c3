"""The contract between the scheduler and a session, written once (standard library only).

Everything a session and the scheduler must agree on lives here, so no other file types it again.
"""

from __future__ import annotations

DEFAULT_MARGIN_SECONDS = 600.0  # at most this long before the cap is kept for the last checkpoint
DEFAULT_MARGIN_FRACTION = 0.1  # ...and at most this share of a short session


def deadline_margin(cap_seconds: float | None, configured: float | None = None) -> float:
    """Seconds before a session's hard end at which the trainer is told to save and stop.

    ``configured`` (the provider's ``deadline_margin``, seconds) wins when given; otherwise
    min(600 s, 10 % of the cap), so a 12-hour session keeps 10 minutes for its last checkpoint
    and upload and a 20-minute one keeps 2. A session with no cap (``None``) has no margin.
    """
    if configured is not None:
        return float(configured)
    if cap_seconds is None:
        return 0.0
    return min(DEFAULT_MARGIN_SECONDS, DEFAULT_MARGIN_FRACTION * float(cap_seconds))
