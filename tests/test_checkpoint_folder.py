"""Bring-your-own scripts: the runtime contract (checkpoint_dir, resumed, request_snapshot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from gpupool import runtime
from gpupool.bundle import pack_workdir
from gpupool.errors import SpecError
from gpupool.manifest import list_local, read_local, verify_local
from gpupool.runtime import Session
from gpupool.session import snapshot
from gpupool.session.snapshot import (
    Folders,
    Snapshotter,
    restore_into,
    restored_checkpoint,
    substitute_resume,
)
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
    ("outputs: [.]\n", "outputs.0", 4, "workdir itself"),
    ("checkpoint: {path: ckpt}\noutputs:\n  - final\n  - ckpt\n", "outputs.1", 7,
     "same folder as checkpoint.path ('ckpt')"),
    ("checkpoint: {path: runs}\noutputs: [runs/tb]\n", "outputs.0", 5, "nested with"),
], ids=["dotdot", "absolute", "twice-in-outputs", "dot", "checkpoint-also-output", "nested"])
def test_bad_folders_name_the_field_and_line(tmp_path, extra, field, line, words):
    problems = spec_problems(write_experiment(tmp_path, extra))
    assert [where for where, _ in problems] == [f"{field} (line {line})"], problems
    assert words in problems[0][1]


def test_every_bad_output_entry_is_reported_with_its_line(tmp_path):
    problems = spec_problems(write_experiment(tmp_path, "outputs:\n  - ../up\n  - fine\n  - /abs\n"))
    assert [where for where, _ in problems] == ["outputs.0 (line 5)", "outputs.2 (line 7)"], problems
    assert "outside the workdir" in problems[0][1] and "absolute" in problems[1][1]


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
    assert "outputs.0 (line 4)" in result.stderr and "Traceback" not in result.stderr


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


# -- snapshots -------------------------------------------------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_snapshotter(tmp_path: Path, known=None, **options) -> tuple[Snapshotter, Path, Clock]:
    work = tmp_path / "code"
    for folder in ("ckpt", "out"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    clock = Clock(time.time() + 100)  # the folder is quiet unless a test touches it "now"
    snapper = Snapshotter(Folders(work, "ckpt", ("out",)), tmp_path / "session", info={},
                          keep_last=2, known=known, clock=clock, **options)
    return snapper, work, clock


def published(snapper: Snapshotter) -> list:
    return list_local(snapper.root)


def test_snapshot_is_a_verified_checkpoint_of_workdir_relative_files(tmp_path):
    snapper, work, _ = make_snapshotter(tmp_path)
    (work / "ckpt" / "last.pt").write_bytes(b"weights-1")
    (work / "out" / "sub").mkdir()
    (work / "out" / "sub" / "log.txt").write_bytes(b"log")
    manifest = snapper.snapshot()
    assert manifest is not None and manifest.metadata["snapshot"] is True
    assert [f.path for f in manifest.files] == ["ckpt/last.pt", "out/sub/log.txt"]
    verify_local(snapper.root / manifest.name, read_local(snapper.root / manifest.name))
    assert snapper.snapshot() is None  # nothing changed: nothing published


def test_unchanged_files_are_neither_read_nor_hashed_again(tmp_path):
    snapper, work, _ = make_snapshotter(tmp_path)
    (work / "ckpt" / "big.bin").write_bytes(os.urandom(1 << 20))
    (work / "out" / "log.txt").write_bytes(b"a")
    first = snapper.snapshot()
    assert snapper.bytes_read == (1 << 20) + 1
    (work / "out" / "log.txt").write_bytes(b"ab")
    second = snapper.snapshot()
    assert second is not None and snapper.bytes_read == (1 << 20) + 1 + 2  # only the changed file
    old, new = (snapper.root / m.name / "ckpt" / "big.bin" for m in (first, second))
    assert old.stat().st_ino == new.stat().st_ino  # hard-linked from the previous snapshot


def test_a_checkpoint_folder_written_just_now_waits_unless_the_trainer_asked(tmp_path):
    snapper, work, clock = make_snapshotter(tmp_path)
    (work / "ckpt" / "last.pt").write_bytes(b"v1")
    (work / "out" / "log.txt").write_bytes(b"a")
    clock.now = time.time()  # last.pt was modified less than `quiet` seconds ago
    manifest = snapper.snapshot()
    assert manifest is not None and [f.path for f in manifest.files] == ["out/log.txt"]
    trusted = snapper.snapshot(trusted=True)  # Session.request_snapshot(): the save is complete
    assert trusted is not None and [f.path for f in trusted.files] == ["ckpt/last.pt", "out/log.txt"]


def test_a_busy_checkpoint_folder_keeps_the_previous_consistent_copy(tmp_path):
    snapper, work, clock = make_snapshotter(tmp_path)
    (work / "ckpt" / "a.pt").write_bytes(b"a1")
    (work / "ckpt" / "b.pt").write_bytes(b"b1")
    snapper.snapshot()
    (work / "ckpt" / "a.pt").write_bytes(b"a2-half-written")  # the trainer is saving right now
    (work / "out" / "log.txt").write_bytes(b"new output")
    clock.now = time.time()
    manifest = snapper.snapshot()
    assert manifest is not None
    folder = snapper.root / manifest.name
    assert (folder / "ckpt" / "a.pt").read_bytes() == b"a1"
    assert (folder / "ckpt" / "b.pt").read_bytes() == b"b1"
    assert (folder / "out" / "log.txt").read_bytes() == b"new output"


def test_a_file_changing_during_the_copy_is_never_published(tmp_path, monkeypatch):
    snapper, work, _ = make_snapshotter(tmp_path)
    (work / "ckpt" / "last.pt").write_bytes(b"complete")
    snapper.snapshot()
    (work / "ckpt" / "last.pt").write_bytes(b"second version")
    os.utime(work / "ckpt" / "last.pt", (1, 1))  # looks quiet, yet is rewritten mid-copy:
    real_copy = snapshot.copy_hashed

    def copy_then_write(source, target):
        result = real_copy(source, target)
        (work / "ckpt" / "last.pt").write_bytes(b"third, torn")
        return result

    monkeypatch.setattr(snapshot, "copy_hashed", copy_then_write)
    assert snapper.snapshot() is None  # the two scans disagree: the consistent copy stays
    [only] = published(snapper)
    assert (snapper.root / only.name / "ckpt" / "last.pt").read_bytes() == b"complete"


def test_restore_puts_files_in_place_and_seeds_the_snapshotter(tmp_path):
    first, work, _ = make_snapshotter(tmp_path / "s1")
    (work / "ckpt" / "last.pt").write_bytes(b"state")
    (work / "out" / "events.1").write_bytes(b"curve part 1")
    manifest = first.snapshot()
    restore_dir = first.root / manifest.name
    folders = Folders(tmp_path / "s2" / "code", "ckpt", ("out",))
    known = restore_into(folders, restore_dir)
    assert (folders.workdir / "ckpt" / "last.pt").read_bytes() == b"state"
    assert restored_checkpoint(folders, known)
    second, work2, _ = make_snapshotter(tmp_path / "s2", known=known, start_step=manifest.step)
    assert second.snapshot() is None  # the restored state is already in the store
    (work2 / "out" / "events.2").write_bytes(b"curve part 2")  # a second TensorBoard file
    merged = second.snapshot()
    assert [f.path for f in merged.files] == ["ckpt/last.pt", "out/events.1", "out/events.2"]
    assert second.bytes_read == len(b"curve part 2") and merged.step == manifest.step + 1


def test_outputs_only_restore_is_not_a_resume(tmp_path):
    first, work, _ = make_snapshotter(tmp_path / "s1")
    (work / "out" / "samples.txt").write_bytes(b"x")
    manifest = first.snapshot()
    folders = Folders(tmp_path / "s2" / "code", "ckpt", ("out",))
    assert not restored_checkpoint(folders, restore_into(folders, first.root / manifest.name))


def test_keep_last_prunes_old_snapshots(tmp_path):
    snapper, work, _ = make_snapshotter(tmp_path)
    for i in range(4):
        (work / "ckpt" / "last.pt").write_bytes(b"v%d" % i)
        snapper.snapshot(trusted=True)
    assert [m.step for m in published(snapper)] == [4, 3]


def test_an_unquoted_resume_gets_a_hint(tmp_path):
    path = write_experiment(tmp_path, "checkpoint: {path: ckpt}\n",
                            run="python train.py {{resume: --resume ckpt/last.pt}}")
    [(where, why)] = spec_problems(path)
    assert where.startswith("line 3") and "in quotes" in why


def test_the_plain_example_loads():
    spec = load_experiment(Path(__file__).parents[1] / "configs" / "examples" / "plain" / "experiment.yaml")
    assert spec.checkpoint.path == "checkpoints" and spec.outputs == ["final", "runs"]


# -- the session's supervisor (gpupool.session.bootstrap) ---------------------------------------------

SHOW_ENV = """import json, os, sys
os.makedirs("out", exist_ok=True)
keys = ("GPUPOOL_CHECKPOINT_DIR", "GPUPOOL_RESUMED", "WANDB_RUN_ID", "WANDB_RESUME")
json.dump({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in keys}}, open("out/seen.json", "w"))
with open("ckpt/n.txt", "a") as handle:
    handle.write("x")
