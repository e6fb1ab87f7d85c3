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
