"""What the framework callbacks share: when to save and stop, and which folder is the run's state.

Standard library only; the framework modules import torch/transformers/lightning themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpupool.errors import RuntimeErrorInSession
from gpupool.runtime import Session
from gpupool.session.contract import EVENT_PROGRESS


class Pacer:
    """Decides, at the end of each optimizer step, whether the loop must save and stop now.

    It stops when ``session.should_stop()`` (SIGTERM, or the deadline told by gpupool) or when
    the seconds left before the deadline no longer cover twice the last save plus one more
    step: a framework saves only at a step end, so waiting for the next one could be too late.
    Durations are measured with ``clock`` (seconds, monotonic; injected in tests).
    """

    def __init__(self, session: Session, clock: Callable[[], float] = time.monotonic):
        self.session = session
        self.clock = clock
        self.step_seconds = 0.0
        self.save_seconds = 0.0
        self._step_started: float | None = None
        self._save_started: float | None = None
        self.stopping = False

    def step_ended(self) -> None:
        """Call at every step end: the step's duration is the gap since the previous call."""
        now = self.clock()
        if self._step_started is not None:
            self.step_seconds = now - self._step_started
        self._step_started = now

    def must_stop(self) -> bool:
        if self.stopping or self.session.should_stop():
            return True
        left = self.session.seconds_left()
        return left is not None and left <= 2 * self.save_seconds + self.step_seconds

    def save_started(self) -> None:
        self._save_started = self.clock()

    def save_ended(self) -> None:
        """Record the save's duration; the time spent saving is not counted as a step."""
        if self._save_started is not None:
            self.save_seconds = self.clock() - self._save_started
            self._save_started = None
        self._step_started = self.clock()


def under_gpupool(session: Session) -> bool:
    """True inside a session gpupool started (it sets ``GPUPOOL_EXPERIMENT``)."""
    return session.experiment != "standalone"


def state_folder(session: Session, given: str | Path | None, what: str) -> Path | None:
    """The folder the framework writes its checkpoints to, checked against the experiment file.

    ``given`` (e.g. ``TrainingArguments.output_dir``) defaults to ``session.checkpoint_dir``
    (the experiment's ``checkpoint.path``). Inside a gpupool session the folder must lie in
    the declared checkpoint folder, the only one gpupool restores and snapshots: anything else
    would be lost with the session, so it raises ``RuntimeErrorInSession`` naming both.
    Standalone (no gpupool), any folder is accepted, and None means there is none.
    """
    declared = session.checkpoint_dir
    if given is None:
        return declared
    folder = Path(given).absolute()  # relative to the working directory, as the frameworks read it
    if not under_gpupool(session):
        return folder
    if declared is None:
        raise RuntimeErrorInSession(
            f"{what}: checkpoints written to {given} would be lost when the session ends; declare "
            f"that folder in the experiment file (checkpoint: {{path: {given}}})")
    if not _inside(folder, declared):
        raise RuntimeErrorInSession(
            f"{what}: {folder} is outside the experiment's checkpoint folder {declared}, so gpupool "
            f"would not keep its checkpoints; write them under {declared} (session.checkpoint_dir)")
    return folder


def _inside(path: Path, folder: Path) -> bool:
    resolved, root = path.resolve(), folder.resolve()
    return resolved == root or root in resolved.parents


def progress_now(session: Session, step: int, total: int | None, metrics: dict[str, Any]) -> None:
    """A progress record written now, not throttled like ``report()``: the supervisor labels
    the snapshot it is asked for right after with this step."""
    session.event(EVENT_PROGRESS, step=step, total=total, metrics=metrics)
