"""Runs an example training script in a subprocess, with test-only callbacks that cut it.

    python tests/integrations/harness.py hf|lightning [path/to/train.py]

``GATE_SIGTERM_AT=N``: at step N, touch ``$GPUPOOL_SESSION_DIR/gate`` and wait until the
session has seen a SIGTERM (the test sends it once the file exists), so the cut happens at a
known step without guessing at timing. ``GATE_DEADLINE_AT=N``: at step N, move the session's
deadline to now, as if the provider's cap had come. ``GATE_WAIT_AT=N,M``: at those steps, wait
until the session must stop (the deadline of a real session cap, told by the supervisor): a
session cap then ends the session there whatever the machine's speed. The example's own
gpupool callback runs after these, so it sees the cut at the same step end.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from gpupool import runtime

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"


def load_example(name: str, path: Path | None = None):
    path = path if path is not None else EXAMPLES / name / "train.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cut(step: int) -> None:
    session = runtime.session()
    if step == int(os.environ.get("GATE_SIGTERM_AT", "-1")):
        (session.session_dir / "gate").write_text(str(step))
        while not session.should_stop():  # released by the test's SIGTERM
            time.sleep(0.01)
    if step == int(os.environ.get("GATE_DEADLINE_AT", "-1")):
        session.deadline = time.time()
    if str(step) in os.environ.get("GATE_WAIT_AT", "").split(","):
        while not session.should_stop():  # released by the session cap's deadline
            time.sleep(0.05)


def hf_gate():
    from transformers import TrainerCallback

    class Gate(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            cut(state.global_step)

    return Gate()


def lightning_gate():
    import lightning.pytorch as pl

    class Gate(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            cut(trainer.global_step)

    return Gate()


def main(which: str, script: str | None = None) -> None:
    torch.set_num_threads(1)
    example = load_example({"hf": "hf-trainer", "lightning": "lightning"}[which],
                           Path(script).absolute() if script else None)
    gate = hf_gate() if which == "hf" else lightning_gate()
    example.main(extra_callbacks=[gate])


if __name__ == "__main__":
    main(*sys.argv[1:3])
