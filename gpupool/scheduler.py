"""The scheduler's one step, ``reconcile_once(now)``: poll running attempts, finish ended ones
(collect their checkpoints, charge quota, decide the hop), and place pending experiments.

It keeps no state of its own between steps: everything lives in the state database, so a
scheduler killed at any point is restarted and simply reconciles again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from gpupool.errors import (
    CancelFailed,
    CheckpointError,
    GpupoolError,
    InputUnavailable,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    StoredSpecError,
    StoreUnreachable,
)
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.manifest import Manifest
from gpupool.placement import (
    Candidate,
    Place,
    backoff_seconds,
    checkpoint_interval,
    choose,
)
from gpupool.pool import Pool
from gpupool.progress import FALLBACK_EVENT, record_session_news
from gpupool.provider import Availability, Launch, PollResult, Provider
from gpupool.quota import gpu_seconds_left
from gpupool.spec import ExperimentSpec
from gpupool.state import Attempt, Cooldown, Experiment

MAX_PLACEMENT_TRIES = 4  # providers tried in one step when each refuses at submit
# Endings of attempts that ran a session: they count toward the no-progress streaks.
SESSION_ENDINGS = frozenset({AttemptState.YIELDED, AttemptState.LOST, AttemptState.FAILED})


@dataclass
class Report:
    """What one step did (for logs and tests)."""

    placed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, pool: Pool):
        self.pool = pool
        self.state = pool.state

    def reconcile_once(self, now: float, *, claimed: Collection[str] | None = None,
                       place: bool = True) -> Report:
        """One step. ``claimed``: only these experiments (this scheduler's share, when several
        share a database; None: all); ``place``: whether to place pending ones (only the holder
        of the placement lease does, so quota and concurrency are decided in one place).
        Nothing raised while handling one attempt or one experiment stops the others: it is
        recorded as a problem of that one, and the step goes on (a stored spec that no longer
        validates fails its experiment, with the fix)."""
        report = Report()

        def mine(experiment_id: str) -> bool:
            return claimed is None or experiment_id in claimed

        for orphan in self.state.orphaned_experiments():
            if not mine(orphan.id):
                continue
            self.state.move_experiment(orphan.id, ExperimentState.PENDING, now,
                                       event="no active attempt found; placing again")
        for attempt in self.state.attempts(active=True):
            if not mine(attempt.experiment_id):
                continue
            self._isolated(attempt.experiment_id, attempt.id, now, report,
                           partial(self._reconcile_attempt, attempt, now, report))
        for experiment in self.state.experiments([ExperimentState.PENDING]) if place else []:
            if not mine(experiment.id):
                continue
            if experiment.not_before is not None and experiment.not_before > now:
                report.waiting[experiment.id] = experiment.wait_reason or "waiting"
                continue
            self._isolated(experiment.id, None, now, report,
                           partial(self._place, experiment, now, report))
        self._release_ended(now, report)
        return report

    def _release_ended(self, now: float, report: Report) -> None:
        """Let each provider free what it keeps for experiments that are over (uploaded code
        and inputs: ``Provider.release``); a failure is reported, and tried again next step."""
        def ended(experiment_id: str) -> bool:
            try:
                experiment = self.state.experiment(experiment_id)
            except NotFound:
                return True
            return experiment.state.terminal and not self.state.attempts(experiment_id, active=True)

        for provider in self.pool.opened_providers():
            try:
                provider.release(ended, now)
            except GpupoolError as err:
                report.problems.append(f"{provider.name}: freeing what ended experiments used: {err}")

    def _isolated(self, experiment_id: str, attempt_id: str | None, now: float, report: Report,
                  work: Callable[[], object]) -> None:
        """Run one experiment's (or attempt's) part of the step; what it raises stays its own."""
        try:
            work()
        except StoredSpecError as err:
            self._fail_unreadable(experiment_id, err, now, report)
        except Exception as err:  # noqa: BLE001 - one experiment's fault must not stop the others
            text = str(err) if isinstance(err, GpupoolError) else f"unexpected {type(err).__name__}: {err}"
            report.problems.append(f"{attempt_id or experiment_id}: {text}")
            self.state.add_event(now, experiment_id, attempt_id, "problem", text)

    def _fail_unreadable(self, experiment_id: str, err: StoredSpecError, now: float,
                         report: Report) -> None:
        report.problems.append(f"{experiment_id}: {err}")
        experiment = self.state.experiment(experiment_id)
        if not experiment.state.terminal:  # its active attempt is then stopped and collected
            self.state.move_experiment(experiment_id, ExperimentState.FAILED, now,
                                       event=str(err), message=str(err))

    # -- running attempts -----------------------------------------------------------------

    def _reconcile_attempt(self, attempt: Attempt, now: float, report: Report) -> None:
        provider = self.pool.provider(attempt.provider)
        experiment = self.state.experiment(attempt.experiment_id)
        if experiment.state.terminal and not self._stop_failed(attempt):  # cancelled or failed
            self._cancel_attempt(attempt, now, f"stopped: its experiment {experiment.state.value}")
            return
        if attempt.state == AttemptState.CREATED:  # the scheduler died before recording submit
            experiment = self.state.experiment(attempt.experiment_id)
            self._submit(provider, experiment, attempt, now, report)
            return
        try:
            result = provider.poll(attempt, now)
        except RateLimited:
            return  # ask again next step
        self._record_progress(attempt, result)
        record_session_news(self.state, attempt, result, now)  # checkpoints, metrics: seen live
        if result.state == AttemptState.RUNNING and attempt.state == AttemptState.SUBMITTED:
            self.state.move_attempt(attempt.id, AttemptState.RUNNING, now, event="session started",
                                    started_at=result.started_at or now)
            self.state.clear_cooldown(attempt.provider, attempt.account)
        elif result.state.terminal:
            self._finish(provider, self.state.attempt(attempt.id), result, now)
            report.finished.append(attempt.id)

    def _record_progress(self, attempt: Attempt, result: PollResult) -> None:
        fields: dict[str, object] = {}
        if result.step is not None:
            fields["step"] = result.step
        if result.total is not None:
            fields["total_steps"] = result.total
        if result.heartbeat is not None:
            fields["last_heartbeat"] = result.heartbeat
        rate = result.rate if result.rate is not None else _rate(attempt, result)
        if rate is not None:
            fields["rate"] = rate
        if result.started_at is not None and attempt.started_at is None:
            fields["started_at"] = result.started_at
        if result.message and not result.state.terminal:
            fields["detail"] = result.message
        if fields:
            self.state.update_attempt(attempt.id, **fields)

    def _finish(self, provider: Provider, attempt: Attempt, result: PollResult, now: float) -> None:
        """Collect the session's checkpoints, charge its time, end it, and decide what's next.
        A lost session is first told to stop, so it cannot train on unseen (best effort)."""
        if result.state == AttemptState.LOST:
            self._tell_to_stop(provider, attempt, now)
        store = self.pool.store_for(attempt.experiment_id)
        try:
            provider.collect(attempt, store)
        except StoreUnreachable:
            raise  # nothing known, nothing decided: the attempt is collected at the next step
        except CheckpointError as err:  # torn or corrupt output: never published
            self.state.add_event(now, attempt.experiment_id, attempt.id, "corrupt-checkpoint", str(err))
        latest = store.latest()
        self._end(attempt, result.state, result.message or result.state.value, now, latest=latest,
                  until=result.unavailable_until, quota_spent=result.quota_spent,
                  final=result.final and result.state == AttemptState.FAILED)
        keep_last = self.state.experiment(attempt.experiment_id).parsed_spec.checkpoint.keep_last
        store.prune(keep_last, protect=[latest.name] if latest else [])
        provider.cleanup(attempt)

    def _tell_to_stop(self, provider: Provider, attempt: Attempt, now: float) -> bool:
        """Ask the provider to stop ``attempt``'s session; a refusal is recorded, not raised."""
        try:
            provider.cancel(attempt)
        except GpupoolError as err:
            kind = "cancel-failed" if isinstance(err, CancelFailed) else "problem"
            self.state.add_event(now, attempt.experiment_id, attempt.id, kind,
                                 f"could not stop the session: {err}")
            return False
        return True

    def _stop_failed(self, attempt: Attempt) -> bool:
        """Whether stopping this attempt's session already failed (it is then tracked until it
        really ends, and charged)."""
        return any(e["kind"] == "cancel-failed" and e["attempt_id"] == attempt.id
                   for e in self.state.events(attempt.experiment_id))

    def _end(self, attempt: Attempt, outcome: AttemptState, message: str, now: float, *,
             latest: Manifest | None = None, until: float | None = None,
             quota_spent: bool = False, final: bool = False) -> None:
        """End ``attempt`` with ``outcome`` and move its experiment on, in one transaction.
        An UNAVAILABLE end cools the account down: until ``until`` when the provider said so,
        else with back-off; ``quota_spent``: the provider said its GPU quota is used up;
        ``final``: no other attempt can do better (an input is gone), the experiment fails."""
        experiment = self.state.experiment(attempt.experiment_id)
        seconds = attempt.duration(now) if attempt.started_at else 0.0
        produced = latest.name if latest is not None and latest.attempt == attempt.id else None
        fields: dict = dict(gpu_seconds=experiment.gpu_seconds + seconds, wait_reason=None,
                            not_before=None)
        if latest is not None:
            fields.update(last_checkpoint=latest.name, last_step=latest.step)
        if experiment.state.terminal:  # cancelled or failed meanwhile: only the attempt ends
            target, why = experiment.state, experiment.message or experiment.state.value
        else:
            ended = attempt_ending(attempt, outcome, produced)
            history = [*self.state.attempts(attempt.experiment_id, active=False), ended]
            target, why = self._next_state(experiment, experiment.parsed_spec, ended, message,
                                           fields, history)
            if final:
                target, why = ExperimentState.FAILED, message
        fields["message"] = why
        if outcome == AttemptState.UNAVAILABLE:  # the reason is shown after the provider's name
            self.state.cool_down(attempt.provider, attempt.account, now,
                                 unprefixed(attempt.provider, message), backoff=backoff_seconds,
                                 until=until, quota_spent=quota_spent)
        self.state.end_attempt(
            attempt, outcome, now, message=message, why=why, next_state=target,
            attempt_fields=dict(end_reason=message, gpu_seconds=seconds, checkpoint_out=produced,
                                step=latest.step if latest is not None else attempt.step),
            experiment_fields=fields, charge_seconds=seconds,
        )

    def _next_state(self, experiment: Experiment, spec: ExperimentSpec, attempt: Attempt,
                    message: str, fields: dict, history: list[Attempt]) -> tuple[ExperimentState, str]:
        """Where the experiment goes after ``attempt`` ended (README, "How a session ends")."""
        outcome, limits = attempt.state, spec.limits
        if outcome == AttemptState.SUCCEEDED:
            return ExperimentState.SUCCEEDED, "training completed"
        if outcome == AttemptState.CANCELLED:
            return ExperimentState.CANCELLED, "cancelled"
        if outcome == AttemptState.UNAVAILABLE:
            reason = f"{attempt.provider} unavailable: {unprefixed(attempt.provider, message)}"
            fields["wait_reason"] = reason
            return ExperimentState.PENDING, reason
        budget = limits.gpu_hours
        if budget is not None and fields["gpu_seconds"] >= budget * 3600:
            return ExperimentState.FAILED, f"GPU-hour budget of {budget} h is spent"
        errors, stalled = no_progress_streaks(history)
        if outcome == AttemptState.FAILED:
            fields["failed_attempts"] = experiment.failed_attempts + 1
            if errors > limits.retries_on_error:
                return ExperimentState.FAILED, (
                    f"failed {errors} times in a row without a new checkpoint "
                    f"(limits.retries_on_error: {limits.retries_on_error}); last: {message}")
        if stalled >= limits.max_sessions_without_checkpoint:
            return ExperimentState.FAILED, (
                f"{stalled} sessions in a row published no new checkpoint (limits."
                f"max_sessions_without_checkpoint: {limits.max_sessions_without_checkpoint}); "
                f"last: {message}")
        if outcome == AttemptState.FAILED:
            return ExperimentState.PENDING, f"retrying after an error: {message}"
        fields["hops"] = experiment.hops + 1
        if fields["hops"] > limits.max_hops:
            return ExperimentState.FAILED, f"reached max_hops ({limits.max_hops})"
        return ExperimentState.PENDING, f"session ended ({message}); resuming"

    # -- placement ------------------------------------------------------------------------

    def _place(self, experiment: Experiment, now: float, report: Report) -> None:
        spec = experiment.parsed_spec
        for _ in range(MAX_PLACEMENT_TRIES):
            decision = choose(spec.providers, spec.resources, self.candidates(spec, now),
                              self._slice_seconds(spec), now)
            if not isinstance(decision, Place):
                self.state.update_experiment(experiment.id, now, wait_reason=decision.reason,
                                             not_before=decision.until)
                report.waiting[experiment.id] = decision.reason
                return
            provider = self.pool.provider(decision.provider)
            attempt = self.state.create_attempt(experiment.id, decision.provider, decision.account, now)
            if decision.passed_over:  # a fallback: `status` says why
                self.state.add_event(now, experiment.id, attempt.id, FALLBACK_EVENT,
                                     f"on {decision.provider} because " + "; ".join(decision.passed_over))
            if self._submit(provider, self.state.experiment(experiment.id), attempt, now, report):
                return

    def _slice_seconds(self, spec: ExperimentSpec) -> float:
        """The smallest useful slice of a session: one checkpoint interval (fixed or the
        default for ``auto``); placement adds each provider's start-up time."""
        return checkpoint_interval(spec.checkpoint, None, None)

    def interval_for(self, spec: ExperimentSpec, provider: Provider, restore: Manifest | None) -> float:
        """The checkpoint interval for an attempt on ``provider``: fixed, or Young/Daly from the
        measured save cost and the provider's observed losses (smoothed by its prior)."""
        save = restore.metadata.get("save_seconds") if restore is not None else None
        seconds, losses = self.state.loss_stats(provider.name)
        mtbf = (seconds + provider.loss_prior_seconds()) / (losses + 1)
        return checkpoint_interval(spec.checkpoint, save, mtbf)

    def candidates(self, spec: ExperimentSpec, now: float) -> list[Candidate]:
        cooldowns = self.state.cooldowns()
        active = self._active_counts()
        views = []
        for name in spec.providers:
            provider = self.pool.try_provider(name)
            if provider is None or not provider.enabled:
                views.append(Candidate(name, "default", configured=False))
                continue
            accounts = [a for a in provider.accounts() if spec.allows_account(name, a)]
            if not accounts:  # the experiment names members' accounts the pool does not list
                views.append(Candidate(name, ",".join(spec.accounts[name]), configured=False))
            for account in accounts:
                views.append(self._candidate(provider, account, cooldowns.get((name, account)),
                                             active, now))
        return views

    def _candidate(self, provider: Provider, account: str, cooldown: Cooldown | None,
                   active: dict, now: float) -> Candidate:
        ok, hint = provider.check_account(account)
        available = provider.availability(account, now)
        if cooldown is not None and cooldown.in_force(now):  # gpupool's record, over the answer
            available = Availability(False, cooldown.reason, until=cooldown.until)
        left = gpu_seconds_left(self.state, provider, account, now) if ok else None
        kinds = provider.gpu_kinds()
        return Candidate(
            provider.name, account, credentials_ok=ok, credentials_hint=hint,
            available=available.ok, unavailable_reason=unprefixed(provider.name, available.reason),
            unavailable_until=available.until,
            active=active.get((provider.name, account), 0),
            max_concurrent=provider.max_concurrent(account),
            remaining_seconds=left.placeable_seconds if left else None,
            quota_resets_at=left.resets_at if left else None,
            gpu_kinds=frozenset(kinds) if kinds is not None else None,
            cpu_only_ok=provider.accepts_cpu(),
            startup_seconds=provider.startup_seconds(),
        )

    def _active_counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for attempt in self.state.attempts(active=True):
            key = (attempt.provider, attempt.account)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _submit(self, provider: Provider, experiment: Experiment, attempt: Attempt, now: float,
                report: Report) -> bool:
        spec = experiment.parsed_spec
        store = self.pool.store_for(experiment.id)
        restore = store.latest(rehash=True)  # what a new session resumes from: no bit rot
        launch = Launch(
            attempt_id=attempt.id, experiment_id=experiment.id, account=attempt.account, spec=spec,
            bundle=Path(experiment.bundle), store=store, restore=restore,
            checkpoint_interval=self.interval_for(spec, provider, restore), now=now,
            quota_seconds=gpu_seconds_left(self.state, provider, attempt.account, now,
                                           starting=attempt.id).session_limit_seconds,
        )
        try:
            submission = provider.submit(launch)
        except InputUnavailable as err:  # elsewhere or later cannot help: fail, don't loop
            self._end(attempt, AttemptState.FAILED, str(err), now, final=True)
            return True
        except (ProviderUnavailable, ProviderError) as err:
            until = err.until if isinstance(err, ProviderUnavailable) else None
            self._end(attempt, AttemptState.UNAVAILABLE, str(err), now, until=until)
            return False
        self.state.move_attempt(
            attempt.id, AttemptState.SUBMITTED, now, event=submission.message or "submitted",
            remote_id=submission.remote_id, url=submission.url, deadline=submission.deadline,
            checkpoint_in=restore.name if restore else None,
            step_start=restore.step if restore else 0, step=restore.step if restore else 0,
            detail=submission.message,
        )
        report.placed.append(attempt.id)
        return True

    # -- cancelling -----------------------------------------------------------------------

    def cancel(self, experiment_id: str, now: float) -> Cancelled:
        """Stop an experiment: nothing new is placed, its active attempt's session is stopped
        and what it checkpointed is kept. A session the provider could not stop (its
        ``CancelFailed`` is in ``Cancelled.failures``) stays tracked and charged until it ends."""
        experiment = self.state.experiment(experiment_id)
        if not experiment.state.terminal:  # first, so no step places it again meanwhile
            self.state.move_experiment(experiment.id, ExperimentState.CANCELLED, now,
                                       event="cancelled by the user", message="cancelled")
        failures = []
        for attempt in self.state.attempts(experiment.id, active=True):
            failure = self._cancel_attempt(attempt, now, "cancelled by the user")
            if failure is not None:
                failures.append(failure)
        self._release_ended(now, Report())
        return Cancelled(self.state.experiment(experiment.id), failures)

    def _cancel_attempt(self, attempt: Attempt, now: float, reason: str) -> CancelFailed | None:
        """Stop the attempt's session, collect it and end it CANCELLED; if the provider cannot
        stop it, record that and leave it active (polled, collected and charged when it ends)."""
        provider = self.pool.provider(attempt.provider)
        store = self.pool.store_for(attempt.experiment_id)
        try:
            provider.cancel(attempt)
        except ProviderError as err:  # CancelFailed, or a call that failed some other way
            failure = err if isinstance(err, CancelFailed) else CancelFailed(
                attempt.provider, unprefixed(attempt.provider, str(err)),
                action=f"run `gpupool cancel {attempt.experiment_id}` again, or stop the session "
                       f"on {attempt.provider}'s own page")
            self.state.add_event(now, attempt.experiment_id, attempt.id, "cancel-failed",
                                 f"could not stop the session: {failure}; tracking it until it ends")
            return failure
        try:
            provider.collect(attempt, store)
        except GpupoolError as err:
            self.state.add_event(now, attempt.experiment_id, attempt.id, "problem", str(err))
        # what the session saved is the experiment's resume point (`gpupool resume`)
        self._end(attempt, AttemptState.CANCELLED, reason, now, latest=store.latest())
        return None


