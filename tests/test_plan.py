"""`gpupool plan`: the simulation is repeatable, follows placement, and answers plainly."""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpupool import placement
from gpupool.cli import cli
from gpupool.plan import DAY, HOUR, PlanModel, ProviderModel, forecast, plan_model, presence_for, simulate
from gpupool.provider import Provider, load_provider_class
from gpupool.spec import ExperimentSpec
from gpupool_providers.kaggle.config import week_start, week_window

MONDAY = 1704067200.0  # 2024-01-01 00:00 UTC, a Monday
SATURDAY = 1704499200.0  # 2024-01-06 00:00 UTC


def spec(providers: list[str], **kw) -> ExperimentSpec:
    return ExperimentSpec(name="plan-test", run="python train.py", providers=providers,
                          limits={"max_hops": 200}, **kw)


def adapters(s: ExperimentSpec, sections: dict | None = None) -> dict[str, Provider]:
    """The installed adapters of ``s``'s providers, built from their pool sections."""
    data = Path(tempfile.mkdtemp())
    return {name: load_provider_class(name).from_section((sections or {}).get(name, {}),
                                                         data / name, time.time)
            for name in s.providers}


def model(s: ExperimentSpec, sections: dict | None = None, **kw) -> PlanModel:
    return plan_model(s, adapters(s, sections), **kw)


def test_same_seed_same_forecast_and_other_seed_differs():
    s = spec(["colab", "kaggle"])
    m = model(s)
    first = forecast(s, m, 40, MONDAY, runs=30, seed=7)
    assert forecast(s, m, 40, MONDAY, runs=30, seed=7) == first
    assert forecast(s, m, 40, MONDAY, runs=30, seed=8).finish_hours != first.finish_hours


def test_more_kaggle_quota_finishes_earlier():
    s = spec(["kaggle"])
    small = forecast(s, model(s, {"kaggle": {"weekly_gpu_hours": 20}}), 60, MONDAY, runs=20)
    large = forecast(s, model(s, {"kaggle": {"weekly_gpu_hours": 40}}), 60, MONDAY, runs=20)
    assert small.can_finish and large.can_finish
    assert large.finish_hours["p50"] < small.finish_hours["p50"]
    assert large.hops <= small.hops + 1


def test_no_usable_provider_cannot_finish_with_the_reason():
    s = spec(["kaggle"])
    result = forecast(s, model(s, {"kaggle": {"enabled": False}}), 10, MONDAY, runs=5)
    assert not result.can_finish and result.finished == 0
    assert "kaggle: not configured" in result.reason
    assert result.finish_hours == {}


def test_gpu_kind_no_provider_has_is_refused_by_placement():
    s = spec(["kaggle"], resources={"gpu": "none"})
    m = PlanModel({"kaggle": ProviderModel("kaggle", quota_seconds=30 * HOUR, quota_window=week_window)})
    assert forecast(s, m, 5, MONDAY, runs=3).can_finish  # CPU-only work: any provider will do


def test_cli_says_cannot_finish_and_exits_1(tmp_path):
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({"name": "plan-test", "run": "python t.py",
                                          "providers": ["kaggle"]}))
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                    "providers": {"kaggle": {"enabled": False}}}))
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", str(pool), "plan", str(experiment), "--hours", "5",
                                 "--runs", "3"])
    assert result.exit_code == 1
    assert "cannot finish" in result.output and "not configured" in result.output
    ok = runner.invoke(cli, ["--config", str(pool), "plan", str(experiment), "--runs", "3"])
    assert ok.exit_code == 2 and "--hours" in ok.output


