"""The code dataset on Kaggle (issue 11): one per content of the code, shared by every attempt
and experiment that runs the same code, deleted once no experiment uses it; a refused or
failed push leaves no new dataset behind. Against the emulator through the real kagglesdk;
its request log counts uploads and creates."""

from __future__ import annotations

import time

import pytest

from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.scheduler import Scheduler
from gpupool_providers.kaggle.registry import Registry
from tests.emulators.kaggle import Fault, KaggleEmulator
from tests.providers.test_kaggle import (  # noqa: F401 - fixtures
    drive,
    emu_fixture,
    isolated_env,
    make_pool,
    spec,
)

FAIL_ONCE = ("python -c \"import os, sys; from pathlib import Path; p = Path(os.environ['MARK']); "
             "sys.exit(0) if p.exists() else (p.touch(), sys.exit(3))\"")
SLEEPER = "python -c 'import time; time.sleep(60)'"


def code_uploads(emu: KaggleEmulator) -> list[str]:
    return [name for name in emu.uploads() if name in ("code.gpupool", "runtime.gpupool")]


def code_creates(emu: KaggleEmulator) -> list[str]:
    return [ref for ref in emu.dataset_writes() if "-code-" in ref]


def test_every_attempt_reuses_one_code_dataset_deleted_when_the_experiment_ends(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, _, _ = make_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path, run=FAIL_ONCE, env={"MARK": str(tmp_path / "mark")}))
    done = drive(pool, experiment.id, timeout=90)
    assert done.state == ExperimentState.SUCCEEDED, done
    attempts = pool.state.attempts(experiment.id)
    assert [a.state for a in attempts] == [AttemptState.FAILED, AttemptState.SUCCEEDED]
    assert len(code_creates(emu)) == 1 and sorted(code_uploads(emu)) == ["code.gpupool",
                                                                         "runtime.gpupool"]
    pushes = [r.json for r in emu.requests if r.endpoint == "SaveKernel"]
    assert len(pushes) == 2 and pushes[0]["datasetDataSources"] == pushes[1]["datasetDataSources"]
    assert not emu.live_datasets() and not emu.live_kernels()  # gone with the experiment


def test_same_code_in_two_experiments_is_uploaded_once_and_kept_while_one_runs(
        emu: KaggleEmulator, tmp_path) -> None:
    emu.config.expose_session_id = True  # so gpupool can stop the long session
    pool, _, _ = make_pool(tmp_path)
    scheduler = Scheduler(pool)
    running = pool.submit(spec(tmp_path, run=SLEEPER, name="runs-long"))
    scheduler.reconcile_once(time.time())
    quick = pool.submit(spec(tmp_path, run="python -c 'print(1)'", name="quick"))
    assert drive(pool, quick.id, timeout=60).state == ExperimentState.SUCCEEDED
    assert len(code_creates(emu)) == 1 and len(code_uploads(emu)) == 2  # one code, one upload
    assert [d.slug for d in emu.live_datasets()] == [code_creates(emu)[0].split("/")[1]]
    scheduler.cancel(running.id, time.time())
    scheduler.reconcile_once(time.time())
    assert not emu.live_datasets()  # the last experiment using it ended (cancelled)


@pytest.mark.parametrize("fault", [Fault.http(400), Fault.http(403)], ids=["bad-request", "denied"])
def test_failed_push_leaves_no_new_dataset(emu: KaggleEmulator, tmp_path, fault: Fault) -> None:
    pool, _, _ = make_pool(tmp_path)
    emu.inject("SaveKernel", fault)
    experiment = pool.submit(spec(tmp_path))
    Scheduler(pool).reconcile_once(time.time())
    assert pool.state.attempts(experiment.id)[0].state == AttemptState.UNAVAILABLE
    assert code_creates(emu) and emu.datasets == {} and not emu.live_kernels()


