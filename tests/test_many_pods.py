"""Beyond one machine: several pods ship into one PostgreSQL database and one bucket, and
the database goes away mid-load; every record arrives exactly once."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest

from asgi_audit.sinks import Query, open_sink
from postgres_server import admin_connection, fresh_table
from postgres_server import store_url as postgres_store_url
from processes import SIGTERM, Load, environment, serving, wait_for

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]

PODS = 4


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("s3", marks=pytest.mark.s3),
    ]
)
def shared_store(request: pytest.FixtureRequest) -> Iterator[str]:
    """One store every pod ships into: a fresh PostgreSQL table, or a fresh bucket prefix."""
    if request.param == "postgres":
        with fresh_table() as table:
            yield postgres_store_url(table)
    else:
        server = request.getfixturevalue("s3_server")
        yield server.url(server.make_bucket("pods"), f"run-{uuid.uuid4()}")


def stored(url: str) -> list[tuple[str, str]]:
    """(correlation id, stream) of every record in the store."""
    with closing(open_sink(url)) as store:
        return [(r.correlation_id, r.stream) for r in store.search(Query(limit=None))]


def test_four_pods_ship_concurrently_into_one_store_exactly_once(
    shared_store: str, tmp_path: Path
) -> None:
    """Four uvicorn processes, each with its own spool and shipper, load at once; after
    SIGTERM every answered exchange is in the shared store once, from four streams."""
    loads: list[Load] = []
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                serving(
                    environment(
                        ASGI_AUDIT_SINK=shared_store,
                        ASGI_AUDIT_SPOOL=str(tmp_path / f"pod-{pod}"),
                        ASGI_AUDIT_SERVICE=f"pod-{pod}",
                    )
                )
            )
            for pod in range(PODS)
        ]
        loads = [
            Load(server.url, total=120, threads=2, prefix=f"pod{pod}")
            for pod, server in enumerate(servers)
        ]
        running = [load.start() for load in loads]
        for thread in running:
            thread.join()
        for server in servers:
            server.signal(SIGTERM)
        for server in servers:
            server.wait(90)
    answered = set().union(*(load.completed for load in loads))
    assert len(answered) == PODS * 120
    records = stored(shared_store)
    counts = Counter(correlation for correlation, _ in records)
    assert set(counts) == answered
    assert max(counts.values()) == 1
    assert len({stream for _, stream in records}) == PODS


@pytest.mark.postgres
def test_postgres_going_away_mid_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """While every connection to PostgreSQL is cut again and again mid-load, the spool holds
    the records, the shipper reconnects, and the table ends with each record once."""
    with fresh_table() as table:
        url = postgres_store_url(table)
        env = environment(ASGI_AUDIT_SINK=url, ASGI_AUDIT_SPOOL=str(tmp_path / "spool"))
        stop = threading.Event()
        cuts = 0

        def cut_connections() -> None:
            nonlocal cuts
            with admin_connection() as admin:
                while not stop.wait(0.1):
                    terminated = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND application_name = 'asgi-audit'"  # the stores' connections
                    ).fetchone()
                    cuts += int(str(terminated[0])) if terminated else 0

        with serving(env) as server:
            Load(server.url, total=20, threads=2, prefix="before").run()
            assert wait_for(lambda: len(stored(url)) == 20, timeout=60)
            cutter = threading.Thread(target=cut_connections)
            cutter.start()
            try:
                during = Load(server.url, total=400, threads=4, prefix="during").run()
            finally:
                stop.set()
                cutter.join()
            assert during.failed == 0
            assert wait_for(lambda: len(stored(url)) == 420, timeout=120)
            server.signal(SIGTERM)
            server.wait(90)
        counts = Counter(correlation for correlation, _ in stored(url))
        assert cuts > 0
        assert set(counts) >= during.completed
        assert len(counts) == 420 and max(counts.values()) == 1
