"""gpupool.session.contract is the one owner of what the scheduler and a session share: no other
product file types its names again, every provider's deadline follows its one margin rule, and
its helpers (event lines, atomic JSON, tar extraction) hold up against torn or hostile input."""

from __future__ import annotations

import ast
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from gpupool.session import bootstrap, contract
from tests.helpers import ROOT

HOUR = 3600.0

# -- no second copy of the contract ----------------------------------------------------------

# The variables and the session files (folder names such as "checkpoints" are common words).
SHARED_VALUES = {value for name, value in vars(contract).items()
                 if isinstance(value, str) and (name.startswith("ENV_") or name.endswith("_FILE")
                                                or name in ("SESSION_CONFIG", "SNAPSHOT_REQUEST"))}


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def contract_copies(source: str, filename: str) -> list[str]:
    """Where ``source`` types a value the contract owns: a GPUPOOL_* session variable or a
    session file name as a string, or the yield exit code 75 as a number (docstrings aside)."""
    tree = ast.parse(source, filename=filename)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in skip:
            continue
        text = node.value if isinstance(node.value, str) else None
        if text in SHARED_VALUES or (text is not None and text.startswith(contract.ENV_INPUT_PREFIX)) \
                or (type(node.value) is int and node.value == contract.EXIT_YIELD):
            found.append(f"{filename}:{node.lineno}: {node.value!r}")
    return found


