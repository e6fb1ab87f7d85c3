"""What a running session has done that a person wants to see before it ends: the checkpoints
it saved and the metrics its script reported (``Session.report(step, loss=...)``).

The scheduler records them as they are polled: the newest checkpoint name on the attempt (its
``checkpoint_out``, final once the session is collected) and each as an event, so ``status``,
the live line, ``logs -f`` and ``metrics`` read them from the state database, across sessions.
"""

from __future__ import annotations

import json
from typing import Any

from gpupool.manifest import ManifestError, step_of
from gpupool.provider import PollResult
from gpupool.state import Attempt, State

CHECKPOINT_EVENT = "checkpoint"
METRICS_EVENT = "metrics"
FALLBACK_EVENT = "fallback"  # placed on a provider after others it prefers could not take it


def record_session_news(state: State, attempt: Attempt, result: PollResult, now: float) -> None:
    """Record a newly seen checkpoint and new metrics of ``attempt`` (idempotent per poll)."""
    if result.checkpoint and result.checkpoint != attempt.checkpoint_out:
        state.update_attempt(attempt.id, checkpoint_out=result.checkpoint)
        step = checkpoint_step(result.checkpoint)
        state.add_event(result.checkpoint_at or now, attempt.experiment_id, attempt.id, CHECKPOINT_EVENT,
                        f"step {step} saved on {attempt.provider} ({result.checkpoint})")
    if result.metrics and result.step is not None and result.step != attempt.step:
        record = {"step": result.step, **{k: v for k, v in result.metrics.items() if _number(v)}}
        state.add_event(result.heartbeat or now, attempt.experiment_id, attempt.id, METRICS_EVENT,
                        json.dumps(record))


def checkpoint_step(name: str) -> int:
    """The step a checkpoint name records (``ckpt-000000001200-...``)."""
    try:
        return step_of(name)  # the one parser of checkpoint names
    except ManifestError:
        return 0


def metric_rows(state: State, experiment_id: str) -> list[dict[str, Any]]:
    """Every recorded metrics sample of an experiment, oldest first: ``time`` (epoch seconds),
    ``attempt`` (the session), ``step`` and each reported metric."""
    rows = []
    for event in state.events(experiment_id, limit=None, kinds=[METRICS_EVENT]):
        try:
            values = json.loads(event["message"])
        except ValueError:
            continue
        rows.append({"time": event["at"], "attempt": event["attempt_id"], **values})
    return rows


def latest_metrics(state: State, experiment_id: str) -> dict[str, Any] | None:
    """The newest metrics sample (as in ``metric_rows``), or None."""
    events = state.events(experiment_id, limit=1, kinds=[METRICS_EVENT])
    if not events:
        return None
    try:
        return dict(json.loads(events[-1]["message"]), time=events[-1]["at"])
    except ValueError:
        return None


def fallback_reason(state: State, attempt: Attempt) -> str | None:
    """Why ``attempt`` runs where it does rather than on a provider preferred before it."""
    for event in state.events(attempt.experiment_id, limit=5, kinds=[FALLBACK_EVENT]):
        if event["attempt_id"] == attempt.id:
            return str(event["message"])
    return None


def work_at_risk(attempt: Attempt, now: float) -> dict[str, Any] | None:
    """Steps and seconds the running session would lose if it died now: those since its newest
    checkpoint (or since it started, when it saved none yet)."""
    if attempt.step is None or attempt.started_at is None:
        return None
    if attempt.checkpoint_out:
        saved = checkpoint_step(attempt.checkpoint_out)
    else:
        saved = attempt.step_start or 0
    steps = max(0, attempt.step - saved)
    seconds = steps / attempt.rate if attempt.rate else None
    return {"steps": steps, "seconds": seconds, "since_step": saved}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