def test_cli_json(tmp_path):
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({"name": "plan-test", "run": "python t.py",
                                          "providers": ["colab", "kaggle"],
                                          "limits": {"gpu_hours": 20}}))
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    result = CliRunner().invoke(cli, ["--config", str(pool), "plan", str(experiment), "--runs", "10",
                                      "--loss-hours", "colab=3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["can_finish"] and data["work_hours"] == 20 and data["runs"] == 10
    assert set(data["gpu_hours"]) == {"colab", "kaggle"}
    assert data["finish_hours"]["p10"] <= data["finish_hours"]["p50"] <= data["finish_hours"]["p90"]


def test_every_placement_goes_through_placement_choose(monkeypatch):
    calls = []
    real = placement.choose

    def counting(*args, **kwargs):
        calls.append(args[2])  # the candidates
        return real(*args, **kwargs)

    monkeypatch.setattr(placement, "choose", counting)
    s = spec(["colab", "kaggle"])
    run = simulate(s, model(s), 30 * HOUR, MONDAY, random.Random(1))
    assert run.finished_at is not None
    assert len(calls) == run.placements >= run.hops + 1
    assert {c.provider for c in calls[0]} == {"colab", "kaggle"}


def test_kaggle_week_starts_saturday_utc_and_quota_waits_for_it():
    assert week_start(SATURDAY) == SATURDAY
    assert week_start(SATURDAY - 1) == SATURDAY - 7 * DAY
    assert week_start(MONDAY) == SATURDAY - 7 * DAY
    s = spec(["kaggle"])
    m = PlanModel({"kaggle": ProviderModel("kaggle", 8 * HOUR, 0, quota_seconds=10 * HOUR,
                                           quota_window=week_window)})
    run = simulate(s, m, 15 * HOUR, MONDAY, random.Random(0))
    assert run.finished_at is not None and run.finished_at > SATURDAY  # 10 h this week, 5 h next
    assert run.gpu_seconds["kaggle"] == pytest.approx(15 * HOUR, rel=0.05)


def test_final_checkpoint_before_deadline_loses_less_work():
    s = spec(["kaggle"], checkpoint={"interval": "30m"})
    sections = {"kaggle": {"weekly_gpu_hours": 60}}
    aware = forecast(s, model(s, sections), 40, MONDAY, runs=40, seed=3)
    blind = forecast(s, PlanModel(model(s, sections).providers, final_checkpoint=False),
                     40, MONDAY, runs=40, seed=3)
    assert aware.lost_hours < blind.lost_hours
    assert aware.goodput > blind.goodput


def test_oracle_is_a_lower_bound():
    s = spec(["colab", "kaggle"])
    real = forecast(s, model(s), 40, MONDAY, runs=40, seed=5)
    oracle = forecast(s, PlanModel(model(s).providers, oracle=True), 40, MONDAY, runs=40, seed=5)
    assert oracle.lost_hours == 0
    assert oracle.finish_hours["mean"] <= real.finish_hours["mean"] * 1.01


def test_nobody_opens_colab_falls_back_to_kaggle():
    s = spec(["colab", "kaggle"])
    result = forecast(s, model(s, colab_hours_per_day=0), 20, MONDAY, runs=10)
    assert result.can_finish and result.gpu_hours["colab"] == 0 and result.gpu_hours["kaggle"] > 20


def test_local_sessions_start_only_inside_their_window():
    s = spec(["local"])
    m = model(s, {"local": {"windows": ["22:00-23:00"], "session_seconds": 3600,
                            "deadline_margin": 0}})  # a session outlasts the window it began in
    run = simulate(s, m, 5 * HOUR, MONDAY, random.Random(0))
    assert run.finished_at is not None
    assert run.finished_at - MONDAY > 4 * DAY  # one hour a night
    assert presence_for(24) == ((0, 1440),) and presence_for(0) == ()


def test_a_month_of_virtual_time_runs_quickly():
    s = spec(["colab", "kaggle", "local"])
    m = model(s, {"local": {"windows": ["01:00-03:00"]}}, horizon_days=30)
    started = time.perf_counter()
    result = forecast(s, m, 10_000, MONDAY, runs=1)  # never finishes: the full 30 days
    assert time.perf_counter() - started < 5.0  # loosely: well under a second here
    assert not result.can_finish and "30 days" in result.reason


# -- issue 13 item 3: the forecast asks each adapter, and reads what the scheduler reads ----

@pytest.mark.parametrize("name, section", [
    ("local", {}), ("local", {"session_seconds": "2h", "startup_seconds": 12}),
    ("kaggle", {}), ("kaggle", {"session_seconds": "6h", "deadline_margin": 120}),
    ("colab", {}), ("colab", {"startup_seconds": "10m", "loss_prior_seconds": "3h"}),
])
def test_forecast_model_reads_the_numbers_the_scheduler_reads(name, section):
    from gpupool.session.contract import deadline_margin

    s = spec([name])
    provider = adapters(s, {name: section})[name]
    m = plan_model(s, {name: provider}).providers[name]
    assert m.startup_seconds == provider.startup_seconds()  # local: 5 s in both (was 60 vs 5)
    cap = provider.session_seconds()
    margin = deadline_margin(cap, section.get("deadline_margin", provider.config.deadline_margin))
    assert m.session_seconds == (None if cap is None else cap - margin)  # the one margin rule
    assert m.loss_hours == provider.loss_prior_seconds() / 3600  # the scheduler's prior too
    assert m.needs_person == (provider.capabilities.needs_person is not None)


def test_kaggle_forecast_counts_quota_over_the_adapters_own_week():
    s = spec(["kaggle"])
    kaggle = adapters(s, {"kaggle": {"weekly_gpu_hours": 12}})["kaggle"]
    m = kaggle.forecast_model()
    assert m.quota_seconds == 12 * HOUR
    for now in (MONDAY, SATURDAY - 1, SATURDAY, SATURDAY + 3 * DAY + 5):
        assert m.quota_window(now) == (kaggle.quota_window_start(now),
                                       kaggle.quota_window_start(now) + 7 * DAY)


def test_local_windows_have_one_rule_for_availability_and_forecast():
    s = spec(["local"])
    local = adapters(s, {"local": {"windows": ["22:00-07:00", "12:00-13:00"]}})["local"]
    m = local.forecast_model()
    for hour in range(0, 48):
        now = MONDAY + hour * 1800 + 7
        inside, change = m.open_at(now)
        available = local.availability("default", now)
        assert available.ok == inside
        if not inside:  # the scheduler also learns when the next window opens
            assert available.until == change and local.open_at(change)[0]
            assert not local.open_at(change - 60)[0]


def test_a_team_forecast_uses_its_members_adapter_rule(tmp_path):
    s = spec(["kaggle"])
    section = {"weekly_gpu_hours": 7, "accounts": {
        "ann": {"owner": "Ann", "credentials": str(tmp_path / "ann.json")},
        "bob": {"owner": "Bob", "credentials": str(tmp_path / "bob.json")}}}
    team = adapters(s, {"kaggle": section})["kaggle"]
    m = plan_model(s, {"kaggle": team}).providers["kaggle"]
    assert m.quota_seconds == 7 * HOUR and m.quota_window is not None
    assert m.startup_seconds == team.startup_seconds() == 180
