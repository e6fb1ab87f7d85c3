"""The Kaggle provider when Kaggle answers outside the happy path (issue 12).

Each test is one member of a kind of fault: a call that may have taken effect is resolved by
asking, never repeated (1); what gpupool started it can stop, and it never says "stopped" when
it did not (2); what gpupool creates on Kaggle is deleted (3); what Kaggle ended is a loss,
not a user error (5); a 404 on a new dataset means "not ready yet" (7); every message names
its provider once. The emulator counts sessions, charges and live objects, so the tests
assert "one session, charged once" and "nothing left behind" directly.
"""

from __future__ import annotations

import time

import pytest

from gpupool.clock import SystemClock
from gpupool.errors import CancelFailed
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool_providers.kaggle import KaggleProvider
from gpupool_providers.kaggle.janitor import RETRY_SECONDS
from tests.emulators.kaggle import Fault, KaggleEmulator
from tests.providers.test_kaggle import (  # noqa: F401 - fixtures
    Sleeps,
    drive,
    emu_fixture,
    fast_section,
    isolated_env,
    make_pool,
    spec,
)

QUICK = "python -c 'print(\"quick run done\")'"
SLEEPER = "python -c 'import time; print(\"sleeping\", flush=True); time.sleep(60)'"


def kaggle_then_local(tmp) -> tuple[Pool, KaggleProvider]:
    settings = PoolSettings(data_dir=tmp / "data", providers={
        "kaggle": fast_section(request_timeout=0.5), "local": {"gpus": "none"}})
    pool = Pool(settings, clock=SystemClock(sleep=Sleeps()))
    provider = pool.provider("kaggle")
    assert isinstance(provider, KaggleProvider)
    return pool, provider


def running_attempt(pool: Pool, emu: KaggleEmulator, tmp, run: str = SLEEPER):
    experiment = pool.submit(spec(tmp, run=run))
    report = Scheduler(pool).reconcile_once(time.time())
    assert report.placed, report
    attempt = pool.state.attempts(experiment.id)[0]
    session = emu.wait_status(next(iter(emu.sessions)), "RUNNING")
    return experiment, attempt, session


def no_doubled_prefix(*texts: str | None) -> None:
    for text in texts:
        assert "kaggle: kaggle:" not in (text or ""), text


# -- 1. a call that may have taken effect is resolved by asking ------------------------------

@pytest.mark.parametrize("fault", [Fault.http(500, after=True), Fault.http(502, after=True),
                                   Fault.reset(after=True), Fault.hang(3, after=True)],
                         ids=["500", "502", "reset", "late-answer"])
def test_push_that_landed_without_an_answer_runs_one_session_charged_once(
        emu: KaggleEmulator, tmp_path, fault: Fault) -> None:
    pool, provider, _ = make_pool(tmp_path, request_timeout=0.5)
    emu.inject("SaveKernel", fault)
    experiment = pool.submit(spec(tmp_path, run=QUICK))
    done = drive(pool, experiment.id, timeout=60)
    assert done.state == ExperimentState.SUCCEEDED, done
    assert len(emu.sessions) == 1 and len(emu.charged_sessions()) == 1
    assert [r.endpoint for r in emu.requests].count("SaveKernel") == 1  # never sent again
    attempts = pool.state.attempts(experiment.id)
    assert len(attempts) == 1 and attempts[0].state == AttemptState.SUCCEEDED
    assert done.gpu_seconds == pytest.approx(attempts[0].gpu_seconds)  # charged once


def test_push_answered_after_the_timeout_is_adopted_not_placed_elsewhere(
        emu: KaggleEmulator, tmp_path) -> None:
    emu.config.max_hang_seconds = 2.0
    emu.inject("SaveKernel", Fault.hang(2.0))  # the kernel appears only after the client gave up
    pool, _ = kaggle_then_local(tmp_path)
    experiment = pool.submit(spec(tmp_path, run=QUICK, providers=["kaggle", "local"]))
    Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    assert attempt.provider == "kaggle" and attempt.state == AttemptState.SUBMITTED
    done = drive(pool, experiment.id, timeout=60)
    assert done.state == ExperimentState.SUCCEEDED, done
    attempts = pool.state.attempts(experiment.id)
    assert [(a.provider, a.state) for a in attempts] == [("kaggle", AttemptState.SUCCEEDED)]
    assert len(emu.sessions) == 1 and emu.session(min(emu.sessions)).status == "COMPLETE"


