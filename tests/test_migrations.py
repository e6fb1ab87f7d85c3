"""Alembic migrations on each backend: from an empty database, and from every earlier revision
with data in it, to a schema that matches the tables gpupool's code uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

import gpupool.db as db
from gpupool.state import State

T0 = 1_700_000_000.0
MIGRATIONS = Path(db.__file__).parent / "migrations"


def config_for(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory(str(MIGRATIONS))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def upgrade(engine: sa.Engine, target: str) -> None:
    with engine.begin() as connection:
        command.upgrade(config_for(connection), target)


def schema_differences(engine: sa.Engine) -> list:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), db.metadata)


def test_there_are_revisions_to_walk() -> None:
    assert len(revisions()) >= 2


def test_from_empty_to_head_matches_the_code(database_url: str) -> None:
    state = State(database_url)  # migrates on first use
    try:
        assert schema_differences(state.engine) == []
        with state.engine.connect() as conn:
            version = conn.exec_driver_sql("select version_num from alembic_version").scalar()
        assert version == revisions()[-1]
    finally:
        state.close()


@pytest.mark.parametrize("start", range(len(revisions()) - 1))
def test_from_every_earlier_revision_keeps_the_data(database_url: str, start: int) -> None:
    engine = db.create_engine(database_url)
    try:
        upgrade(engine, revisions()[start])
        with engine.begin() as conn:  # a row written by that older gpupool
            conn.execute(sa.text(
                "insert into experiments (id, name, spec, state, created_at, updated_at, bundle, "
                "hops, errors, gpu_seconds) values ('old-1', 'old', '{}', 'pending', :t, :t, '-', "
                "0, 0, 0.0)"), {"t": T0})
        db.migrate(engine)
        assert schema_differences(engine) == []
        with engine.connect() as conn:
            assert conn.execute(sa.select(db.experiments.c.name)).scalars().all() == ["old"]
        db.migrate(engine)  # at head already: a no-op
    finally:
        engine.dispose()
