"""``gpupool plan``: when will this experiment finish on my free quota?

A discrete-event simulation in virtual time. Each time the experiment needs a session, the
simulation builds ``Candidate`` views of its simulated providers and asks the scheduler's own
``placement.choose`` where to go, so a forecast follows the same preferences, quota checks,
windows and back-off as a real run. A session then runs until the earliest of: training done,
its planned deadline (where a final checkpoint saves everything), an unplanned loss
(exponential, per-provider mean time between losses; work since the last checkpoint is lost),
or its quota running out mid-session (also unplanned). Monte Carlo over seeds gives a range.

The model's assumptions are data (``ProviderModel``, ``PlanModel``). Each adapter builds its
own ``ProviderModel`` (``Provider.forecast_model``) from the settings the scheduler reads, with
its own calendar rules as functions (Kaggle's week, Colab's rolling day, local windows), so the
forecast and the scheduler read the same numbers and a new adapter needs no change here.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gpupool import placement
from gpupool.placement import Candidate, Wait
from gpupool.provider_config import ProviderModel
from gpupool.spec import ExperimentSpec

if TYPE_CHECKING:
    from gpupool.provider import Provider

HOUR, DAY = 3600.0, 86400.0


@dataclass(frozen=True)
class PlanModel:
    """The whole simulated world of one experiment."""

    providers: dict[str, ProviderModel]
    save_seconds: float = 10.0  # training stall per checkpoint
    final_checkpoint: bool = True  # save just before a known deadline
    oracle: bool = False  # knows every loss in advance: saves just before it, never periodically
    presence: tuple[tuple[int, int], ...] = ((9 * 60, 21 * 60),)  # when a person can open Colab
    open_probability: float = 0.9  # chance the person opens a notebook while present
    restart_delay_hours: float = 0.0  # manual restarts: mean delay before the next session
    utc_offset: float = 0.0  # local time minus UTC, seconds (for the presence hours)
    horizon_days: float = 56.0


@dataclass
class Run:
    """One simulated run."""

    finished_at: float | None = None
    reason: str = ""  # why it did not finish
    gpu_seconds: dict[str, float] = field(default_factory=dict)
    lost_seconds: float = 0.0
    useful_seconds: float = 0.0  # work checkpointed (all of it, once finished)
    hops: int = 0
    placements: int = 0


@dataclass(frozen=True)
class Forecast:
    work_hours: float
    runs: int
    finished: int
    finish_hours: dict[str, float]  # mean, p10, p50, p90 (hours from the start), finished runs
    gpu_hours: dict[str, float]  # mean per provider
    lost_hours: float  # mean work lost to session ends
    hops: float  # mean
    goodput: float  # useful hours / GPU hours consumed
    reason: str  # why runs did not finish (most common), "" when all did
    start: float

    @property
    def can_finish(self) -> bool:
        return self.finished > 0

    def as_dict(self) -> dict[str, Any]:
        return dict(work_hours=self.work_hours, runs=self.runs, finished=self.finished,
                    can_finish=self.can_finish, finish_hours=self.finish_hours,
                    gpu_hours=self.gpu_hours, lost_hours=self.lost_hours, hops=self.hops,
                    goodput=self.goodput, reason=self.reason, start=self.start)


# -- models from the pool configuration ---------------------------------------------------

def provider_models(spec: ExperimentSpec, providers: Mapping[str, Provider],
                    loss_hours: dict[str, float] | None = None) -> dict[str, ProviderModel]:
    """Models of the experiment's enabled providers, each built by its adapter; ``loss_hours``
    (provider: mean hours between unplanned losses) replaces an adapter's prior."""
    models = {}
    for name in spec.providers:
        provider = providers.get(name)
        if provider is None or not provider.enabled:
            continue
        model = provider.forecast_model()
        if loss_hours and name in loss_hours:
            model = replace(model, loss_hours=loss_hours[name] or None)
        models[name] = model
    return models


def plan_model(spec: ExperimentSpec, providers: Mapping[str, Provider], *,
               colab_hours_per_day: float = 12.0, loss_hours: dict[str, float] | None = None,
               save_seconds: float = 10.0, utc_offset: float = 0.0,
               horizon_days: float = 56.0) -> PlanModel:
    """The simulated world for ``spec`` on the pool's adapters and the user's answers."""
    return PlanModel(provider_models(spec, providers, loss_hours), save_seconds=save_seconds,
                     presence=presence_for(colab_hours_per_day), utc_offset=utc_offset,
                     horizon_days=horizon_days)


