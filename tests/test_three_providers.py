"""End to end across all three providers: one experiment starts on Colab (the generated notebook
run in a real Jupyter kernel against the Drive emulator), loses its runtime, continues on the
Kaggle emulator from the collected checkpoint, runs out of Kaggle GPU quota, and finishes on the
local provider, with final weights bit-identical to an uninterrupted run.

Every cut is triggered by "the session has published a checkpoint", never by a fixed time, so
the test holds on a loaded machine where importing torch takes seconds.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpupool.clock import SystemClock
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.settings import PoolSettings
from gpupool.spec import load_experiment
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401 - fixture
from tests.emulators.kaggle import KaggleEmulator
from tests.helpers import (
    EXAMPLE,
    assert_same_weights,
    drive_until_done,
    final_weights,
    reference_weights,
    write_experiment,
)
from tests.providers.colab_support import Person, make_provider

STEPS = 800
# The example script, slowed by a fixed sleep per step on Colab and Kaggle, so that neither can
# finish the run in the second or two between publishing its first checkpoint and being cut;
# the local session runs at full speed.
SLOW_TRAIN = '''\
import os, runpy, sys, time
from gpupool import runtime
if os.environ.get("GPUPOOL_PROVIDER") != "local":
    report = runtime.Session.report
    def slow_report(self, step, **kw):
        time.sleep(0.01)
        return report(self, step, **kw)
    runtime.Session.report = slow_report
sys.argv = ["train.py"]
runpy.run_path("train.py", run_name="__main__")
'''
QUOTA_REFRESH = dt.timedelta(days=2, hours=3)
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="finds the Colab kernel's process tree in /proc")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    for name in [k for k in os.environ if k.startswith(("GPUPOOL_", "KAGGLE_API"))]:
        monkeypatch.delenv(name)


@pytest.fixture
def kaggle_emu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KaggleEmulator]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    refresh = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + QUOTA_REFRESH
    with KaggleEmulator("alice", "alice-key", workdir=tmp_path / "kaggle-emu",
                        session_cap_seconds=600, quota_refresh_time=refresh,
                        extra_env={"PATH": path}) as emulator:
        emulator.connect(monkeypatch)
        yield emulator


def make_pool(tmp: Path, colab) -> Pool:
    kaggle = {"request_timeout": 5.0, "max_retries": 3, "backoff_base": 0.2, "backoff_max": 2,
              "dataset_poll_seconds": 0, "session_seconds": 600, "deadline_margin": 5,
              "startup_seconds": 1}
    settings = PoolSettings(data_dir=tmp / "data",
                            providers={"kaggle": kaggle, "local": {"gpus": "none"}})
    return Pool(settings, clock=SystemClock(sleep=lambda seconds: None), providers={"colab": colab})


def workdir(tmp: Path) -> Path:
    work = tmp / "code"
    work.mkdir()
    shutil.copy(EXAMPLE / "train.py", work / "train.py")
    (work / "slow_train.py").write_text(SLOW_TRAIN)
    return work


# -- the cuts ---------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def kill_kernels(work: Path) -> int:
    """SIGKILL the Jupyter kernel running in ``work`` and everything under it: the runtime is
    gone, as when Colab disconnects or recycles it."""
    children = _children()
    kernels = [pid for pid in children.get(os.getpid(), []) if _cwd(pid) == work.resolve()]
    doomed, todo = [], list(kernels)
    while todo:
        pid = todo.pop()
        doomed.append(pid)
        todo.extend(children.get(pid, []))
    for pid in doomed:  # the whole tree was listed first: nothing is reparented unseen
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(kernels)


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def on_drive(drive, folder_id: str) -> bool:
    """A complete checkpoint (manifest uploaded last) in an attempt's Drive folder."""
    state = drive.state
    for manifest in state.find(title="manifest.json"):
        ckpt = state.get(manifest.parents[0]) if manifest.parents else None
        parent = state.get(ckpt.parents[0]) if ckpt is not None and ckpt.parents else None
        if (parent is not None and parent.title == "checkpoints" and folder_id in parent.parents
                and not state.is_trashed(manifest)):
            return True
    return False


def in_kaggle_working(session) -> bool:
    if session.root is None:
        return False
    return any((session.root / "working/gpupool/checkpoints").glob("ckpt-*/manifest.json"))


