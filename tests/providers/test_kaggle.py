"""The Kaggle provider against the loopback Kaggle emulator, through the real kagglesdk client.

Kernels really run: the emulator executes the pushed bootstrap script in a subprocess with a
fake /kaggle, so gpupool's runtime, bootstrap and the example training script run as on Kaggle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpupool.clock import SystemClock
from gpupool.errors import CredentialsError, ProviderError, ProviderUnavailable, RateLimited
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.provider import Launch
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from gpupool.state import Experiment
from gpupool_providers.kaggle import KaggleProvider
from gpupool_providers.kaggle.credentials import find_credentials
from gpupool_providers.kaggle.kernel import (
    STATUS_MAP,
    kernel_slug,
    marker,
    render_script,
    save_request,
    script_marker,
)
from tests.emulators.kaggle import Fault, KaggleEmulator

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "examples" / "mlp"
SECRET = "SECRET-kaggle-key-7f3a9c"  # planted credential: must never leave the client
TINY = {"HIDDEN": "16", "BATCH": "32"}
STEPS = 200
SLOW_TRAIN = '''\
"""The example script, slowed by a fixed sleep per step (so a session cap always cuts it)."""
import runpy, sys, time
from gpupool import runtime
report = runtime.Session.report
def slow_report(self, step, **kw):
    time.sleep(0.01)
    return report(self, step, **kw)
runtime.Session.report = slow_report
sys.argv = ["train.py"]
runpy.run_path("train.py", run_name="__main__")
'''


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY",
                 "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    for name in [k for k in os.environ if k.startswith("GPUPOOL_")]:
        monkeypatch.delenv(name)


@pytest.fixture(name="emu")
def emu_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KaggleEmulator]:
    """A running emulator; the provider finds a kaggle.json (the planted secret) in the config dir."""
    # Kaggle's image has torch on the PATH's python; here that is this interpreter's.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with KaggleEmulator("alice", SECRET, workdir=tmp_path / "emu", session_cap_seconds=60,
                        extra_env={"PATH": path}) as emulator:
        emulator.connect(monkeypatch)
        monkeypatch.delenv("KAGGLE_USERNAME")
        monkeypatch.delenv("KAGGLE_KEY")
        config_dir = tmp_path / "kaggle-config"
        config_dir.mkdir(exist_ok=True)
        (config_dir / "kaggle.json").write_text(json.dumps({"username": "alice", "key": SECRET}))
        yield emulator


class Sleeps(list):
    """Records the backoff waits instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fast_section(**overrides: object) -> dict:
    section = {"request_timeout": 2.0, "max_retries": 3, "backoff_base": 0.5, "backoff_max": 30,
               "dataset_poll_seconds": 0, "session_seconds": 60, "deadline_margin": 5,
               "startup_seconds": 1}
    section.update(overrides)
    return section


def make_pool(tmp: Path, **section: object) -> tuple[Pool, KaggleProvider, Sleeps]:
    sleeps = Sleeps()
    pool = Pool(PoolSettings(data_dir=tmp / "data", providers={"kaggle": fast_section(**section)}),
                clock=SystemClock(sleep=sleeps))
    provider = pool.provider("kaggle")
    assert isinstance(provider, KaggleProvider)
    return pool, provider, sleeps


def workdir(tmp: Path) -> Path:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    shutil.copy(EXAMPLE / "train.py", work / "train.py")
    (work / "slow_train.py").write_text(SLOW_TRAIN)
    return work


def spec(tmp: Path, run: str = "python slow_train.py", **overrides: object) -> ExperimentSpec:
    data = {"name": "tiny-kaggle", "workdir": str(workdir(tmp)), "run": run,
            "providers": ["kaggle"], "checkpoint": {"interval": 1.0, "keep_last": 2},
            "limits": {"max_hops": 20, "retries_on_error": 1},
            "env": {**TINY, "TOTAL_STEPS": str(STEPS)}}
    data.update(overrides)
    return ExperimentSpec.model_validate(data)


def drive(pool: Pool, experiment_id: str, timeout: float = 100.0, on_tick=None) -> Experiment:
    scheduler = Scheduler(pool)
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        scheduler.reconcile_once(time.time())
        experiment = pool.state.experiment(experiment_id)
        if experiment.state.terminal:
            return experiment
        if on_tick is not None:
            on_tick()
        time.sleep(0.2)
    attempts = [(a.state, a.end_reason, a.step) for a in pool.state.attempts(experiment_id)]
    raise AssertionError(f"{experiment_id} still {pool.state.experiment(experiment_id)}: {attempts}")


