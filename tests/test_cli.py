"""The command line as a user meets it: clear errors and exit codes, JSON for scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import write_experiment


def gpupool(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "GPUPOOL_DATA_DIR": str(data_dir), "GPUPOOL_CONFIG": "", **env}
    full_env.pop("GPUPOOL_CONFIG")
    return subprocess.run([sys.executable, "-m", "gpupool", *args], env=full_env, text=True,
                          capture_output=True, timeout=120)


def test_unwritable_store_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store should be")
    path = write_experiment(tmp_path, steps=10, providers=["local"])
    result = gpupool(["run", "--detach", str(path)], tmp_path / "data",
                     GPUPOOL_STORE_URL=str(blocker / "store"))
    assert result.returncode == 1
    assert "is not writable" in result.stderr and "store_url" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_unknown_provider_is_a_clear_error(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, steps=10, providers=["paperspace"])
    result = gpupool(["run", "--detach", str(path)], tmp_path / "data")
    assert result.returncode == 2
    assert "unknown provider 'paperspace'" in result.stderr and "Traceback" not in result.stderr


def test_detached_run_then_status_logs_and_cancel(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_experiment(tmp_path, steps=100_000, providers=["local"])
    submitted = gpupool(["run", "--detach", str(path)], data)
    assert submitted.returncode == 0, submitted.stderr
    rows = json.loads(gpupool(["status", "--json"], data).stdout)
    assert [r["name"] for r in rows] == ["tiny-mlp"]
    ident = rows[0]["id"]
    assert rows[0]["state"] == "running" and rows[0]["provider"] == "local"
    detail = json.loads(gpupool(["status", ident[:8], "--json"], data).stdout)
    assert detail["attempts"][0]["provider"] == "local"
    deadline = time.monotonic() + 60
    while "[gpupool] run: python train.py" not in (log := gpupool(["logs", "tiny-mlp"], data).stdout):
        assert time.monotonic() < deadline, log
        time.sleep(0.5)
    cancelled = gpupool(["cancel", ident], data)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    final = json.loads(gpupool(["status", ident, "--json"], data).stdout)
    assert final["state"] == "cancelled"
    assert [a["state"] for a in final["attempts"]] == ["cancelled"]


def test_status_of_unknown_experiment(tmp_path: Path) -> None:
    result = gpupool(["status", "nope"], tmp_path / "data")
    assert result.returncode == 3 and "no experiment 'nope'" in result.stderr


def test_providers_json_lists_local_as_usable(tmp_path: Path) -> None:
    result = gpupool(["providers", "--json"], tmp_path / "data")
    rows = {r["provider"]: r for r in json.loads(result.stdout)}
    assert rows["local"]["usable"] is True
    assert {"kaggle", "colab"} <= rows.keys()


@pytest.mark.parametrize(
    "command", ["run", "watch", "status", "logs", "cancel", "daemon", "providers", "quota"])
def test_help_teaches(command: str, tmp_path: Path) -> None:
    result = gpupool([command, "--help"], tmp_path / "data")
    assert result.returncode == 0 and "Usage:" in result.stdout and len(result.stdout) > 150


def test_commands_started_together_on_a_new_data_folder_all_succeed(tmp_path: Path) -> None:
    """Issue 12 (kind 9): the first migration ran in each of them and most failed with
    `table alembic_version already exists`; it is serialized now."""
    env = {**os.environ, "GPUPOOL_DATA_DIR": str(tmp_path / "fresh")}
    env.pop("GPUPOOL_CONFIG", None)
    commands = [subprocess.Popen([sys.executable, "-m", "gpupool", "status", "--json"], env=env,
                                 text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(3)]
    results = [(c.communicate(timeout=120), c.returncode) for c in commands]
    assert [code for _, code in results] == [0, 0, 0], results
    assert all(json.loads(out) == [] and "Traceback" not in err for (out, err), _ in results)
