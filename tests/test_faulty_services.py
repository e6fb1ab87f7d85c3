"""Faulty services at random (fixed seed): the Kaggle and Drive emulators answer 429 with
Retry-After, 500/503, reset connections, hang past the client's timeout, truncate downloads, add
unknown fields and unknown status strings, while gpupool runs experiments and a few hundred
provider operations. Counted: operations that eventually succeeded, work lost, attempts
duplicated (must be 0). Backoff sleeps are recorded, never slept; hangs are bounded."""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from gpupool.clock import SystemClock
from gpupool.errors import GpupoolError
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from gpupool_providers.kaggle import KaggleProvider
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401
from tests.emulators.drive import faults as drive_faults
from tests.emulators.kaggle import Fault, KaggleEmulator
from tests.providers.colab_support import make_provider

SEED = 20240607
TRAIN = '''\
"""Stdlib-only resumable training: 10 ms a step, a checkpoint every 0.3 s."""
import json, os, time
from gpupool import runtime
session = runtime.session()
total = int(os.environ["TOTAL_STEPS"])
step = json.loads((session.restore_dir / "state.json").read_text())["step"] if session.restore_dir else 0
while step < total:
    time.sleep(0.01)
    step += 1
    session.report(step, total=total)
    if session.checkpoint_due() or step == total:
        with session.checkpoint(step, final=step == total) as folder:
            (folder / "state.json").write_text(json.dumps({"step": step}))
session.complete(step)
'''


def kaggle_faults(rng: random.Random) -> Fault:
    return rng.choice([
        Fault.rate_limit(rng.choice([1, 2])), Fault.http(500), Fault.http(503), Fault.reset(),
        Fault.hang(1.0), Fault.truncate(), Fault.extra_fields(surprise={"new": [1, 2]}, v2=True),
    ])


KAGGLE_ENDPOINTS = ("GetKernelSessionStatus", "ListKernelSessionOutput", "download",
                    "GetAcceleratorQuotaStatistics", "SaveKernel", "GetKernel", "GetDatasetStatus",
                    "StartBlobUpload", "upload", "CreateDataset")


class Tally(Counter):
    def print(self, what: str) -> None:
        print(f"\n{what}: " + ", ".join(f"{k}={v}" for k, v in sorted(self.items())))


@pytest.fixture
def emu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    for name in [k for k in os.environ if k.startswith("GPUPOOL_")]:
        monkeypatch.delenv(name)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with KaggleEmulator("alice", "alice-key", workdir=tmp_path / "emu", session_cap_seconds=600,
                        max_hang_seconds=1.5, extra_env={"PATH": path}) as emulator:
        emulator.connect(monkeypatch)
        yield emulator


def kaggle_pool(tmp: Path) -> tuple[Pool, KaggleProvider, list[float]]:
    section = {"request_timeout": 0.4, "max_retries": 4, "backoff_base": 0.5, "backoff_max": 30,
               "dataset_poll_seconds": 0, "session_seconds": 600, "deadline_margin": 1,
               "startup_seconds": 1, "push_settle_seconds": 5,  # > the longest stall (1.5 s)
               "keep_remote_objects": True}  # the finished kernels are polled again below
    sleeps: list[float] = []
    pool = Pool(PoolSettings(data_dir=tmp / "data", providers={"kaggle": section}),
                clock=SystemClock(sleep=sleeps.append))
    provider = pool.provider("kaggle")
    assert isinstance(provider, KaggleProvider)
    return pool, provider, sleeps


def spec(tmp: Path, steps: int) -> ExperimentSpec:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    (work / "train.py").write_text(TRAIN)
    return ExperimentSpec.model_validate({
        "name": "faulty", "workdir": str(work), "run": "python train.py", "providers": ["kaggle"],
        "resources": {"gpu": "any"}, "checkpoint": {"interval": 0.3, "keep_last": 2},
        "limits": {"max_hops": 10, "retries_on_error": 3}, "env": {"TOTAL_STEPS": str(steps)}})


def eventually(op, tally: Tally, tries: int = 4):  # type: ignore[no-untyped-def]
    """Call ``op`` as the scheduler would: a gpupool error is retried at the next step."""
    tally["operations"] += 1
    for _ in range(tries):
        try:
            result = op()
        except GpupoolError:
            tally["errors surfaced (retried next step)"] += 1
            continue
        tally["succeeded"] += 1
        return result
    tally["gave up"] += 1
    return None