def launch_for(pool: Pool, experiment: Experiment, attempt_id: str) -> Launch:
    return Launch(attempt_id=attempt_id, experiment_id=experiment.id, account="default",
                  spec=ExperimentSpec.model_validate(experiment.spec),
                  bundle=Path(experiment.bundle), store=pool.store_for(experiment.id),
                  restore=None, checkpoint_interval=1, now=time.time())


def checkpointed(session) -> bool:
    if session.root is None:
        return False
    return any((session.root / "working/gpupool/checkpoints").glob("ckpt-*/manifest.json"))


class CutFirstSession:
    """Cuts the first session at the emulator's time cap once it has checkpointed (so the test
    does not depend on how fast this machine imports torch), then lifts the cap again."""

    def __init__(self, emu: KaggleEmulator):
        self.emu, self.cut, self.lifted = emu, False, False

    def __call__(self) -> None:
        first = min(self.emu.sessions.values(), key=lambda s: s.id, default=None)
        if first is None or self.lifted:
            return
        if not self.cut and first.started is not None and checkpointed(first):
            self.emu.config.session_cap_seconds = time.monotonic() - first.started
            self.cut = True
        elif self.cut and first.done.is_set():
            self.emu.config.session_cap_seconds = 600
            self.lifted = True

    def wait(self, timeout: float = 60) -> None:
        give_up = time.monotonic() + timeout
        while not self.lifted and time.monotonic() < give_up:
            self()
            time.sleep(0.05)
        assert self.lifted, "the first session never checkpointed"


def model_weights(directory: Path) -> dict:
    import torch

    return torch.load(directory / "state.pt", weights_only=True)["model"]


def reference_weights(tmp: Path) -> dict:
    from gpupool.manifest import list_local

    session = tmp / "reference"
    env = {**os.environ, **TINY, "TOTAL_STEPS": str(STEPS), "GPUPOOL_SESSION_DIR": str(session),
           "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, env=env, check=True,
                   capture_output=True, timeout=120)
    return model_weights(session / "checkpoints" / list_local(session / "checkpoints")[0].name)


# -- units: slugs, metadata, status table, credentials -------------------------------------

@pytest.mark.parametrize("attempt", ["tiny-kaggle-3fa9c1-a1", "Ünïcode__Name--x-a12",
                                     "x" * 80 + "-a3", "---", "a" * 41 + "-a1"])
def test_slug_is_safe_short_and_deterministic(attempt: str) -> None:
    slug = kernel_slug("gpupool", attempt)
    assert slug == kernel_slug("gpupool", attempt)
    assert len(slug) <= 50 and slug.startswith("gpupool")
    assert all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in slug)
    assert "--" not in slug and not slug.endswith("-")


def test_long_slugs_of_different_attempts_differ() -> None:
    base = "y" * 60
    assert kernel_slug("gpupool", base + "-a1") != kernel_slug("gpupool", base + "-a2")


def test_metadata_is_private_gpu_and_holds_no_secret() -> None:
    told = marker("x-a1", code="alice/gpupool-code-1a2b3c", code_files={"code.gpupool": "ab"},
                  checkpoint=None, checkpoint_name=None, setup=None, run="python train.py",
                  env={"A": "1"}, session_seconds=600, margin=60)
    request = save_request(owner="alice", slug="gpupool-x-a1", script=render_script(told),
                           sources=["alice/gpupool-code-1a2b3c"], private=True,
                           accelerator="NvidiaTeslaT4", internet=False, timeout_seconds=3600)
    body = type(request).to_dict(request)
    assert body["isPrivate"] is True and body["enableGpu"] is True
    assert body["machineShape"] == "NvidiaTeslaT4" and body["kernelType"] == "script"
    assert body["datasetDataSources"] == ["alice/gpupool-code-1a2b3c"]
    assert SECRET not in json.dumps(body) and "KAGGLE_KEY" not in body["text"]
    compile(body["text"], "kernel.py", "exec")
    assert script_marker(body["text"]) == told  # the script carries the attempt's marker


def test_private_unless_public_is_explicit(tmp_path: Path) -> None:
    assert KaggleProvider.Config.model_validate({}).public is False
    with pytest.raises(Exception, match="extra"):
        KaggleProvider.Config.model_validate({"is_privat": False})


def test_status_table_covers_every_kernel_worker_status() -> None:
    from kagglesdk.kernels.types.kernels_enums import KernelWorkerStatus

    assert set(STATUS_MAP) == {s.name for s in KernelWorkerStatus}
    assert STATUS_MAP["QUEUED"] == AttemptState.SUBMITTED
    assert STATUS_MAP["RUNNING"] == AttemptState.RUNNING
    assert STATUS_MAP["CANCEL_ACKNOWLEDGED"] == AttemptState.CANCELLED


