"""Issue 13, done means: a provider adapter that a third party installs through the
``gpupool.providers`` entry-point group works in `run`, `status`, `quota` and `plan` with no
change in gpupool/. The adapter (``tests.fakes:JournalProvider``) lives outside the package,
declares its settings by subclassing ``ProviderConfig`` and brings its own quota rule (a UTC
day), which the scheduler, `quota` and the forecast all read from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from gpupool.cli import cli
from gpupool.errors import ConfigError
from gpupool.pool import Pool
from gpupool.provider import available_providers, load_provider_class
from gpupool.provider_config import Capabilities
from gpupool.settings import PoolSettings
from tests.fakes import JournalProvider, register_entry_point

ROOT = Path(__file__).resolve().parent.parent


def gpupool(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpupool", *args], env=env, text=True,
                          capture_output=True, timeout=180)


@pytest.fixture
def third_party(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """A pool whose only provider is the journal, found through an installed distribution's
    entry point (a dist-info on PYTHONPATH), and an experiment that hops once on it."""
    site = register_entry_point(tmp_path / "site")
    folder = tmp_path / "journal"
    folder.mkdir()
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "poll_interval": 0.1,
        "providers": {"journal": {
            "folder": str(folder), "seconds": 0.3, "yields": 1, "daily_gpu_hours": 2,
            "session_seconds": "1h", "startup_seconds": 30, "loss_prior_seconds": "48h"}}}))
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "train.py").write_text("print('trained')\n")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "elsewhere", "workdir": str(tmp_path / "code"), "run": "python train.py",
        "providers": ["journal"], "checkpoint": {"interval": 600}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
           "GPUPOOL_CONFIG": str(pool_file)}
    env.pop("GPUPOOL_DATABASE_URL", None)
    env.pop("GPUPOOL_DATA_DIR", None)
    return env, experiment, folder


def test_an_entry_point_adapter_works_in_run_status_quota_and_plan(third_party) -> None:
    env, experiment, folder = third_party
    run = gpupool(["run", str(experiment)], env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "will use journal" in run.stdout + run.stderr
    started = [line.split()[1] for line in (folder / "journal.log").read_text().splitlines()
               if line.startswith("started")]
    assert len(started) == 2  # it yielded once and finished on the next session

    [row] = json.loads(gpupool(["status", "--json"], env).stdout)
    assert (row["name"], row["state"]) == ("elsewhere", "succeeded")
    detail = json.loads(gpupool(["status", row["id"], "--json"], env).stdout)
    assert [(a["provider"], a["state"]) for a in detail["attempts"]] == [
        ("journal", "yielded"), ("journal", "succeeded")]

    [quota] = [r for r in json.loads(gpupool(["quota", "--json"], env).stdout)
               if r["provider"] == "journal"]
    assert (quota["provider"], quota["total_hours"], quota["source"]) == ("journal", 2.0, "ledger")
    assert quota["resets_at"] is not None  # the adapter's own window (the UTC day)

    planned = gpupool(["plan", str(experiment), "--hours", "10", "--runs", "5", "--json"], env)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    forecast = json.loads(planned.stdout)
    assert forecast["providers"] == ["journal"] and forecast["can_finish"]
    assert forecast["assumed_startup_seconds"] == {"journal": 30}  # its config, as placement reads
    assert forecast["assumed_loss_hours"] == {"journal": 48}
    # 10 GPU-hours at 2 a day (the adapter's window rule) take days, not the 10 h they would
    # take unlimited
    assert forecast["finish_hours"]["p10"] > 3 * 24


class PlainConfig(BaseModel):
    folder: str = ""


class OldStyle(JournalProvider):
    """An adapter whose settings do not subclass ProviderConfig (no shared fields)."""

    Config = PlainConfig  # type: ignore[assignment]


def test_an_adapter_without_the_shared_fields_is_refused_with_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    info = site / "old_style-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: old-style\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[gpupool.providers]\noldstyle = tests.test_third_party_adapter:OldStyle\n")
    monkeypatch.syspath_prepend(str(site))
    assert "oldstyle" in available_providers()
    with pytest.raises(ConfigError, match="must subclass gpupool.provider_config.ProviderConfig"):
        load_provider_class("oldstyle")


def test_auth_reads_the_declared_sign_in_capability(tmp_path: Path) -> None:
    journal = JournalProvider(JournalProvider.Config(folder=str(tmp_path)), tmp_path, lambda: 0.0)
    pool = Pool(PoolSettings(data_dir=tmp_path / "data"), providers={"journal": journal})
    result = CliRunner().invoke(cli, ["auth", "journal"], obj={"pool": pool})
    assert result.exit_code == 2 and "journal has no sign-in step" in result.output
    pool.close()


def test_every_public_method_of_the_interface_is_documented() -> None:
    """What a third party implements against is written down: each public method and
    property of ``Provider`` has a docstring."""
    import inspect

    from gpupool.provider import Provider

    undocumented = [name for name, member in inspect.getmembers(Provider)
                    if not name.startswith("_") and (callable(member) or isinstance(member, property))
                    and name != "Config" and not inspect.getdoc(member)]
    assert undocumented == []


class SignedOut(JournalProvider):
    """A third party's adapter with its own sign-in, not signed in yet."""

    capabilities = Capabilities(interactive_sign_in=True)

    def check_credentials(self) -> tuple[bool, str]:
        return False, "not signed in"


def test_the_run_preflight_fix_comes_from_declared_capabilities(tmp_path: Path) -> None:
    from gpupool.preflight import check_provider
    from gpupool.spec import ExperimentSpec

    journal = SignedOut(JournalProvider.Config(folder=str(tmp_path)), tmp_path, lambda: 0.0)
    pool = Pool(PoolSettings(data_dir=tmp_path / "data"), providers={"journal": journal})
    spec = ExperimentSpec(name="signed-out", run="python t.py", providers=["journal"])
    check = check_provider(pool, spec, "journal")
    assert (check.usable, check.reason, check.fix) == (False, "not signed in", "gpupool auth journal")
    pool.close()


class CpuOnly(JournalProvider):
    """A third party's adapter that trains on the CPU when there is no GPU, with no
    ``cpu_fallback`` key in its settings to turn that off."""

    capabilities = Capabilities(cpu_fallback=True)

    def gpu_kinds(self) -> set[str]:
        return set()


def test_the_cpu_note_names_a_setting_only_when_the_adapter_has_it(tmp_path: Path) -> None:
    from gpupool.preflight import check_provider, report_lines
    from gpupool.spec import ExperimentSpec

    assert "cpu_fallback" not in CpuOnly.Config.model_fields
    journal = CpuOnly(JournalProvider.Config(folder=str(tmp_path)), tmp_path, lambda: 0.0)
    pool = Pool(PoolSettings(data_dir=tmp_path / "data"), providers={"journal": journal})
    spec = ExperimentSpec(name="on-cpu", run="python t.py", providers=["journal"],
                          resources={"gpu": "any"})
    check = check_provider(pool, spec, "journal")
    assert check.usable and check.on_cpu and check.cpu_switch is None
    note = "\n".join(report_lines([check]))
    assert "train on the CPU there" in note and "cpu_fallback" not in note
    pool.close()
