"""Shared pieces for end-to-end tests: a tiny version of the example experiment, its reference
(uninterrupted) weights, and a loop that drives the scheduler until an experiment ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.state import Experiment
from gpupool.store import CheckpointStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "examples" / "mlp"
TINY_ENV = {"HIDDEN": "16", "BATCH": "32", "OMP_NUM_THREADS": "1"}


def write_experiment(tmp: Path, *, steps: int, providers: list[str], interval: str = "0.3s",
                     **overrides: object) -> Path:
    """An experiment file for the example MLP, small enough for tests."""
    spec = {
        "name": "tiny-mlp", "workdir": str(EXAMPLE), "run": "python train.py",
        "resources": {"gpu": "any"}, "providers": providers,
        "checkpoint": {"interval": interval, "keep_last": 3},
        "limits": {"max_hops": 30, "retries_on_error": 2},
        "env": {**TINY_ENV, "TOTAL_STEPS": str(steps)},
    }
    spec.update(overrides)
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def reference_weights(tmp: Path, steps: int) -> dict:
    """Final model weights of an uninterrupted run of the same script."""
    session = tmp / "reference-session"
    env = {**os.environ, **TINY_ENV, "TOTAL_STEPS": str(steps), "GPUPOOL_SESSION_DIR": str(session),
           "PYTHONPATH": str(ROOT)}
    env.pop("GPUPOOL_DEADLINE", None)
    subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, env=env, check=True,
                   capture_output=True, timeout=300)
    from gpupool.manifest import list_local

    newest = list_local(session / "checkpoints")[0]
    return load_model_weights(session / "checkpoints" / newest.name)


def load_model_weights(directory: Path) -> dict:
    import torch

    return torch.load(directory / "state.pt", weights_only=True)["model"]


def final_weights(store: CheckpointStore, tmp: Path) -> tuple[int, dict]:
    latest = store.latest()
    assert latest is not None, "no verified checkpoint in the store"
    target = store.download(latest, tmp / f"final-{latest.name}")
    return latest.step, load_model_weights(target)


def assert_same_weights(left: dict, right: dict) -> None:
    import torch

    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), f"{name} differs"


def drive_until_done(pool: Pool, experiment_id: str, *, timeout: float = 240.0,
                     on_tick=None, tick: float = 0.2) -> Experiment:
    """Reconcile (real time) until the experiment ends; ``on_tick(now)`` runs between steps."""
    scheduler = Scheduler(pool)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = scheduler.reconcile_once(time.time())
        assert not report.problems, report.problems
        experiment = pool.state.experiment(experiment_id)
        if experiment.state.terminal:
            return experiment
        if on_tick is not None:
            on_tick(time.time())
        time.sleep(tick)
    raise AssertionError(f"{experiment_id} did not finish within {timeout}s: "
                         f"{pool.state.experiment(experiment_id)}")
