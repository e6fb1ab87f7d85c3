"""`gpupool status` says why an experiment waits and until when, and `gpupool quota` shows each
account's used/remaining/reset: Kaggle from the emulator's quota API, Colab as gpupool's estimate.

The waiting state comes from real providers: a Colab notebook nobody opened (Drive emulator)
and a Kaggle account whose weekly GPU quota is almost spent (Kaggle emulator).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpupool.cli import cli
from gpupool.lifecycle import AttemptState
from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.settings import load_settings
from gpupool.spec import ExperimentSpec
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401 - fixture
from tests.emulators.kaggle import KaggleEmulator
from tests.providers.colab_support import MLP, make_provider

HOUR = 3600.0
RESETS_IN = dt.timedelta(days=2, hours=3, minutes=30)  # "2d03h" for the whole test


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    for name in [k for k in os.environ if k.startswith("GPUPOOL_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def kaggle_emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[KaggleEmulator]:
    refresh = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + RESETS_IN
    with KaggleEmulator("alice", "alice-key", quota_refresh_time=refresh) as emulator:
        emulator.connect(monkeypatch)
        emulator.gpu_seconds_finished = 29.9 * HOUR  # 6 minutes left of 30 h
        yield emulator


def pool_file(tmp: Path) -> Path:
    path = tmp / "pool.yaml"
    path.write_text(yaml.safe_dump({"data_dir": "data", "providers": {
        "kaggle": {"request_timeout": 5.0, "max_retries": 1, "startup_seconds": 60},
        "colab": {"start_timeout": 1, "startup_seconds": 1},
        "local": {"enabled": False},
    }}))
    return path


def invoke(config: Path, *args: str) -> str:
    result = CliRunner(env={"COLUMNS": "300"}).invoke(cli, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture
def waiting(drive_emulator, kaggle_emu, tmp_path: Path) -> tuple[Path, str, float]:
    """An experiment whose Colab notebook was never opened and whose Kaggle quota is spent."""
    config = pool_file(tmp_path)
    colab = make_provider(drive_emulator, tmp_path, start_timeout=1)
    pool = Pool(load_settings(config), providers={"colab": colab})
    spec = ExperimentSpec(name="mlp-wait", workdir=MLP, run="python train.py",
                          providers=["colab", "kaggle"], checkpoint={"interval": "10m"})
    experiment = pool.submit(spec)
    scheduler = Scheduler(pool)
    start = time.time()
    scheduler.reconcile_once(start)  # the notebook goes to Drive; nobody opens it
    ended = start + 5
    report = scheduler.reconcile_once(ended)  # withdrawn; Colab cools down; Kaggle too small
    assert not report.problems, report.problems
    [attempt] = pool.state.attempts(experiment.id)
    assert attempt.state == AttemptState.UNAVAILABLE
    pool.close()
    return config, experiment.id, ended


def test_status_says_why_it_waits_and_until_when(waiting) -> None:
    config, ident, ended = waiting
    text = invoke(config, "status", ident)
    flat = " ".join(text.split())
    assert "pending" in flat
    assert "colab: notebook not opened in time (1 s) (retry in 1m00s)" in flat
    assert "kaggle: quota too small (6m00s left, resets in 2d03h)" in flat
    assert "next try: in " in flat

    data = json.loads(invoke(config, "status", ident, "--json"))
    assert data["state"] == "pending"
    assert data["waiting_until"] == pytest.approx(ended + 60)  # Colab's first back-off
    assert data["waiting_for"].split("; ") == [
        "colab: notebook not opened in time (1 s) (retry in 1m00s)",
        "kaggle: quota too small (6m00s left, resets in 2d03h)"]
    [attempt] = data["attempts"]
    assert attempt["provider"] == "colab" and attempt["state"] == "unavailable"
    assert "not opened in time" in attempt["ended_because"]

    listing = " ".join(invoke(config, "status").split())
    assert "quota too small" in listing and "next try in" in listing


def test_quota_json_per_account_with_its_source(waiting) -> None:
    config, _, _ = waiting
    rows = {row["provider"]: row for row in json.loads(invoke(config, "quota", "--json"))}
    kaggle = rows["kaggle"]
    assert kaggle["source"] == "api" and kaggle["account"] == "default"
    assert kaggle["used_hours"] == pytest.approx(29.9, abs=0.01)
    assert kaggle["total_hours"] == 30 and kaggle["remaining_hours"] == pytest.approx(0.1, abs=0.01)
    assert kaggle["resets_in"] == "2d03h"
    assert kaggle["resets_at"] == pytest.approx(time.time() + RESETS_IN.total_seconds(), abs=60)
    colab = rows["colab"]
    assert colab["source"] == "estimate" and colab["total_hours"] == 4.0
    assert colab["used_hours"] == 0 and colab["remaining_hours"] == 4.0  # the notebook never ran
    assert "local" not in rows  # disabled in the pool file

    table = invoke(config, "quota")
    assert "kaggle" in table and "0.1 h" in table and "2d03h" in table and "~" in table
