"""The runtime shipped into remote sessions (Kaggle, Colab) is complete: every in-session
module imports from the extracted archive alone, not from the installed gpupool."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from gpupool.bundle import pack_runtime

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import gpupool.bootstrap, gpupool.manifest, gpupool.runtime, gpupool.snapshot, gpupool.torch
for module in (gpupool.bootstrap, gpupool.runtime, gpupool.snapshot, gpupool.torch):
    assert module.__file__.startswith(sys.argv[1]), module.__file__
print("ok", gpupool.torch.save_training_state.__module__)
"""


def test_shipped_runtime_imports_every_session_module(tmp_path: Path) -> None:
    archive = tmp_path / "runtime.tar.gz"
    pack_runtime(archive)
    target = tmp_path / "runtime"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(target, filter="data")
    assert "gpupool/torch/__init__.py" in names
    result = subprocess.run([sys.executable, "-c", PROBE, str(target)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok gpupool.torch")


def test_example_resumed_from_its_final_checkpoint_completes(tmp_path: Path) -> None:
    """A session cut after the last checkpoint but before complete() resumes at the last step:
    the example must finish (exit 0), not fail on a loss it never computed."""
    import os

    from gpupool.manifest import list_local
    from tests.helpers import EXAMPLE, ROOT, TINY_ENV

    def run(session: Path, restore: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **TINY_ENV, "TOTAL_STEPS": "3", "GPUPOOL_SESSION_DIR": str(session),
               "PYTHONPATH": str(ROOT)}
        env.pop("GPUPOOL_DEADLINE", None)
        if restore is not None:
            env["GPUPOOL_RESTORE_DIR"] = str(restore)
        return subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, env=env, capture_output=True,
                              text=True, timeout=300)

    first = run(tmp_path / "first")
    assert first.returncode == 0, first.stderr
    final = tmp_path / "first" / "checkpoints" / list_local(tmp_path / "first" / "checkpoints")[0].name
    again = run(tmp_path / "again", restore=final)
    assert again.returncode == 0, again.stderr
    assert "resumed from step 3" in again.stdout
