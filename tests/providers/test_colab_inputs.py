"""inputs: on Colab, against the Drive emulator through the real pydrive2 client (provider side)
and the notebook's own Drive REST client (session side, ``bring_inputs``)."""

from __future__ import annotations

import hashlib
import os
import time
import webbrowser
from pathlib import Path

import pytest

from gpupool.errors import SpecError
from gpupool.lifecycle import AttemptState
from gpupool.scheduler import Scheduler
from gpupool.session.inputs import InputProblem
from gpupool.spec import ExperimentSpec
from gpupool_providers.colab.agent import DriveREST, bring_inputs
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401
from tests.providers.colab_support import MLP, make_pool, make_provider
from tests.providers.test_kaggle_inputs import web_fixture  # noqa: F401
from tests.test_inputs import make_data


@pytest.fixture(autouse=True)
def no_browser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    monkeypatch.setattr(webbrowser, "open", lambda *a, **k: pytest.fail("a browser was opened"))


def spec_with(inputs: dict, name: str = "colab-inputs") -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": name, "workdir": str(MLP), "run": "python train.py", "providers": ["colab"],
        "limits": {"retries_on_error": 0}, "inputs": inputs})


def submit(pool, spec: ExperimentSpec):  # type: ignore[no-untyped-def]
    experiment = pool.submit(spec)
    Scheduler(pool).reconcile_once(time.time())
    return pool.state.attempts(experiment.id)[-1]


def params_of(drive, colab, attempt) -> dict:  # type: ignore[no-untyped-def]
    """The notebook's INPUTS parameter, read back from the notebook gpupool put on Drive."""
    import json

    record = colab.records.get(attempt.id)
    cells = json.loads(drive.state.get(record["notebook_id"]).content)["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", []))
    scope: dict = {}
    exec(source, {}, scope)  # noqa: S102 - the cell is gpupool's own literal parameters
    return scope["INPUTS"]


def session_drive(drive) -> DriveREST:  # type: ignore[no-untyped-def]
    return DriveREST(drive.base_url, lambda token=drive.state.issue_access_token(): token,
                     chunk=256 * 1024, sleep=lambda s: None)


def copies(drive, title: str) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for f in drive.state.files.values() if f.title == title)


def test_local_input_goes_to_drive_once_and_arrives_verified(drive_emulator, tmp_path: Path) -> None:
    a, b = os.urandom(70_000), os.urandom(30_000)
    data = make_data(tmp_path / "data", {"a.bin": a, "sub/b.bin": b})
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    first = submit(pool, spec_with({"train": str(data)}))
    # Another experiment (from a second pool: Colab runs one session at a time per account).
    (tmp_path / "other").mkdir()
    other = make_provider(drive_emulator, tmp_path / "other")
    second = submit(make_pool(tmp_path / "other", colab=other), spec_with({"train": str(data)},
                                                                           name="same-data"))
    assert first.state == second.state == AttemptState.SUBMITTED
    assert copies(drive_emulator, "a.bin") == 1 and copies(drive_emulator, "b.bin") == 1
    plan = params_of(drive_emulator, other, second)
    assert plan == params_of(drive_emulator, colab, first)  # the same Drive folder
    env = bring_inputs(session_drive(drive_emulator), plan, tmp_path / "vm")
    path = Path(env["GPUPOOL_INPUT_TRAIN"])
    assert (path / "a.bin").read_bytes() == a and (path / "sub" / "b.bin").read_bytes() == b
    assert not os.access(path / "a.bin", os.W_OK) or os.geteuid() == 0  # read-only (root ignores)
    assert oct((path / "a.bin").stat().st_mode & 0o777) == "0o444"


def test_a_byte_changed_on_drive_is_caught_in_the_session(drive_emulator, tmp_path: Path) -> None:
    make_data(tmp_path / "data", {"a.bin": b"abc"})
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    attempt = submit(pool, spec_with({"train": str(tmp_path / "data")}))
    stored = next(f for f in drive_emulator.state.files.values() if f.title == "a.bin")
    drive_emulator.state.set_content(stored, b"abX")
    with pytest.raises(InputProblem, match="a.bin does not match its sha256"):
        bring_inputs(session_drive(drive_emulator), params_of(drive_emulator, colab, attempt),
                     tmp_path / "vm")