"""


def run_session(tmp_path: Path, name: str, restore: Path | None = None) -> Path:
    code = tmp_path / "src"
    code.mkdir(exist_ok=True)
    (code / "show.py").write_text(SHOW_ENV)
    pack_workdir(code, tmp_path / "bundle.tar.gz")
    session = tmp_path / name
    env = {"GPUPOOL_EXPERIMENT": "exp-1", "GPUPOOL_ATTEMPT": f"exp-1-{name}",
           "GPUPOOL_CHECKPOINT_PATH": "ckpt", "GPUPOOL_OUTPUTS": '["out"]',
           "GPUPOOL_SESSION_DIR": str(session), "GPUPOOL_CHECKPOINT_INTERVAL": "3600"}
    if restore is not None:
        env["GPUPOOL_RESTORE_DIR"] = str(restore)
    config = {"session_dir": str(session), "bundle": str(tmp_path / "bundle.tar.gz"),
              "run": f"mkdir -p ckpt && {sys.executable} show.py {{{{resume: --from ckpt/n.txt}}}}",
              "env": env}
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "gpupool.session.bootstrap", str(tmp_path / f"{name}.json")],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return session


def test_the_supervisor_restores_resumes_and_snapshots(tmp_path):
    first = run_session(tmp_path, "s1")
    seen = json.loads((first / "code" / "out" / "seen.json").read_text())
    assert seen["argv"] == [] and seen["GPUPOOL_RESUMED"] is None  # nothing to resume yet
    assert seen["GPUPOOL_CHECKPOINT_DIR"] == str(first / "code" / "ckpt")
    assert (seen["WANDB_RUN_ID"], seen["WANDB_RESUME"]) == ("exp-1", "allow")
    [snap] = list_local(first / "checkpoints")  # once more after the script exited
    assert {f.path for f in snap.files} == {"ckpt/n.txt", "out/seen.json"} and snap.final
    second = run_session(tmp_path, "s2", restore=first / "checkpoints" / snap.name)
    seen = json.loads((second / "code" / "out" / "seen.json").read_text())
    assert seen["argv"] == ["--from", "ckpt/n.txt"] and seen["GPUPOOL_RESUMED"] == "1"
    assert (second / "code" / "ckpt" / "n.txt").read_text() == "xx"  # restored, then appended
    assert json.loads((second / "exit.json").read_text())["returncode"] == 0


def test_a_failed_restore_fails_the_session_instead_of_starting_over(tmp_path):
    first = run_session(tmp_path, "s1")
    [snap] = list_local(first / "checkpoints")
    (first / "checkpoints" / snap.name / "ckpt" / "n.txt").unlink()
    second = run_session(tmp_path, "s2", restore=first / "checkpoints" / snap.name)
    assert json.loads((second / "exit.json").read_text())["returncode"] == 1
    assert not (second / "code" / "out").exists(), "the script never ran"


def test_a_restore_with_a_malformed_manifest_fails_the_session_too(tmp_path):
    """ManifestError is part of gpupool's tree (issue 13 item 2), no longer a ValueError: the
    supervisor still reports a restore it cannot read and fails the session, no traceback."""
    first = run_session(tmp_path, "s1")
    [snap] = list_local(first / "checkpoints")
    (first / "checkpoints" / snap.name / "manifest.json").write_text('{"name": "../x"}')
    second = run_session(tmp_path, "s2", restore=first / "checkpoints" / snap.name)
    assert json.loads((second / "exit.json").read_text())["returncode"] == 1
    assert not (second / "code" / "out").exists(), "the script never ran"


def test_a_file_rewritten_with_the_same_bytes_is_read_once(tmp_path):
    snapper, work, _ = make_snapshotter(tmp_path)
    (work / "out" / "config.json").write_bytes(b"{}")
    snapper.snapshot()
    os.utime(work / "out" / "config.json", ns=(1, 1))  # rewritten, same content
    assert snapper.snapshot() is None and snapper.bytes_read == 4
    assert snapper.snapshot() is None and snapper.bytes_read == 4  # not read a third time


def test_a_file_deleted_during_the_copy_keeps_the_previous_consistent_copy(tmp_path, monkeypatch):
    snapper, work, _ = make_snapshotter(tmp_path)
    (work / "ckpt" / "checkpoint-1").mkdir()
    (work / "ckpt" / "checkpoint-1" / "model.bin").write_bytes(b"one")
    snapper.snapshot()
    (work / "ckpt" / "checkpoint-2").mkdir()  # the trainer saves checkpoint-2, then rotates
    (work / "ckpt" / "checkpoint-2" / "model.bin").write_bytes(b"two")
    os.utime(work / "ckpt" / "checkpoint-2" / "model.bin", (1, 1))
    real_copy = snapshot.copy_hashed

    def copy_then_rotate(source, target):
        result = real_copy(source, target)
        shutil.rmtree(work / "ckpt" / "checkpoint-1", ignore_errors=True)
        return result

    monkeypatch.setattr(snapshot, "copy_hashed", copy_then_rotate)
    assert snapper.snapshot() is None  # the scans disagree: nothing half-rotated is published
    [only] = published(snapper)
    assert [f.path for f in only.files] == ["ckpt/checkpoint-1/model.bin"]


def test_a_script_with_folders_is_stopped_at_the_deadline_so_its_last_snapshot_fits():
    from gpupool.session.bootstrap import _stop_at

    env = {"GPUPOOL_DEADLINE": "1000.000"}
    assert _stop_at(env, 1060.0, has_folders=True) == 1000.0
    assert _stop_at(env, 1060.0, has_folders=False) == 1060.0  # runtime scripts yield on their own
    assert _stop_at({}, 1060.0, has_folders=True) == 1060.0
