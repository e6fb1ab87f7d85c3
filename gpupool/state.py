"""State of the pool: experiments, attempts, quota ledger, events, provider health.

All writes go through this module; every state change goes through ``_transition``, which
rejects moves the lifecycle in ``gpupool.lifecycle`` does not allow.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from gpupool import claims, db
from gpupool.errors import IllegalTransition, NotFound, StateError
from gpupool.lifecycle import ATTEMPT_MOVES, EXPERIMENT_MOVES, AttemptState, ExperimentState
from gpupool.spec import ExperimentSpec, parse_stored

_KEPT_AFTER_END = frozenset({"gpu_seconds", "last_checkpoint", "last_step"})


@dataclass(frozen=True)
class Experiment:
    """One experiment as the database holds it. ``spec`` is the stored experiment file (a
    dict, as ``gpupool run`` recorded it); ``parsed_spec`` is that file validated, once."""

    id: str
    name: str
    spec: dict[str, Any]
    state: ExperimentState
    created_at: float
    updated_at: float
    bundle: str
    hops: int
    failed_attempts: int  # its attempts that ended FAILED, since it was last resumed
    gpu_seconds: float
    last_step: int | None
    last_checkpoint: str | None
    wait_reason: str | None
    not_before: float | None
    message: str | None

    @cached_property
    def parsed_spec(self) -> ExperimentSpec:
        """The stored spec, validated once per process (``gpupool.spec.parse_stored``);
        ``StoredSpecError`` when this gpupool cannot read it, so a caller fails this
        experiment alone."""
        return parse_stored(json.dumps(self.spec, sort_keys=True), self.id)


@dataclass(frozen=True)
class Attempt:
    id: str
    experiment_id: str
    seq: int
    provider: str
    account: str
    state: AttemptState
    remote_id: str | None
    url: str | None
    end_reason: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    deadline: float | None
    last_heartbeat: float | None
    step_start: int | None
    step: int | None
    total_steps: int | None
    rate: float | None
    checkpoint_in: str | None
    checkpoint_out: str | None
    gpu_seconds: float
    detail: str | None

    def duration(self, now: float) -> float:
        if self.started_at is None:
            return 0.0
        return max(0.0, (self.ended_at or now) - self.started_at)


CLAIM_COLUMNS = ("claimed_by", "claim_expires")  # the schedulers' business, not the experiment's


@dataclass(frozen=True)
class Cooldown:
    """A provider account gpupool places nothing on until ``until`` (epoch seconds), and why.

    ``failures``: refusals in a row since a session last started there (the back-off grows
    with them; kept after ``until`` passes); ``quota_spent``: the provider itself said the
    account's GPU quota is used up (an estimated quota then counts as spent until ``until``)."""

    provider: str
    account: str
    until: float | None
    reason: str
    failures: int
    quota_spent: bool = False

    def in_force(self, now: float) -> bool:
        return self.until is not None and self.until > now


