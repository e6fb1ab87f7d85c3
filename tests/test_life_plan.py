"""`gpupool plan` on the README's own example: the work comes from the experiment (or it says
exactly what to add), only usable providers are simulated, CPU hours are not GPU hours, and
the loss figures say what they assume."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from gpupool.cli import cli
from gpupool.lifecycle import AttemptState
from gpupool.pool import Pool
from gpupool.settings import PoolSettings
from tests.fakes import FakeProvider
from tests.test_scheduler import T0

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "examples" / "mlp" / "experiment.yaml"


class NoCredentials(FakeProvider):
    def check_credentials(self) -> tuple[bool, str]:
        return False, "no Kaggle API key: run `gpupool auth kaggle`\nmore help\nand more"


class CpuOnly(FakeProvider):
    def gpu_kinds(self) -> set[str] | None:
        return set()


def pool_with(tmp_path: Path, *providers: FakeProvider) -> Pool:
    return Pool(PoolSettings(data_dir=tmp_path / "data"), clock=lambda: T0,
                providers={p.name: p for p in providers})


def plan(pool: Pool, experiment: Path, *args: str) -> object:
    return CliRunner().invoke(cli, ["plan", str(experiment), "--runs", "20", *args], obj={"pool": pool})


def example_with(tmp_path: Path, providers: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(EXAMPLE.read_text().replace("providers: [local]", f"providers: {providers}")
                    .replace("workdir: .", f"workdir: {EXAMPLE.parent}"))
    return path


def measured_run(pool: Pool, name: str = "mlp-quickstart", rate: float = 50.0) -> None:
    """An earlier session of the example that reported its total and whose rate was measured."""
    experiment = pool.state.create_experiment(name, {}, "bundle", T0)
    attempt = pool.state.create_attempt(experiment.id, "local", "default", T0)
    pool.state.move_attempt(attempt.id, AttemptState.SUBMITTED, T0)
    pool.state.update_attempt(attempt.id, rate=rate, total_steps=6000, step=300)


def test_plan_on_the_readme_example_without_hours_says_exactly_what_to_add(tmp_path):
    result = plan(pool_with(tmp_path, FakeProvider("local")), EXAMPLE)
    assert result.exit_code == 2
    message = result.output
    assert "--hours" in message and "limits: {gpu_hours: H}" in message and "session.report" in message


def test_plan_uses_reported_total_steps_and_the_measured_rate(tmp_path):
    pool = pool_with(tmp_path, FakeProvider("local"))
    measured_run(pool)
    result = plan(pool, EXAMPLE, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert abs(data["work_hours"] - 6000 / 50.0 / 3600) < 1e-9
    assert "6000 steps" in data["work_source"] and "50.0 steps/s" in data["work_source"]


def test_plan_forecasts_only_on_usable_providers_and_says_which_it_left_out(tmp_path):
    pool = pool_with(tmp_path, NoCredentials("kaggle"), FakeProvider("local"))
    result = plan(pool, example_with(tmp_path, "[kaggle, local]"), "--hours", "5")
    assert result.exit_code == 0, result.output
    assert "left out: kaggle: no Kaggle API key: run `gpupool auth kaggle`" in result.output
    assert "more help" not in result.output
    data = json.loads(plan(pool, example_with(tmp_path, "[kaggle, local]"), "--hours", "5", "--json").output)
    assert list(data["gpu_hours"]) == ["local"] and data["skipped"].keys() == {"kaggle"}


def test_plan_with_no_usable_provider_says_it_assumed_them(tmp_path):
    pool = pool_with(tmp_path, NoCredentials("kaggle"))
    result = plan(pool, example_with(tmp_path, "[kaggle]"), "--hours", "5")
    assert "none of kaggle is usable now; assumed all are" in result.output


def test_plan_keeps_cpu_hours_apart_and_explains_its_loss_figures(tmp_path):
    pool = pool_with(tmp_path, CpuOnly("local", loss_prior_seconds=336 * 3600))  # the adapter's
    result = plan(pool, EXAMPLE, "--hours", "3")
    assert result.exit_code == 0, result.output
    assert "local (CPU hours)" in result.output and "GPU h" not in result.output
    assert "0.00 h lost to session ends" in result.output
    assert "start-up and checkpoint saves (goodput" in result.output  # why goodput < 100%
    assert "assumed: an unplanned session loss on average local every 336 h" in result.output
    assert json.loads(plan(pool, EXAMPLE, "--hours", "3", "--json").output)["cpu_hours_on"] == ["local"]
