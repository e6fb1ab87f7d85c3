"""Driving the scheduler: APScheduler calls ``reconcile_once`` on an interval. Schedulers sharing
one database split the work: each claims its share of the experiments (row locks that skip
locked rows, with a ttl), and the one holding the placement lease also places pending ones, so
no work is done twice and quota is decided in one place.

The placement lease is also the record that a scheduler runs: its owner names the host, the
process, the role (``daemon`` or a foreground ``run``/``watch``) and when it started, so
``gpupool status`` can say whether anything is moving the experiments on, and since when. The
lease holder (only it, so nothing is sent twice) also sends the pool's notifications
(gpupool.notify) after each step.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from gpupool import db
from gpupool.notify import Notifier
from gpupool.pool import Pool
from gpupool.scheduler import Report, Scheduler

LEASE = "scheduler"
log = logging.getLogger("gpupool.driver")


def owner_id(role: str = "scheduler", since: float | None = None) -> str:
    """``host:pid:token:role:since`` (``since`` in whole epoch seconds); at most 128 chars."""
    host = socket.gethostname()[:64]
    return f"{host}:{os.getpid()}:{secrets.token_hex(3)}:{role}:{int(since or 0)}"


@dataclass(frozen=True)
class SchedulerRecord:
    """What the lease says about the scheduler: who holds it, since when, and if it is alive."""

    running: bool
    host: str
    pid: int | None
    role: str
    since: float | None  # epoch seconds the holder started, None if it did not say
    last_seen: float  # epoch seconds of its last step (the lease's expiry minus its ttl)
    why_not: str = ""  # why it is taken as not running


def scheduler_record(pool: Pool, now: float) -> SchedulerRecord | None:
    """The scheduler lease as a record; None when no scheduler holds or held it (released)."""
    with pool.state.engine.connect() as conn:
        row = conn.execute(db.leases.select().where(db.leases.c.name == LEASE)).first()
    if row is None:
        return None
    host, pid, _token, role, since = (str(row.owner).split(":") + ["", "", "", ""])[:5]
    why_not = ""
    if holder_is_dead(row.owner):
        why_not = f"process {pid} on {host} is gone"
    elif row.expires_at <= now:
        why_not = "it stopped renewing its lease"
    started = float(since) if since.isdigit() and int(since) > 0 else None
    ttl = max(30.0, 3 * pool.settings.poll_interval)  # as the holder's Driver sets it
    return SchedulerRecord(running=not why_not, host=host, pid=int(pid) if pid.isdigit() else None,
                           role=role or "scheduler", since=started, last_seen=row.expires_at - ttl,
                           why_not=why_not)


def holder_is_dead(owner: str) -> bool:
    """True when ``owner`` was a process on this machine that no longer exists (killed)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Driver:
    """Runs reconcile steps while holding the scheduler lease."""

    def __init__(self, pool: Pool, *, owner: str | None = None, role: str = "scheduler",
                 on_report: Callable[[Report], None] | None = None,
                 notifier: Notifier | None = None):
        self.pool = pool
        self.scheduler = Scheduler(pool)
        self.owner = owner or owner_id(role, pool.clock())
        self.on_report = on_report
        self.ttl = max(30.0, 3 * pool.settings.poll_interval)
        self._lock = threading.Lock()
        self.holds_lease = False
        self.notifier = notifier if notifier is not None else Notifier.for_pool(pool)

    def step(self) -> Report | None:
        """One reconcile step over this scheduler's share of the work: the experiments it
        claimed, plus placement while it holds the placement lease. None when it got neither
        (the other schedulers on the database hold all the work)."""
        with self._lock:
            now = self.pool.clock()
            state = self.pool.state
            self.holds_lease = state.acquire_lease(LEASE, self.owner, now, self.ttl,
                                                   holder_dead=holder_is_dead)
            claimed = state.claim_experiments(self.owner, now, self.ttl, placing=self.holds_lease,
                                              holder_dead=holder_is_dead)
            if not self.holds_lease and not claimed:
                return None
            report = self.scheduler.reconcile_once(now, claimed=claimed, place=self.holds_lease)
        for problem in report.problems:
            log.warning(problem)
        if self.holds_lease:  # one sender, however many schedulers share the database
            self._notify(now)
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _notify(self, now: float) -> None:
        """Send the notifications this step's events call for; never stops the scheduler."""
        if self.notifier is None:
            return
        try:
            self.notifier.check(now)
        except Exception:  # a notification service down must not stop training
            log.exception("sending notifications failed; they are retried next step")

    def release(self) -> None:
        """Hand the placement lease and every claim back, so other schedulers go on at once."""
        self.pool.state.release_lease(LEASE, self.owner)
        self.pool.state.release_claims(self.owner)

    def start_background(self) -> object:
        """An APScheduler BackgroundScheduler running ``step`` every poll interval."""
        from apscheduler.schedulers.background import BackgroundScheduler

        background = BackgroundScheduler(daemon=True)
        background.add_job(self._safe_step, "interval", seconds=self.pool.settings.poll_interval,
                           max_instances=1, coalesce=True)
        background.start()
        return background

    def run_forever(self) -> None:
        """Block, stepping every poll interval, until interrupted (the daemon)."""
        from apscheduler.schedulers.blocking import BlockingScheduler

        blocking = BlockingScheduler()
        blocking.add_job(self._safe_step, "interval", seconds=self.pool.settings.poll_interval,
                         max_instances=1, coalesce=True)
        self._safe_step()
        try:
            blocking.start()
        finally:
            self.release()

    def _safe_step(self) -> None:
        try:
            self.step()
        except Exception:  # keep the daemon alive; the next step reconciles again
            log.exception("reconcile step failed")