def test_credentials_sources_and_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CredentialsError, match="kaggle.json"):
        find_credentials()
    monkeypatch.setenv("KAGGLE_USERNAME", "bob")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    found = find_credentials()
    assert (found.source, found.username) == ("KAGGLE_USERNAME/KAGGLE_KEY", "bob")
    assert SECRET not in repr(found)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok-" + SECRET)
    assert find_credentials().source == "KAGGLE_API_TOKEN"


def test_check_credentials_says_where_and_never_echoes(emu: KaggleEmulator, tmp_path: Path) -> None:
    _, provider, _ = make_pool(tmp_path)
    ok, hint = provider.check_credentials()
    assert ok and "kaggle.json" in hint and "alice" in hint and SECRET not in hint
    emu.credentials["alice"] = "rotated"
    _, fresh, _ = make_pool(tmp_path / "again")
    ok, hint = fresh.check_credentials()
    assert not ok and SECRET not in hint


def test_quota_from_api_then_ledger_fallback(emu: KaggleEmulator, tmp_path: Path) -> None:
    emu.gpu_seconds_finished = 3600
    _, provider, sleeps = make_pool(tmp_path)
    quota = provider.quota("default", time.time(), charged=0)
    assert quota is not None and quota.source == "api"
    assert quota.used_seconds == pytest.approx(3600, abs=1) and quota.total_seconds == 30 * 3600
    emu.inject("GetAcceleratorQuotaStatistics", Fault.http(500), times=10)
    now = time.time() + 3600  # past the cache
    fallback = provider.quota("default", now, charged=1234)
    assert fallback is not None and fallback.source == "ledger" and fallback.used_seconds == 1234
    start = provider.quota_window_start(now)
    assert time.gmtime(start).tm_wday == 5 and fallback.resets_at == start + 7 * 86400
    assert len(sleeps) == 3  # retried, then fell back


# -- end to end -----------------------------------------------------------------------------

def test_capped_session_resumes_elsewhere_bit_identical(emu: KaggleEmulator, tmp_path: Path) -> None:
    pool, provider, _ = make_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path))
    cutter = CutFirstSession(emu)
    done = drive(pool, experiment.id, on_tick=cutter)
    assert cutter.lifted
    assert done.state == ExperimentState.SUCCEEDED, done
    attempts = pool.state.attempts(experiment.id)
    assert len(attempts) >= 2 and attempts[0].state == AttemptState.LOST
    assert attempts[1].checkpoint_in is not None and attempts[1].step_start > 0
    assert attempts[-1].state == AttemptState.SUCCEEDED
    assert all(s.request["isPrivate"] for s in emu.sessions.values())
    assert all(d.is_private for d in emu.datasets.values())
    store = pool.store_for(experiment.id)
    latest = store.latest()
    assert latest is not None and latest.step == STEPS and latest.final
    final = model_weights(store.download(latest, tmp_path / "final"))
    reference = reference_weights(tmp_path)
    import torch

    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)
    assert "resumed from step" in provider.logs(attempts[1])
    assert_no_secret_anywhere(emu, pool, tmp_path)


def assert_no_secret_anywhere(emu: KaggleEmulator, pool: Pool, tmp: Path) -> None:
    needle = SECRET.encode()
    for session in emu.sessions.values():
        assert needle not in json.dumps(session.request).encode()
        assert needle not in json.dumps(session.log).encode()
        for path in session.outputs.values():
            assert needle not in path.read_bytes()
    for dataset in emu.datasets.values():
        for version in dataset.versions:
            assert all(needle not in data for data in version.files.values())
    for blob in emu.blobs.values():
        assert needle not in blob.data
    for path in (pool.data_dir).rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path


def test_resubmit_after_crash_finds_the_pushed_kernel(emu: KaggleEmulator, tmp_path: Path) -> None:
    pool, provider, _ = make_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path, run="python -c 'print(1)'"))
    Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    shutil.rmtree(provider.data_dir / "attempts")  # the scheduler's host lost its records
    again = provider.submit(launch_for(pool, experiment, attempt.id))
    assert again.remote_id == attempt.remote_id
    assert len(emu.sessions) == 1 and len(emu.datasets) == 1  # nothing pushed twice (its code)


# -- faults ---------------------------------------------------------------------------------

