"""Experiment files: the example loads; every malformed file gets one message per problem,
naming the field path and its line; nothing but SpecError ever escapes; the CLI exits 2."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupool.errors import SpecError
from gpupool.spec import ExperimentSpec, load_experiment
from gpupool.yamlfile import parse_yaml_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "examples" / "mlp" / "experiment.yaml"

VALID = "name: my-exp\nworkdir: code\nrun: python train.py\n"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    (tmp_path / "code").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    return info.value


# -- valid files ---------------------------------------------------------------------------


def test_example_loads_with_workdir_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the current directory must not matter
    spec = load_experiment(EXAMPLE)
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert spec.name == raw["name"]
    assert spec.run == raw["run"]
    assert spec.providers == raw["providers"]
    assert spec.workdir == EXAMPLE.parent.resolve()
    assert spec.workdir.is_absolute()
    assert spec.checkpoint.keep_last == raw["checkpoint"]["keep_last"]
    assert spec.env == {k: str(v) for k, v in raw["env"].items()}


def test_relative_workdir_resolves_against_the_file_folder(tmp_path, monkeypatch):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "src").mkdir()
    path = nested / "exp.yaml"
    path.write_text("name: abc\nworkdir: src\nrun: python x.py\n")
    monkeypatch.chdir(tmp_path)
    assert load_experiment(path).workdir == (nested / "src").resolve()


def test_durations_and_defaults(tmp_path):
    text = VALID + "checkpoint: {interval: 1h30m, keep_last: 5}\nenv: {EPOCHS: 20, LR: 0.5}\n"
    spec = load_experiment(write(tmp_path, text))
    assert spec.checkpoint.interval == 5400.0
    assert spec.checkpoint.keep_last == 5
    assert spec.env == {"EPOCHS": "20", "LR": "0.5"}
    assert spec.providers == ["local"]
    assert spec.resources.wants_gpu


def test_auto_interval_and_no_gpu(tmp_path):
    spec = load_experiment(write(tmp_path, VALID + "checkpoint: {interval: auto}\nresources: {gpu: none}\n"))
    assert spec.checkpoint.interval == "auto"
    assert not spec.resources.wants_gpu


# -- one malformed thing at a time ---------------------------------------------------------

MALFORMED = [
    # (id, extra YAML appended to a valid file, field path, line of the offending value)
    ("unknown-key", "bogus: 1\n", "bogus", 4),
    ("unknown-nested-key", "limits:\n  max_hopz: 3\n", "limits.max_hopz", 5),
    ("wrong-type", "limits:\n  max_hops: lots\n", "limits.max_hops", 5),
    ("bad-duration", "checkpoint:\n  interval: 5q\n", "checkpoint.interval", 5),
    ("negative-duration", "checkpoint:\n  interval: -5\n", "checkpoint.interval", 5),
    ("zero-duration", "checkpoint:\n  interval: 0s\n", "checkpoint.interval", 5),
    ("nan-duration", "checkpoint:\n  interval: .nan\n", "checkpoint.interval", 5),
    ("list-duration", "checkpoint:\n  interval: [1]\n", "checkpoint.interval", 5),
    ("negative-hops", "limits:\n  max_hops: -1\n", "limits.max_hops", 5),
    ("negative-gpu-hours", "limits:\n  gpu_hours: -2\n", "limits.gpu_hours", 5),
    ("zero-keep-last", "checkpoint:\n  keep_last: 0\n", "checkpoint.keep_last", 5),
    ("negative-gpu-memory", "resources:\n  gpu_memory_gb: -1\n", "resources.gpu_memory_gb", 5),
    ("duplicate-providers", "providers: [local, kaggle, local]\n", "providers", 4),
    ("bad-provider-name", "providers: [Local!]\n", "providers", 4),
    ("empty-providers", "providers: []\n", "providers", 4),
    ("gpupool-env", "env:\n  GPUPOOL_DEADLINE: 1\n", "env", 5),
    ("bad-env-name", "env:\n  1BAD: x\n", "env", 5),
    ("nested-env-value", "env:\n  A: {b: 1}\n", "env", 5),
    ("min-over-max", "checkpoint:\n  min_interval: 2h\n  max_interval: 1m\n", "checkpoint", 5),
    ("duplicate-key", "run: python other.py\n", "run", 4),
]


@pytest.mark.parametrize("extra, field, line", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_field_names_path_and_line(tmp_path, extra, field, line):
    err = problems_of(write(tmp_path, VALID + extra))
    assert len(err.problems) == 1, err.problems
    where, what = err.problems[0]
    assert where == f"{field} (line {line})"
    assert what.strip()
    assert f"{field} (line {line})" in str(err)
    assert str(tmp_path / "exp.yaml") in str(err)


@pytest.mark.parametrize(
    "text, field, line",
    [
        ("name: abc\nworkdir: code\nrun: '   '\n", "run", 3),
        ("name: Bad_Name\nworkdir: code\nrun: x\n", "name", 1),
        ("name: ab\nworkdir: code\nrun: x\n", "name", 1),
        ("name: abc\nworkdir: code\nrun: [python]\n", "run", 3),
    ],
    ids=["empty-run", "bad-name-chars", "name-too-short", "run-not-a-string"],
)
def test_malformed_top_level_values(tmp_path, text, field, line):
    err = problems_of(write(tmp_path, text))
    assert [where for where, _ in err.problems] == [f"{field} (line {line})"]


def test_missing_required_fields_are_each_reported(tmp_path):
    err = problems_of(write(tmp_path, "workdir: code\nsetup: pip install x\n"))
    fields = sorted(where.split(" ")[0] for where, _ in err.problems)
    assert fields == ["name", "run"]
    assert all("required" in what.lower() for _, what in err.problems)


def test_several_problems_give_one_message_each(tmp_path):
    text = (
        "name: Bad\n"
        "workdir: code\n"
        "run: python train.py\n"
        "bogus: 1\n"
        "limits: {max_hops: -3, retries_on_error: x}\n"
        "checkpoint: {interval: 5q}\n"
    )
    err = problems_of(write(tmp_path, text))
    wheres = {where for where, _ in err.problems}
    assert wheres == {
        "name (line 1)", "bogus (line 4)", "limits.max_hops (line 5)",
        "limits.retries_on_error (line 5)", "checkpoint.interval (line 6)",
    }
    lines = str(err).splitlines()
    assert lines[0].endswith("5 problem(s)")
    assert len(lines) == 1 + len(err.problems)


@pytest.mark.parametrize(
    "text", ["- a\n- b\n", "just a string\n", "", "42\n"], ids=["list", "scalar", "empty", "number"]
)
def test_not_a_mapping(tmp_path, text):
    err = problems_of(write(tmp_path, text))
    assert len(err.problems) == 1
    assert "mapping" in err.problems[0][1]


@pytest.mark.parametrize(
    "text, line, column",
    [
        ("name: abc\nrun: [x\n", 3, 1),
        ("name: abc\n\trun: x\n", 2, 1),
        ("name: abc\nrun: x\n  bad: : :\n", 3, 6),
    ],
    ids=["unclosed-list", "tab", "bad-indent"],
)
def test_invalid_yaml_reports_line_and_column(tmp_path, text, line, column):
    err = problems_of(write(tmp_path, text))
    assert len(err.problems) == 1
    where, what = err.problems[0]
    assert where == f"line {line}, column {column}"
    assert what.startswith("not valid YAML")


def test_missing_file(tmp_path):
    err = problems_of(tmp_path / "nope.yaml")
    assert err.problems == [("file", "does not exist")]
    assert "nope.yaml" in str(err)


def test_missing_workdir_names_the_field_and_line(tmp_path):
    err = problems_of(write(tmp_path, "name: abc\nrun: x\nworkdir: missing\n"))
    assert len(err.problems) == 1
    where, what = err.problems[0]
    assert where == "workdir (line 3)"
    assert str((tmp_path / "missing").resolve()) in what
    # skipping the check (e.g. for `plan`) loads it
    assert load_experiment(tmp_path / "exp.yaml", check_workdir=False).name == "abc"


def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    err = problems_of(write(tmp_path, "name: abc\nrun: x\nworkdir: afile\n"))
    assert err.problems[0][0] == "workdir (line 3)"


def test_spec_error_exit_code_is_2():
    assert SpecError("f", [("x", "y")]).exit_code == 2


# -- nothing but SpecError escapes ---------------------------------------------------------

yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12)
)
FIELDS = ["name", "workdir", "setup", "run", "resources", "providers", "checkpoint", "limits",
          "env", "gpu", "gpu_memory_gb", "interval", "keep_last", "min_interval", "max_interval",
          "max_hops", "retries_on_error", "gpu_hours"]
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers())
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=20,
)


def _load_text(text: str) -> ExperimentSpec | None:
    try:
        return parse_yaml_model(text, ExperimentSpec, source="prop.yaml")
    except SpecError as err:
        assert err.problems
        assert all(isinstance(w, str) and isinstance(m, str) for w, m in err.problems)
        return None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, yaml_values, max_size=8))
def test_arbitrary_mappings_only_raise_spec_error(data):
    _load_text(yaml.safe_dump(data, allow_unicode=True))


@settings(max_examples=80, deadline=None)
@given(
    st.fixed_dictionaries(
        {"name": st.text(max_size=10), "run": yaml_scalars},
        optional={
            "checkpoint": st.dictionaries(
                st.sampled_from(["interval", "keep_last", "min_interval", "max_interval"]), yaml_values
            ),
            "limits": st.dictionaries(
                st.sampled_from(["max_hops", "retries_on_error", "gpu_hours"]), yaml_values
            ),
            "env": st.dictionaries(st.text(max_size=6), yaml_values, max_size=3),
            "providers": yaml_values,
            "resources": st.dictionaries(st.sampled_from(["gpu", "gpu_memory_gb"]), yaml_values),
        },
    )
)
def test_near_valid_specs_only_raise_spec_error(data):
    spec = _load_text(yaml.safe_dump(data, allow_unicode=True))
    if spec is not None:  # whatever loads honours the invariants the rest of gpupool assumes
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]+[a-z0-9]", spec.name)
        assert spec.run.strip()
        interval = spec.checkpoint.interval
        assert interval == "auto" or 0 < interval < float("inf")
        assert spec.checkpoint.min_interval <= spec.checkpoint.max_interval
        assert all(isinstance(v, str) for v in spec.env.values())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@ \n\t,?.01")), max_size=60))
def test_arbitrary_yamlish_text_only_raises_spec_error(text):
    _load_text(text)


# -- the CLI -------------------------------------------------------------------------------


def _run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GPUPOOL_DATA_DIR=str(tmp_path / "data"),
               GPUPOOL_CONFIG=str(tmp_path / "no-pool.yaml"))
    env.pop("GPUPOOL_DATABASE_URL", None)
    (tmp_path / "no-pool.yaml").write_text("{}\n")
    return subprocess.run([sys.executable, "-m", "gpupool", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_cli_run_bad_file_exits_2_without_traceback(tmp_path):
    bad = write(tmp_path, "name: Bad\nworkdir: code\nrun: x\nbogus: 1\n", "bad.yaml")
    result = _run_cli(tmp_path, "run", str(bad))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "name (line 1)" in result.stderr
    assert "bogus (line 4)" in result.stderr
    assert str(bad) in result.stderr
    _assert_no_experiments(tmp_path / "data" / "state.db")


def test_cli_run_missing_workdir_exits_2(tmp_path):
    bad = write(tmp_path, "name: abc\nworkdir: gone\nrun: x\n", "bad.yaml")
    result = _run_cli(tmp_path, "run", str(bad))
    assert result.returncode == 2
    assert "workdir (line 2)" in result.stderr
    assert "Traceback" not in result.stderr
    _assert_no_experiments(tmp_path / "data" / "state.db")


def _assert_no_experiments(db_file: Path) -> None:
    if not db_file.exists():
        return
    with sqlite3.connect(db_file) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        if "experiments" in tables:
            assert conn.execute("select count(*) from experiments").fetchone()[0] == 0