class Director:
    """Plays the world between scheduler steps: a person runs the Colab notebook; once it has
    put a checkpoint on Drive its runtime dies; once the Kaggle session has checkpointed, the
    account's weekly GPU quota runs out (the emulator stops the session and its quota API says
    so)."""

    def __init__(self, pool: Pool, experiment_id: str, drive, kaggle: KaggleEmulator, tmp: Path):
        self.pool, self.experiment_id, self.drive, self.kaggle, self.tmp = (
            pool, experiment_id, drive, kaggle, tmp)
        self.person: Person | None = None
        self.colab_cut = self.kaggle_cut = False

    def __call__(self, now: float) -> None:
        current = self.pool.state.attempts(self.experiment_id)[-1]
        if current.provider == "colab" and current.url and self.person is None:
            self.person = Person(self.drive, current.url, self.tmp / "colab-session")
            self.person.start()
        elif current.provider == "colab" and self.person is not None and not self.colab_cut:
            record = self.pool.provider("colab").records.get(current.id)  # type: ignore[attr-defined]
            if on_drive(self.drive, record["folder_id"]):
                self.colab_cut = kill_kernels(self.person.work) > 0
        elif current.provider == "kaggle" and not self.kaggle_cut:
            session = next(iter(self.kaggle.sessions.values()), None)
            if session is not None and in_kaggle_working(session):
                self.kaggle.config.gpu_quota_seconds = self.kaggle.gpu_seconds_used()
                self.kaggle_cut = True


# -- the test ---------------------------------------------------------------------------------

def test_colab_then_kaggle_then_local_bit_identical(drive_emulator, kaggle_emu, tmp_path):
    # Colab publishes no quota: gpupool's estimate for the day (3 s here) is spent by the first
    # session, so the hop skips Colab rather than handing out another notebook.
    colab = make_provider(drive_emulator, tmp_path, heartbeat_seconds=0.5, heartbeat_timeout=5,
                          session_seconds=3600, deadline_margin=0,
                          estimated_gpu_hours_per_day=3 / 3600)
    pool = make_pool(tmp_path, colab)
    spec = load_experiment(write_experiment(tmp_path, steps=STEPS, workdir=str(workdir(tmp_path)),
                                            providers=["colab", "kaggle", "local"],
                                            run="python slow_train.py"))
    experiment = pool.submit(spec)
    director = Director(pool, experiment.id, drive_emulator, kaggle_emu, tmp_path)

    try:
        done = drive_until_done(pool, experiment.id, timeout=150, on_tick=director)
    finally:  # on failure, the attempts and the Kaggle sessions say where it stuck
        for attempt in pool.state.attempts(experiment.id):
            print(attempt)
        for session in kaggle_emu.sessions.values():
            print(session.status, session.failure_message, session.log[-10:])

    attempts = pool.state.attempts(experiment.id)
    history = [(a.provider, a.state) for a in attempts]
    assert done.state == ExperimentState.SUCCEEDED, (done, history)
    assert history == [("colab", AttemptState.LOST), ("kaggle", AttemptState.LOST),
                       ("local", AttemptState.SUCCEEDED)], [a.end_reason for a in attempts]
    colab_attempt, kaggle_attempt, local_attempt = attempts
    # Cut off: the test kills the kernel (no more heartbeats), unless on a slow machine the
    # notebook's own session cap stopped the trainer first. Either way the session was lost.
    assert ("no heartbeat from the notebook" in colab_attempt.end_reason
            or "training process was killed" in colab_attempt.end_reason), colab_attempt.end_reason
    assert "GPU quota exhausted" in kaggle_attempt.end_reason
    assert local_attempt.end_reason == "training completed"

    # Each attempt resumed from the checkpoint the previous one produced, and made progress.
    assert colab_attempt.checkpoint_in is None and colab_attempt.checkpoint_out
    assert kaggle_attempt.checkpoint_in == colab_attempt.checkpoint_out
    assert local_attempt.checkpoint_in == kaggle_attempt.checkpoint_out
    assert 0 < kaggle_attempt.step_start < local_attempt.step_start < STEPS
    assert done.hops == 2 and done.last_step == STEPS

    # Kaggle was skipped for want of quota (its API says so), not tried and refused.
    quota = pool.provider("kaggle").quota("default", time.time(), 0.0)
    assert quota is not None and quota.source == "api" and quota.remaining_seconds == 0
    assert len(kaggle_emu.sessions) == 1

    # The quota ledger charged every attempt exactly once, with its own duration.
    charges = ledger(pool)
    assert sorted(charges) == sorted(a.id for a in attempts)
    for attempt in attempts:
        assert charges[attempt.id] == pytest.approx(attempt.gpu_seconds)
    assert done.gpu_seconds == pytest.approx(sum(charges.values()))

    step, weights = final_weights(pool.store_for(experiment.id), tmp_path)
    assert step == STEPS
    assert_same_weights(weights, reference_weights(tmp_path, STEPS))
    assert director.person is not None
    director.person.join(30)  # its kernel died: papermill gives up on it


def ledger(pool: Pool) -> dict[str, float]:
    from gpupool import db

    with pool.state.engine.connect() as conn:
        rows = conn.execute(db.quota_ledger.select()).mappings().all()
    assert len({r["attempt_id"] for r in rows}) == len(rows)
    return {r["attempt_id"]: r["seconds"] for r in rows}

