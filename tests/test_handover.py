"""Restarts into PostgreSQL leave nothing behind: a process SIGKILLed under load, the next
one SIGTERMed under load, a third that lives three seconds; by the end every answered
exchange is stored and the spool is empty. The shipper of a stopping process (still
draining, ``shipper.lock`` held) hands over to the next process's shipper, which waits
for the lock instead of giving up."""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from asgi_audit.recording.spool import streams
from asgi_audit.sinks import Query, open_sink
from postgres_server import fresh_table, store_url
from processes import SIGKILL, SIGTERM, Load, environment, serving, wait_for

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.timeout(600)]

RESTART_RUNS = int(os.environ.get("AUDIT_TEST_RESTART_RUNS", "2"))
"""Kill-restart-stop sequences in a row (the issue's acceptance: 10)."""


def stored(sink: str) -> Counter[str]:
    with closing(open_sink(sink)) as store:
        return Counter(r.correlation_id for r in store.search(Query(limit=None)))


def under_load(env: dict[str, str], prefix: str, then: int) -> tuple[set[str], int]:
    """Serve, load at c=8 until ``then`` exchanges completed, send signal; the answered
    ids and the exit code (None-free: waits for the process)."""
    with serving(env) as server:
        load = Load(server.url, total=100_000, threads=8, seconds=60, prefix=prefix)
        running = load.start()
        assert wait_for(lambda: len(load.completed) >= 300, timeout=60)
        server.signal(then)
        code = server.wait(60)
        load.stopped.set()
        running.join()
    return load.completed, code


@pytest.mark.parametrize("run", range(RESTART_RUNS))
def test_kill_restart_stop_and_a_short_life_deliver_everything(tmp_path: Path, run: int) -> None:
    with fresh_table() as table:
        sink = store_url(table)
        spool = tmp_path / "spool"
        env = environment(
            ASGI_AUDIT_SINK=sink, ASGI_AUDIT_SPOOL=str(spool), ASGI_AUDIT_MODE="blocking"
        )
        first, _ = under_load(env, "first", SIGKILL)
        second, code = under_load(env, "second", SIGTERM)
        assert code in (0, -SIGTERM)
        with serving(env) as third:
            time.sleep(3)
            third.signal(SIGTERM)
            assert third.wait(60) in (0, -SIGTERM)
        answered = first | second
        ids = stored(sink)
        missing = answered - set(ids)
        assert not missing, f"{len(missing)} of {len(answered)} answered exchanges not stored"
        assert max(ids.values()) == 1
        left = [s.name for s in streams(spool) if s.segments()]
        assert not left, f"streams still in the spool: {left}"
