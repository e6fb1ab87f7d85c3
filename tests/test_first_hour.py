"""A person's first hour (issue 14): the pool file checked when loaded, typos named with their
line and the key they were meant to be, and `gpupool run` saying before it starts which
providers it will use, why the others are skipped and what fixes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gpupool.errors import ConfigError, SpecError
from gpupool.settings import load_settings
from gpupool.spec import load_experiment
from tests.helpers import write_experiment


def no_credentials_pool(tmp_path: Path, **extra: object) -> Path:
    """A pool file for a machine with no GPU and no Kaggle or Google credentials."""
    data = {
        "data_dir": str(tmp_path / "data"),
        "poll_interval": "1s",
        "providers": {
            "local": {"gpus": "none", "cpu_fallback": True},
            "kaggle": {"credentials": str(tmp_path / "no-kaggle.json")},
            "colab": {"client_secrets": str(tmp_path / "no-client.json"),
                      "credentials_file": str(tmp_path / "no-google.json")},
        },
        **extra,
    }
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def gpupool(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess: exit codes and stderr exactly as a person sees them."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "gpupool", *args], env=full_env, text=True,
                          capture_output=True, timeout=120)


# -- the pool file, checked when loaded --------------------------------------------------------

def test_misspelt_key_in_a_provider_section_is_named_with_line_and_suggestion(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("poll_interval: 5\nproviders:\n  kaggle:\n    enabeld: false\n")
    with pytest.raises(SpecError) as caught:
        load_settings(path)
    assert "providers.kaggle.enabeld (line 4): unknown key (did you mean 'enabled'?)" in str(caught.value)


def test_misspelt_provider_section_is_an_error_not_a_silently_skipped_provider(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("providers:\n  local: {}\n  kagle:\n    enabled: true\n")
    result = gpupool(["--config", str(path), "providers"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "providers.kagle (line 3): unknown provider (did you mean 'kaggle'?)" in result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_misspelt_top_level_key_suggests_the_known_one(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("pol_interval: 5\n")
    with pytest.raises(SpecError,
                       match=r"pol_interval \(line 1\): unknown key \(did you mean 'poll_interval'\?\)"):
        load_settings(path)


def test_bad_value_in_a_provider_section_names_its_line(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("providers:\n  colab:\n    folder: gpupool\n    max_concurrent: many\n")
    with pytest.raises(SpecError, match=r"providers\.colab\.max_concurrent \(line 4\)"):
        load_settings(path)


def test_durations_are_accepted_in_the_pool_file_as_in_experiment_files(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("poll_interval: 30s\nproviders:\n"
                    "  kaggle: {session_seconds: 8h, request_timeout: 1m30s}\n"
                    "  colab: {start_timeout: 30m, no_gpu_cooldown: 6h}\n"
                    "  local: {session_seconds: 2h}\n")
    settings = load_settings(path)
    assert settings.poll_interval == 30
    from gpupool_providers.colab import ColabConfig
    from gpupool_providers.kaggle.config import KaggleConfig
    from gpupool_providers.local import LocalConfig

    kaggle = KaggleConfig.model_validate(settings.provider_section("kaggle"))
    assert (kaggle.session_seconds, kaggle.request_timeout) == (8 * 3600, 90)
    colab = ColabConfig.model_validate(settings.provider_section("colab"))
    assert (colab.start_timeout, colab.no_gpu_cooldown) == (1800, 6 * 3600)
    assert LocalConfig.model_validate(settings.provider_section("local")).session_seconds == 7200


def test_bad_duration_in_the_pool_file_names_line_and_form(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("providers:\n  colab:\n    start_timeout: half an hour\n")
    with pytest.raises(SpecError, match=r"providers\.colab\.start_timeout \(line 3\): .*write e\.g\. 90s"):
        load_settings(path)


def test_bad_environment_variable_is_a_clean_exit_2_naming_it(tmp_path):
    result = gpupool(["status"], GPUPOOL_DATA_DIR=str(tmp_path / "data"), GPUPOOL_POLL_INTERVAL="abc")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "GPUPOOL_POLL_INTERVAL='abc'" in result.stderr and "Traceback" not in result.stderr
    ok = gpupool(["status"], GPUPOOL_DATA_DIR=str(tmp_path / "data"), GPUPOOL_POLL_INTERVAL="2m")
    assert ok.returncode == 0, ok.stderr


def test_bad_nested_environment_variable_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUPOOL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPUPOOL_PROVIDERS__KAGGLE__MAX_CONCURRENT", "lots")
    monkeypatch.delenv("GPUPOOL_CONFIG", raising=False)
    with pytest.raises(SpecError, match="GPUPOOL_PROVIDERS__KAGGLE__MAX_CONCURRENT='lots'"):
        load_settings()


def test_unknown_notification_url_is_refused_without_showing_it(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("notify:\n  - json://127.0.0.1:9/hook\n  - nosuchservice://secret-token-123\n")
    with pytest.raises(SpecError) as caught:
        load_settings(path)
    assert "notify.1 (line 3)" in str(caught.value)
    assert "secret-token-123" not in str(caught.value) and "notify.0" not in str(caught.value)


# -- the experiment file ------------------------------------------------------------------------

def test_provider_typo_in_an_experiment_gets_file_line_and_suggestion(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: typo-test\nworkdir: {tmp_path}\nrun: python train.py\n"
                    "providers:\n  - colab\n  - kagle\n")
    with pytest.raises(SpecError) as caught:
        load_experiment(path)
    message = str(caught.value)
    assert str(path) in message
    assert "providers.1 (line 6): unknown provider 'kagle' (did you mean 'kaggle'?)" in message


def test_misspelt_key_in_an_experiment_section_suggests_the_known_one(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: typo-test\nworkdir: {tmp_path}\nrun: x\ncheckpoint:\n  keep_lst: 2\n")
    with pytest.raises(SpecError,
                       match=r"checkpoint\.keep_lst \(line 5\): unknown key \(did you mean 'keep_last'\?\)"):
        load_experiment(path)


def test_errors_start_alike_whether_click_or_gpupool_raised_them(tmp_path):
    usage = gpupool(["status", "--page", "x"], GPUPOOL_DATA_DIR=str(tmp_path / "data"))
    assert usage.returncode == 2 and "error: " in usage.stderr and "Error:" not in usage.stderr
    missing = gpupool(["status", "nosuch"], GPUPOOL_DATA_DIR=str(tmp_path / "data"))
    assert missing.returncode == 3 and missing.stderr.startswith("error: ")


# -- `gpupool run`: which providers, why not the others, what fixes them -----------------------

def test_run_with_no_usable_provider_exits_2_with_the_fixes(tmp_path):
    pool = no_credentials_pool(tmp_path)
    experiment = write_experiment(tmp_path, steps=10, providers=["colab", "kaggle"])
    for extra in ([], ["--detach"]):
        result = gpupool(["--config", str(pool), "run", *extra, str(experiment)])
        assert result.returncode == 2, result.stdout + result.stderr
        assert "skipping colab" in result.stderr and "fix: gpupool auth colab" in result.stderr
        assert "skipping kaggle" in result.stderr and "fix: gpupool auth kaggle" in result.stderr
        assert "--wait" in result.stderr and "Traceback" not in result.stderr
        assert "skipping colab: colab:" not in result.stderr  # named once
    listed = gpupool(["--config", str(pool), "status", "--json"])
    assert json.loads(listed.stdout) == []  # refused before anything was recorded


def test_run_wait_submits_even_with_no_usable_provider(tmp_path):
    pool = no_credentials_pool(tmp_path)
    experiment = write_experiment(tmp_path, steps=10, providers=["colab", "kaggle"])
    result = gpupool(["--config", str(pool), "run", "--detach", "--wait", str(experiment)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitting anyway (--wait)" in result.stderr
    rows = json.loads(gpupool(["--config", str(pool), "status", "--json"]).stdout)
    assert [row["state"] for row in rows] == ["pending"]


def test_run_says_a_gpu_experiment_falls_back_to_the_cpu_and_why_others_are_skipped(tmp_path):
    pool = no_credentials_pool(tmp_path)
    experiment = write_experiment(tmp_path, steps=3, providers=["colab", "kaggle", "local"])
    result = gpupool(["--config", str(pool), "run", "--detach", str(experiment)])
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.index("skipping colab") < out.index("skipping kaggle") < out.index("will use local")
    assert "fix: gpupool auth colab" in out and "fix: gpupool auth kaggle" in out
    assert "will train on the CPU" in out
    ident = json.loads(gpupool(["--config", str(pool), "status", "--json"]).stdout)[0]["id"]
    gpupool(["--config", str(pool), "cancel", ident])


def test_disabled_provider_is_skipped_with_the_setting_that_enables_it(tmp_path):
    from gpupool.pool import Pool
    from gpupool.preflight import check_providers

    pool_file = no_credentials_pool(tmp_path)
    data = yaml.safe_load(pool_file.read_text())
    data["providers"]["local"]["enabled"] = False
    pool_file.write_text(yaml.safe_dump(data))
    spec = load_experiment(write_experiment(tmp_path, steps=3, providers=["local"]))
    pool = Pool(load_settings(pool_file))
    try:
        [check] = check_providers(pool, spec)
    finally:
        pool.close()
    assert not check.usable and check.fix == f"set providers.local.enabled: true in {pool_file}"


def test_cpu_experiment_on_local_is_not_called_a_fallback(tmp_path):
    from gpupool.pool import Pool
    from gpupool.preflight import check_providers

    spec = load_experiment(write_experiment(tmp_path, steps=3, providers=["local"],
                                            resources={"gpu": "none"}))
    pool = Pool(load_settings(no_credentials_pool(tmp_path)))
    try:
        [check] = check_providers(pool, spec)
    finally:
        pool.close()
    assert check.usable and not check.on_cpu


def test_refusal_is_a_config_error_for_library_callers(tmp_path):
    from click.testing import CliRunner

    from gpupool.cli import cli

    pool = no_credentials_pool(tmp_path)
    experiment = write_experiment(tmp_path, steps=3, providers=["kaggle"])
    result = CliRunner().invoke(cli, ["--config", str(pool), "run", str(experiment)])
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2


# -- `gpupool status`: is a scheduler running, and since when ---------------------------------

def status_text(pool_file: Path, *args: str) -> str:
    from click.testing import CliRunner

    from gpupool.cli import cli

    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["--config", str(pool_file), "status", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_status_says_when_no_scheduler_runs_and_what_is_left_waiting(tmp_path):
    pool = no_credentials_pool(tmp_path)
    experiment = write_experiment(tmp_path, steps=10, providers=["colab"])
    assert gpupool(["--config", str(pool), "run", "--detach", "--wait", str(experiment)]).returncode == 0
    text = status_text(pool)
    assert "scheduler: none running" in text
    assert "1 unfinished experiment(s) will not move on until `gpupool daemon`" in text


def test_status_names_the_running_scheduler_and_since_when(tmp_path):
    from gpupool.driver import Driver
    from gpupool.pool import Pool

    pool_file = no_credentials_pool(tmp_path)
    pool = Pool(load_settings(pool_file))
    driver = Driver(pool, role="daemon")
    try:
        assert driver.step() is not None
        text = status_text(pool_file)
        assert f"scheduler: daemon on {os.uname().nodename[:64]} (pid {os.getpid()}) running since" in text
        experiment = write_experiment(tmp_path, steps=10, providers=["colab"])
        gpupool(["--config", str(pool_file), "run", "--detach", "--wait", str(experiment)])
        ident = json.loads(gpupool(["--config", str(pool_file), "status", "--json"]).stdout)[0]["id"]
        detail = json.loads(status_text(pool_file, ident, "--json"))
        assert detail["scheduler"]["running"] and detail["scheduler"]["role"] == "daemon"
        assert abs(detail["scheduler"]["since"] - time.time()) < 600
    finally:
        driver.release()
        pool.close()
    assert "scheduler: none running" in status_text(pool_file)  # released on a clean stop


def test_status_sees_through_the_lease_of_a_killed_scheduler(tmp_path):
    from gpupool.driver import LEASE
    from gpupool.pool import Pool

    pool_file = no_credentials_pool(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owner = f"{os.uname().nodename[:64]}:{gone.pid}:abc123:run:{int(time.time())}"
    pool = Pool(load_settings(pool_file))
    try:
        assert pool.state.acquire_lease(LEASE, owner, time.time(), 3600.0)  # killed -9 while held
    finally:
        pool.close()
    text = status_text(pool_file)
    assert f"scheduler: none running (process {gone.pid} on" in text and "is gone" in text


def test_the_example_pool_file_loads_and_its_durations_reach_every_reader(tmp_path):
    from gpupool.plan import provider_models
    from gpupool.provider import load_provider_class

    example = Path(__file__).resolve().parents[1] / "configs" / "pool.example.yaml"
    settings = load_settings(example)
    assert settings.poll_interval == 10
    assert settings.provider_section("kaggle")["session_seconds"] == 9 * 3600  # "9h", checked
    assert settings.provider_section("colab")["start_timeout"] == 1800  # "30m"
    spec = load_experiment(write_experiment(tmp_path, steps=3, providers=["colab", "kaggle"]))
    adapters = {name: load_provider_class(name).from_section(
        settings.provider_section(name), tmp_path / name, time.time) for name in spec.providers}
    models = provider_models(spec, adapters, {})
    assert models["colab"].start_timeout == 1800
    assert models["kaggle"].session_seconds == 9 * 3600 - 600  # the cap less the one margin rule


def test_a_detached_run_leaves_no_scheduler_lease_behind(tmp_path):
    pool = no_credentials_pool(tmp_path)
    experiment = write_experiment(tmp_path, steps=10, providers=["colab"])
    assert gpupool(["--config", str(pool), "run", "--detach", "--wait", str(experiment)]).returncode == 0
    text = status_text(pool)
    assert "scheduler: none running;" in text  # released, not left to a process that is gone
