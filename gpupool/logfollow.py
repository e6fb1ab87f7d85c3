"""``gpupool logs -f``: one experiment's logs followed across all its sessions, with gpupool's
own timestamped events (placed, started, checkpoint, hop and why) between the lines.

Providers' ``logs(attempt)`` return the whole log so far; this keeps how much of each was
shown, so a session that ends is printed to its last line before the next one starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gpupool.pool import Pool
from gpupool.state import Attempt

QUIET_EVENTS = ("metrics",)  # sampled every poll: `gpupool metrics` shows them


def follow_logs(pool: Pool, experiment_id: str, echo: Callable[[str], None], *,
                pause: Callable[[], None] = lambda: time.sleep(1.0), first_seq: int | None = None) -> None:
    """Print each session's log from session ``first_seq`` (default: the latest) on, then the
    next session's, until the experiment ends. ``pause`` waits between polls (tests step a
    scheduler instead)."""
    if first_seq is None:
        attempts = pool.state.attempts(experiment_id)
        first_seq = attempts[-1].seq if attempts else 1
    shown: dict[str, int] = {}
    last_event = _start_event_id(pool, experiment_id, first_seq)
    current: str | None = None
    while True:
        experiment = pool.state.experiment(experiment_id)
        attempts = [a for a in pool.state.attempts(experiment_id) if a.seq >= first_seq]
        last_event = _print_events(pool, experiment_id, last_event, echo)
        for attempt in attempts:
            if attempt.id != current and (attempt.state.active or attempt.id not in shown):
                echo(f"──── session {attempt.seq} on {attempt.provider} ({attempt.id}) ────\n")
                current = attempt.id
            _print_new_log(pool, attempt, shown, echo)
        if experiment.state.terminal and not any(a.state.active for a in attempts):
            _print_events(pool, experiment_id, last_event, echo)
            return
        pause()


def _start_event_id(pool: Pool, experiment_id: str, first_seq: int | None) -> int:
    """Follow events from the chosen session's placement on (all of them by default)."""
    if first_seq is None:
        return 0
    for event in pool.state.events(experiment_id, limit=None):
        if event["attempt_id"] == f"{experiment_id}-a{first_seq}":
            return int(event["id"]) - 1
    return 0


def _print_events(pool: Pool, experiment_id: str, after: int, echo: Callable[[str], None]) -> int:
    for event in pool.state.events(experiment_id, limit=None, exclude=QUIET_EVENTS, after_id=after):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
        echo(f"[gpupool {stamp}] {event['kind']}: {event['message'].splitlines()[0]}\n")
        after = int(event["id"])
    return after


def _print_new_log(pool: Pool, attempt: Attempt, shown: dict[str, int], echo: Callable[[str], None]) -> None:
    """The log's new whole lines (all of it once the session ended)."""
    provider = pool.try_provider(attempt.provider)
    if provider is None:
        return
    text = provider.logs(attempt)
    start = shown.get(attempt.id, 0)
    end = len(text) if attempt.state.terminal else text.rfind("\n") + 1
    shown[attempt.id] = max(start, end)
    if end > start:
        chunk = text[start:end]
        echo(chunk if chunk.endswith("\n") else chunk + "\n")
