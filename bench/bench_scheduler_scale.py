"""Scheduler scale: `reconcile_once` time per active attempt at growing numbers of attempts
spread over 100 accounts of an in-memory fake provider (each poll answers "running" with
progress, so every attempt is read and written as in a real step); and `gpupool status`
(one page of `views.experiment_row`) with few against many experiments in the database.
Each figure is measured on SQLite and, given a server, on PostgreSQL in the same run (each
size on a fresh database, created and dropped here).

    python bench/bench_scheduler_scale.py                       # SQLite only
    python bench/bench_scheduler_scale.py --postgres postgresql://user@127.0.0.1:5432/postgres
    python bench/bench_scheduler_scale.py --sizes 100,1000,10000 --experiments 100,10000
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import sqlalchemy as sa
from _util import best_of, table
from pydantic import BaseModel

from gpupool import db
from gpupool.lifecycle import AttemptState
from gpupool.pool import Pool
from gpupool.provider import PollResult, Provider, Submission
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from gpupool.views import experiment_row

NOW = 1_700_000_000.0
ACCOUNTS = [f"user{i:03d}" for i in range(100)]
SPEC = json.loads(ExperimentSpec(name="bench-scale", run="python t.py",
                                 providers=["fake"]).model_dump_json())


class FakeConfig(BaseModel):
    enabled: bool = True


class FakeProvider(Provider):
    """Every attempt is running and one step further at each poll."""

    name = "fake"
    Config = FakeConfig

    def accounts(self) -> list[str]:
        return ACCOUNTS

    def check_credentials(self) -> tuple[bool, str]:
        return True, "fake"

    def submit(self, launch):  # noqa: ANN001, ANN201
        return Submission(remote_id=launch.attempt_id)

    def poll(self, attempt, now):  # noqa: ANN001, ANN201
        return PollResult(AttemptState.RUNNING, step=(attempt.step or 0) + 10, heartbeat=now)

    def cancel(self, attempt) -> None:  # noqa: ANN001
        return None

    def logs(self, attempt) -> str:  # noqa: ANN001
        return ""

    def collect(self, attempt, store):  # noqa: ANN001, ANN201
        return []


@contextmanager
def sqlite_database(folder: Path) -> Iterator[str]:
    yield f"sqlite:///{folder / 'state.db'}"


def postgres_database(server: str) -> Callable[[Path], AbstractContextManager[str]]:
    """Fresh databases on the PostgreSQL server at ``server`` (dropped after use)."""
    admin = db.create_engine(server).execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def database(_folder: Path) -> Iterator[str]:
        name = f"gpupool_bench_{secrets.token_hex(4)}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return database


def open_pool(folder: Path, url: str) -> Pool:
    settings = PoolSettings(data_dir=folder, database_url=url, store_url=str(folder / "checkpoints"))
    fake = FakeProvider(FakeConfig(), folder, time.time)
    return Pool(settings, clock=lambda: NOW, providers={"fake": fake})


def seed(pool: Pool, experiments: int, active: int) -> None:
    """``experiments`` experiments, the first ``active`` with a running attempt (bulk insert)."""
    rows, attempts = [], []
    for i in range(experiments):
        ident = f"bench-scale-{i:06d}"
        running = i < active
        rows.append(dict(id=ident, name="bench-scale", spec=json.dumps(SPEC),
                         state="running" if running else "succeeded", created_at=NOW + i,
                         updated_at=NOW + i, bundle="-", hops=0, errors=0, gpu_seconds=0.0))
        attempts.append(dict(id=f"{ident}-a1", experiment_id=ident, seq=1, provider="fake",
                             account=ACCOUNTS[i % len(ACCOUNTS)],
                             state="running" if running else "succeeded", created_at=NOW + i,
                             started_at=NOW + i, ended_at=None if running else NOW + i + 60,
                             step=0, step_start=0, gpu_seconds=0.0))
    with pool.state.engine.begin() as conn:
        conn.execute(db.experiments.insert(), rows)
        conn.execute(db.attempts.insert(), attempts)


def reconcile_per_attempt(database: Callable, size: int, repeat: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="gpupool-bench-") as tmp, database(Path(tmp)) as url:
        pool = open_pool(Path(tmp), url)
        seed(pool, size, size)
        scheduler = Scheduler(pool)
        clock = iter(range(1, 1_000_000))
        seconds = best_of(repeat, lambda: scheduler.reconcile_once(NOW + next(clock)))
        pool.close()
    return seconds, seconds / size


def status_page(database: Callable, experiments: int, repeat: int, limit: int = 50) -> float:
    with tempfile.TemporaryDirectory(prefix="gpupool-bench-") as tmp, database(Path(tmp)) as url:
        pool = open_pool(Path(tmp), url)
        seed(pool, experiments, min(experiments, 100))

        def page() -> None:
            rows = [experiment_row(pool, e, NOW) for e in pool.state.experiments(limit=limit)]
            pool.state.count_experiments()
            assert len(rows) == min(limit, experiments)

        seconds = best_of(repeat, page)
        pool.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="active attempts, comma-separated")
    parser.add_argument("--experiments", default="100,10000", help="experiments for status")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres", default=os.environ.get("GPUPOOL_TEST_POSTGRES_URL"),
                        help="a PostgreSQL server URL to measure beside SQLite "
                             "(default: $GPUPOOL_TEST_POSTGRES_URL)")
    args = parser.parse_args()
    backends: dict[str, Callable] = {"SQLite": sqlite_database}
    if args.postgres:
        backends["PostgreSQL"] = postgres_database(args.postgres)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for backend, database in backends.items():
        results = [(n, *reconcile_per_attempt(database, n, args.repeat)) for n in sizes]
        base = results[0][2]
        rows += [(backend, str(n), f"{total * 1000:.0f} ms", f"{each * 1e6:.0f} µs",
                  f"{each / base:.2f}") for n, total, each in results]
    table("reconcile_once with N active attempts over 100 accounts (fake provider)", rows,
          ("database", "attempts", "step", "per attempt", f"per attempt x N={sizes[0]}"))
    counts = [int(s) for s in args.experiments.split(",")]
    rows = []
    for backend, database in backends.items():
        pages = [(n, status_page(database, n, args.repeat)) for n in counts]
        rows += [(backend, str(n), f"{s * 1000:.1f} ms", f"{s / pages[0][1]:.2f}") for n, s in pages]
    table("`gpupool status` first page (50 rows) with N experiments in the database", rows,
          ("database", "experiments", "page", f"x N={counts[0]}"))


if __name__ == "__main__":
    main()
