"""Bring-your-own scripts: the runtime contract (checkpoint_dir, resumed, request_snapshot)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from gpupool import runtime
from gpupool.bundle import pack_workdir
from gpupool.errors import SpecError
from gpupool.runtime import Session
from gpupool.snapshot import substitute_resume
from gpupool.spec import load_experiment
from tests.test_cli import gpupool


def make_session(tmp_path, **env: str) -> Session:
    return Session(env={runtime.ENV_SESSION_DIR: str(tmp_path / "session"), **env},
                   install_sigterm=False)


def test_checkpoint_dir_and_resumed_come_from_the_supervisor(tmp_path):
    folder = tmp_path / "code" / "checkpoints"
    session = make_session(tmp_path, GPUPOOL_CHECKPOINT_DIR=str(folder), GPUPOOL_RESUMED="1")
    assert session.checkpoint_dir == folder
    assert session.resumed is True


def test_no_checkpoint_folder_declared_means_none_and_not_resumed(tmp_path):
    session = make_session(tmp_path)
    assert session.checkpoint_dir is None
    assert session.resumed is False
    assert make_session(tmp_path, GPUPOOL_RESUMED="0").resumed is False


def test_request_snapshot_leaves_a_new_request_file_each_time(tmp_path):
    session = make_session(tmp_path)
    request = session.session_dir / runtime.SNAPSHOT_REQUEST
    session.request_snapshot()
    first = request.stat()
    session.request_snapshot()
    second = request.stat()
    assert (first.st_ino, first.st_mtime_ns) != (second.st_ino, second.st_mtime_ns)
    assert not list(session.session_dir.glob("*.tmp"))  # written by rename, never torn


# -- the experiment file ---------------------------------------------------------------------

def write_experiment(tmp_path: Path, extra: str, run: str = "python train.py") -> Path:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "train.py").write_text("print('hi')\n")
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: byo-test\nworkdir: work\nrun: {run}\n{extra}")
    return path


def spec_problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    return info.value.problems


def test_folders_are_normalised_and_left_out_of_the_bundle(tmp_path):
    path = write_experiment(tmp_path, "checkpoint: {path: ./checkpoints/}\noutputs: [final, runs/tb]\n")
    work = tmp_path / "work"
    for rel in ("checkpoints/last.pt", "final/model.pt", "runs/tb/events", "runs/keep.txt"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text("stale")
    spec = load_experiment(path)
    assert spec.checkpoint.path == "checkpoints" and spec.outputs == ["final", "runs/tb"]
    pack_workdir(spec.workdir, tmp_path / "bundle.tar.gz", exclude=spec.state_folders())
    with tarfile.open(tmp_path / "bundle.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["runs/keep.txt", "train.py"]


@pytest.mark.parametrize("extra, field, line, words", [
    ("checkpoint: {path: ../x}\n", "checkpoint.path", 4, "outside the workdir"),
    ("checkpoint:\n  path: /tmp/ckpt\n", "checkpoint.path", 5, "absolute"),
    ("outputs:\n  - out\n  - ./out/\n", "outputs", 5, "twice"),
    ("outputs: [.]\n", "outputs", 4, "workdir itself"),
    ("checkpoint: {path: ckpt}\noutputs:\n  - final\n  - ckpt\n", "outputs.1", 7, "same folder as"),
    ("checkpoint: {path: runs}\noutputs: [runs/tb]\n", "outputs.0", 5, "nested with"),
], ids=["dotdot", "absolute", "twice-in-outputs", "dot", "checkpoint-also-output", "nested"])
def test_bad_folders_name_the_field_and_line(tmp_path, extra, field, line, words):
    problems = spec_problems(write_experiment(tmp_path, extra))
    assert [where for where, _ in problems] == [f"{field} (line {line})"], problems
    assert words in problems[0][1]


def test_a_symlink_out_of_the_workdir_is_refused(tmp_path):
    path = write_experiment(tmp_path, "outputs:\n  - out\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "work" / "out").symlink_to(tmp_path / "elsewhere")
    [(where, why)] = spec_problems(path)
    assert where == "outputs.0 (line 5)" and "outside the workdir" in why


def test_a_folder_holding_the_run_script_is_refused(tmp_path):
    path = write_experiment(tmp_path, "checkpoint: {path: src}\n", run="python src/train.py")
    (tmp_path / "work" / "src").mkdir()
    (tmp_path / "work" / "src" / "train.py").write_text("")
    [(where, why)] = spec_problems(path)
    assert where == "checkpoint.path (line 4)" and "src/train.py" in why


def test_a_stale_checkpoint_named_by_resume_is_not_code(tmp_path):
    run = "python train.py {{resume: --resume ckpt/last.pt}}"
    path = write_experiment(tmp_path, "checkpoint: {path: ckpt}\n", run=f"'{run}'")
    (tmp_path / "work" / "ckpt").mkdir()
    (tmp_path / "work" / "ckpt" / "last.pt").write_text("stale")
    assert load_experiment(path).run == run


@pytest.mark.parametrize("run, extra, words", [
    ("python train.py {{resume: --resume ckpt/last.pt}}", "", "no checkpoint.path"),
    ("python train.py {{resume: --resume x", "checkpoint: {path: ckpt}\n", "without its closing"),
    ("python train.py {{resume: }}", "checkpoint: {path: ckpt}\n", "empty"),
])
def test_bad_resume_substitution_names_run(tmp_path, run, extra, words):
    problems = spec_problems(write_experiment(tmp_path, extra, run=f"'{run}'"))
    assert problems[0][0] == "run (line 3)" and words in problems[0][1]


def test_cli_exits_2_for_a_bad_folder(tmp_path):
    path = write_experiment(tmp_path, "outputs: [../up]\n")
    result = gpupool(["run", "--detach", str(path)], tmp_path / "data")
    assert result.returncode == 2, result.stderr
    assert "outputs (line 4)" in result.stderr and "Traceback" not in result.stderr


# -- the resume substitution -----------------------------------------------------------------

def test_resume_text_is_kept_only_when_restored_and_the_files_exist(tmp_path):
    command = "python train.py {{resume: --resume ckpt/last.pt --lr=1}} --epochs 3"
    (tmp_path / "ckpt").mkdir()
    assert substitute_resume(command, tmp_path, "ckpt", resumed=False) == "python train.py  --epochs 3"
    assert substitute_resume(command, tmp_path, "ckpt", resumed=True) == "python train.py  --epochs 3"
    (tmp_path / "ckpt" / "last.pt").write_text("x")
    assert (substitute_resume(command, tmp_path, "ckpt", resumed=True)
            == "python train.py --resume ckpt/last.pt --lr=1 --epochs 3")
    assert substitute_resume("a {{resume: --from=ckpt/missing}}", tmp_path, "ckpt", True) == "a "
    assert substitute_resume("a {{ resume: --go }}", tmp_path, "ckpt", True) == "a --go"
