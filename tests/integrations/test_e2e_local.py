"""End to end through the local provider: the Hugging Face and Lightning examples, with only
gpupool's callback added, run under a session cap that forces two hops (the checkpoint folder
restored into place and snapshotted by the session supervisor), and the final model pulled
from the store is bit-identical to an uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.spec import load_experiment
from tests.helpers import ROOT, drive_until_done
from tests.integrations.sessions import HARNESS, run_session
from tests.test_byo_e2e import make_pool, pulled_outputs

EXAMPLES = ROOT / "configs" / "examples"
# The harness waits at two steps (GATE_WAIT_AT) until the session must stop: the cap's deadline,
# whatever the machine's speed, ends those two sessions there (for Lightning at epoch ends, where
# it resumes exactly; mid-epoch is the README's measured limit). A cap must leave time for the imports
# (torch + transformers take ~20 s of wall time on a loaded 2-core machine); a session whose
# imports outlast it is stopped before training and lost, which only adds a hop.
CASES = {
    "hf": ("hf-trainer", {"TOTAL_STEPS": "12", "SAVE_STEPS": "4", "BATCH": "4", "SEQ_LEN": "16",
                          "GATE_WAIT_AT": "4,7"}, 60.0, "model.safetensors"),
    "lightning": ("lightning", {"MAX_EPOCHS": "3", "SAMPLES": "64", "BATCH": "8", "GATE_WAIT_AT": "8,16"},
                  40.0, "model.pt"),
}


def framework_experiment(tmp: Path, which: str) -> Path:
    """The example's experiment file and script, run through the test harness (its gates)."""
    example, env, _, _ = CASES[which]
    work = tmp / "work"
    shutil.copytree(EXAMPLES / example, work)
    shutil.copy(HARNESS, work / "harness.py")
    spec = yaml.safe_load((EXAMPLES / example / "experiment.yaml").read_text())
    spec.update(workdir=str(work), providers=["local"], run=f"python harness.py {which} train.py",
                limits={"max_hops": 30, "retries_on_error": 2})
    spec["env"] = {**spec.get("env", {}), **env, "OMP_NUM_THREADS": "1"}
    spec["checkpoint"].update(interval="1h", settle="0.3s")  # snapshots come from the callback
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def load_weights(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("which", ["hf", "lightning"])
def test_session_caps_force_two_hops_and_the_pulled_model_is_exact(tmp_path, which):
    pytest.importorskip("transformers" if which == "hf" else "lightning")
    _, env, cap, weights_file = CASES[which]
    reference = run_session(tmp_path / "reference", "ref", which, {**env, "GATE_WAIT_AT": ""})
    assert reference.returncode == 0, reference.output[-3000:]

    pool = make_pool(tmp_path, session_seconds=cap, deadline_margin=2.0)
    experiment = pool.submit(load_experiment(framework_experiment(tmp_path, which)))
    done = drive_until_done(pool, experiment.id, timeout=1200)
    assert done.state == ExperimentState.SUCCEEDED, done.message
    attempts = pool.state.attempts(experiment.id)
    yields = [a for a in attempts if a.state == AttemptState.YIELDED]
    assert len(yields) >= 2 and done.hops >= 2, [(a.state, a.end_reason) for a in attempts]
    assert attempts[-1].checkpoint_in, "the last session resumed from a snapshot"

    files = pulled_outputs(pool, experiment.id, tmp_path / "pulled")
    assert f"final/{weights_file}" in files
    expected = load_weights(reference.workdir / "final" / weights_file)
    got = load_weights(tmp_path / "pulled" / "final" / weights_file)
    assert sorted(got) == sorted(expected)
    assert all(bool((expected[name] == got[name]).all()) for name in expected), "weights differ"