def test_upload_cut_short_is_completed_not_used(drive_emulator, tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a.bin": b"abc", "b.bin": b"defg"})
    colab = make_provider(drive_emulator, tmp_path)
    inputs = colab.inputs()
    from gpupool.inputs import hash_content

    content = hash_content(data, inputs.cache)
    folder = colab.drive().folder_path("gpupool", "inputs", content.sha256, "data")
    colab.drive().put(folder, "a.bin", data / "a.bin")  # an earlier run stopped here
    inputs.ensure_content(content)
    assert copies(drive_emulator, "a.bin") == 1 and copies(drive_emulator, "b.bin") == 1
    assert copies(drive_emulator, "gpupool-content.json") == 1


def test_drive_input_is_checked_up_front_and_copied_onto_the_vm(drive_emulator, tmp_path: Path) -> None:
    folder = drive_emulator.state.mkdir("my-shards")
    drive_emulator.state.create("shard-0.bin", parents=[folder.id], content=b"0" * 100)
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    with pytest.raises(SpecError) as caught:
        pool.submit(spec_with({"shards": {"drive": "1NoSuchFileId"}}))
    assert caught.value.exit_code == 2
    assert "does not exist or is not readable" in caught.value.problems[0][1]
    attempt = submit(pool, spec_with({"shards": {"drive": folder.id}}))
    env = bring_inputs(session_drive(drive_emulator), params_of(drive_emulator, colab, attempt),
                       tmp_path / "vm")
    assert (Path(env["GPUPOOL_INPUT_SHARDS"]) / "shard-0.bin").read_bytes() == b"0" * 100
    assert copies(drive_emulator, "shard-0.bin") == 1  # nothing uploaded


def test_drive_input_deleted_after_submit_fails_the_attempt(drive_emulator, tmp_path: Path) -> None:
    item = drive_emulator.state.create("vocab.txt", content=b"words")
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    experiment = pool.submit(spec_with({"vocab": {"drive": item.id}}))
    with drive_emulator.state.lock:
        del drive_emulator.state.files[item.id]
    Scheduler(pool).reconcile_once(time.time())
    [attempt] = pool.state.attempts(experiment.id)
    assert attempt.state == AttemptState.FAILED
    assert f"{item.id} no longer exists" in (attempt.end_reason or "")


def test_url_input_is_fetched_and_verified_in_the_session(drive_emulator, tmp_path: Path,
                                                          web: tuple[str, Path]) -> None:
    base, root = web
    (root / "w.txt").write_bytes(b"words\n")
    good = {"words": {"url": f"{base}/w.txt", "sha256": hashlib.sha256(b"words\n").hexdigest()}}
    plan = make_provider(drive_emulator, tmp_path).inputs().prepare(spec_with(good))
    env = bring_inputs(session_drive(drive_emulator), plan, tmp_path / "vm")
    assert Path(env["GPUPOOL_INPUT_WORDS"]).read_bytes() == b"words\n"
    plan["words"]["sha256"] = "0" * 64
    with pytest.raises(InputProblem, match="not 0000"):
        bring_inputs(session_drive(drive_emulator), plan, tmp_path / "vm2")


def test_a_drive_input_gone_in_the_session_fails_the_run_once(drive_emulator, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted after placement: the notebook reports the input apart ("input-problem") and the
    run fails at once with the reason, though retries are left (no retry loop)."""
    from gpupool.lifecycle import ExperimentState
    from gpupool_providers.colab import agent

    item = drive_emulator.state.create("vocab.txt", content=b"words")
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    spec = ExperimentSpec.model_validate({**spec_with({"vocab": {"drive": item.id}}).model_dump(),
                                          "limits": {"retries_on_error": 2}})
    attempt = submit(pool, spec)
    plan = params_of(drive_emulator, colab, attempt)
    with drive_emulator.state.lock:
        del drive_emulator.state.files[item.id]
    drive, work = session_drive(drive_emulator), tmp_path / "vm"
    work.mkdir()
    reporter = agent.Reporter(drive, colab._folder(attempt), work)
    monkeypatch.setattr(agent, "prepare", lambda d, p, w: bring_inputs(d, plan, w / "inputs"))
    with pytest.raises(InputProblem, match=f"input 'vocab': Drive file or folder {item.id} is gone"):
        agent.install(drive, reporter, {"HEARTBEAT_SECONDS": 60}, work)
    Scheduler(pool).reconcile_once(time.time())
    experiment = pool.state.experiment(attempt.experiment_id)
    [ended] = pool.state.attempts(attempt.experiment_id)
    assert ended.state == AttemptState.FAILED and experiment.state == ExperimentState.FAILED
    assert f"{item.id} is gone" in (experiment.message or "")
