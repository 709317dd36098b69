"""The PostgreSQL server the tests use, and a fresh table on it for each test.

The server is the real one on 127.0.0.1:5432 (the development machines and CI run it);
``TEST_POSTGRES_URL`` points elsewhere. Each test gets a table name of its own, dropped
afterwards with its partitions and its schema-version table, so tests never see each
other's rows. Without a server, tests skip with how to start it; in CI they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import psycopg

SERVER_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
START_HINT = "start it with: pg_ctlcluster 15 main start"


def unavailable(reason: str) -> None:
    """Skip locally; fail in CI, where a missing server must not pass as skipped tests."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection beside the store's own (to look at or break the server)."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed: pip install -e '.[test]'")
        raise
    try:
        return psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(
            f"PostgreSQL not reachable on 127.0.0.1:5432 ({' '.join(str(exc).split())}); "
            f"{START_HINT}"
        )
        raise


def store_url(table: str, **options: str) -> str:
    """The sink URL for ``table`` on the test server, with extra URL options."""
    query = "&".join(f"{name}={value}" for name, value in {"table": table, **options}.items())
    return f"{SERVER_URL}{'&' if '?' in SERVER_URL else '?'}{query}"


def drop_table(connection: psycopg.Connection[tuple[object, ...]], table: str) -> None:
    """Drop a store's table (partitions go with it), its schema-version table and its
    checkpoints."""
    connection.execute("SET lock_timeout = '10s'")
    connection.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
    connection.execute(f'DROP TABLE IF EXISTS "{table}_schema_version"')
    connection.execute(f'DROP TABLE IF EXISTS "{table}_checkpoints"')


@contextmanager
def fresh_table() -> Iterator[str]:
    """A table name no other test uses; dropped at the end."""
    with admin_connection() as connection:
        table = f"test_{uuid.uuid4().hex[:16]}"
        try:
            yield table
        finally:
            drop_table(connection, table)