def test_refused_push_keeps_the_code_another_experiment_uses(
        emu: KaggleEmulator, tmp_path) -> None:
    emu.config.expose_session_id = True  # so gpupool can stop the long session
    pool, provider, _ = make_pool(tmp_path)
    first = pool.submit(spec(tmp_path, run=SLEEPER, name="first"))
    scheduler = Scheduler(pool)
    scheduler.reconcile_once(time.time())
    emu.config.max_gpu_sessions = 1  # the first experiment's session holds the only slot
    other = pool.submit(spec(tmp_path, run="python -c 'print(2)'", name="other"))
    scheduler.reconcile_once(time.time())
    assert pool.state.attempts(other.id)[0].state == AttemptState.UNAVAILABLE
    assert len(emu.live_datasets()) == 1  # the shared code stays: the first experiment uses it
    scheduler.cancel(first.id, time.time())
    scheduler.cancel(other.id, time.time())
    assert not emu.live_datasets()
    assert provider.registry.experiments() == set()


def test_unclear_create_of_the_code_dataset_is_asked_about_and_reused(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, _, _ = make_pool(tmp_path)
    emu.inject("CreateDataset", Fault.http(500, after=True))
    experiment = pool.submit(spec(tmp_path, run="python -c 'print(1)'"))
    assert drive(pool, experiment.id, timeout=60).state == ExperimentState.SUCCEEDED
    assert len(code_creates(emu)) == 1 and not emu.live_datasets()


def test_code_damaged_on_kaggle_stops_the_session_before_it_runs(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, provider, _ = make_pool(tmp_path)
    first = pool.submit(spec(tmp_path, run=SLEEPER, name="holds-the-code"))
    scheduler = Scheduler(pool)
    scheduler.reconcile_once(time.time())
    (code,) = emu.live_datasets()
    files = code.versions[-1].files
    files["code.gpupool"] = files["code.gpupool"][:-1] + b"!"  # a byte changed at rest
    emu.config.max_gpu_sessions = 2
    damaged = pool.submit(spec(tmp_path, run="python -c 'print(1)'", name="damaged",
                               limits={"retries_on_error": 0}))
    done = drive(pool, damaged.id, timeout=60)
    assert done.state == ExperimentState.FAILED
    assert len(code_creates(emu)) == 1  # the same code: reused, not uploaded again
    attempt = pool.state.attempts(damaged.id)[0]
    assert "code.gpupool does not match its sha256" in provider.logs(attempt)
    assert pool.state.attempts(first.id)[0].state in (AttemptState.SUBMITTED, AttemptState.RUNNING)


def test_registry_keeps_inputs_their_days_and_code_not_at_all(tmp_path) -> None:
    registry = Registry(tmp_path / "datasets.json")
    registry.use("p-code-abc", "code", "abc", 1, "e1")
    registry.use("p-in-data", "input", "one", 1, "e1")
    registry.use("p-in-data", "input", "two", 2, "e2")
    keep = {"code": 0.0, "input": 100.0}
    registry.release("e1", 1000.0)
    assert registry.due(1000.0, keep) == ["p-code-abc"]  # e2 still uses the input
    assert registry.others_need_old_versions("p-in-data", "e3")
    registry.release("e2", 1010.0)
    assert registry.due(1109.0, keep) == ["p-code-abc"]
    assert sorted(registry.due(1110.0, keep)) == ["p-code-abc", "p-in-data"]
    registry.use("p-in-data", "input", "one", 1, "e3")  # used again before it went: kept
    assert registry.due(5000.0, keep) == ["p-code-abc"]
    assert registry.holding("two", "input") == ("p-in-data", 2)
    registry.postpone("p-code-abc", 6000.0)  # its deletion failed: not before then
    assert registry.due(5000.0, keep) == [] and registry.due(6000.0, keep) == ["p-code-abc"]
    (tmp_path / "datasets.json").write_text("{torn")
    assert registry.due(9999.0, keep) == [] and registry.experiments() == set()  # none deleted
