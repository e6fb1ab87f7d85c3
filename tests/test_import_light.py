"""`import gpupool`, the CLI module and `gpupool --help` load no provider SDK and no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "kaggle", "kagglesdk", "pydrive2", "googleapiclient")

PROBE = """
import sys
{body}
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
print('LOADED:' + ','.join(heavy))
"""


def loaded_after(body: str) -> tuple[list[str], str]:
    code = PROBE.format(body=body, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    line = [x for x in result.stdout.splitlines() if x.startswith("LOADED:")][-1]
    names = [m for m in line[len("LOADED:"):].split(",") if m]
    return names, result.stdout


def test_probe_detects_a_heavy_import():
    """Guard against a probe that can never fail: a module we know is installed shows up."""
    pytest.importorskip("torch")
    names, _ = loaded_after("import torch")
    assert "torch" in names


def test_import_gpupool_and_cli_is_light():
    names, _ = loaded_after("import gpupool, gpupool.cli")
    assert names == []


def test_help_is_light():
    body = (
        "from gpupool.cli import cli\n"
        "try:\n"
        "    cli.main(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    names, out = loaded_after(body)
    assert names == []
    assert "Usage" in out and "run" in out


@pytest.mark.parametrize("command", ["run", "status", "providers", "daemon"])
def test_subcommand_help_is_light(command):
    body = (
        "from gpupool.cli import cli\n"
        f"cli.main([{command!r}, '--help'], standalone_mode=False)\n"
    )
    names, out = loaded_after(body)
    assert names == []
    assert "Usage" in out


def test_python_m_gpupool_help_runs():
    result = subprocess.run([sys.executable, "-m", "gpupool", "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Quick start" in result.stdout
