"""The plain-script example (configs/examples/plain) on the Kaggle emulator: its checkpoint
folder is snapshotted inside the kernel, collected through the kernel's output like runtime
checkpoints, restored into the next kernel, and the final model comes back with `pull`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.manifest import list_local
from gpupool.spec import ExperimentSpec
from tests.emulators.kaggle import KaggleEmulator
from tests.providers.test_kaggle import drive, emu_fixture, isolated_env, make_pool  # noqa: F401 - fixtures

PLAIN = Path(__file__).resolve().parents[2] / "configs" / "examples" / "plain"
ENV = {"TOTAL_STEPS": "600", "SAVE_EVERY": "100", "STEP_SECONDS": "0.01", "OMP_NUM_THREADS": "1"}


def plain_spec(tmp: Path) -> ExperimentSpec:
    work = tmp / "work"
    shutil.copytree(PLAIN, work)
    return ExperimentSpec.model_validate({
        "name": "plain-kaggle", "workdir": str(work), "providers": ["kaggle"],
        "run": "python train.py {{resume: --resume checkpoints/last.pt}}",
        "checkpoint": {"path": "checkpoints", "interval": "0.5s", "settle": "0.3s"},
        "outputs": ["final", "runs"], "limits": {"max_hops": 10, "retries_on_error": 5}, "env": ENV,
    })


class CutAfterSnapshot:
    """Cuts the first kernel at the emulator's cap once it published a snapshot holding the
    script's checkpoint (not on a clock), then lifts the cap."""

    def __init__(self, emulator: KaggleEmulator):
        self.emu, self.cut, self.lifted = emulator, False, False

    def __call__(self) -> None:
        first = min(self.emu.sessions.values(), key=lambda s: s.id, default=None)
        if first is None or self.lifted or first.root is None:
            return
        snapshots = list_local(first.root / "working" / "gpupool" / "checkpoints")
        holds = any("checkpoints/last.pt" in {f.path for f in m.files} for m in snapshots)
        if not self.cut and first.started is not None and holds:
            self.emu.config.session_cap_seconds = time.monotonic() - first.started
            self.cut = True
        elif self.cut and first.done.is_set():
            self.emu.config.session_cap_seconds = 600
            self.lifted = True


def test_plain_script_hops_between_kernels_bit_identical(emu: KaggleEmulator, tmp_path: Path) -> None:
    import torch

    reference = tmp_path / "reference"
    shutil.copytree(PLAIN, reference)
    subprocess.run([sys.executable, "train.py"], cwd=reference, env={**os.environ, **ENV}, check=True,
                   capture_output=True, timeout=300)
    pool, provider, _ = make_pool(tmp_path)
    experiment = pool.submit(plain_spec(tmp_path))
    cutter = CutAfterSnapshot(emu)
    done = drive(pool, experiment.id, timeout=300, on_tick=cutter)
    assert cutter.lifted and done.state == ExperimentState.SUCCEEDED, done
    attempts = pool.state.attempts(experiment.id)
    assert attempts[0].state == AttemptState.LOST and attempts[1].checkpoint_in is not None
    assert "resumed from checkpoints/last.pt" in provider.logs(attempts[-1])
    store = pool.store_for(experiment.id)
    store.pull(store.pick(), tmp_path / "pulled")
    final = torch.load(tmp_path / "pulled" / "final" / "model.pt", weights_only=True)
    expected = torch.load(reference / "final" / "model.pt", weights_only=True)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert len(list((tmp_path / "pulled" / "runs").glob("loss-from-step-*.csv"))) >= 2
