"""End to end: the generated notebook runs in a real Jupyter kernel against the Drive emulator
(standing in for the person pressing Run all) while the scheduler watches it through Drive."""

from __future__ import annotations

import time

import pytest

from gpupool.scheduler import Scheduler
from gpupool.states import AttemptState, ExperimentState
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
    experiment = pool.submit(mlp_spec(["colab"], TOTAL_STEPS="300"))
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

    # Second session: restores from the relayed checkpoint on Drive and finishes.
    run_until(scheduler, lambda: len(pool.state.attempts(experiment.id)) == 2, timeout=10)
    second = pool.state.attempts(experiment.id)[1]
    assert second.provider == "colab" and second.checkpoint_in == first.checkpoint_out
    person = Person(drive_emulator, second.url, tmp_path / "session-2")
    person.start()
    run_until(scheduler, lambda: pool.state.experiment(experiment.id).state.terminal)
    person.join(60)
    assert pool.state.experiment(experiment.id).state == ExperimentState.SUCCEEDED
    latest = store.latest()
    assert latest.final and latest.step == 300 and latest.provider == "colab"
    assert "resumed from step" in colab.logs(pool.state.attempts(experiment.id)[1])
