"""The Lightning integration: RNG states, the checkpoint folder rules, and cut-and-resumed runs
against an uninterrupted one (fresh processes, the checkpoint folder carried between them)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpupool import runtime  # noqa: E402
from gpupool.errors import RuntimeErrorInSession  # noqa: E402
from gpupool.integrations.lightning import (  # noqa: E402
    GpupoolCallback,
    ckpt_path,
    collect_rng_states,
    restore_rng_states,
)
from tests.integrations.sessions import run_session  # noqa: E402

# 3 epochs of 8 batches: steps 8 and 16 are epoch ends, 5 and 13 are mid-epoch.
SMALL = {"MAX_EPOCHS": "3", "SAMPLES": "64", "BATCH": "8"}


def make_session(tmp_path: Path, checkpoint_dir: Path | None = None, experiment: str = "exp"
                 ) -> runtime.Session:
    env = {runtime.ENV_SESSION_DIR: str(tmp_path / "session"), runtime.ENV_EXPERIMENT: experiment}
    if checkpoint_dir is not None:
        env[runtime.ENV_CHECKPOINT_DIR] = str(checkpoint_dir)
    return runtime.Session(env=env, install_sigterm=False)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_states_survive_lightnings_weights_only_load(tmp_path):
    """Lightning 2.6 loads checkpoints with weights_only=True: the states must be plain data."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    states = collect_rng_states()
    expected = draws()
    torch.save({"rng": states}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    draws(), draws()  # move every generator on
    restore_rng_states(loaded)
    assert draws() == expected


def test_ckpt_path_is_none_until_a_checkpoint_is_restored(tmp_path):
    folder = tmp_path / "code" / "checkpoints"
    session = make_session(tmp_path, folder)
    assert ckpt_path(session=session) is None
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"x")
    assert ckpt_path(session=session) == str(folder / "last.ckpt")


def test_folders_gpupool_would_not_keep_are_refused(tmp_path):
    session = make_session(tmp_path, tmp_path / "checkpoints")
    with pytest.raises(RuntimeErrorInSession, match="outside the experiment's checkpoint folder"):
        GpupoolCallback(tmp_path / "elsewhere", session=session)
    with pytest.raises(RuntimeErrorInSession, match="declares no checkpoint folder"):
        GpupoolCallback(session=make_session(tmp_path))
    standalone = make_session(tmp_path, experiment="standalone")
    assert GpupoolCallback(session=standalone).path == Path("checkpoints").absolute() / "last.ckpt"


# -- cut and resumed ----------------------------------------------------------------------------

def final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(workdir / "final" / "model.pt", weights_only=True)


def final_step(output: str) -> int:
    return int(re.findall(r"done: step (\d+)", output)[-1])


def run_chain(root: Path, cuts: list[tuple[str, int]], env: dict[str, str]):
    """Sessions cut as listed (each must yield with 75), then one that finishes."""
    previous = None
    for index, (how, step) in enumerate(cuts):
        where = {"sigterm_at": step} if how == "sigterm" else {"deadline_at": step}
        ran = run_session(root, f"s{index}", "lightning", env, restore=previous, **where)
        assert ran.returncode == runtime.EXIT_YIELD, ran.output[-3000:]
        assert (ran.workdir / "checkpoints" / "last.ckpt").exists()
        assert (ran.session_dir / runtime.SNAPSHOT_REQUEST).exists()
        previous = ran.workdir
    last = run_session(root, "last", "lightning", env, restore=previous)
    assert last.returncode == 0, last.output[-3000:]
    return last


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ran = run_session(tmp_path_factory.mktemp("lightning"), "reference", "lightning", SMALL)
    assert ran.returncode == 0, ran.output[-3000:]
    return ran


def test_cuts_at_epoch_ends_resume_bit_identical(tmp_path, reference):
    """A deadline at one epoch end, SIGTERM at the next (Lightning turns SIGTERM into exit 0
    unless the callback makes it a yield); two resumes in a row."""
    last = run_chain(tmp_path, [("deadline", 8), ("sigterm", 16)], SMALL)
    expected, got = final_weights(reference.workdir), final_weights(last.workdir)
    assert final_step(last.output) == final_step(reference.output) == 24
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_cut_mid_epoch_resumes_without_losing_or_repeating_steps(tmp_path, reference):
    """Mid-epoch a plain DataLoader restarts the epoch's shuffle (the README gives the measured
    weight difference); the run still does exactly the reference's number of steps."""
    last = run_chain(tmp_path, [("sigterm", 5), ("deadline", 13)], SMALL)
    assert final_step(last.output) == final_step(reference.output)
    expected, got = final_weights(reference.workdir), final_weights(last.workdir)
    difference = max(float((expected[name] - got[name]).abs().max()) for name in expected)
    print(f"mid-epoch cut: max |weight difference| = {difference:.4f}")
    assert all(torch.isfinite(tensor).all() for tensor in got.values())
