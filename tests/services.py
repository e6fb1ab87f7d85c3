"""Real servers the tests run against: a PostgreSQL server (started by `.ci/run`, or by a
developer, and named by ``GPUPOOL_TEST_POSTGRES_URL``) and an S3 server (moto's server mode on a
loopback port, started here). Each test gets its own database or bucket and drops it after."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

POSTGRES_URL_ENV = "GPUPOOL_TEST_POSTGRES_URL"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def missing(what: str, why: str) -> None:
    """Skip on a developer's machine, but fail in CI, where every backend must really run."""
    message = f"{what}: {why}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: these tests must run, `.ci/run` sets them up)", pytrace=False)
    pytest.skip(message)


class PostgresServer:
    """One throw-away database on the server at ``url`` for the whole run, and in it one fresh
    schema per test (named in the URL's ``search_path``: gpupool never names a schema, so each
    test sees an empty database of its own). Schemas cost milliseconds; databases, seconds."""

    def __init__(self, url: str):
        import sqlalchemy as sa

        from gpupool.db import create_engine

        self.server = create_engine(url).execution_options(isolation_level="AUTOCOMMIT")
        self.name = f"gpupool_test_{secrets.token_hex(6)}"
        with self.server.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{self.name}" TEMPLATE template0')
        self.url = sa.make_url(url).set(database=self.name)
        self.admin = create_engine(self.url.render_as_string(hide_password=False)) \
            .execution_options(isolation_level="AUTOCOMMIT")

    def create(self) -> str:
        schema = f"t_{secrets.token_hex(6)}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = self.url.update_query_dict({"options": f"-csearch_path={schema}"})
        return url.render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        import sqlalchemy as sa

        schema = sa.make_url(url).query["options"].split("=", 1)[1]
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    @contextmanager
    def database(self) -> Iterator[str]:
        url = self.create()
        try:
            yield url
        finally:
            self.drop(url)

    def close(self) -> None:
        self.admin.dispose()
        with self.server.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.server.dispose()


def postgres_server() -> PostgresServer:
    """The test server, or a skip (a developer without PostgreSQL) / failure (CI) saying why."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        missing("postgresql", f"no server: set {POSTGRES_URL_ENV} (`.ci/run` starts one)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("postgresql", "psycopg is not installed (pip install -e '.[dev]')")
    try:
        return PostgresServer(str(url))
    except Exception as err:  # noqa: BLE001 - any connection failure means "no server"
        missing("postgresql", f"cannot connect to {POSTGRES_URL_ENV}: {type(err).__name__}")
        raise  # not reached: missing() skips or fails


class Databases:
    """Makes fresh, empty state databases of one backend (and drops them at the end)."""

    def __init__(self, backend: str, folder: Path, server: PostgresServer | None):
        self.backend, self.folder, self.server = backend, folder, server
        self.made: list[str] = []

    def new(self) -> str:
        if self.server is None:
            url = f"sqlite:///{self.folder / f'state-{len(self.made)}' / 'state.db'}"
        else:
            url = self.server.create()
        self.made.append(url)
        return url

    def drop_all(self) -> None:
        if self.server is not None:
            for url in self.made:
                self.server.drop(url)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """moto's S3 server on a loopback port; ``bucket()`` makes a fresh, empty bucket."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    @property
    def options(self) -> dict[str, Any]:
        """s3fs storage options that reach this server (and never a real AWS endpoint)."""
        return {"key": S3_KEYS["AWS_ACCESS_KEY_ID"], "secret": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    @property
    def environment(self) -> dict[str, str]:
        """The same, as environment variables, for processes that open ``s3://`` by URL alone."""
        return {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint}

    def bucket(self) -> str:
        import boto3

        name = f"gpupool-test-{secrets.token_hex(6)}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.server.stop()


def s3_server() -> S3Server:
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as err:
        missing("s3", f"{err.name} is not installed (pip install -e '.[dev]')")
    return S3Server()
