"""End to end on the local provider: a plain training script (configs/examples/plain, unchanged
apart from its experiment file) survives random SIGKILLs of the trainer, a SIGKILL of the
scheduler followed by `gpupool watch`, and session caps; its final model comes back with
`gpupool pull`, bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gpupool.lifecycle import ExperimentState
from gpupool.manifest import list_local
from gpupool.pool import Pool
from gpupool.settings import PoolSettings
from gpupool.spec import load_experiment
from tests.helpers import ROOT, drive_until_done
from tests.test_local_e2e import trainer_pid

PLAIN = ROOT / "configs" / "examples" / "plain"
# Sized by work: the pause makes the run last about 8 s of training on any machine.
PLAIN_ENV = {"TOTAL_STEPS": "1600", "SAVE_EVERY": "200", "STEP_SECONDS": "0.005", "OMP_NUM_THREADS": "1"}


def plain_experiment(tmp: Path, **overrides: object) -> Path:
    """The example's experiment file with test-sized numbers (the script is the example's)."""
    spec = yaml.safe_load((PLAIN / "experiment.yaml").read_text())
    spec.update(workdir=str(PLAIN), providers=["local"], env=PLAIN_ENV,
                limits={"max_hops": 30, "retries_on_error": 10})
    spec["checkpoint"].update(interval="0.5s", settle="0.3s")
    spec.update(overrides)
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final model of the same script run once, uninterrupted, outside gpupool."""
    work = tmp_path_factory.mktemp("plain-ref") / "work"
    shutil.copytree(PLAIN, work)
    subprocess.run([sys.executable, "train.py"], cwd=work, env={**os.environ, **PLAIN_ENV},
                   check=True, capture_output=True, timeout=300)
    return load(work / "final" / "model.pt")


def load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def assert_same(left: dict, right: dict) -> None:
    import torch

    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left), "weights differ"


def make_pool(tmp: Path, **local: object) -> Pool:
    return Pool(PoolSettings(data_dir=tmp / "data", providers={"local": dict(local)}))


def session_snapshots(pool: Pool, attempt_id: str) -> list:
    return list_local(pool.data_dir / "local" / "sessions" / attempt_id / "checkpoints")


def pulled_outputs(pool: Pool, experiment_id: str, target: Path) -> list[str]:
    store = pool.store_for(experiment_id)
    store.pull(store.pick(), target)
    return sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())


def test_three_random_sigkills_of_the_trainer(tmp_path: Path, reference: dict) -> None:
    pool = make_pool(tmp_path)
    experiment = pool.submit(load_experiment(plain_experiment(tmp_path)))
    rng = random.Random(11)
    kills: list[int] = []
    kill_at: dict[str, float] = {}

    def kill_at_random(now: float) -> None:  # a random moment after the session's first snapshot
        for attempt in pool.state.attempts(experiment.id, active=True):
            pid = trainer_pid(pool, attempt.id)
            if len(kills) >= 3 or pid is None or attempt.seq in kills:
                continue
            if not any("checkpoints/last.pt" in {f.path for f in m.files}
                       for m in session_snapshots(pool, attempt.id)):
                continue
            kill_at.setdefault(attempt.id, now + rng.uniform(0.0, 1.5))
            if now >= kill_at[attempt.id]:
                os.kill(pid, signal.SIGKILL)
                kills.append(attempt.seq)

    done = drive_until_done(pool, experiment.id, on_tick=kill_at_random, tick=0.1, timeout=400)
    assert done.state == ExperimentState.SUCCEEDED, done.message
    assert kills == [1, 2, 3]
    attempts = pool.state.attempts(experiment.id)
    assert all(a.checkpoint_in for a in attempts[1:]), "every later session resumed"
    files = pulled_outputs(pool, experiment.id, tmp_path / "pulled")
    assert "final/model.pt" in files and "checkpoints/last.pt" in files
    assert_same(load(tmp_path / "pulled" / "final" / "model.pt"), reference)
    curves = [f for f in files if f.startswith("runs/")]
    assert len(curves) >= 2, f"the loss logs of every session are kept: {curves}"


def test_session_caps_force_three_hops_and_the_result_is_exact(tmp_path: Path) -> None:
    # A torch-free plain script: its start-up takes milliseconds, so 3 s sessions still train.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "tests" / "scripts" / "counter.py", work / "counter.py")
    env = {"TOTAL_STEPS": "400", "SAVE_EVERY": "25", "STEP_SECONDS": "0.02"}  # 8 s of work
    subprocess.run([sys.executable, "counter.py"], cwd=work, env={**os.environ, **env}, check=True)
    expected = (work / "out" / "result.txt").read_text()
    shutil.rmtree(work / "out")
    shutil.rmtree(work / "ckpt")
    spec = {"name": "counter", "workdir": str(work), "providers": ["local"],
            "run": "python counter.py {{resume: --resume ckpt/state.pkl}}",
            "checkpoint": {"path": "ckpt", "interval": "0.3s", "settle": "0.2s"}, "outputs": ["out"],
            "limits": {"max_hops": 40, "retries_on_error": 10}, "env": env}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec))
    pool = make_pool(tmp_path, session_seconds=3, deadline_margin=0.5)
    experiment = pool.submit(load_experiment(tmp_path / "exp.yaml"))
    done = drive_until_done(pool, experiment.id, timeout=400)
    assert done.state == ExperimentState.SUCCEEDED, done.message
    assert done.hops >= 3
    pulled_outputs(pool, experiment.id, tmp_path / "pulled")
    assert (tmp_path / "pulled" / "out" / "result.txt").read_text() == expected


def gpupool(args: list[str], env: dict[str, str], **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpupool", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_scheduler_sigkill_then_watch_then_pull(tmp_path: Path, reference: dict) -> None:
    env = {**os.environ, "GPUPOOL_DATA_DIR": str(tmp_path / "data")}
    env.pop("GPUPOOL_CONFIG", None)
    runner = gpupool(["run", str(plain_experiment(tmp_path))], env)
    pool = Pool(PoolSettings(data_dir=tmp_path / "data"))
    deadline = time.monotonic() + 300
    while True:  # until the session has published a snapshot of its checkpoint folder
        assert time.monotonic() < deadline and runner.poll() is None, "no snapshot while running"
        attempts = [a for e in pool.state.experiments() for a in pool.state.attempts(e.id, active=True)]
        if attempts and session_snapshots(pool, attempts[0].id):
            break
        time.sleep(0.1)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    experiment_id = attempts[0].experiment_id
    watcher = gpupool(["watch", experiment_id], env)
    output = watcher.communicate(timeout=400)[0]
    assert watcher.returncode == 0, output
    status = subprocess.run([sys.executable, "-m", "gpupool", "status", experiment_id], env=env,
                            capture_output=True, text=True, timeout=120)
    assert f"gpupool pull {experiment_id}" in status.stdout and "final/" in status.stdout
    pulled = subprocess.run([sys.executable, "-m", "gpupool", "pull", experiment_id,
                             "--to", str(tmp_path / "out")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert_same(load(tmp_path / "out" / "final" / "model.pt"), reference)
    assert (tmp_path / "out" / "checkpoints" / "last.pt").is_file()
