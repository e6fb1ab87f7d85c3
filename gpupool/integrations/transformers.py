"""gpupool for the Hugging Face ``Trainer``: add one callback, resume from the restored folder.

    from gpupool.integrations.transformers import GpupoolCallback, resume_from_checkpoint

    args = TrainingArguments(output_dir="checkpoints", save_steps=200, ...)  # = checkpoint.path
    trainer = Trainer(model, args, train_dataset=data, callbacks=[GpupoolCallback()])
    trainer.train(resume_from_checkpoint=resume_from_checkpoint())   # None on the first session
    trainer.save_model("final")                                      # reached only when finished

The experiment file declares the Trainer's ``output_dir`` as its checkpoint folder
(``checkpoint: {path: checkpoints}``). The callback reports progress, asks gpupool to snapshot
the folder after every checkpoint the Trainer writes, and before the session deadline (or on
SIGTERM) makes the Trainer save a checkpoint and stop; ``train()`` then ends the process with
exit 75 (a yield), so gpupool resumes the run in the next session instead of counting it done.
The Trainer's own checkpoint holds the optimizer, scheduler and RNG states and it skips the
batches already seen, so a resumed run ends bit-identical to an uninterrupted one.

Imports ``transformers``; ``import gpupool`` does not import this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from gpupool import runtime
from gpupool.integrations._pacing import Pacer, progress_now, state_folder

CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's PREFIX_CHECKPOINT_DIR + step
COMPLETE_MARKER = "trainer_state.json"  # the Trainer writes it last into a checkpoint folder


class GpupoolCallback(TrainerCallback):
    """Reports step/total/loss, snapshots after each save, saves and stops before the deadline.

    ``session``: the gpupool session (default: ``runtime.session()``, which also installs the
    SIGTERM handler); ``clock``: monotonic seconds, injected in tests. Raises
    ``RuntimeErrorInSession`` at the start of training when, inside a gpupool session, the
    Trainer's ``output_dir`` is not in the experiment's declared checkpoint folder.
    """

    def __init__(self, session: runtime.Session | None = None, clock: Callable[[], float] | None = None):
        self.session = session if session is not None else runtime.session()
        self.pacer = Pacer(self.session, clock) if clock is not None else Pacer(self.session)
        self.metrics: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        state_folder(self.session, args.output_dir, "TrainingArguments.output_dir")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.metrics["loss"] = float(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.pacer.step_ended()
        self.session.report(state.global_step, total=state.max_steps or None, **self.metrics)
        if self.pacer.must_stop():
            self.pacer.stopping = True
            control.should_save = True
            control.should_training_stop = True
        if control.should_save:
            self.pacer.save_started()
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pacer.save_ended()
        if state.is_world_process_zero:
            progress_now(self.session, state.global_step, state.max_steps or None, self.metrics)
            self.session.request_snapshot()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pacer.stopping:  # stopped early on purpose: resume elsewhere, not "done"
            self.session.yield_session(state.global_step)


def resume_from_checkpoint(output_dir: str | Path | None = None,
                           session: runtime.Session | None = None) -> str | None:
    """The newest complete ``checkpoint-N`` folder in ``output_dir``, for
    ``trainer.train(resume_from_checkpoint=...)``; None when there is none (a fresh start,
    where ``True`` would make the Trainer raise ``ValueError``).

    ``output_dir`` defaults to the experiment's checkpoint folder (``session.checkpoint_dir``,
    restored into place by gpupool). A folder without ``trainer_state.json`` (the file the
    Trainer writes last) is skipped as incomplete. Raises ``RuntimeErrorInSession`` when,
    inside a gpupool session, ``output_dir`` lies outside the declared checkpoint folder.
    """
    session = session if session is not None else runtime.session()
    folder = state_folder(session, output_dir, "resume_from_checkpoint(output_dir)")
    if folder is None or not folder.is_dir():
        return None
    steps = {}
    for child in folder.iterdir():
        match = CHECKPOINT_FOLDER.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            steps[int(match.group(1))] = child
    return str(steps[max(steps)]) if steps else None
