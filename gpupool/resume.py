"""An experiment's life after it stopped: resume it, and list what it checkpointed.

The CLI's ``resume`` and ``checkpoints`` call these; they read and write only through the
state database and the checkpoint store, so a scheduler running meanwhile sees a consistent
experiment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpupool.bundle import pack_workdir
from gpupool.errors import CheckpointError, ConfigError, StateError
from gpupool.lifecycle import ExperimentState
from gpupool.pool import Pool
from gpupool.spec import ExperimentSpec
from gpupool.state import Experiment

RESUMABLE = (ExperimentState.CANCELLED, ExperimentState.FAILED)


def resume(pool: Pool, experiment_id: str, spec: ExperimentSpec | None, now: float,
           source: Path | None = None) -> Experiment:
    """Put a cancelled or failed experiment back in the queue, to continue from its latest
    verified checkpoint (step 0 when it has none). ``spec`` (an edited experiment file)
    replaces the recorded one and its workdir is bundled again.

    Raises ``StateError`` when the experiment is not resumable (running, succeeded, or a
    session of it is still tracked) or a limit it hit would stop it again at once, and
    ``ConfigError`` when ``spec`` names another experiment.
    """
    experiment = pool.state.experiment(experiment_id)
    _check_resumable(pool, experiment)
    fields: dict[str, Any] = {}
    if spec is not None:
        fields.update(_replacement(pool, experiment, spec, now, source))
    current = spec or experiment.parsed_spec
    _check_limits(experiment, current)
    latest = pool.store_for(experiment.id).latest()
    start = f"step {latest.step} (checkpoint {latest.name})" if latest else \
        "step 0: it has no verified checkpoint"
    return pool.state.move_experiment(
        experiment.id, ExperimentState.PENDING, now, event=f"resumed by the user from {start}",
        failed_attempts=0, wait_reason=None, not_before=None, message=f"resumed from {start}",
        last_checkpoint=latest.name if latest else None, last_step=latest.step if latest else None,
        **fields,
    )


def _check_resumable(pool: Pool, experiment: Experiment) -> None:
    if experiment.state not in RESUMABLE:
        why = "it finished; submit it again with `gpupool run`" \
            if experiment.state == ExperimentState.SUCCEEDED else "it has not stopped"
        raise StateError(f"{experiment.id} is {experiment.state.value}; only a cancelled or failed "
                         f"experiment can be resumed ({why})")
    still = pool.state.attempts(experiment.id, active=True)
    if still:
        raise StateError(f"{experiment.id}: session {still[0].id} on {still[0].provider} is still "
                         "being stopped; resume it once `gpupool status` shows it ended")


def _check_limits(experiment: Experiment, spec: ExperimentSpec) -> None:
    """A limit already reached would fail the experiment again at its first session end."""
    if experiment.hops >= spec.limits.max_hops:
        raise StateError(f"{experiment.id} used {experiment.hops} of limits.max_hops "
                         f"({spec.limits.max_hops}); raise it in the experiment file and pass "
                         "that file: `gpupool resume ID experiment.yaml`")
    budget = spec.limits.gpu_hours
    if budget is not None and experiment.gpu_seconds >= budget * 3600:
        raise StateError(f"{experiment.id} spent its limits.gpu_hours ({budget:g} h); raise it in "
                         "the experiment file and pass that file: `gpupool resume ID experiment.yaml`")


def _replacement(pool: Pool, experiment: Experiment, spec: ExperimentSpec, now: float,
                 source: Path | None) -> dict[str, Any]:
    """The columns an edited experiment file changes: the spec and a fresh bundle of its code
    (its inputs checked as `run` checks them; ``source`` is the file, for line numbers)."""
    if spec.name != experiment.name:
        raise ConfigError(f"the experiment file names {spec.name!r}, not {experiment.name!r}; "
                        "resume takes an edited file of the same experiment")
    pool.check_inputs(spec, source)
    staging = Path(pool.settings.data_dir) / "bundles" / f"{spec.name}-{int(now * 1000)}.tar.gz"
    pack_workdir(spec.workdir, staging, exclude=spec.state_folders())
    return {"spec": json.dumps(json.loads(spec.model_dump_json())), "bundle": str(staging)}


def checkpoint_rows(pool: Pool, experiment_id: str) -> list[dict[str, Any]]:
    """Every checkpoint of an experiment, newest first: step, creation time (epoch seconds),
    size (bytes), which session wrote it, where it is, and whether its files verify against
    the manifest's sha256 (the newest verified one is where a resume starts)."""
    experiment = pool.state.experiment(experiment_id)
    store = pool.store_for(experiment.id)
    rows, latest_seen = [], False
    for manifest in store.list():
        try:
            store.verify(manifest)
            problem = None
        except CheckpointError as err:
            problem = str(err)
        is_latest = problem is None and not latest_seen
        latest_seen = latest_seen or is_latest
        rows.append({
            "name": manifest.name, "step": manifest.step, "created": manifest.created,
            "bytes": manifest.total_bytes, "files": len(manifest.files),
            "attempt": manifest.attempt or None, "provider": manifest.provider or None,
            "final": manifest.final, "location": f"{store.url.rstrip('/')}/{manifest.name}",
            "verified": problem is None, "problem": problem, "latest": is_latest,
        })
    return rows
