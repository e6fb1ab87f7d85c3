"""gpupool's library face: what the ``gpupool`` command calls, and what a script or notebook
calls to do the same without a terminal.

Every function takes an open ``Pool`` (``open_pool``) and returns plain data: the dicts of
``gpupool.views`` (the shapes ``--json`` prints), records of ``gpupool.state``, or the small
dataclasses below. Times are epoch seconds of the pool's clock (``pool.clock``), durations
seconds, sizes bytes, GPU time hours where a key says ``_hours``. Errors are gpupool's own
(``gpupool.errors``): an unknown experiment id raises ``NotFound``; nothing here prints.

    pool = open_pool()
    experiment = submit(pool, load_experiment("exp.yaml"), "exp.yaml")
    for update in progress(pool, experiment.id):
        print(update.line)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupool.errors import GpupoolError, StateError
from gpupool.lifecycle import ExperimentState
from gpupool.pool import Pool
from gpupool.views import attempt_row, experiment_row, progress_line, quota_rows, scheduler_row, where_row

if TYPE_CHECKING:
    from gpupool.clock import Clock
    from gpupool.manifest import Manifest
    from gpupool.scheduler import Cancelled, Report
    from gpupool.spec import ExperimentSpec
    from gpupool.state import Experiment

UNFINISHED = (ExperimentState.PENDING, ExperimentState.RUNNING)


def open_pool(config: Path | None = None, *, clock: Clock | None = None) -> Pool:
    """The pool described by the pool file ``config`` (default: the user config dir's
    ``gpupool/pool.yaml``, or ``GPUPOOL_CONFIG``). Close it with ``pool.close()``.
    Raises ``SpecError``/``ConfigError`` (exit 2) for a pool file that does not validate."""
    from gpupool.clock import as_clock
    from gpupool.settings import load_settings

    return Pool(load_settings(config), clock=as_clock(clock))


# -- submitting and following -----------------------------------------------------------------

def submit(pool: Pool, spec: ExperimentSpec, source: Path | None = None) -> Experiment:
    """Record ``spec`` as a new pending experiment with a bundle of its workdir; a scheduler
    (``gpupool.driver.Driver``) places it. ``source``: the experiment file, for line numbers
    in errors. Raises ``SpecError`` when an input cannot reach one of its providers,
    ``CheckpointError`` when the checkpoint store is not writable."""
    return pool.submit(spec, source)


def run(pool: Pool, spec: ExperimentSpec, source: Path | None = None, *,
        on_progress: Callable[[Progress], object] = lambda update: None) -> Outcome:
    """``submit`` ``spec``, then schedule it in this process (``scheduling``) until it ends,
    handing each ``Progress`` to ``on_progress``; returns how it ended. Ctrl-C
    (``KeyboardInterrupt``) stops following only: sessions keep running and a daemon, or
    another ``run``/``watch``, carries on. Raises what ``submit`` raises."""
    submitted = submit(pool, spec, source)
    with scheduling(pool, "run"):
        for update in progress(pool, submitted.id):
            on_progress(update)
    return outcome(pool, submitted.id)


def step_once(pool: Pool, role: str = "scheduler") -> Report | None:
    """One scheduler step now (poll sessions, collect and hop, place pending experiments,
    notify), then the lease and claims are handed back so a daemon may take over at once.
    Returns the step's ``Report``, or None when other schedulers on the database hold all
    the work. ``role`` names this scheduler in ``status`` meanwhile."""
    from gpupool.driver import Driver

    driver = Driver(pool, role=role)
    try:
        return driver.step()
    finally:
        driver.release()


def serve(pool: Pool) -> None:
    """Keep every experiment moving (``gpupool daemon``): a scheduler step every
    ``poll_interval`` seconds until interrupted; the lease is handed back on the way out."""
    from gpupool.driver import Driver

    Driver(pool, role="daemon").run_forever()


@contextlib.contextmanager
def scheduling(pool: Pool, role: str = "run") -> Iterator[Report | None]:
    """Schedule in this process while the block runs: one step at once (its ``Report``, or
    None when other schedulers hold all the work), then one every ``poll_interval`` seconds
    in a background thread; on leaving, that thread is stopped and the lease handed back."""
    from gpupool.driver import Driver

    driver, background = Driver(pool, role=role), None
    try:
        first = driver.step()
        background = driver.start_background()
        yield first
    finally:  # a failed first step hands the lease back too
        if background is not None:
            background.shutdown(wait=True)  # type: ignore[attr-defined]
        driver.release()


def experiment(pool: Pool, experiment_id: str) -> Experiment:
    """The experiment's record as stored now. Raises ``NotFound`` for an unknown id."""
    return pool.state.experiment(experiment_id)


