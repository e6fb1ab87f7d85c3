"""End to end: the generated notebook runs in a real Jupyter kernel against the Drive emulator
(standing in for the person pressing Run all) while the scheduler watches it through Drive."""

from __future__ import annotations

import time

import pytest

from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.scheduler import Scheduler
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401 - fixture
from tests.providers.colab_support import Person, make_pool, make_provider, mlp_spec, run_until


@pytest.fixture(autouse=True)
def non_interactive(monkeypatch):
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")


def test_notebook_yields_then_resumes_and_the_scheduler_collects(drive_emulator, tmp_path):
    # First session: its deadline has passed when training starts, so it saves and yields.
    colab = make_provider(drive_emulator, tmp_path, session_seconds=60, deadline_margin=59.9)
    pool = make_pool(tmp_path, colab=colab)
    scheduler = Scheduler(pool)
    experiment = pool.submit(mlp_spec(["colab"], TOTAL_STEPS="200"))
    scheduler.reconcile_once(time.time())
    first = pool.state.attempts(experiment.id)[0]
    assert first.state == AttemptState.SUBMITTED
    assert first.url.startswith("https://colab.research.google.com/drive/")

    person = Person(drive_emulator, first.url, tmp_path / "session-1")
    person.start()
    colab.config.deadline_margin = 0  # the next session may run to the end
    run_until(scheduler, lambda: pool.state.attempts(experiment.id)[0].state.terminal)
    person.join(60)
    assert person.error is None, person.error
    first = pool.state.attempts(experiment.id)[0]
    assert first.state == AttemptState.YIELDED, first.end_reason
    assert first.checkpoint_out and first.step > 0
    store = pool.store_for(experiment.id)
    assert store.latest().attempt == first.id

    # Second session: restores from the collected checkpoint on Drive and finishes.
    run_until(scheduler, lambda: len(pool.state.attempts(experiment.id)) == 2, timeout=10)
    second = pool.state.attempts(experiment.id)[1]
    assert second.provider == "colab" and second.checkpoint_in == first.checkpoint_out
    person = Person(drive_emulator, second.url, tmp_path / "session-2")
    person.start()
    run_until(scheduler, lambda: pool.state.experiment(experiment.id).state.terminal)
    person.join(60)
    assert pool.state.experiment(experiment.id).state == ExperimentState.SUCCEEDED
    latest = store.latest()
    assert latest.final and latest.step == 200 and latest.provider == "colab"
    assert "resumed from step" in colab.logs(pool.state.attempts(experiment.id)[1])


def local_provider(tmp_path):
    from gpupool_providers.local import LocalConfig, LocalProvider

    return LocalProvider(LocalConfig(gpus="none"), tmp_path / "local", time.time)


def test_notebook_never_opened_falls_back_to_local(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path, start_timeout=0.5)
    pool = make_pool(tmp_path, colab=colab, local=local_provider(tmp_path))
    scheduler = Scheduler(pool)
    experiment = pool.submit(mlp_spec(["colab", "local"]))
    run_until(scheduler, lambda: pool.state.experiment(experiment.id).state.terminal)
    first, second = pool.state.attempts(experiment.id)
    assert (first.provider, first.state) == ("colab", AttemptState.UNAVAILABLE)
    assert "not opened in time" in first.end_reason
    assert (second.provider, second.state) == ("local", AttemptState.SUCCEEDED)
    assert pool.state.experiment(experiment.id).state == ExperimentState.SUCCEEDED


def test_notebook_without_gpu_reports_it_and_local_takes_over(drive_emulator, tmp_path):
    colab = make_provider(drive_emulator, tmp_path, no_gpu_cooldown=3600)
    pool = make_pool(tmp_path, colab=colab, local=local_provider(tmp_path))
    scheduler = Scheduler(pool)
    experiment = pool.submit(mlp_spec(["colab", "local"]))
    scheduler.reconcile_once(time.time())
    first = pool.state.attempts(experiment.id)[0]
    person = Person(drive_emulator, first.url, tmp_path / "session", GPU_PROBE="false")
    person.start()
    person.join(60)
    assert "No GPU in this runtime" in str(person.error)
    run_until(scheduler, lambda: pool.state.experiment(experiment.id).state.terminal)
    first, second = pool.state.attempts(experiment.id)
    assert first.state == AttemptState.UNAVAILABLE and "no GPU" in first.end_reason
    assert (second.provider, second.state) == ("local", AttemptState.SUCCEEDED)
    cooldown = pool.state.cooldowns()[("colab", "default")]
    assert cooldown.in_force(time.time()) and cooldown.quota_spent and "no GPU" in cooldown.reason
