"""A plain script (no gpupool code) in the generated Colab notebook against the Drive emulator:
its checkpoint folder is snapshotted in the session, uploaded to Drive like runtime checkpoints,
restored into the next notebook's session, and the result is exact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpupool.lifecycle import ExperimentState
from gpupool.scheduler import Scheduler
from gpupool.spec import ExperimentSpec
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401 - fixture
from tests.providers.colab_support import Person, make_pool, make_provider, run_until

COUNTER = Path(__file__).resolve().parents[1] / "scripts" / "counter.py"
ENV = {"TOTAL_STEPS": "300", "SAVE_EVERY": "25", "STEP_SECONDS": "0.02"}  # 6 s of work


@pytest.fixture(autouse=True)
def non_interactive(monkeypatch):
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")


def counter_spec(tmp_path: Path) -> tuple[ExperimentSpec, str]:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(COUNTER, work / "counter.py")
    subprocess.run([sys.executable, "counter.py"], cwd=work, env={**os.environ, **ENV}, check=True)
    expected = (work / "out" / "result.txt").read_text()
    shutil.rmtree(work / "out")
    shutil.rmtree(work / "ckpt")
    spec = ExperimentSpec.model_validate({
        "name": "counter-colab", "workdir": str(work), "providers": ["colab"],
        "run": "python counter.py {{resume: --resume ckpt/state.pkl}}",
        "checkpoint": {"path": "ckpt", "interval": "0.3s", "settle": "0.2s"}, "outputs": ["out"],
        "limits": {"max_hops": 5, "retries_on_error": 2}, "env": ENV})
    return spec, expected


def test_plain_script_is_stopped_at_the_deadline_and_resumes_in_the_next_notebook(drive_emulator, tmp_path):
    spec, expected = counter_spec(tmp_path)
    # The first session's deadline comes 4 s after it starts: the script is stopped mid-run.
    colab = make_provider(drive_emulator, tmp_path, session_seconds=60, deadline_margin=56)
    pool = make_pool(tmp_path, colab=colab)
    scheduler = Scheduler(pool)
    experiment = pool.submit(spec)
    scheduler.reconcile_once(time.time())
    first = pool.state.attempts(experiment.id)[0]
    person = Person(drive_emulator, first.url, tmp_path / "session-1")
    person.start()
    colab.config.deadline_margin = 0  # the next session may run to the end
    run_until(scheduler, lambda: pool.state.attempts(experiment.id)[0].state.terminal, timeout=180)
    person.join(60)
    first = pool.state.attempts(experiment.id)[0]
    assert first.checkpoint_out, first.end_reason  # a snapshot reached the store through Drive

    run_until(scheduler, lambda: len(pool.state.attempts(experiment.id)) == 2, timeout=30)
    second = pool.state.attempts(experiment.id)[1]
    assert second.checkpoint_in == first.checkpoint_out
    person = Person(drive_emulator, second.url, tmp_path / "session-2")
    person.start()
    run_until(scheduler, lambda: pool.state.experiment(experiment.id).state.terminal, timeout=180)
    person.join(60)
    assert pool.state.experiment(experiment.id).state == ExperimentState.SUCCEEDED
    store = pool.store_for(experiment.id)
    store.pull(store.pick(), tmp_path / "pulled")
    assert (tmp_path / "pulled" / "out" / "result.txt").read_text() == expected
    assert "--resume ckpt/state.pkl" in colab.logs(second)
