"""The Hugging Face Trainer integration: unit behaviour, then a cut-and-resumed run against an
uninterrupted one (fresh processes, the checkpoint folder carried between them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from gpupool import runtime  # noqa: E402
from gpupool.errors import RuntimeErrorInSession  # noqa: E402
from gpupool.integrations.transformers import GpupoolCallback, resume_from_checkpoint  # noqa: E402
from tests.integrations.sessions import run_session  # noqa: E402

SMALL = {"TOTAL_STEPS": "12", "SAVE_STEPS": "4", "BATCH": "4", "SEQ_LEN": "16"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_session(tmp_path: Path, checkpoint_dir: Path | None = None, **env: str) -> runtime.Session:
    env = {runtime.ENV_SESSION_DIR: str(tmp_path / "session"), runtime.ENV_EXPERIMENT: "exp", **env}
    if checkpoint_dir is not None:
        env[runtime.ENV_CHECKPOINT_DIR] = str(checkpoint_dir)
    return runtime.Session(env=env, install_sigterm=False)


def write_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


# -- resume_from_checkpoint -------------------------------------------------------------------

def test_resume_is_none_on_a_fresh_start(tmp_path):
    folder = tmp_path / "code" / "checkpoints"
    session = make_session(tmp_path, folder)
    assert resume_from_checkpoint(session=session) is None  # folder not even created yet
    folder.mkdir(parents=True)
    assert resume_from_checkpoint(session=session) is None  # empty: True would raise in the Trainer


def test_resume_gives_the_newest_complete_checkpoint_by_step_number(tmp_path):
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder, 9)
    newest = write_checkpoint(folder, 10)  # 10 > 9 although "checkpoint-9" sorts after as text
    write_checkpoint(folder, 11, complete=False)  # cut while the Trainer was still writing it
    (folder / "checkpoint-12").write_text("a file, not a folder")
    assert resume_from_checkpoint(session=make_session(tmp_path, folder)) == str(newest)


def test_resume_refuses_a_folder_gpupool_does_not_keep(tmp_path):
    session = make_session(tmp_path, tmp_path / "checkpoints")
    with pytest.raises(RuntimeErrorInSession, match="outside the experiment's checkpoint folder"):
        resume_from_checkpoint(tmp_path / "elsewhere", session=session)
    undeclared = make_session(tmp_path)
    with pytest.raises(RuntimeErrorInSession, match="declare that folder"):
        resume_from_checkpoint("out", session=undeclared)


def test_standalone_resume_reads_any_folder(tmp_path):
    session = runtime.Session(env={runtime.ENV_SESSION_DIR: str(tmp_path / "s")}, install_sigterm=False)
    newest = write_checkpoint(tmp_path / "out", 3)
    assert resume_from_checkpoint(tmp_path / "out", session=session) == str(newest)
    assert resume_from_checkpoint(session=session) is None


# -- the callback, driven by hand ---------------------------------------------------------------

def step(callback: GpupoolCallback, state: TrainerState, control: TrainerControl, args=None) -> None:
    state.global_step += 1
    callback.on_step_end(args, state, control)


def test_callback_saves_and_stops_on_sigterm_then_yields_with_75(tmp_path):
    folder = tmp_path / "checkpoints"
    session = make_session(tmp_path, folder)
    callback = GpupoolCallback(session, clock=Clock())
    args = TrainingArguments(output_dir=str(folder), report_to=[])
    state, control = TrainerState(max_steps=50), TrainerControl()
    callback.on_train_begin(args, state, control)
    step(callback, state, control)
    assert not (control.should_save or control.should_training_stop)
    session._stop_requested = True  # what the SIGTERM handler sets
    step(callback, state, control)
    assert control.should_save and control.should_training_stop
    callback.on_save(args, state, control)
    assert (session.session_dir / runtime.SNAPSHOT_REQUEST).exists()
    with pytest.raises(SystemExit) as ended:
        callback.on_train_end(args, state, control)
    assert ended.value.code == runtime.EXIT_YIELD
    outcome = json.loads((session.session_dir / "outcome.json").read_text())
    assert outcome == {"outcome": "yield", "step": 2, "time": outcome["time"]}


def test_callback_stops_early_enough_for_one_more_step_and_two_saves(tmp_path):
    """The deadline is a wall time; steps and saves are measured with the injected clock."""
    session = make_session(tmp_path, tmp_path / "checkpoints")
    clock = Clock()
    callback = GpupoolCallback(session, clock=clock)
    state, control = TrainerState(max_steps=50), TrainerControl()
    step(callback, state, control)
    clock.now += 3.0  # a step takes 3 s
    step(callback, state, control)
    control.should_save = True  # the Trainer's own save at this step, taking 5 s
    callback.on_step_end(None, state, control)
    clock.now += 5.0
    callback.on_save(None, state, control)
    control.should_save = False
    session.deadline = __import__("time").time() + 12.0  # < 3 + 2 * 5 + margin: stop now
    clock.now += 3.0
    step(callback, state, control)
    assert control.should_training_stop and control.should_save


def test_callback_reports_progress_and_snapshots_after_every_save(tmp_path):
    session = make_session(tmp_path, tmp_path / "checkpoints")
    callback = GpupoolCallback(session, clock=Clock())
    state, control = TrainerState(max_steps=8), TrainerControl()
    callback.on_log(None, state, control, logs={"loss": 2.5})
    step(callback, state, control)
    callback.on_save(None, state, control)
    events = [json.loads(x) for x in (session.session_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "progress" and events[-1]["step"] == 1
    assert events[-1]["total"] == 8 and events[-1]["metrics"] == {"loss": 2.5}
    assert (session.session_dir / runtime.SNAPSHOT_REQUEST).exists()
    callback.on_train_end(None, state, control)  # finished normally: no yield, no exit


def test_callback_refuses_an_output_dir_outside_the_checkpoint_folder(tmp_path):
    session = make_session(tmp_path, tmp_path / "checkpoints")
    args = TrainingArguments(output_dir=str(tmp_path / "trainer_output"), report_to=[])
    with pytest.raises(RuntimeErrorInSession, match="TrainingArguments.output_dir"):
        GpupoolCallback(session).on_train_begin(args, TrainerState(), TrainerControl())


# -- bit-identical after cuts -------------------------------------------------------------------

def final_weights(workdir: Path) -> dict:
    return load_file(str(workdir / "final" / "model.safetensors"))


def test_cut_by_sigterm_and_deadline_then_resumed_ends_bit_identical(tmp_path):
    reference = run_session(tmp_path, "reference", "hf", SMALL)
    assert reference.returncode == 0, reference.output[-3000:]

    first = run_session(tmp_path, "s1", "hf", SMALL, sigterm_at=5)
    assert first.returncode == runtime.EXIT_YIELD, first.output[-3000:]
    assert (first.workdir / "checkpoints" / "checkpoint-5" / "trainer_state.json").exists()
    assert not (first.workdir / "final").exists()
    assert (first.session_dir / runtime.SNAPSHOT_REQUEST).exists()

    second = run_session(tmp_path, "s2", "hf", SMALL, restore=first.workdir, deadline_at=7)
    assert second.returncode == runtime.EXIT_YIELD, second.output[-3000:]
    assert (second.workdir / "checkpoints" / "checkpoint-7" / "trainer_state.json").exists()

    last = run_session(tmp_path, "s3", "hf", SMALL, restore=second.workdir)
    assert last.returncode == 0, last.output[-3000:]
    expected, got = final_weights(reference.workdir), final_weights(last.workdir)
    assert sorted(got) == sorted(expected) and len(got) > 10
    unequal = [name for name in expected if not bool((expected[name] == got[name]).all())]
    assert unequal == [], f"{len(unequal)} of {len(expected)} tensors differ"
