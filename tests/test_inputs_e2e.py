"""End to end with data (issue 11): an experiment with a generated 300 MB local input hops
Colab -> Kaggle -> local, as in test_three_providers.py, and its script checks the sha256 of the
data it reads in every session. The emulators' logs show the input uploaded exactly once per
provider across all attempts; a second experiment with the same input uploads nothing.

The input is a sparse file (300 MB of mostly holes, a few random blocks), so generating it
costs nothing; every cut is triggered by "the session has published a checkpoint" (the
Director of test_three_providers.py), never by a fixed time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml

from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.spec import load_experiment
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401 - fixture
from tests.emulators.kaggle import KaggleEmulator
from tests.helpers import drive_until_done
from tests.providers.colab_support import make_provider
from tests.test_three_providers import (  # noqa: F401 - fixtures
    Director,
    isolated_env,
    kaggle_emu,
    make_pool,
)

SIZE = 300 * 1024 * 1024
STEPS = 400
TRAIN = '''\
"""Reads the whole input and checks its sha256, then counts steps with checkpoints (slowed on
Colab and Kaggle, so a cut always lands before the end)."""
import hashlib, os, sys, time
from pathlib import Path
from gpupool import runtime

path = Path(os.environ["GPUPOOL_INPUT_DATA"])
digest = hashlib.sha256()
with open(path, "rb") as handle:
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
if digest.hexdigest() != os.environ["DATA_SHA256"]:
    sys.exit(f"DATA MISMATCH {digest.hexdigest()}")
print("DATA OK", os.environ["GPUPOOL_PROVIDER"], path.stat().st_size, flush=True)
session = runtime.session()
restore = session.restore_dir
step = int((restore / "step.txt").read_text()) if restore else 0
total = int(os.environ["TOTAL_STEPS"])
pause = 0.05 if os.environ["GPUPOOL_PROVIDER"] != "local" else 0.0
while step < total:
    step += 1
    time.sleep(pause)
    session.report(step, total=total)
    if step % 20 == 0 or step == total:
        with session.checkpoint(step, final=step == total) as folder:
            (folder / "step.txt").write_text(str(step))
    if session.should_stop():
        session.yield_session(step)
session.complete(step)
'''
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="finds the Colab kernel's process tree in /proc")


def generated_input(path: Path) -> str:
    """A sparse 300 MB file with a few random blocks; returns its sha256."""
    with open(path, "wb") as handle:
        handle.truncate(SIZE)
        for offset in (0, SIZE // 3, SIZE // 2, SIZE - 4096):
            handle.seek(offset)
            handle.write(os.urandom(4096))
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def experiment_file(tmp: Path, name: str, providers: list[str], sha256: str) -> Path:
    work = tmp / "code"
    work.mkdir(exist_ok=True)
    (work / "train.py").write_text(TRAIN)
    data = {"name": name, "workdir": str(work), "run": "python train.py",
            "providers": providers, "resources": {"gpu": "any"},
            "checkpoint": {"interval": "1s", "keep_last": 2},
            "limits": {"max_hops": 5, "retries_on_error": 0},
            "env": {"TOTAL_STEPS": str(STEPS), "DATA_SHA256": sha256},
            "inputs": {"data": str(tmp / "data.bin")}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def kaggle_input_uploads(emu: KaggleEmulator) -> int:
    return emu.uploads().count("data.tar")


def drive_input_uploads(drive) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for f in drive.state.files.values() if f.title == "data.bin")


def drive_uploaded_bytes(drive) -> int:  # type: ignore[no-untyped-def]
    """Bytes of every upload chunk the Drive emulator answered (its request log)."""
    return sum(int(r.headers.get("content-length") or 0) for r in drive.state.calls("upload.chunk"))


def once(uploaded: int) -> bool:
    """The input's bytes went up once: more than its size, less than twice (the rest is code,
    notebooks, checkpoints and status files, a few MB at most)."""
    return SIZE <= uploaded < SIZE + 64 * 1024 * 1024


def session_reads(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith(("DATA OK", "DATA MISMATCH"))]


def test_300mb_input_hops_colab_kaggle_local_uploaded_once_per_provider(
        drive_emulator, kaggle_emu, tmp_path):  # noqa: F811 - fixtures by name
    sha256 = generated_input(tmp_path / "data.bin")
    colab = make_provider(drive_emulator, tmp_path, heartbeat_seconds=0.5, heartbeat_timeout=5,
                          session_seconds=3600, deadline_margin=0,
                          estimated_gpu_hours_per_day=3 / 3600,
                          upload_chunk_bytes=32 * 1024 * 1024)
    pool = make_pool(tmp_path, colab)
    path = experiment_file(tmp_path, "with-data", ["colab", "kaggle", "local"], sha256)
    experiment = pool.submit(load_experiment(path), path)
    director = Director(pool, experiment.id, drive_emulator, kaggle_emu, tmp_path)
    try:
        done = drive_until_done(pool, experiment.id, timeout=400, on_tick=director)
    finally:
        for attempt in pool.state.attempts(experiment.id):
            print(attempt)
    attempts = pool.state.attempts(experiment.id)
    history = [(a.provider, a.state) for a in attempts]
    assert done.state == ExperimentState.SUCCEEDED, (done, history)
    assert [a.provider for a in attempts] == ["colab", "kaggle", "local"], history
    assert attempts[-1].state == AttemptState.SUCCEEDED and done.last_step == STEPS

    # Every session read the whole input and found its hash.
    reads = {a.provider: session_reads(pool.provider(a.provider).logs(a)) for a in attempts}
    for provider in ("colab", "kaggle", "local"):
        assert reads[provider] == [f"DATA OK {provider} {SIZE}"], reads
    assert director.person is not None
    director.person.join(30)

    # Uploaded once per provider across all attempts.
    assert drive_input_uploads(drive_emulator) == 1 and once(drive_uploaded_bytes(drive_emulator))
    assert kaggle_input_uploads(kaggle_emu) == 1 and once(kaggle_emu.uploaded_bytes())

    # A second experiment with the same input uploads nothing, on either provider.
    kaggle_emu.config.gpu_quota_seconds = 30 * 3600  # a new week
    pool = make_pool(tmp_path, colab)  # a later run of gpupool: same data dir, fresh caches
    again = experiment_file(tmp_path, "same-data", ["kaggle", "local"], sha256)
    second = pool.submit(load_experiment(again), again)
    assert drive_until_done(pool, second.id, timeout=200).state == ExperimentState.SUCCEEDED
    (run,) = pool.state.attempts(second.id)
    assert run.provider == "kaggle"
    assert session_reads(pool.provider("kaggle").logs(run)) == [f"DATA OK kaggle {SIZE}"]
    colab.inputs().prepare(load_experiment(again))  # what a Colab attempt of it would ship
    assert kaggle_input_uploads(kaggle_emu) == 1 and drive_input_uploads(drive_emulator) == 1
    assert once(kaggle_emu.uploaded_bytes()) and once(drive_uploaded_bytes(drive_emulator))
