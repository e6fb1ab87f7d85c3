"""What ``gpupool plan`` needs beyond the experiment file: how much work it is, and which of
its providers can really run it (credentials, enabled, GPU or only a CPU).

The work comes, in order, from ``--hours``, the file's ``limits.gpu_hours``, or the steps the
script reports (``session.report(step, total=...)``) divided by the rate measured in earlier
runs of the same experiment (by name) in the state database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpupool.errors import ConfigError
from gpupool.pool import Pool
from gpupool.spec import ExperimentSpec


@dataclass(frozen=True)
class Work:
    hours: float  # hours of training on the providers it ran on
    source: str  # where the figure comes from, for the person to judge it


@dataclass(frozen=True)
class Usable:
    providers: list[str]  # the experiment's providers the forecast uses, in preference order
    skipped: dict[str, str] = field(default_factory=dict)  # provider: why it is left out
    cpu_only: frozenset[str] = frozenset()  # of those, the ones that would train on a CPU
    assumed: bool = False  # none was usable: forecast on all, as if they were


def estimate_work(pool: Pool, spec: ExperimentSpec, hours: float | None) -> Work:
    """Hours of work for ``spec``; raises ``ConfigError`` naming exactly what to add."""
    if hours:
        return Work(hours, "--hours")
    if spec.limits.gpu_hours:
        return Work(spec.limits.gpu_hours, "limits.gpu_hours in the experiment file")
    measured = _measured(pool, spec.name)
    if measured is not None:
        total, rate, runs = measured
        return Work(total / rate / 3600,
                    f"{total} steps reported by the script at {rate:.1f} steps/s measured in "
                    f"{runs} earlier session(s) of {spec.name}")
    raise ConfigError(
        f"plan needs the amount of work in {spec.name}: pass --hours H, or add "
        "`limits: {gpu_hours: H}` to the experiment file, or run it once (`gpupool run`, Ctrl-C "
        "after a minute): with `session.report(step, total=N)` in the script, plan then uses "
        "N steps at the measured steps per second")


def _measured(pool: Pool, name: str) -> tuple[int, float, int] | None:
    """(total steps, mean steps/s, sessions) from earlier sessions of experiments named ``name``."""
    totals, rates = [], []
    for experiment in pool.state.experiments():
        if experiment.name != name:
            continue
        for attempt in pool.state.attempts(experiment.id):
            if attempt.rate and attempt.rate > 0:
                rates.append(attempt.rate)
            if attempt.total_steps:
                totals.append(attempt.total_steps)
    if not totals or not rates:
        return None
    return totals[-1], sum(rates) / len(rates), len(rates)


def usable_providers(pool: Pool, spec: ExperimentSpec) -> Usable:
    """The experiment's providers that are configured, enabled and signed in; with none,
    all of them, marked as assumed."""
    chosen, skipped, cpu = [], {}, set()
    for name in spec.providers:
        provider = pool.try_provider(name)
        if provider is None:
            skipped[name] = "not installed or misconfigured (`gpupool providers`)"
            continue
        if not provider.enabled:
            skipped[name] = "disabled in the pool file"
            continue
        ok, hint = provider.check_credentials()
        if not ok:
            skipped[name] = hint.strip().splitlines()[0] if hint.strip() else "no credentials"
            continue
        kinds = provider.gpu_kinds()
        if kinds is not None and not kinds:
            cpu.add(name)
        chosen.append(name)
    if not chosen:
        return Usable(list(spec.providers), skipped, frozenset(), assumed=True)
    return Usable(chosen, skipped, frozenset(cpu))


def plan_facts(result: Any, work: Work, usable: Usable, model: Any) -> dict[str, Any]:
    """What a forecast assumed, as data (``plan --json``): the work and its source, the
    providers simulated and those left out, which count CPU hours, and where the hours went."""
    consumed = sum(result.gpu_hours.values())
    useful = result.goodput * consumed
    return {
        "work_source": work.source, "providers": usable.providers, "skipped": usable.skipped,
        "providers_assumed_usable": usable.assumed, "cpu_hours_on": sorted(usable.cpu_only),
        "hours_used": round(consumed, 2), "hours_kept": round(useful, 2),
        "hours_overhead": round(max(0.0, consumed - useful - result.lost_hours), 2),
        "assumed_loss_hours": {n: p.loss_hours for n, p in model.providers.items()},
        "assumed_startup_seconds": {n: p.startup_seconds for n, p in model.providers.items()},
        "assumed_save_seconds": model.save_seconds,
    }


def plan_notes(result: Any, work: Work, usable: Usable, model: Any) -> list[str]:
    """The same facts as sentences under the forecast."""
    facts = plan_facts(result, work, usable, model)
    lines = [f"work: {work.hours:.2f} h, from {work.source}"]
    kinds = [f"{n} ({'CPU' if n in usable.cpu_only else 'GPU'} hours)" for n in usable.providers]
    if usable.assumed:
        lines.append(f"none of {', '.join(usable.providers)} is usable now; assumed all are: "
                     + ", ".join(kinds))
    else:
        lines.append("simulated on: " + ", ".join(kinds))
    lines += [f"  left out: {name}: {why}" for name, why in usable.skipped.items() if not usable.assumed]
    if result.can_finish:
        lines.append(f"of {facts['hours_used']:.2f} h used: {facts['hours_kept']:.2f} h of training kept, "
                     f"{result.lost_hours:.2f} h lost to session ends, {facts['hours_overhead']:.2f} h "
                     f"start-up and checkpoint saves (goodput {result.goodput:.1%}; hops {result.hops:.1f})")
    losses = ", ".join(f"{n} every {h:g} h" if h else f"{n} never"
                       for n, h in facts["assumed_loss_hours"].items())
    starts = ", ".join(f"{n} {s:g} s" for n, s in facts["assumed_startup_seconds"].items())
    lines.append(f"assumed: an unplanned session loss on average {losses} (--loss-hours); "
                 f"start-up {starts}; each checkpoint stalls training {model.save_seconds:g} s "
                 "(--save-seconds)")
    return lines