def test_unclear_push_that_never_landed_is_given_up_after_the_settle_time(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, provider, _ = make_pool(tmp_path, push_settle_seconds=120)
    emu.inject("SaveKernel", Fault.http(503))  # refused before taking effect, but who knows
    experiment = pool.submit(spec(tmp_path, run=QUICK))
    scheduler, now = Scheduler(pool), time.time()
    scheduler.reconcile_once(now)
    attempt = pool.state.attempts(experiment.id)[0]
    assert attempt.state == AttemptState.SUBMITTED and not emu.sessions
    scheduler.reconcile_once(now + 60)
    assert pool.state.attempt(attempt.id).state == AttemptState.SUBMITTED
    scheduler.reconcile_once(now + 121)
    ended = pool.state.attempt(attempt.id)
    assert ended.state == AttemptState.UNAVAILABLE and "no kernel" in (ended.end_reason or "")
    assert not emu.sessions and not emu.live_datasets() and not emu.live_kernels()
    assert [r.endpoint for r in emu.requests].count("SaveKernel") == 1


def test_dataset_create_without_an_answer_is_asked_about_not_resent(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, _, _ = make_pool(tmp_path)
    emu.inject("CreateDataset", Fault.http(500, after=True))
    experiment = pool.submit(spec(tmp_path, run=QUICK))
    assert Scheduler(pool).reconcile_once(time.time()).placed
    assert [r.endpoint for r in emu.requests].count("CreateDataset") == 1
    assert len(emu.datasets) == 1
    assert drive(pool, experiment.id, timeout=60).state == ExperimentState.SUCCEEDED


# -- 2. what gpupool started, it can stop --------------------------------------------------

def test_cancel_stops_the_kernel_and_its_charge(emu: KaggleEmulator, tmp_path) -> None:
    emu.config.expose_session_id = True  # a service that tells the session id
    pool, provider, _ = make_pool(tmp_path)
    experiment, attempt, session = running_attempt(pool, emu, tmp_path)
    Scheduler(pool).cancel(experiment.id, time.time())
    assert emu.wait(session.id).status == "CANCEL_ACKNOWLEDGED"
    charged = session.charged_seconds
    assert 0 < charged < 60 and emu.charged_sessions() == [session]
    assert pool.state.experiment(experiment.id).state == ExperimentState.CANCELLED
    provider.sweep()  # the cancelled attempt's kernel and dataset go once it has ended
    assert not emu.live_kernels() and not emu.live_datasets()
    assert session.charged_seconds == charged


def test_adopted_session_is_cancelled_like_any_other(emu: KaggleEmulator, tmp_path) -> None:
    emu.config.expose_session_id = True
    emu.inject("SaveKernel", Fault.http(500, after=True))
    pool, _, _ = make_pool(tmp_path)
    experiment, attempt, session = running_attempt(pool, emu, tmp_path)
    assert "found its kernel" in (pool.state.attempt(attempt.id).detail or "")
    Scheduler(pool).cancel(experiment.id, time.time())
    assert emu.wait(session.id).status == "CANCEL_ACKNOWLEDGED" and len(emu.sessions) == 1


def test_cancel_without_a_session_id_says_so_and_where_to_stop_it(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, provider, _ = make_pool(tmp_path)
    _, attempt, session = running_attempt(pool, emu, tmp_path)
    with pytest.raises(CancelFailed) as caught:
        provider.cancel(pool.state.attempt(attempt.id))
    slug = session.slug
    assert caught.value.action == f"stop it at https://www.kaggle.com/code/alice/{slug}"
    assert caught.value.action in str(caught.value)
    no_doubled_prefix(str(caught.value))
    assert session.status == "RUNNING" and emu.live_kernels()  # nothing claimed, nothing lost


def test_cancel_that_kaggle_refuses_raises_cancel_failed(emu: KaggleEmulator, tmp_path) -> None:
    emu.config.expose_session_id = True
    pool, provider, sleeps = make_pool(tmp_path, max_retries=2)
    _, attempt, session = running_attempt(pool, emu, tmp_path)
    emu.inject("CancelKernelSession", Fault.http(500), times=3)
    with pytest.raises(CancelFailed, match="cancelling .* failed"):
        provider.cancel(pool.state.attempt(attempt.id))
    backoffs = [s for s in sleeps if s > 0]  # 0: the dataset-ready poll
    assert session.status == "RUNNING" and len(backoffs) == 2  # bounded retries, then the truth


def test_cancel_when_kaggle_does_not_answer_raises_cancel_failed(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, provider, _ = make_pool(tmp_path, max_retries=1)
    _, attempt, session = running_attempt(pool, emu, tmp_path)
    emu.inject("GetKernelSessionStatus", Fault.http(503), times=2)
    with pytest.raises(CancelFailed, match="could not reach Kaggle") as caught:
        provider.cancel(pool.state.attempt(attempt.id))
    assert caught.value.action.startswith("stop it at https://www.kaggle.com/code/alice/")
    assert session.status == "RUNNING"


def test_cancel_of_a_session_that_already_ended_sends_nothing(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, provider, _ = make_pool(tmp_path)
    _, attempt, session = running_attempt(pool, emu, tmp_path, run=QUICK)
    emu.wait(session.id)
    provider.cancel(pool.state.attempt(attempt.id))
    assert "CancelKernelSession" not in [r.endpoint for r in emu.requests]


# -- 3. what gpupool creates on Kaggle is deleted ------------------------------------------

def test_kernel_and_dataset_deleted_after_collection_freeing_the_quota(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, provider, _ = make_pool(tmp_path)
    sizes: list[int] = []
    first = pool.submit(spec(tmp_path, run=QUICK))
    done = drive(pool, first.id, timeout=60,
                 on_tick=lambda: sizes.extend(d.size for d in emu.live_datasets()))
    assert done.state == ExperimentState.SUCCEEDED
    assert not emu.live_kernels() and not emu.live_datasets()
    attempt = pool.state.attempts(first.id)[0]
    assert "quick run done" in provider.logs(attempt)  # the log was kept locally first
    emu.config.private_dataset_quota_bytes = max(sizes) * 1.5  # room for one attempt's inputs
    second = pool.submit(spec(tmp_path, run=QUICK, name="second"))
    assert drive(pool, second.id, timeout=60).state == ExperimentState.SUCCEEDED
    assert not emu.live_kernels() and not emu.live_datasets()


def test_refused_push_deletes_its_dataset_at_once(emu: KaggleEmulator, tmp_path) -> None:
    emu.config.max_gpu_sessions = 0
    pool, _, _ = make_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path))
    Scheduler(pool).reconcile_once(time.time())
    assert pool.state.attempts(experiment.id)[0].state == AttemptState.UNAVAILABLE
    assert emu.datasets == {} and not emu.live_kernels()


def test_deletion_that_fails_is_retried_later(emu: KaggleEmulator, tmp_path) -> None:
    pool, provider, _ = make_pool(tmp_path, max_retries=1)
    emu.inject("DeleteKernel", Fault.http(503), times=4)  # cleanup's try and its sweep
    emu.inject("DeleteDataset", Fault.http(503), times=2)  # the code, once the experiment ended
    experiment = pool.submit(spec(tmp_path, run=QUICK))
    assert drive(pool, experiment.id, timeout=60).state == ExperimentState.SUCCEEDED
    assert len(emu.live_kernels()) == 1 and provider.janitor.pending()
    provider.sweep()
    assert not emu.live_kernels() and not provider.janitor.pending()
    deletes = lambda: [r.endpoint for r in emu.requests].count("DeleteDataset")  # noqa: E731
    assert len(emu.live_datasets()) == 1 and deletes() == 2
    Scheduler(pool).reconcile_once(time.time())  # not tried again at every step
    assert deletes() == 2
    Scheduler(pool).reconcile_once(time.time() + RETRY_SECONDS)
    assert not emu.live_datasets() and deletes() == 3


# -- 5. what Kaggle ended is a loss, with Kaggle's message as it was -----------------------

@pytest.mark.parametrize("status,message,keeps", [
    ("ERROR", "The node running this notebook was reclaimed (id 42).", False),
    ("ERROR", "Internal error 0x7f: container exited", True),
    ("COMPLETE", "", True),
])
def test_session_kaggle_ended_without_an_exit_record_is_lost(
        emu: KaggleEmulator, tmp_path, status: str, message: str, keeps: bool) -> None:
    emu.config.session_cap_seconds = 3
    emu.config.limit_status, emu.config.limit_message = status, message
    emu.config.limit_keeps_output = keeps
    pool, _, _ = make_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path, run=SLEEPER, limits={"max_hops": 0,
                                                                  "retries_on_error": 0}))
    done = drive(pool, experiment.id, timeout=60)
    attempt = pool.state.attempts(experiment.id)[0]
    assert attempt.state == AttemptState.LOST, attempt.end_reason
    assert message in (attempt.end_reason or "") and "deadline" not in (attempt.end_reason or "")
    assert done.failed_attempts == 0 and "max_hops" in (done.message or "")


def test_kernel_deleted_on_kaggle_while_running_is_lost_not_polled_forever(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, _, _ = make_pool(tmp_path)
    experiment, attempt, session = running_attempt(pool, emu, tmp_path)
    scheduler = Scheduler(pool)
    scheduler.reconcile_once(time.time())
    assert pool.state.attempt(attempt.id).state == AttemptState.RUNNING
    emu.kernel(session.ref).deleted = True  # the person deleted it on kaggle.com
    scheduler.reconcile_once(time.time())
    ended = pool.state.attempt(attempt.id)
    assert ended.state == AttemptState.LOST and "no longer has kernel" in (ended.end_reason or "")


# -- 7. a new dataset that answers 404 is not ready yet ------------------------------------

def test_new_dataset_answering_404_is_waited_for(emu: KaggleEmulator, tmp_path) -> None:
    pool, _, _ = make_pool(tmp_path)
    not_found = Fault.http(404, {"code": 404, "message": "Dataset not found"})
    emu.inject("GetDatasetStatus", not_found, times=3)  # the existence check, then 2 polls
    experiment = pool.submit(spec(tmp_path, run=QUICK))
    report = Scheduler(pool).reconcile_once(time.time())
    assert report.placed, report
    assert ("kaggle", "default") not in pool.state.cooldowns()  # not cooled down
    assert len(emu.datasets) == 1 and len(emu.sessions) == 1
    assert drive(pool, experiment.id, timeout=60).state == ExperimentState.SUCCEEDED


def test_new_kernel_not_found_right_after_its_push_is_not_lost(
        emu: KaggleEmulator, tmp_path) -> None:
    pool, _, _ = make_pool(tmp_path)
    denied = Fault.http(403, {"code": 403, "message": "Permission 'kernels.get' was denied"})
    experiment = pool.submit(spec(tmp_path, run=QUICK))
    scheduler = Scheduler(pool)
    assert scheduler.reconcile_once(time.time()).placed
    emu.inject("GetKernelSessionStatus", denied, times=2)  # Kaggle has not caught up yet
    scheduler.reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    assert attempt.state == AttemptState.SUBMITTED and "does not show" in (attempt.detail or "")
    assert drive(pool, experiment.id, timeout=60).state == ExperimentState.SUCCEEDED


def test_messages_name_the_provider_once(emu: KaggleEmulator, tmp_path) -> None:
    emu.config.max_gpu_sessions = 0
    pool, provider, _ = make_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path))
    report = Scheduler(pool).reconcile_once(time.time())
    waiting = Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    emu.credentials["alice"] = "rotated"
    _, fresh, _ = make_pool(tmp_path / "again")
    no_doubled_prefix(attempt.end_reason, *report.waiting.values(), *waiting.waiting.values(),
                      pool.state.experiment(experiment.id).wait_reason, fresh.check_credentials()[1])


# -- 8. every call to Kaggle has a timeout and a bounded retry -----------------------------

IDEMPOTENT_CALLS = ("GetDatasetStatus", "StartBlobUpload", "upload", "GetKernel",
                    "GetKernelSessionStatus", "ListKernelSessionOutput", "download",
                    "GetAcceleratorQuotaStatistics", "DeleteKernel", "DeleteDataset")


def test_every_call_times_out_and_is_retried(emu: KaggleEmulator, tmp_path) -> None:
    """A stall on any call costs one timeout and one retry (a backoff recorded), never the
    stall itself; pushes and creates are the unclear-outcome tests above."""
    emu.config.max_hang_seconds = 30
    for endpoint in IDEMPOTENT_CALLS:
        emu.inject(endpoint, Fault.hang(30))
    pool, _, sleeps = make_pool(tmp_path, request_timeout=0.5, download_timeout=0.5)
    experiment = pool.submit(spec(tmp_path, run=QUICK))
    assert drive(pool, experiment.id, timeout=60).state == ExperimentState.SUCCEEDED
    assert not any(emu.faults.values())  # every stall was met by the run
    assert len([s for s in sleeps if s > 0]) == len(IDEMPOTENT_CALLS)
    assert not emu.live_kernels() and not emu.live_datasets()