def experiment_view(pool: Pool, experiment_id: str) -> dict[str, Any]:
    """One experiment as ``status ID --json`` shows it without attempts (``views.experiment_row``:
    state, provider, step, hops, gpu_hours, last_checkpoint, waiting_for, url, message...)."""
    return experiment_row(pool, pool.state.experiment(experiment_id), pool.clock())


@dataclass(frozen=True)
class Outcome:
    """How an experiment ended (or stands): the record, its attempt count, and success."""

    experiment: Experiment
    attempts: int

    @property
    def succeeded(self) -> bool:
        return self.experiment.state is ExperimentState.SUCCEEDED


def outcome(pool: Pool, experiment_id: str) -> Outcome:
    """The experiment now, with how many attempts (sessions) it took. Raises ``NotFound``."""
    found = pool.state.experiment(experiment_id)
    return Outcome(found, len(pool.state.attempts(found.id)))


@dataclass(frozen=True)
class Progress:
    """One look at a followed experiment at ``now`` (epoch seconds): its record, its one-line
    summary (``views.progress_line``) and its ``experiment_view`` dict, all as they were then."""

    experiment: Experiment
    now: float
    line: str
    row: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.experiment.state.terminal


def progress(pool: Pool, experiment_id: str, *, every: float = 0.5) -> Iterator[Progress]:
    """Look at the experiment every ``every`` seconds (slept on ``pool.clock``) until it ends;
    the last ``Progress`` yielded is the finished one. Something else must schedule it
    (a ``Driver`` or a daemon). Raises ``NotFound`` for an unknown id."""
    while True:
        found, now = pool.state.experiment(experiment_id), pool.clock()
        yield Progress(found, now, progress_line(pool, found, now), experiment_row(pool, found, now))
        if found.state.terminal:
            return
        pool.clock.sleep(every)


# -- status --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StatusPage:
    """A page of experiments, newest first: ``rows`` (``experiment_view`` dicts), ``total``
    experiments in the pool, ``unfinished`` (pending or running) ones, and the ``scheduler``
    (``views.scheduler_row``: running, role, host, pid, since, last_seen, why_not)."""

    rows: list[dict[str, Any]]
    total: int
    unfinished: int
    scheduler: dict[str, Any]
    now: float


def status_page(pool: Pool, *, limit: int = 50, page: int = 1) -> StatusPage:
    """Experiments ``limit`` a page, page ``page`` (from 1)."""
    now = pool.clock()
    found = pool.state.experiments(limit=limit, offset=(page - 1) * limit)
    return StatusPage([experiment_row(pool, e, now) for e in found], pool.state.count_experiments(),
                      len(pool.state.experiments(UNFINISHED)), scheduler_row(pool, now), now)


def experiment_status(pool: Pool, experiment_id: str, *, events: int = 20) -> dict[str, Any]:
    """``status ID --json``: the ``experiment_view`` dict plus ``attempts`` (``views.attempt_row``
    each, oldest first), the newest ``events`` events (oldest first; metrics samples left out),
    ``scheduler`` (``views.scheduler_row``) and where its results are (``views.where_row``:
    store, outputs, pull). Raises ``NotFound`` for an unknown id."""
    now = pool.clock()
    found = pool.state.experiment(experiment_id)
    data = experiment_row(pool, found, now)
    data["attempts"] = [attempt_row(a, now) for a in pool.state.attempts(found.id)]
    data["events"] = pool.state.events(found.id, limit=events, exclude=["metrics"])
    data["scheduler"] = scheduler_row(pool, now)
    data.update(where_row(pool, found))
    return data


def matching_experiments(config: Path | None, prefix: str, *, limit: int = 200) -> list[Experiment]:
    """The newest ``limit`` experiments whose id or name starts with ``prefix``, read from the
    state database alone (no store, no provider: fast enough for shell completion). Raises
    what opening the pool file or the database raises."""
    from gpupool.settings import load_settings
    from gpupool.state import State

    state = State(load_settings(config).resolved_database_url)
    try:
        return [e for e in state.experiments(limit=limit)
                if e.id.startswith(prefix) or e.name.startswith(prefix)]
    finally:
        state.close()


# -- logs, metrics ---------------------------------------------------------------------------

def attempt_log(pool: Pool, experiment_id: str, seq: int | None = None) -> str:
    """The log of session ``seq`` (1 is the first; default: the latest) as its provider gives
    it now: the whole text so far. Raises ``NotFound`` for an unknown experiment and
    ``StateError`` when it has no such attempt (or none yet)."""
    found = pool.state.experiment(experiment_id)
    chosen = [a for a in pool.state.attempts(found.id) if seq is None or a.seq == seq]
    if not chosen:
        raise StateError(f"{found.id} has no attempt {seq if seq else 'yet'}")
    return pool.provider(chosen[-1].provider).logs(chosen[-1])


