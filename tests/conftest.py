"""Fixtures shared by the suites: ONE parametrized state database (SQLite and PostgreSQL) and an
S3 server for the store. See tests/services.py for how the servers are found or started."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import Databases, PostgresServer, S3Server, postgres_server, s3_server

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = postgres_server()
    yield server
    server.close()


@pytest.fixture(params=BACKENDS)
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    """The one parametrized database fixture: each test using it runs on SQLite, then on
    PostgreSQL (skipped without a server on a developer's machine, a failure in CI)."""
    server = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    made = Databases(request.param, tmp_path / "databases", server)
    yield made
    made.drop_all()


@pytest.fixture
def database_url(databases: Databases) -> str:
    """A fresh, empty state database: a SQLite file, or a database on the PostgreSQL server."""
    return databases.new()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    server = s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3: S3Server) -> str:
    """``s3://<fresh bucket>/exp`` on the test S3 server (pass ``s3.options`` to open it)."""
    return f"s3://{s3.bucket()}/exp"


@pytest.fixture
def pool_database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every pool opened in the test (and every `gpupool` process it starts) uses the
    parametrized database, set the way a team sets it: ``GPUPOOL_DATABASE_URL``."""
    monkeypatch.setenv("GPUPOOL_DATABASE_URL", database_url)
    return database_url
