"""Plain-data views of the pool for the CLI (tables and ``--json`` share them)."""

from __future__ import annotations

from typing import Any

from gpupool.durations import format_duration
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.progress import checkpoint_step, fallback_reason, latest_metrics, work_at_risk
from gpupool.quota import QuotaLeft, gpu_seconds_left
from gpupool.state import Attempt, Experiment


def experiment_row(pool: Pool, experiment: Experiment, now: float) -> dict[str, Any]:
    attempts = pool.state.attempts(experiment.id)
    current = attempts[-1] if attempts else None
    active = current if current is not None and current.state.active else None
    waiting = experiment.state is ExperimentState.PENDING
    until = experiment.not_before if waiting and (experiment.not_before or 0) > now else None
    return {
        "id": experiment.id,
        "name": experiment.name,
        "state": experiment.state.value,
        "provider": active.provider if active else None,
        "step": (active.step if active else None) or experiment.last_step,
        "total_steps": current.total_steps if current else None,
        "attempts": len(attempts),
        "hops": experiment.hops,
        "gpu_hours": round((experiment.gpu_seconds + (active.duration(now) if active else 0)) / 3600, 3),
        "last_checkpoint": live_checkpoint(experiment, active),
        "metrics": latest_metrics(pool.state, experiment.id),
        "at_risk": work_at_risk(active, now) if active else None,
        "fallback": fallback_reason(pool.state, active) if active else None,
        "waiting_for": experiment.wait_reason if waiting else None,
        "waiting_until": until,  # epoch seconds of the next placement try; None: every step
        "next_try_in": format_duration(until - now) if until is not None else None,
        "url": active.url if active else None,
        "message": experiment.message,
    }


def where_row(pool: Pool, experiment: Experiment) -> dict[str, Any]:
    """Where an experiment's results are: its store, its newest checkpoint (the final one once
    it succeeded) and its output folders, with the command that downloads them."""
    outputs = list(experiment.spec.get("outputs") or [])
    folder = (experiment.spec.get("checkpoint") or {}).get("path")
    store = pool.store_for(experiment.id)
    pull = f"gpupool pull {experiment.id}"
    if not experiment.last_checkpoint:
        return {"store": store.url, "outputs": None, "pull": None}
    kept = ", ".join(f"{name}/" for name in ([folder] if folder else []) + outputs)
    note = f"{kept} in checkpoint {experiment.last_checkpoint}; `{pull}` downloads them" if kept else \
        f"checkpoint {experiment.last_checkpoint}; `{pull}` downloads it"
    return {"store": store.url, "outputs": note, "pull": pull}


def attempt_row(attempt: Attempt, now: float) -> dict[str, Any]:
    gained = None
    if attempt.step is not None and attempt.step_start is not None:
        gained = attempt.step - attempt.step_start
    return {
        "id": attempt.id,
        "seq": attempt.seq,
        "provider": attempt.provider,
        "account": attempt.account,
        "state": attempt.state.value,
        "duration": format_duration(attempt.duration(now)),
        "duration_seconds": round(attempt.duration(now), 1),
        "steps_gained": gained,
        "step": attempt.step,
        "rate": attempt.rate,
        "checkpoint_in": attempt.checkpoint_in,
        "checkpoint_out": attempt.checkpoint_out,
        "ended_because": attempt.end_reason,
        "url": attempt.url,
        "remote_id": attempt.remote_id,
    }


def progress_line(pool: Pool, experiment: Experiment, now: float) -> str:
    """One line: provider, step, rate, ETA, last checkpoint (or why it waits)."""
    row = experiment_row(pool, experiment, now)
    attempts = pool.state.attempts(experiment.id, active=True)
    if not attempts:
        reason = row["waiting_for"] or row["message"] or ""
        if row["next_try_in"]:
            reason += f" (next try in {row['next_try_in']})"
        return f"{experiment.id} {row['state']}" + (f": {reason}" if reason else "")
    attempt = attempts[0]
    parts = [f"{experiment.id} on {attempt.provider} ({attempt.state.value})"]
    if attempt.step is not None:
        total = f"/{attempt.total_steps}" if attempt.total_steps else ""
        parts.append(f"step {attempt.step}{total}")
    if attempt.rate:
        parts.append(f"{attempt.rate:.1f} steps/s")
        if attempt.total_steps and attempt.step is not None:
            parts.append(f"ETA {format_duration((attempt.total_steps - attempt.step) / attempt.rate)}")
    parts += _news_parts(row, now)
    if attempt.url and attempt.state is AttemptState.SUBMITTED:
        parts.append(f"open {attempt.url}")
    return " · ".join(parts)


