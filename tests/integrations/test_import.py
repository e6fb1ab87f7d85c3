"""The integrations are imported only when used: gpupool and its integrations package stay light,
and the session bundle ships them so a Kaggle or Colab session can import them."""

from __future__ import annotations

import ast
import subprocess
import sys

from gpupool.bundle import runtime_sources
from tests.helpers import ROOT

FRAMEWORKS = ("torch", "transformers", "lightning", "pytorch_lightning", "accelerate")


def frameworks_loaded_by(body: str) -> list[str]:
    code = (f"import sys\n{body}\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def test_the_probe_sees_a_framework_import():
    assert "transformers" in frameworks_loaded_by("import transformers")


def test_gpupool_and_the_integrations_package_import_no_framework():
    assert frameworks_loaded_by("import gpupool, gpupool.runtime, gpupool.cli, gpupool.integrations") == []


def test_the_session_bundle_ships_the_integrations():
    shipped = runtime_sources()
    for name in ("__init__", "_pacing", "transformers", "lightning"):
        assert f"gpupool/integrations/{name}.py" in shipped