def presence_for(hours_per_day: float) -> tuple[tuple[int, int], ...]:
    """A person around ``hours_per_day`` hours a day, from 09:00 local time."""
    if hours_per_day <= 0:
        return ()
    minutes = int(min(24.0, hours_per_day) * 60)
    return ((0, 24 * 60),) if minutes >= 24 * 60 else ((9 * 60, (9 * 60 + minutes) % (24 * 60)),)


# -- one simulated run --------------------------------------------------------------------

class _World:
    """Simulated provider state of one run: charges, cool-downs, failures."""

    def __init__(self, spec: ExperimentSpec, model: PlanModel):
        self.spec, self.model = spec, model
        self.charges: list[tuple[str, float, float]] = []  # provider, start, end
        self.cooldown: dict[str, float] = {}
        self.failures: Counter[str] = Counter()

    def candidates(self, now: float) -> list[Candidate]:
        views = []
        for name in self.spec.providers:
            p = self.model.providers.get(name)
            if p is None:
                views.append(Candidate(name, "default", configured=False))
                continue
            remaining, resets = self.remaining(p, now)
            inside = p.open_at is None or p.open_at(now)[0]
            views.append(Candidate(
                name, "default", available=inside,
                unavailable_reason="notebook not opened" if name in self.cooldown else
                ("" if inside else "outside its windows"),
                unavailable_until=self.cooldown.get(name), remaining_seconds=remaining,
                quota_resets_at=resets, cpu_only_ok=p.cpu_only_ok,
                startup_seconds=p.startup_seconds))
        return views

    def remaining(self, p: ProviderModel, now: float) -> tuple[float | None, float | None]:
        """(quota seconds left at ``now``, when the window resets): the adapter's window rule."""
        if p.quota_seconds is None:
            return None, None
        start, resets = p.quota_window(now) if p.quota_window else (-math.inf, None)
        used = sum(e - s for n, s, e in self.charges if n == p.name and e >= start)
        return max(0.0, p.quota_seconds - used), resets

    def minute(self, now: float) -> int:
        return int((now + self.model.utc_offset) % DAY // 60)

    def next_change(self, now: float) -> float | None:
        """The next moment a refusal may lift that placement itself cannot tell."""
        times = []
        for p in self.model.providers.values():
            change = p.open_at(now)[1] if p.open_at else None
            times += [change] if change is not None else []
            if p.quota_seconds is not None and p.quota_window is not None:
                start, resets = p.quota_window(now)
                if resets is None:  # a rolling window: each charge ages out of it in turn
                    span = now - start
                    times += [e + span for n, _, e in self.charges if n == p.name and e + span > now]
        return min(times) if times else None

    def person_opens(self, now: float, rng: random.Random) -> bool:
        present = _inside(self.minute(now), self.model.presence)
        return present and rng.random() < self.model.open_probability


def simulate(spec: ExperimentSpec, model: PlanModel, work_seconds: float, start: float,
             rng: random.Random) -> Run:
    """One run from ``start`` until ``work_seconds`` of training are done (or cannot be)."""
    world, run = _World(spec, model), Run()
    done, now = 0.0, start
    end = start + model.horizon_days * DAY
    slice_seconds = placement.checkpoint_interval(spec.checkpoint, None, None)
    while now < end:
        decision = placement.choose(spec.providers, spec.resources, world.candidates(now),
                                    slice_seconds, now)
        run.placements += 1
        if isinstance(decision, Wait):
            wake = [t for t in (decision.until, world.next_change(now)) if t is not None and t > now]
            if not wake:
                run.reason = decision.reason
                return run
            now = min(wake)
            continue
        p = model.providers[decision.provider]
        if p.needs_person and not world.person_opens(now, rng):
            world.failures[p.name] += 1  # not opened in time: unavailable, backed off
            now += p.start_timeout
            world.cooldown[p.name] = now + placement.backoff_seconds(world.failures[p.name])
            continue
        world.failures[p.name] = 0
        world.cooldown.pop(p.name, None)
        now, done, finished = _session(world, run, p, now + p.startup_seconds, done, work_seconds, rng)
        run.useful_seconds = done
        if finished:
            run.finished_at = now
            return run
        run.hops += 1
        if run.hops > spec.limits.max_hops:
            run.reason = f"reached max_hops ({spec.limits.max_hops})"
            return run
        if model.restart_delay_hours > 0:
            now += rng.expovariate(1.0 / (model.restart_delay_hours * HOUR))
    run.reason = run.reason or f"not finished within {model.horizon_days:g} days"
    return run


def _session(world: _World, run: Run, p: ProviderModel, begin: float, done: float,
             work: float, rng: random.Random) -> tuple[float, float, bool]:
    """Run one session from ``begin``; returns (end time, checkpointed work, finished)."""
    model = world.model
    interval = placement.checkpoint_interval(
        world.spec.checkpoint, model.save_seconds, p.loss_hours and p.loss_hours * HOUR)
    save = model.save_seconds
    need = work - done
    finish = need + save if model.oracle else need + math.ceil(need / interval) * save
    loss = rng.expovariate(1.0 / (p.loss_hours * HOUR)) if p.loss_hours else math.inf
    remaining, _ = world.remaining(p, begin)
    cut = math.inf if remaining is None else remaining  # the provider stops it: unplanned
    planned = p.session_seconds if p.session_seconds is not None else math.inf
    length = min(finish, planned, loss, cut)
    finished = length == finish
    if finished:
        worked = kept = need
    else:
        final = model.oracle or (length == planned and model.final_checkpoint)
        worked, kept = _progress(length, interval, save, final=final, oracle=model.oracle)
        kept = min(kept, need)
    run.lost_seconds += worked - kept
    run.gpu_seconds[p.name] = run.gpu_seconds.get(p.name, 0.0) + length
    world.charges.append((p.name, begin, begin + length))
    return begin + length, done + kept, finished


def _progress(length: float, interval: float, save: float, *, final: bool,
              oracle: bool) -> tuple[float, float]:
    """(work done, work checkpointed) in a session of ``length`` seconds that ends early."""
    if oracle:  # no periodic checkpoints: one save just before the end
        return max(0.0, length - save), max(0.0, length - save)
    cycles = math.floor(length / (interval + save))
    tail = length - cycles * (interval + save)
    if final:  # should_stop() leaves time for one last save before the deadline
        extra = max(0.0, min(tail - save, interval))
        return cycles * interval + extra, cycles * interval + extra
    return cycles * interval + min(tail, interval), cycles * interval


# -- Monte Carlo ----------------------------------------------------------------------------

def forecast(spec: ExperimentSpec, model: PlanModel, work_hours: float, start: float, *,
             runs: int = 200, seed: int = 0) -> Forecast:
    """Simulate ``runs`` runs (seeded, so repeatable) and summarise them."""
    results = [simulate(spec, model, work_hours * HOUR, start, random.Random(seed * 1_000_003 + i))
               for i in range(runs)]
    finished = sorted((r.finished_at - start) / HOUR for r in results if r.finished_at is not None)
    names = list(model.providers)
    gpu = {n: sum(r.gpu_seconds.get(n, 0.0) for r in results) / runs / HOUR for n in names}
    consumed = sum(gpu.values())
    reasons = Counter(r.reason for r in results if r.finished_at is None)
    return Forecast(
        work_hours=work_hours, runs=runs, finished=len(finished),
        finish_hours=_summary(finished), gpu_hours={n: round(h, 2) for n, h in gpu.items()},
        lost_hours=round(sum(r.lost_seconds for r in results) / runs / HOUR, 2),
        hops=round(sum(r.hops for r in results) / runs, 2),
        goodput=round(sum(r.useful_seconds for r in results) / runs / HOUR / consumed, 4)
        if consumed else 0.0,
        reason=reasons.most_common(1)[0][0] if reasons else "", start=start,
    )


def _summary(hours: list[float]) -> dict[str, float]:
    if not hours:
        return {}
    def at(q: float) -> float:
        return round(hours[min(len(hours) - 1, int(q * len(hours)))], 2)
    return {"mean": round(statistics.fmean(hours), 2), "p10": at(0.1), "p50": at(0.5), "p90": at(0.9)}


def _inside(minute: int, windows: tuple[tuple[int, int], ...]) -> bool:
    for start, end in windows:
        if (start <= minute < end) if start <= end else (minute >= start or minute < end):
            return True
    return False