def test_429_retry_after_and_500s_are_retried(emu: KaggleEmulator, tmp_path: Path) -> None:
    pool, provider, sleeps = make_pool(tmp_path)
    emu.inject("SaveKernel", Fault.rate_limit(7))
    emu.inject("GetDatasetStatus", Fault.http(500), Fault.http(503))
    experiment = pool.submit(spec(tmp_path, run="python -c 'print(1)'"))
    report = Scheduler(pool).reconcile_once(time.time())
    assert report.placed, report
    assert 7.0 in sleeps  # Retry-After honoured exactly
    backoffs = [s for s in sleeps if s not in (0, 7.0)]  # 0: the dataset-ready poll
    assert len(backoffs) == 2 and all(s <= 1.0 for s in backoffs)
    assert len(emu.sessions) == 1  # the rate-limited push was not doubled
    assert drive(pool, experiment.id).state == ExperimentState.SUCCEEDED


def test_long_retry_after_raises_rate_limited(emu: KaggleEmulator, tmp_path: Path) -> None:
    _, provider, sleeps = make_pool(tmp_path)
    emu.inject("GetAcceleratorQuotaStatistics", Fault.rate_limit(3600))
    with pytest.raises(RateLimited) as caught:
        provider.remote.quota()
    assert caught.value.retry_after == 3600 and not sleeps


def test_hanging_request_times_out_and_is_retried(emu: KaggleEmulator, tmp_path: Path) -> None:
    _, provider, sleeps = make_pool(tmp_path, request_timeout=0.5)
    emu.inject("GetAcceleratorQuotaStatistics", Fault.hang(5))
    started = time.monotonic()
    assert provider.remote.quota().total_seconds == 30 * 3600
    assert time.monotonic() - started < 3 and len(sleeps) == 1


def test_push_refusal_is_unavailable_and_cools_down(emu: KaggleEmulator, tmp_path: Path) -> None:
    emu.config.max_gpu_sessions = 0
    pool, _, _ = make_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path))
    report = Scheduler(pool).reconcile_once(time.time())
    assert not report.placed
    attempt = pool.state.attempts(experiment.id)[0]
    assert attempt.state == AttemptState.UNAVAILABLE
    assert "Maximum batch GPU session count" in (attempt.end_reason or "")
    assert pool.state.cooldowns()[("kaggle", "default")].in_force(time.time())
    assert pool.state.experiment(experiment.id).state == ExperimentState.PENDING
    Scheduler(pool).reconcile_once(time.time())
    assert len(pool.state.attempts(experiment.id)) == 1  # cooled down: not tried again


def test_kernel_error_retried_then_failed_with_log_tail(emu: KaggleEmulator, tmp_path: Path) -> None:
    pool, provider, _ = make_pool(tmp_path)
    run = "python -c \"import sys; print('boom: the-tail-marker'); sys.exit(3)\""
    experiment = pool.submit(spec(tmp_path, run=run))
    done = drive(pool, experiment.id, timeout=60)
    assert done.state == ExperimentState.FAILED
    attempts = pool.state.attempts(experiment.id)
    assert len(attempts) == 2 and all(a.state == AttemptState.FAILED for a in attempts)
    assert all(s.status == "ERROR" for s in emu.sessions.values())
    assert "the-tail-marker" in (done.message or "")


def test_broken_download_publishes_nothing_until_it_works(emu: KaggleEmulator, tmp_path: Path) -> None:
    pool, provider, _ = make_pool(tmp_path, max_retries=1)
    experiment = pool.submit(spec(tmp_path))
    Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    CutFirstSession(emu).wait()
    session = emu.wait(next(iter(emu.sessions)), timeout=10)
    assert session.status == "ERROR" and "maximum run time" in session.failure_message
    assert any(name.endswith("manifest.json") for name in session.outputs)
    store = pool.store_for(experiment.id)
    emu.inject("download", Fault.truncate(), times=2)
    with pytest.raises(ProviderError):
        provider.collect(pool.state.attempt(attempt.id), store)
    assert store.list() == []
    published = provider.collect(pool.state.attempt(attempt.id), store)
    assert published and store.latest() is not None


def test_quota_refusal_says_when_the_quota_refreshes(emu: KaggleEmulator, tmp_path: Path) -> None:
    emu.gpu_seconds_finished = emu.config.gpu_quota_seconds
    pool, provider, _ = make_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path))
    with pytest.raises(ProviderUnavailable, match="GPU quota") as caught:
        provider.submit(launch_for(pool, experiment, f"{experiment.id}-a1"))
    assert caught.value.until == pytest.approx(emu.config.quota_refresh_time.timestamp(), abs=1)
    assert not emu.sessions
