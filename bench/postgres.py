"""The PostgreSQL server the benchmarks use when it is there: a reachability check and the
clean-up of the tables a run made."""

from __future__ import annotations


def postgres_reachable(server: str) -> str | None:
    """``None`` when the PostgreSQL server answers, else why it cannot be used."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'asgi-audit[postgres]')"
    try:
        psycopg.connect(server, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"not reachable at {server}: {' '.join(str(exc).split())}"
    return None


def drop_postgres_table(server: str, table: str) -> None:
    """Drop a store's table (its partitions go with it) and its schema-version table."""
    import psycopg

    with psycopg.connect(server, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
        admin.execute(f'DROP TABLE IF EXISTS "{table}_schema_version"')