def live_checkpoint(experiment: Experiment, active: Attempt | None) -> str | None:
    """The newest checkpoint: the running session's as soon as it is seen, else the
    experiment's resume point."""
    if active is not None and active.checkpoint_out:
        return active.checkpoint_out
    return experiment.last_checkpoint


def _news_parts(row: dict[str, Any], now: float) -> list[str]:
    """Loss (and other metrics), last checkpoint and the work at risk, for the live line."""
    parts = []
    metrics = {k: v for k, v in (row["metrics"] or {}).items() if k not in ("step", "time")}
    parts += [f"{name} {value:.4g}" for name, value in list(metrics.items())[:3]]
    if row["last_checkpoint"]:
        parts.append(f"last checkpoint step {checkpoint_step(row['last_checkpoint'])}")
    risk = row["at_risk"]
    if risk is not None:
        spent = f", ~{format_duration(risk['seconds'])}" if risk["seconds"] is not None else ""
        parts.append(f"at risk {risk['steps']} steps{spent}")
    return parts


def quota_rows(pool: Pool, now: float) -> list[dict[str, Any]]:
    """``gpupool quota``: one row per account of each enabled provider, from the one rule
    (``gpupool.quota.gpu_seconds_left``)."""
    rows = []
    for name in pool.provider_names():
        provider = pool.try_provider(name)
        if provider is None or not provider.enabled:
            continue
        rows += [quota_row(gpu_seconds_left(pool.state, provider, account, now), now)
                 for account in provider.accounts()]
    return rows


def quota_row(left: QuotaLeft, now: float) -> dict[str, Any]:
    """One account's GPU time in hours: used and total in the window, what is left in it,
    what its running sessions may still spend of that, and when it resets (epoch seconds)."""
    quota, remaining = left.quota, left.remaining_seconds
    return {
        "provider": left.provider, "account": left.account,
        "used_hours": None if quota is None else _hours(quota.used_seconds),
        "total_hours": None if quota is None else _hours(quota.total_seconds),
        "remaining_hours": _hours(remaining),
        "running_hours": _hours(left.reserved_seconds) if remaining is not None else None,
        "resets_at": left.resets_at,
        "resets_in": format_duration(left.resets_at - now) if left.resets_at else None,
        "source": left.source,
    }


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 3600, 2)


def scheduler_row(pool: Pool, now: float) -> dict[str, Any]:
    """Whether a scheduler (daemon, or a foreground run/watch) is moving experiments on, read
    from its lease in the state database, and since when (epoch seconds)."""
    from gpupool.driver import scheduler_record

    record = scheduler_record(pool, now)
    if record is None:
        return {"running": False, "role": None, "host": None, "pid": None, "since": None,
                "last_seen": None, "why_not": None}
    return {"running": record.running, "role": record.role, "host": record.host,
            "pid": record.pid, "since": record.since, "last_seen": record.last_seen,
            "why_not": record.why_not or None}


def scheduler_line(row: dict[str, Any], unfinished: int, now: float) -> str:
    """One sentence for ``gpupool status``: who schedules, since when, or that nobody does."""
    if row["running"]:
        since = f" since {_clock(row['since'])} ({format_duration(now - row['since'])} ago)" \
            if row["since"] else ""
        return f"scheduler: {row['role']} on {row['host']} (pid {row['pid']}) running{since}"
    seen = f", last step at {_clock(row['last_seen'])}" if row["last_seen"] else ""
    line = f"scheduler: none running ({row['why_not']}{seen})" if row["why_not"] else \
        "scheduler: none running"
    if unfinished:
        line += (f"; {unfinished} unfinished experiment(s) will not move on until "
                 "`gpupool daemon` or `gpupool watch ID` runs")
    return line


def _clock(epoch: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
