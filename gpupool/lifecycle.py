"""The lifecycle of experiments and attempts, as data: states and the moves allowed."""

from __future__ import annotations

import enum


class ExperimentState(str, enum.Enum):
    PENDING = "pending"      # waiting to be placed (first time, or after a session ended)
    RUNNING = "running"      # one attempt is active
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _EXPERIMENT_TERMINAL


class AttemptState(str, enum.Enum):
    CREATED = "created"          # recorded, not yet handed to the provider
    SUBMITTED = "submitted"      # the provider accepted it; queued or waiting for a person
    RUNNING = "running"          # the session is training
    SUCCEEDED = "succeeded"      # training completed in this session
    YIELDED = "yielded"          # ended on purpose near its deadline: resume elsewhere
    LOST = "lost"                # the session died (killed, preempted, heartbeat stale)
    FAILED = "failed"            # the training script failed with an error
    UNAVAILABLE = "unavailable"  # the provider had no capacity or was never started
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in ACTIVE_ATTEMPT

    @property
    def terminal(self) -> bool:
        return not self.active


_EXPERIMENT_TERMINAL = {ExperimentState.SUCCEEDED, ExperimentState.FAILED, ExperimentState.CANCELLED}
ACTIVE_ATTEMPT = frozenset({AttemptState.CREATED, AttemptState.SUBMITTED, AttemptState.RUNNING})
_ATTEMPT_ENDINGS = frozenset(AttemptState) - ACTIVE_ATTEMPT

EXPERIMENT_MOVES: dict[ExperimentState, frozenset[ExperimentState]] = {
    ExperimentState.PENDING: frozenset(
        {ExperimentState.RUNNING, ExperimentState.FAILED, ExperimentState.CANCELLED}
    ),
    ExperimentState.RUNNING: frozenset(
        {ExperimentState.PENDING, ExperimentState.SUCCEEDED, ExperimentState.FAILED,
         ExperimentState.CANCELLED}
    ),
    ExperimentState.SUCCEEDED: frozenset(),
    ExperimentState.FAILED: frozenset({ExperimentState.PENDING}),  # `gpupool retry`
    ExperimentState.CANCELLED: frozenset({ExperimentState.PENDING}),
}

ATTEMPT_MOVES: dict[AttemptState, frozenset[AttemptState]] = {
    AttemptState.CREATED: frozenset({AttemptState.SUBMITTED} | _ATTEMPT_ENDINGS),
    AttemptState.SUBMITTED: frozenset({AttemptState.RUNNING} | _ATTEMPT_ENDINGS),
    AttemptState.RUNNING: _ATTEMPT_ENDINGS,
    **{ending: frozenset() for ending in _ATTEMPT_ENDINGS},
}