def test_no_product_file_types_the_contract_again():
    files = sorted([*ROOT.glob("gpupool/**/*.py"), *ROOT.glob("providers/**/*.py")])
    owner = ROOT / "gpupool" / "session" / "contract.py"
    assert owner in files and len(files) > 40
    found = [hit for path in files if path != owner
             for hit in contract_copies(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == []


def test_the_copy_finder_sees_copies():
    source = ('"""Mentions exit.json and 75 in a docstring only."""\n'
              'DEADLINE = "GPUPOOL_DEADLINE"\nCODE = 75\nenv = {"GPUPOOL_INPUT_TRAIN": 1}\n'
              'def f(d):\n    """events.jsonl"""\n    return d / "exit.json"\n')
    assert contract_copies(source, "x.py") == [
        "x.py:2: 'GPUPOOL_DEADLINE'", "x.py:3: 75", "x.py:4: 'GPUPOOL_INPUT_TRAIN'", "x.py:7: 'exit.json'"]


def test_the_generated_kaggle_script_takes_every_shared_name_from_the_contract():
    from gpupool_providers.kaggle.kernel import marker, render_script

    script = render_script(marker("exp-1-a1", code="me/code", code_files={}, checkpoint=None,
                                  checkpoint_name=None, setup=None, run="true", env={},
                                  session_seconds=60.0, margin=6.0))
    ast.parse(script)  # it is valid Python
    assert contract_copies(script, "kernel script") == []
    for literal in ("75", "GPUPOOL_", "exit.json", "session.json", "extractall"):
        assert literal not in script.replace(_extract_source(), ""), literal
    assert _extract_source() in script  # the one extraction, copied in before the runtime exists
    assert "contract.ended_cleanly(" in script and "contract.session_deadline(" in script


def _extract_source() -> str:
    import inspect

    return inspect.getsource(contract.extract_tar)


def test_the_colab_notebook_carries_the_contract_before_its_agent():
    from gpupool_providers.colab.notebook import AGENT_SOURCES

    assert AGENT_SOURCES[0] == Path(contract.__file__)
    assert [p.name for p in AGENT_SOURCES[1:]] == ["agent_drive.py", "agent.py"]


CELL_PROBE = """
import json, sys, tempfile
cell = open(sys.argv[1]).read()
namespace = {}
exec(compile(cell, "agent-cell", "exec"), namespace)  # as Colab runs it: no gpupool installed
assert "gpupool" not in sys.modules, "the cell found an installed gpupool"
work = tempfile.mkdtemp()
with open(work + "/events.jsonl", "w") as f:
    f.write(namespace["event_line"]({"event": "progress", "step": 3, "total": 9, "time": 1.0}) + "\\n")
deadline, hard_end = namespace["session_deadline"](0.0, 1200, None)
print(json.dumps({"progress": namespace["progress"](work), "deadline": deadline, "hard_end": hard_end,
                  "agent": callable(namespace["run_attempt"])}))
"""


def test_the_colab_agent_cell_runs_with_the_contract_alone(tmp_path):
    """The notebook's agent cell defines the contract's names itself: on Colab no gpupool is
    installed until the cell downloads the runtime (``python -I -S``: no site-packages here)."""
    import subprocess
    import sys

    from gpupool_providers.colab.notebook import AGENT_SOURCES

    cell = tmp_path / "cell.py"
    cell.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in AGENT_SOURCES))
    result = subprocess.run([sys.executable, "-I", "-S", "-c", CELL_PROBE, str(cell)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"progress": {"step": 3, "total": 9, "heartbeat": 1.0},
                                         "deadline": 1080.0, "hard_end": 1200.0, "agent": True}


# -- one deadline rule ----------------------------------------------------------------------

@pytest.mark.parametrize(("cap", "configured", "margin"), [
    (12 * HOUR, None, 600.0),  # a long session keeps 10 minutes
    (9 * HOUR, None, 600.0),
    (1200.0, None, 120.0),  # a short one keeps 10 %
    (60.0, None, 6.0),
    (12 * HOUR, 0.0, 0.0),  # configured wins, zero too
    (12 * HOUR, 42.0, 42.0),
    (None, None, 0.0),  # no cap: no margin
])
def test_deadline_margin_rule(cap, configured, margin):
    assert contract.deadline_margin(cap, configured) == margin


def test_the_supervisor_counts_the_rule_from_its_own_start():
    assert bootstrap.session_limits({"session_seconds": 12 * HOUR}, 1000.0) == (1000 + 12 * HOUR - 600,
                                                                                1000 + 12 * HOUR)
    assert bootstrap.session_limits({"session_seconds": 1200, "deadline_margin": 0}, 0.0) == (1200, 1200)
    measured = {"deadline": 50.0, "hard_end": 100.0}  # a caller measured the session's start
    assert bootstrap.session_limits(measured, 1000.0) == (50.0, 100.0)
    assert bootstrap.session_limits({}, 1000.0) == (None, None)


def test_every_provider_defaults_to_the_rule():
    from gpupool_providers.colab.config import ColabConfig
    from gpupool_providers.kaggle.config import KaggleConfig
    from gpupool_providers.local import LocalConfig

    assert KaggleConfig().margin == contract.deadline_margin(9 * HOUR) == 600.0
    assert KaggleConfig(session_seconds=1200).margin == 120.0
    assert KaggleConfig(deadline_margin=5).margin == 5.0
    # Colab and local hand None to the session, which applies the rule to the session's cap
    assert ColabConfig().deadline_margin is None and LocalConfig().deadline_margin is None
    deadline, hard_end = contract.session_deadline(0.0, ColabConfig().session_seconds,
                                                   ColabConfig().deadline_margin)
    assert hard_end - deadline == 600.0


def test_session_config_round_trips_through_the_supervisor(tmp_path):
    config = contract.session_config(session_dir=str(tmp_path), bundle="b.tar.gz", run="true",
                                     env={"A": "1"}, deadline=10.0, hard_end=20.0)
    path = tmp_path / contract.SESSION_CONFIG
    path.write_text(json.dumps(config))
    loaded = bootstrap.load_config(path)
    assert bootstrap.session_limits(loaded, 0.0) == (10.0, 20.0)
    env = bootstrap.session_environment(loaded, 10.0)
    assert env["A"] == "1" and env[contract.ENV_DEADLINE] == "10.000"


# -- event lines and the events file ----------------------------------------------------------

def test_event_lines_round_trip_and_others_are_not_events():
    record = {"event": "progress", "step": 7, "time": 1.5, "metrics": {"loss": 0.25}}
    assert contract.parse_event_line(contract.EVENT_PREFIX + contract.event_line(record)) == record
    for line in ("[gpupool] run: python train.py", "[gpupool] {torn", "step 7", "[gpupool] [1, 2]"):
        assert contract.parse_event_line(line) is None


def test_last_event_reads_the_tail_and_skips_torn_lines(tmp_path):
    assert contract.last_event(tmp_path) == {}  # no events file yet
    lines = [contract.event_line({"event": "progress", "step": s, "pad": "x" * 200}) for s in range(1000)]
    lines.append(contract.event_line({"event": "checkpoint", "step": 1000, "name": "ckpt-1000"}))
    lines.append(contract.event_line({"event": "sigterm"}))  # no step: not a progress record
    lines.append('{"event": "progress", "step": 1001')  # torn by a kill mid-write
    (tmp_path / contract.EVENTS_FILE).write_text("\n".join(lines))
    assert os.path.getsize(tmp_path / contract.EVENTS_FILE) > contract.EVENT_TAIL_BYTES
    assert contract.last_event(tmp_path)["step"] == 1000
    assert contract.last_event(tmp_path, "progress")["step"] == 999
    assert contract.last_event(tmp_path, "complete") == {}


# -- session files ----------------------------------------------------------------------------

def test_write_json_atomic_replaces_whole_and_leaves_nothing_beside(tmp_path):
    path = tmp_path / contract.EXIT_FILE
    contract.write_json_atomic(path, {"returncode": 1})
    contract.write_json_atomic(path, {"returncode": 0})
    assert contract.read_json(path) == {"returncode": 0}
    assert [p.name for p in tmp_path.iterdir()] == [contract.EXIT_FILE]


def test_read_json_is_none_for_missing_torn_or_non_object_files(tmp_path):
    assert contract.read_json(tmp_path / "absent.json") is None
    (tmp_path / "torn.json").write_text('{"returncode": ')
    (tmp_path / "list.json").write_text("[1]")
    assert contract.read_json(tmp_path / "torn.json") is None
    assert contract.read_json(tmp_path / "list.json") is None


def test_ended_cleanly():
    assert contract.ended_cleanly({"returncode": 0, "outcome": None})
    assert contract.ended_cleanly({"returncode": contract.EXIT_YIELD, "outcome": None})
    assert contract.ended_cleanly({"returncode": -9, "outcome": contract.OUTCOME_YIELD})
    assert not contract.ended_cleanly({"returncode": 1, "outcome": None})
    assert not contract.ended_cleanly({})


def _tar(path: Path, members: dict[str, bytes], link: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            tar.addfile(info)
    return path


@pytest.fixture(params=["filter", "no-filter"])
def tar_python(request, monkeypatch):
    """Today's Python, and one without extraction filters (before 3.10.12 / 3.11.4)."""
    if request.param == "no-filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return request.param


def test_extract_tar_unpacks(tmp_path, tar_python):
    archive = _tar(tmp_path / "ok.tar.gz", {"a/b.txt": b"hello", "c.txt": b""})
    target = contract.extract_tar(archive, tmp_path / "out")
    assert (target / "a" / "b.txt").read_bytes() == b"hello" and (target / "c.txt").exists()


@pytest.mark.parametrize("hostile", [
    {"members": {"../escape.txt": b"x"}},
    {"members": {}, "link": ("out-link", "/etc/passwd")},
    {"members": {}, "link": ("up-link", "../../outside")},
])
def test_extract_tar_refuses_what_leaves_the_target(tmp_path, hostile, tar_python):
    archive = _tar(tmp_path / "bad.tar.gz", hostile["members"], hostile.get("link"))
    with pytest.raises(tarfile.TarError):
        contract.extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_extract_tar_keeps_a_link_that_stays_inside(tmp_path, tar_python):
    archive = _tar(tmp_path / "ok.tar.gz", {"a/b.txt": b"hello"}, ("inner", "a/b.txt"))
    target = contract.extract_tar(archive, tmp_path / "out")
    assert (target / "inner").is_symlink() and (target / "inner").read_bytes() == b"hello"
