"""Secrets: planted marker credentials never appear in any artefact a run produces — CLI output
(status, --json, providers, quota, logs), the state database, files under the data dir, kernels,
datasets and uploads on the emulator; kaggle.json that others can read is warned about.
(Notebooks on Drive: tests/providers/test_colab_provider.py; 0600 colab credentials:
tests/providers/test_colab_store.py; private kernel metadata: tests/providers/test_kaggle.py.)"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpupool.cli import cli
from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool_providers.kaggle.credentials import find_credentials
from tests.emulators.kaggle import KaggleEmulator
from tests.test_faulty_services import spec

KEY = "MARKER-kaggle-key-5d1e77"


@pytest.fixture
def emu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in [k for k in os.environ if k.startswith(("GPUPOOL_", "KAGGLE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with KaggleEmulator("alice", KEY, workdir=tmp_path / "emu", extra_env={"PATH": path}) as emulator:
        emulator.connect(monkeypatch)
        monkeypatch.delenv("KAGGLE_USERNAME")
        monkeypatch.delenv("KAGGLE_KEY")
        config = tmp_path / "kaggle-config"
        config.mkdir()
        (config / "kaggle.json").write_text(json.dumps({"username": "alice", "key": KEY}))
        (config / "kaggle.json").chmod(0o600)
        yield emulator


def test_no_credential_in_any_artefact_of_a_run(emu: KaggleEmulator, tmp_path: Path) -> None:
    section = {"request_timeout": 5, "dataset_poll_seconds": 0, "session_seconds": 600,
               "deadline_margin": 1, "startup_seconds": 1}
    pool = Pool(PoolSettings(data_dir=tmp_path / "data", providers={"kaggle": section}))
    experiment = pool.submit(spec(tmp_path, steps=20))
    scheduler = Scheduler(pool)
    give_up = time.monotonic() + 40
    while not pool.state.experiment(experiment.id).state.terminal and time.monotonic() < give_up:
        scheduler.reconcile_once(time.time())
        time.sleep(0.2)
    assert pool.state.experiment(experiment.id).state.terminal
    emu.credentials["alice"] = "rotated"  # now an error message would be the place to leak it
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                      "providers": {"kaggle": section}}))
    runner, outputs = CliRunner(), []
    for args in (["status"], ["status", "--json"], ["status", experiment.id],
                 ["status", experiment.id, "--json"], ["providers"], ["providers", "--json"],
                 ["quota"], ["quota", "--json"], ["logs", experiment.id]):
        result = runner.invoke(cli, ["--config", str(config), *args])
        outputs.append(result.output + repr(result.exception or ""))
    needle = KEY.encode()
    assert all(KEY not in text for text in outputs)
    artefacts = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.name == "state.db" for p in artefacts)
    for path in artefacts:  # state database, logs, records, checkpoints, bundles
        assert needle not in path.read_bytes(), path
    for session in emu.sessions.values():
        assert needle not in json.dumps(session.request).encode()
        assert needle not in json.dumps(session.log).encode()
        assert all(needle not in p.read_bytes() for p in session.outputs.values())
    for dataset in emu.datasets.values():
        assert dataset.is_private
        assert all(needle not in data for v in dataset.versions for data in v.files.values())
    assert all(needle not in blob.data for blob in emu.blobs.values())
    assert all(s.request["isPrivate"] for s in emu.sessions.values())


def test_world_readable_kaggle_json_is_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    for name in [k for k in os.environ if k.startswith("KAGGLE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    path = tmp_path / "kaggle.json"
    path.write_text(json.dumps({"username": "alice", "key": KEY}))
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        find_credentials()
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        find_credentials()
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text
    assert KEY not in caplog.text