class State:
    """Typed access to the state database."""

    def __init__(self, url: str):
        self.url = url
        self.engine = db.create_engine(url)
        db.migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- experiments ----------------------------------------------------------------------

    def create_experiment(self, name: str, spec: dict[str, Any], bundle: str, now: float) -> Experiment:
        ident = f"{name}-{secrets.token_hex(3)}"
        row = dict(
            id=ident, name=name, spec=json.dumps(spec), state=ExperimentState.PENDING.value,
            created_at=now, updated_at=now, bundle=bundle, hops=0, failed_attempts=0, gpu_seconds=0.0,
        )
        with self.engine.begin() as conn:
            conn.execute(db.experiments.insert().values(**row))
            _event(conn, now, ident, None, "created", f"experiment {name} created")
        return self.experiment(ident)

    def experiment(self, ident: str) -> Experiment:
        with self.engine.connect() as conn:
            row = _by_id(conn, db.experiments, ident)
            return _experiment(row if row is not None else _unique_prefix(conn, ident))

    def experiments(
        self, states: Iterable[ExperimentState] | None = None, *, limit: int | None = None,
        offset: int = 0,
    ) -> list[Experiment]:
        query = db.experiments.select().order_by(db.experiments.c.created_at.desc())
        if states is not None:
            query = query.where(db.experiments.c.state.in_([s.value for s in states]))
        if limit is not None:
            query = query.limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_experiment(r) for r in conn.execute(query)]

    def count_experiments(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(db.experiments)).scalar_one())

    def move_experiment(
        self, ident: str, target: ExperimentState, now: float, *, event: str | None = None, **fields: Any
    ) -> Experiment:
        with self.engine.begin() as conn:
            self._move_experiment(conn, ident, target, now, event=event, **fields)
        return self.experiment(ident)

    def _move_experiment(
        self, conn: sa.Connection, ident: str, target: ExperimentState, now: float, *,
        event: str | None = None, **fields: Any,
    ) -> None:
        table = db.experiments
        current = conn.execute(sa.select(table.c.state).where(table.c.id == ident)).scalar_one_or_none()
        if current is None:
            raise NotFound(f"no experiment {ident}")
        _transition(conn, table, "experiment", ident, ExperimentState(current), target,
                    EXPERIMENT_MOVES, dict(fields, updated_at=now))
        if event:
            _event(conn, now, ident, None, target.value, event)

    def update_experiment(self, ident: str, now: float, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(db.experiments.update().where(db.experiments.c.id == ident)
                         .values(updated_at=now, **fields))

    # -- attempts -------------------------------------------------------------------------

    def create_attempt(
        self, experiment_id: str, provider: str, account: str, now: float, **fields: Any
    ) -> Attempt:
        """Record a new attempt and move its experiment to RUNNING, in one transaction."""
        with self.engine.begin() as conn:
            seq = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(db.attempts.c.seq), 0))
                .where(db.attempts.c.experiment_id == experiment_id)
            ).scalar_one() + 1
            ident = f"{experiment_id}-a{seq}"
            try:
                conn.execute(db.attempts.insert().values(
                    id=ident, experiment_id=experiment_id, seq=seq, provider=provider,
                    account=account, state=AttemptState.CREATED.value, created_at=now,
                    gpu_seconds=0.0, **fields,
                ))
            except sa.exc.IntegrityError:
                raise StateError(f"experiment {experiment_id} already has an active attempt") from None
            self._move_experiment(conn, experiment_id, ExperimentState.RUNNING, now, wait_reason=None)
            _event(conn, now, experiment_id, ident, "placed", f"attempt {seq} placed on {provider}")
        return self.attempt(ident)

    def attempt(self, ident: str) -> Attempt:
        with self.engine.connect() as conn:
            row = _by_id(conn, db.attempts, ident)
        if row is None:
            raise NotFound(f"no attempt {ident}")
        return _attempt(row)

    def attempts(self, experiment_id: str | None = None, *, active: bool | None = None,
                 on: tuple[str, str] | None = None) -> list[Attempt]:
        """Attempts by experiment and seq; only ``experiment_id``'s, only active (or ended)
        ones, only those ``on`` one (provider, account), when given."""
        query = db.attempts.select().order_by(db.attempts.c.experiment_id, db.attempts.c.seq)
        if experiment_id is not None:
            query = query.where(db.attempts.c.experiment_id == experiment_id)
        if on is not None:
            query = query.where(db.attempts.c.provider == on[0], db.attempts.c.account == on[1])
        if active is not None:
            clause = db.attempts.c.state.in_(db.ACTIVE_STATES)
            query = query.where(clause if active else sa.not_(clause))
        with self.engine.connect() as conn:
            return [_attempt(r) for r in conn.execute(query)]

    def move_attempt(
        self, ident: str, target: AttemptState, now: float, *, event: str | None = None, **fields: Any
    ) -> Attempt:
        with self.engine.begin() as conn:
            row = conn.execute(db.attempts.select().where(db.attempts.c.id == ident)).first()
            if row is None:
                raise NotFound(f"no attempt {ident}")
            _transition(conn, db.attempts, "attempt", ident, AttemptState(row.state), target,
                        ATTEMPT_MOVES, fields)
            if event:
                _event(conn, now, row.experiment_id, ident, target.value, event)
        return self.attempt(ident)

    def end_attempt(
        self, attempt: Attempt, target: AttemptState, now: float, *, message: str,
        attempt_fields: dict[str, Any], next_state: ExperimentState, experiment_fields: dict[str, Any],
        why: str, charge_seconds: float = 0.0,
    ) -> None:
        """End an attempt, charge its time and move its experiment on, in one transaction:
        a scheduler killed at any point leaves either all of it done or none."""
        with self.engine.begin() as conn:
            _transition(conn, db.attempts, "attempt", attempt.id, attempt.state, target,
                        ATTEMPT_MOVES, dict(attempt_fields, ended_at=now))
            _event(conn, now, attempt.experiment_id, attempt.id, target.value, message)
            if charge_seconds > 0:
                conn.execute(db.quota_ledger.insert().values(
                    provider=attempt.provider, account=attempt.account, attempt_id=attempt.id,
                    started_at=attempt.started_at or now, ended_at=now, seconds=charge_seconds,
                ))
            current = conn.execute(sa.select(db.experiments.c.state)
                                   .where(db.experiments.c.id == attempt.experiment_id)).scalar_one()
            if not ExperimentState(current).terminal:
                self._move_experiment(conn, attempt.experiment_id, next_state, now, event=why,
                                      **experiment_fields)
                return
            # ended already (cancelled first): still keep the session's time and checkpoint
            kept = {k: v for k, v in experiment_fields.items() if k in _KEPT_AFTER_END}
            if kept:
                conn.execute(db.experiments.update().where(db.experiments.c.id == attempt.experiment_id)
                             .values(updated_at=now, **kept))

    def orphaned_experiments(self) -> list[Experiment]:
        """RUNNING experiments with no active attempt (should not happen; healed by the scheduler)."""
        active = sa.select(db.attempts.c.experiment_id).where(db.attempts.c.state.in_(db.ACTIVE_STATES))
        query = db.experiments.select().where(
            db.experiments.c.state == ExperimentState.RUNNING.value,
            db.experiments.c.id.not_in(active),
        )
        with self.engine.connect() as conn:
            return [_experiment(r) for r in conn.execute(query)]

    def update_attempt(self, ident: str, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(db.attempts.update().where(db.attempts.c.id == ident).values(**fields))

    def loss_stats(self, provider: str) -> tuple[float, int]:
        """(seconds of ended sessions, how many of them were lost) on ``provider``."""
        table = db.attempts
        query = sa.select(
            sa.func.coalesce(sa.func.sum(table.c.gpu_seconds), 0.0),
            sa.func.count().filter(table.c.state == AttemptState.LOST.value),
        ).where(table.c.provider == provider, table.c.ended_at.is_not(None))
        with self.engine.connect() as conn:
            seconds, losses = conn.execute(query).one()
        return float(seconds), int(losses)

    # -- quota ledger ---------------------------------------------------------------------

    def charged_seconds(self, provider: str, account: str, since: float) -> float:
        """GPU-seconds charged to the account for sessions that ended at or after ``since``
        (epoch seconds): each ended session is charged once, in ``end_attempt``."""
        ledger = db.quota_ledger
        query = sa.select(sa.func.coalesce(sa.func.sum(ledger.c.seconds), 0.0)).where(
            ledger.c.provider == provider, ledger.c.account == account, ledger.c.ended_at >= since
        )
        with self.engine.connect() as conn:
            return float(conn.execute(query).scalar_one())

    # -- cool-downs ------------------------------------------------------------------------

    def cool_down(self, provider: str, account: str, now: float, reason: str, *,
                  backoff: Callable[[int], float], until: float | None = None,
                  quota_spent: bool = False) -> Cooldown:
        """Record a refusal of ``(provider, account)`` and return the cool-down now in force.

        It lasts until ``until`` (epoch seconds) when the provider said so, else ``now +
        backoff(failures)`` (seconds, growing with the refusals in a row). A cool-down still
        in force that ends later is kept, with its reason: two sessions refused at once never
        shorten each other's rest. One transaction, so two schedulers count every refusal."""
        table = db.provider_health
        key = (table.c.provider == provider, table.c.account == account)
        with self.engine.begin() as conn:
            row = conn.execute(table.select().where(*key).with_for_update()).first()
            previous = _cooldown(row) if row is not None else None
            failures = (previous.failures if previous else 0) + 1
            ends = until if until is not None else now + backoff(failures)
            if previous is not None and previous.in_force(now) and (previous.until or 0) >= ends:
                ends, reason, quota_spent = previous.until or ends, previous.reason, previous.quota_spent
            values = dict(unavailable_until=ends, reason=reason, failures=failures,
                          quota_spent=quota_spent, updated_at=now)
            if row is None:
                conn.execute(table.insert().values(provider=provider, account=account, **values))
            else:
                conn.execute(table.update().where(*key).values(**values))
        return Cooldown(provider, account, ends, reason, failures, quota_spent)

    def clear_cooldown(self, provider: str, account: str) -> None:
        """A session started on the account: its cool-down and refusal count end."""
        table = db.provider_health
        with self.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.provider == provider, table.c.account == account))

    def cooldowns(self) -> dict[tuple[str, str], Cooldown]:
        """Every account's recorded cool-down, by (provider, account), ended ones included
        (their refusal count still sets the next back-off)."""
        with self.engine.connect() as conn:
            rows = conn.execute(db.provider_health.select()).all()
        return {(r.provider, r.account): _cooldown(r) for r in rows}

    # -- events and leases ----------------------------------------------------------------

    def add_event(self, now: float, experiment_id: str | None, attempt_id: str | None,
                  kind: str, message: str) -> None:
        with self.engine.begin() as conn:
            _event(conn, now, experiment_id, attempt_id, kind, message)

    def events(self, experiment_id: str, limit: int | None = 200, *, kinds: Iterable[str] | None = None,
               exclude: Iterable[str] = (), after_id: int | None = None) -> list[dict[str, Any]]:
        """An experiment's newest ``limit`` events (all when None), oldest first; only those of
        ``kinds`` when given, none of ``exclude``, and only newer than event ``after_id``."""
        query = (db.events.select().where(db.events.c.experiment_id == experiment_id)
                 .order_by(db.events.c.id.desc()).limit(limit))
        if kinds is not None:
            query = query.where(db.events.c.kind.in_(list(kinds)))
        if exclude:
            query = query.where(db.events.c.kind.not_in(list(exclude)))
        if after_id is not None:
            query = query.where(db.events.c.id > after_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()][::-1]

    def acquire_lease(self, name: str, owner: str, now: float, ttl: float,
                      holder_dead: Callable[[str], bool] | None = None) -> bool:
        """Take or renew the named lease for ``ttl`` seconds; False while another owner holds an
        unexpired one (unless ``holder_dead(owner)`` says that owner is known to be gone), and
        False at once while another scheduler is taking or renewing it: the row is locked with
        ``FOR UPDATE SKIP LOCKED``, so no scheduler ever waits on another (PostgreSQL; SQLite
        serializes writers and ignores the clause)."""
        table = db.leases
        with self.engine.begin() as conn:
            if _insert_lease_if_absent(conn, name, owner, now + ttl):
                return True
            row = conn.execute(table.select().where(table.c.name == name)
                               .with_for_update(skip_locked=True)).first()
            if row is None:  # locked by a scheduler taking or renewing it right now
                return False
            if row.owner != owner and row.expires_at > now:
                if holder_dead is None or not holder_dead(row.owner):
                    return False
            conn.execute(table.update().where(table.c.name == name)
                         .values(owner=owner, expires_at=now + ttl))
            return True

    def release_lease(self, name: str, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(db.leases.delete().where(db.leases.c.name == name, db.leases.c.owner == owner))

    # -- claims: several schedulers sharing the work ------------------------------------------

    def claim_experiments(self, owner: str, now: float, ttl: float, *, placing: bool,
                          holder_dead: Callable[[str], bool] | None = None) -> set[str]:
        """Claim this scheduler's share of the work for ``ttl`` seconds and return the ids.

        Each live scheduler (one that claimed within its ``ttl``; ``holder_dead`` may say one is
        gone sooner) gets an even share of the RUNNING experiments (and of those ended with an
        attempt still active, e.g. cancelled while its session ran), keeping its own first, then
        taking unclaimed or expired ones; beyond its share it lets go, so a scheduler that joins
        gets work. The one ``placing`` (it holds the placement lease, so quota and concurrency
        are decided in one place) also claims every PENDING experiment; the others let go of
        theirs. The rows wanted are locked with ``FOR UPDATE SKIP LOCKED`` and claimed only if
        still free then: a row another scheduler is claiming (or changing) right now is
        skipped, never waited on, and never claimed by two.
        """
        table = db.experiments
        live_attempt = sa.select(db.attempts.c.experiment_id).where(
            db.attempts.c.state.in_(db.ACTIVE_STATES))
        work = sa.or_(  # an attempt of a cancelled experiment still has to be stopped and charged
            table.c.state.in_([ExperimentState.RUNNING.value, ExperimentState.PENDING.value]),
            table.c.id.in_(live_attempt))
        with self.engine.begin() as conn:
            live = claims.renew_presence(conn, owner, now, ttl, holder_dead)
            rows = conn.execute(
                sa.select(table.c.id, table.c.state, table.c.claimed_by, table.c.claim_expires)
                .where(work).order_by(table.c.created_at, table.c.id)).all()
            running = sum(1 for r in rows if r.state != ExperimentState.PENDING.value)
            share = -(-running // live)  # ceil: together the live schedulers cover them all
            take, drop, dead = claims.share_of(rows, owner, now, share, placing, holder_dead)
            if take:  # lock only the rows wanted, and only if still free once locked
                claimable = sa.or_(table.c.claimed_by.is_(None), table.c.claimed_by == owner,
                                   table.c.claim_expires <= now, table.c.claimed_by.in_(dead))
                take = list(conn.execute(sa.select(table.c.id).where(table.c.id.in_(take), claimable)
                                         .with_for_update(skip_locked=True)).scalars())
                conn.execute(table.update().where(table.c.id.in_(take))
                             .values(claimed_by=owner, claim_expires=now + ttl))
            if drop:
                conn.execute(table.update().where(table.c.id.in_(drop), table.c.claimed_by == owner)
                             .values(claimed_by=None, claim_expires=None))
        return set(take)

    def release_claims(self, owner: str) -> None:
        """Let go of every claim and the presence of ``owner`` (a scheduler stopping cleanly),
        so the others take its experiments over at their next step rather than after the ttl."""
        table = db.experiments
        with self.engine.begin() as conn:
            conn.execute(table.update().where(table.c.claimed_by == owner)
                         .values(claimed_by=None, claim_expires=None))
            conn.execute(db.leases.delete().where(db.leases.c.name == claims.presence_name(owner)))


def _transition(
    conn: sa.Connection, table: sa.Table, kind: str, ident: str, current: Any, target: Any,
    moves: dict[Any, frozenset[Any]], fields: dict[str, Any],
) -> None:
    """The one place states change: checks the move, then updates only if nobody moved first."""
    if target != current and target not in moves[current]:
        raise IllegalTransition(kind, ident, current.value, target.value)
    result = conn.execute(
        table.update().where(table.c.id == ident, table.c.state == current.value)
        .values(state=target.value, **fields)
    )
    if result.rowcount != 1:
        raise IllegalTransition(kind, ident, f"{current.value} (changed concurrently)", target.value)


def _insert_lease_if_absent(conn: sa.Connection, name: str, owner: str, expires_at: float) -> bool:
    """Create the lease row unless it exists (``ON CONFLICT DO NOTHING``, no error to recover
    from: on PostgreSQL a failed INSERT would abort the whole transaction); True if created."""
    dialects: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
    insert = dialects.get(conn.dialect.name)
    if insert is None:  # another engine: the portable way, racing only into "not acquired"
        if conn.execute(sa.select(db.leases.c.name).where(db.leases.c.name == name)).first():
            return False
        conn.execute(db.leases.insert().values(name=name, owner=owner, expires_at=expires_at))
        return True
    statement = insert(db.leases).values(name=name, owner=owner, expires_at=expires_at)
    return conn.execute(statement.on_conflict_do_nothing(index_elements=["name"])).rowcount == 1


def _event(conn: sa.Connection, now: float, experiment_id: str | None, attempt_id: str | None,
           kind: str, message: str) -> None:
    conn.execute(db.events.insert().values(
        at=now, experiment_id=experiment_id, attempt_id=attempt_id, kind=kind, message=message))


def _by_id(conn: sa.Connection, table: sa.Table, ident: str) -> Any:
    """The row of ``table`` whose id is ``ident``, or None."""
    return conn.execute(table.select().where(table.c.id == ident)).first()


def _unique_prefix(conn: sa.Connection, prefix: str) -> Any:
    """Let users type an unambiguous prefix of an experiment id (or its name)."""
    table = db.experiments
    rows = conn.execute(table.select().where(
        sa.or_(table.c.id.startswith(prefix, autoescape=True), table.c.name == prefix)
    ).order_by(table.c.created_at.desc()).limit(2)).all()
    if not rows:
        raise NotFound(f"no experiment {prefix!r}; `gpupool status` lists them")
    if len(rows) > 1 and rows[0].name != prefix:
        raise NotFound(f"{prefix!r} matches several experiments; give more of the id")
    return rows[0]


def _cooldown(row: Any) -> Cooldown:
    return Cooldown(row.provider, row.account, row.unavailable_until, row.reason or "",
                    int(row.failures or 0), bool(row.quota_spent))


def _experiment(row: Any) -> Experiment:
    data = {c.key: row._mapping[c] for c in db.experiments.c if c.key not in CLAIM_COLUMNS}
    data["spec"] = json.loads(data["spec"])
    data["state"] = ExperimentState(data["state"])
    return Experiment(**data)


def _attempt(row: Any) -> Attempt:
    data = dict(row._mapping)
    data["state"] = AttemptState(data["state"])
    return Attempt(**data)
