"""The state database: tables (SQLAlchemy Core), engine set-up, and migrations on first use."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from gpupool.errors import StateError

metadata = sa.MetaData()

ACTIVE_STATES = ("created", "submitted", "running")

experiments = sa.Table(
    "experiments", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, index=True),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),  # status pages by it
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("bundle", sa.Text, nullable=False),
    sa.Column("hops", sa.Integer, nullable=False, default=0),
    # how many of its attempts ended FAILED (since it was last resumed); the column keeps the
    # name it was created with, the code calls it by its key
    sa.Column("errors", sa.Integer, nullable=False, default=0, key="failed_attempts"),
    sa.Column("gpu_seconds", sa.Float, nullable=False, default=0.0),
    sa.Column("last_step", sa.Integer),
    sa.Column("last_checkpoint", sa.String(128)),
    sa.Column("wait_reason", sa.Text),
    sa.Column("not_before", sa.Float),
    sa.Column("message", sa.Text),
    # Which scheduler handles the experiment, until when (epoch seconds): several daemons on
    # one database share the work by claiming rows (gpupool.state.State.claim_experiments).
    sa.Column("claimed_by", sa.String(128)),
    sa.Column("claim_expires", sa.Float),
)

attempts = sa.Table(
    "attempts", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("experiment_id", sa.String(64), sa.ForeignKey("experiments.id"), nullable=False, index=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("account", sa.String(64), nullable=False, default="default"),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("remote_id", sa.Text),
    sa.Column("url", sa.Text),
    sa.Column("end_reason", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("deadline", sa.Float),
    sa.Column("last_heartbeat", sa.Float),
    sa.Column("step_start", sa.Integer),
    sa.Column("step", sa.Integer),
    sa.Column("total_steps", sa.Integer),
    sa.Column("rate", sa.Float),
    sa.Column("checkpoint_in", sa.String(128)),
    sa.Column("checkpoint_out", sa.String(128)),
    sa.Column("gpu_seconds", sa.Float, nullable=False, default=0.0),
    sa.Column("detail", sa.Text),
    sa.UniqueConstraint("experiment_id", "seq", name="uq_attempt_seq"),
)
# At most one active attempt per experiment, enforced by the database itself.
sa.Index(
    "uq_one_active_attempt", attempts.c.experiment_id, unique=True,
    sqlite_where=attempts.c.state.in_(ACTIVE_STATES),
    postgresql_where=attempts.c.state.in_(ACTIVE_STATES),
)

quota_ledger = sa.Table(
    "quota_ledger", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("account", sa.String(64), nullable=False),
    sa.Column("attempt_id", sa.String(64), unique=True),  # one charge per attempt, ever
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Index("ix_ledger_account", "provider", "account", "ended_at"),
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("experiment_id", sa.String(64), index=True),
    sa.Column("attempt_id", sa.String(64)),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
)

# The one record of cool-downs: a provider account gpupool places nothing on until a time
# (gpupool.state.State.cool_down); the table keeps its first name.
provider_health = sa.Table(
    "provider_health", metadata,
    sa.Column("provider", sa.String(32), primary_key=True),
    sa.Column("account", sa.String(64), primary_key=True),
    sa.Column("unavailable_until", sa.Float),
    sa.Column("reason", sa.Text),
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("updated_at", sa.Float, nullable=False),
    # the provider itself said the account's GPU quota is used up (Colab's "no GPU")
    sa.Column("quota_spent", sa.Boolean, nullable=False, default=False,
              server_default=sa.false()),
)

leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)


POSTGRES_DRIVER = "postgresql+psycopg"  # psycopg 3, from the `postgres` extra


def create_engine(url: str) -> sa.Engine:
    """An engine for ``url``: SQLite files get WAL, a busy timeout and enforced foreign keys;
    a plain ``postgresql://`` URL uses psycopg 3. Raises ``StateError`` for a URL that does not
    parse or whose driver is not installed."""
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite":
        return _server_engine(parsed)
    if parsed.database and parsed.database != ":memory:":
        _ensure_parent(Path(parsed.database))
    engine = sa.create_engine(parsed, connect_args={"timeout": 30})
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _parse(url: str) -> sa.URL:
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise StateError("database_url is not a database URL (e.g. sqlite:///path/state.db or "
                         "postgresql://user@host/db)") from None
    if parsed.drivername == "postgresql":  # SQLAlchemy would pick psycopg2; we ship psycopg 3
        parsed = parsed.set(drivername=POSTGRES_DRIVER)
    return parsed


def _server_engine(parsed: sa.URL) -> sa.Engine:
    """A database server's engine; connections are checked before use, since a server (or the
    network to it) may have dropped them while the daemon slept."""
    try:
        return sa.create_engine(parsed, pool_pre_ping=True)
    except (ImportError, sa.exc.NoSuchModuleError) as err:
        raise StateError(
            f"cannot use database {parsed.render_as_string(hide_password=True)}: {err}; "
            "for PostgreSQL install gpupool[postgres]"
        ) from None


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StateError(f"cannot create the state directory {path.parent}: {err}") from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest revision (creates it on first use).

    Several gpupool commands may start together on a new database: the migration is
    serialized (an exclusive lock file beside a SQLite file; a transaction-level advisory lock
    on PostgreSQL) and Alembic reads the revision again after the lock is taken, so it runs
    once and the others find the schema done. Raises ``StateError`` if it cannot be prepared."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    try:
        with _migration_lock(engine), engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except sa.exc.SQLAlchemyError as err:
        raise StateError(f"cannot prepare the state database {engine.url!r}: {err}") from None


MIGRATION_LOCK_KEY = 0x67707570  # "gpup": the advisory lock id of gpupool's migrations


@contextlib.contextmanager
def _migration_lock(engine: sa.Engine) -> Iterator[None]:
    """An exclusive lock on ``<database>.migrate.lock`` for a SQLite file (blocks until free;
    released when the holder ends, even if it is killed); nothing for other databases."""
    database = engine.url.database
    if engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        yield
        return
    path = Path(database).with_name(Path(database).name + ".migrate.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise StateError(f"cannot create the migration lock {path}: {err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