@dataclass(frozen=True)
class Cancelled:
    """What ``Scheduler.cancel`` did: the experiment now, and the sessions it could not stop."""

    experiment: Experiment
    failures: list[CancelFailed]


def attempt_ending(attempt: Attempt, outcome: AttemptState, produced: str | None) -> Attempt:
    """The attempt as it is about to be recorded: ended with ``outcome``, ``produced`` out."""
    return replace(attempt, state=outcome, checkpoint_out=produced)


def no_progress_streaks(history: list[Attempt]) -> tuple[int, int]:
    """(errors, stalled) over the experiment's ended attempts, oldest first: how many FAILED
    sessions since the last one that published a new checkpoint (counting it, if it failed),
    and how many sessions in a row published none. Attempts that never ran a session
    (unavailable, cancelled) neither count nor break a streak."""
    errors = stalled = 0
    for attempt in reversed(history):
        if attempt.state not in SESSION_ENDINGS:
            continue
        errors += attempt.state == AttemptState.FAILED
        if attempt.checkpoint_out:
            break
        stalled += 1
    return errors, stalled


def unprefixed(provider: str, message: str) -> str:
    """``message`` without a leading ``"<provider>: "``, for text that names the provider."""
    prefix = f"{provider}: "
    while message.startswith(prefix):
        message = message[len(prefix):]
    return message


def _rate(attempt: Attempt, result: PollResult) -> float | None:
    """Steps per second between two polls, smoothed with the previous estimate."""
    if None in (result.step, result.heartbeat, attempt.step, attempt.last_heartbeat):
        return attempt.rate
    elapsed = result.heartbeat - attempt.last_heartbeat  # type: ignore[operator]
    if elapsed <= 0 or result.step < attempt.step:  # type: ignore[operator]
        return attempt.rate
    current = (result.step - attempt.step) / elapsed  # type: ignore[operator]
    return current if attempt.rate is None else 0.7 * attempt.rate + 0.3 * current