def test_kaggle_under_random_faults(emu: KaggleEmulator, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    pool, provider, sleeps = kaggle_pool(tmp_path)
    idents = [pool.submit(spec(tmp_path, steps=60)).id for _ in range(2)]
    scheduler, tally, skew = Scheduler(pool), Tally(), 0.0
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        for _ in range(2):  # faults on whatever the step calls next
            emu.inject(rng.choice(KAGGLE_ENDPOINTS), kaggle_faults(rng))
            tally["faults injected"] += 1
        report = scheduler.reconcile_once(time.time() + skew)
        tally["problems reported (retried next step)"] += len(report.problems)
        waits = [pool.state.experiment(i).not_before or 0 for i in report.waiting]
        if waits:  # a refused submit cooled Kaggle down: let that time pass
            skew += max(0.0, max(waits) - time.time() - skew) + 1
        if all(pool.state.experiment(i).state.terminal for i in idents):
            break
        time.sleep(0.1)
    emu.faults.clear()
    attempts = [a for i in idents for a in pool.state.attempts(i)]
    pushed = Counter((s.slug, s.version) for s in emu.sessions.values())
    per_attempt = Counter(a.remote_id for a in attempts if a.remote_id)
    tally["attempts"] = len(attempts)
    tally["experiments finished"] = sum(pool.state.experiment(i).state == ExperimentState.SUCCEEDED
                                        for i in idents)
    tally["attempts duplicated"] = sum(n - 1 for n in per_attempt.values()) + sum(
        n - 1 for n in pushed.values()) + max(0, len(emu.sessions) - len(attempts))
    tally["work lost (steps)"] = sum(60 - pool.state.experiment(i).last_step
                                     for i in idents if pool.state.experiment(i).last_step)
    # a few hundred more operations on the finished sessions: poll, outputs, collect, quota
    done = [a for a in attempts if a.state == AttemptState.SUCCEEDED]
    assert done, [(a.state, a.end_reason, a.detail) for a in attempts] + [
        (s.status, s.failure_message, s.log[-3:]) for s in emu.sessions.values()]
    operations = [
        lambda: provider.quota("default", time.time() + 3600 * rng.random(), 0),
        lambda: provider.poll(rng.choice(done), time.time()),
        lambda: provider.collect(rng.choice(done), pool.store_for(rng.choice(done).experiment_id)),
        lambda: provider.remote.status(provider.owner, provider._record_of(done[0])["slug"], None),
    ]
    for _ in range(240):
        if rng.random() < 0.6:
            emu.inject(rng.choice(KAGGLE_ENDPOINTS[:4]), kaggle_faults(rng))
            tally["faults injected"] += 1
        if rng.random() < 0.05:
            emu.inject("GetKernelSessionStatus", Fault.status("PAUSED_FOR_MAINTENANCE"))
            tally["faults injected"] += 1
        eventually(rng.choice(operations), tally)
        emu.faults.clear()
    tally["backoff sleeps recorded"] = len(sleeps)
    tally.print("kaggle")
    assert tally["experiments finished"] == len(idents)
    assert tally["attempts duplicated"] == 0
    assert tally["work lost (steps)"] == 0
    assert tally["operations"] >= 240 and tally["gave up"] == 0
    assert all(s <= 30 for s in sleeps)


def test_unknown_kaggle_status_keeps_polling(emu: KaggleEmulator, tmp_path: Path) -> None:
    pool, provider, _ = kaggle_pool(tmp_path)
    experiment = pool.submit(spec(tmp_path, steps=5))
    Scheduler(pool).reconcile_once(time.time())
    attempt = pool.state.attempts(experiment.id)[0]
    emu.inject("GetKernelSessionStatus", Fault.status("SOMETHING_NEW"))
    result = provider.poll(attempt, time.time())
    assert result.state.active and "not understood" in (result.message or "")


# -- Drive ------------------------------------------------------------------------------------

DRIVE_FAULTS = (drive_faults.rate_limit, drive_faults.too_many_requests, drive_faults.server_error,
                drive_faults.service_unavailable, drive_faults.connection_reset,
                lambda: drive_faults.hang(1.0), drive_faults.truncated)
DRIVE_ENDPOINTS = ("files.list", "files.insert", "files.download", "upload.chunk", "files.get")


def test_drive_client_under_random_faults(drive_emulator, tmp_path: Path) -> None:  # noqa: F811
    rng = random.Random(SEED)
    sleeps: list[float] = []
    colab = make_provider(drive_emulator, tmp_path, SystemClock(sleep=sleeps.append), request_timeout=0.4)
    drive = colab.drive()
    assert drive.auth.http_timeout == 0.4  # PyDrive2 sets none: a stalled request would block
    folder = drive.folder_path("gpupool", "faulty")
    tally, written = Tally(), {}
    for i in range(240):
        if rng.random() < 0.6:
            drive_emulator.inject(rng.choice(DRIVE_ENDPOINTS), rng.choice(DRIVE_FAULTS)())
            tally["faults injected"] += 1
        if rng.random() < 0.05:
            drive_emulator.inject("upload.chunk", drive_faults.cut_upload(after_bytes=1000))
            tally["faults injected"] += 1
        kind = rng.choice(["upload", "list", "download", "find"]) if written else "upload"
        if kind == "upload":
            title, data = f"file-{i}'s \\ {i}.bin", os.urandom(rng.randint(1, 600 * 1024))
            item = eventually(partial(drive.upload, folder, title, data), tally)
            if item is not None:
                written[item["id"]] = (title, data)
        elif kind == "list":
            eventually(lambda: drive.children(folder), tally)
        elif kind == "find":
            file_id, (title, _) = rng.choice(sorted(written.items()))
            found = eventually(partial(drive.find, folder, title), tally)
            assert found is None or found["id"] == file_id
        else:
            file_id, (_, data) = rng.choice(sorted(written.items()))
            target = tmp_path / "dl" / file_id
            if eventually(partial(drive.download, file_id, target), tally) is not None:
                assert target.read_bytes() == data, "a download came back corrupt"
        drive_emulator.faults.clear()
    on_drive = [f for f in drive_emulator.state.files.values()
                if f.parents and folder in f.parents and not f.trashed]
    titles = Counter(f.title for f in on_drive)
    tally["files lost"] = sum(1 for file_id in written if file_id not in drive_emulator.state.files)
    tally["uploads duplicated"] = sum(n - 1 for n in titles.values())
    tally["backoff sleeps recorded"] = len(sleeps)
    tally.print("drive")
    assert tally["operations"] >= 240 and tally["gave up"] == 0
    assert tally["files lost"] == 0 and tally["uploads duplicated"] == 0
    assert all(data == drive_emulator.state.get(fid).content for fid, (_, data) in written.items())
