"""Driving the scheduler: APScheduler calls ``reconcile_once`` on an interval, under a lease so
that two schedulers sharing one database never place the same work twice."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable

from gpupool.pool import Pool
from gpupool.scheduler import Report, Scheduler

LEASE = "scheduler"
log = logging.getLogger("gpupool.daemon")


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


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

    def __init__(self, pool: Pool, *, owner: str | None = None,
                 on_report: Callable[[Report], None] | None = None):
        self.pool = pool
        self.scheduler = Scheduler(pool)
        self.owner = owner or owner_id()
        self.on_report = on_report
        self.ttl = max(30.0, 3 * pool.settings.poll_interval)
        self._lock = threading.Lock()
        self.holds_lease = False

    def step(self) -> Report | None:
        """One reconcile step; None when another scheduler holds the lease."""
        with self._lock:
            now = self.pool.clock()
            self.holds_lease = self.pool.state.acquire_lease(LEASE, self.owner, now, self.ttl,
                                                             holder_dead=holder_is_dead)
            if not self.holds_lease:
                return None
            report = self.scheduler.reconcile_once(now)
        for problem in report.problems:
            log.warning(problem)
        if self.on_report is not None:
            self.on_report(report)
        return report

    def release(self) -> None:
        self.pool.state.release_lease(LEASE, self.owner)

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