def follow_logs(pool: Pool, experiment_id: str, echo: Callable[[str], None], *,
                first_seq: int | None = None, every: float = 1.0) -> None:
    """Pass each session's new log text to ``echo``, from session ``first_seq`` (default: the
    latest) on, with gpupool's own events between, until the experiment ends; looks again
    every ``every`` seconds of ``pool.clock``. Raises ``NotFound`` for an unknown id."""
    from gpupool import logfollow

    found = pool.state.experiment(experiment_id)
    logfollow.follow_logs(pool, found.id, echo, first_seq=first_seq,
                          pause=lambda: pool.clock.sleep(every))


def metrics(pool: Pool, experiment_id: str) -> list[dict[str, Any]]:
    """Every metrics sample the training script reported, oldest first: ``time`` (epoch
    seconds), ``attempt`` (the attempt id, ``<experiment>-a<n>``), ``step`` and one key a
    metric. Raises ``NotFound``."""
    from gpupool.progress import metric_rows

    return metric_rows(pool.state, pool.state.experiment(experiment_id).id)


# -- stopping and resuming -------------------------------------------------------------------

def cancel(pool: Pool, experiment_id: str) -> Cancelled:
    """Cancel an experiment: nothing new is placed and its running session is stopped; its
    checkpoints are kept. A session its provider could not stop is in ``failures`` (each a
    ``CancelFailed`` with the ``action`` the person must take); gpupool keeps tracking and
    charging it until it ends. Raises ``NotFound`` for an unknown id."""
    from gpupool.scheduler import Scheduler

    return Scheduler(pool).cancel(experiment_id, pool.clock())


def resume(pool: Pool, experiment_id: str, spec: ExperimentSpec | None = None,
           source: Path | None = None) -> Experiment:
    """Put a cancelled or failed experiment back in the queue from its latest verified
    checkpoint; ``spec`` (an edited experiment file at ``source``) replaces the recorded one.
    Raises ``StateError`` when it cannot be resumed (and why), ``ConfigError`` when ``spec``
    names another experiment, ``NotFound`` for an unknown id."""
    from gpupool.resume import resume as resume_experiment

    return resume_experiment(pool, experiment_id, spec, pool.clock(), source)


def checkpoints(pool: Pool, experiment_id: str) -> list[dict[str, Any]]:
    """Every checkpoint, newest first, each verified now: name, step, created (epoch seconds),
    bytes, files, attempt, provider, final, location, verified, problem, latest (where a
    resume starts). Raises ``NotFound`` for an unknown id."""
    from gpupool.resume import checkpoint_rows

    return checkpoint_rows(pool, experiment_id)


@dataclass(frozen=True)
class Pulled:
    """What ``pull`` wrote: from which checkpoint of which store, and the top-level paths."""

    experiment_id: str
    manifest: Manifest
    store_url: str
    written: list[Path]


def pull(pool: Pool, experiment_id: str, target: Path | None = None, step: int | None = None) -> Pulled:
    """Download the checkpoint at ``step`` (default: the latest verified one) with the output
    folders it carries into ``target`` (default: ``./EXPERIMENT_ID``), as they were in the
    session's workdir. Raises ``NotFound`` for an unknown id, ``CheckpointError`` when there
    is no such checkpoint or it does not verify."""
    found = pool.state.experiment(experiment_id)
    store = pool.store_for(found.id)
    manifest = store.pick(step)
    written = store.pull(manifest, target or Path(found.id))
    return Pulled(found.id, manifest, store.url, written)


# -- providers and quotas --------------------------------------------------------------------

def providers_report(pool: Pool) -> list[dict[str, Any]]:
    """Every installed or configured provider, by name: ``provider``, ``usable`` (bool) and
    ``hint`` (what is set up, or what to do). Checks credentials, which may ask the provider
    (cached by each adapter); never raises for one provider's problem."""
    return [_provider_row(pool, name) for name in pool.provider_names()]


def _provider_row(pool: Pool, name: str) -> dict[str, Any]:
    try:
        provider = pool.provider(name)
    except GpupoolError as err:
        return {"provider": name, "usable": False, "hint": str(err)}
    if not provider.enabled:
        return {"provider": name, "usable": False, "hint": "disabled in the pool configuration"}
    ok, hint = provider.check_credentials()
    return {"provider": name, "usable": ok, "hint": hint}


def quotas(pool: Pool) -> list[dict[str, Any]]:
    """GPU time of every account of every enabled provider, from the one rule
    (``gpupool.quota.gpu_seconds_left``), as ``views.quota_row`` dicts: provider, account,
    used_hours, total_hours, remaining_hours, running_hours (what running sessions may still
    spend), resets_at (epoch seconds), resets_in, source ("api", "ledger", "estimate" or
    "unlimited")."""
    return quota_rows(pool, pool.clock())
