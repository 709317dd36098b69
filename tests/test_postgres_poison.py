"""Poison into PostgreSQL: values a client controls cannot stop delivery. A 3,000-character
``X-Request-ID`` and a 64 KiB path are stored whole (the indexed columns hold a bounded
prefix); a record the server refuses for good (here by a trigger) goes to the quarantine
while the other 49 are stored, and ``spool retry`` stores it once the server takes it."""

from __future__ import annotations

import asyncio
import time
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from asgi_audit import AuditMiddleware
from asgi_audit.cli import main
from asgi_audit.recording.writer import SpoolRecorder
from asgi_audit.shipping.quarantine import Quarantine
from asgi_audit.shipping.shipper import Shipper
from asgi_audit.sinks import Query, open_sink
from harness import EchoApp, call
from postgres_server import admin_connection, fresh_table, store_url

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

LONG_ID = "r" * 3000
LONG_PATH = "/orders/" + "p" * (64 << 10)


def record_fifty(spool: Path, poison_id: str, poison_path: str) -> None:
    recorder = SpoolRecorder(spool)
    mw = AuditMiddleware(EchoApp(), recorder=recorder, environ={})

    async def send_all() -> None:
        for number in range(50):
            poisoned = number == 25
            request_id = poison_id if poisoned else f"ok-{number}"
            await call(
                mw,
                b'{"n": %d}' % number,
                headers=[(b"x-request-id", request_id.encode())],
                path=poison_path if poisoned else f"/orders/{number}",
            )

    asyncio.run(send_all())
    assert recorder.shutdown(30)


def correlation_ids(url: str) -> list[str]:
    with closing(open_sink(url)) as store:
        return [r.correlation_id for r in store.search(Query(limit=None))]


def test_long_request_id_and_path_are_stored_whole(tmp_path: Path) -> None:
    with fresh_table() as table:
        url = store_url(table)
        record_fifty(tmp_path / "spool", LONG_ID, LONG_PATH)
        with closing(open_sink(url)) as sink:
            started = time.monotonic()
            report = Shipper(tmp_path / "spool", sink).ship_once(timeout=10)
            assert time.monotonic() - started < 10
        assert report.delivered == 50 and report.quarantined == 0
        with closing(open_sink(url)) as store:
            (found,) = store.search(Query(correlation_id=LONG_ID, limit=None))
        assert found.correlation_id == LONG_ID and found.path == LONG_PATH


def test_a_refused_record_is_quarantined_and_retried(tmp_path: Path) -> None:
    with fresh_table() as table, admin_connection() as admin:
        url = store_url(table)
        with closing(open_sink(url)) as made:
            assert made.count() == 0  # the table, made by the sink at its first operation
        # A value the server refuses for what it is (SQLSTATE class 22, as for text it
        # cannot hold), raised by a trigger the test can drop again.
        admin.execute(
            f'CREATE FUNCTION "{table}_no_poison"() RETURNS trigger LANGUAGE plpgsql AS $$ '
            "BEGIN IF NEW.correlation_id = 'poison' THEN RAISE EXCEPTION 'no_poison' "
            "USING ERRCODE = 'invalid_parameter_value'; END IF; RETURN NEW; END $$"
        )
        admin.execute(
            f'CREATE TRIGGER no_poison BEFORE INSERT ON "{table}" '
            f'FOR EACH ROW EXECUTE FUNCTION "{table}_no_poison"()'
        )
        spool = tmp_path / "spool"
        record_fifty(spool, "poison", "/orders/25")
        with closing(open_sink(url)) as sink:
            started = time.monotonic()
            report = Shipper(spool, sink).ship_once(timeout=10)
            assert time.monotonic() - started < 10
        assert report.quarantined == 1 and report.delivered == 49
        assert sorted(correlation_ids(url)) == sorted(f"ok-{n}" for n in range(50) if n != 25)
        (entry,) = Quarantine(spool).entries()
        assert "no_poison" in entry.reason
        runner = CliRunner()
        status = runner.invoke(main, ["spool", "status", "--spool", str(spool)])
        assert "quarantine: 1 record(s)" in status.output and "no_poison" in status.output
        refused = runner.invoke(main, ["spool", "retry", "--spool", str(spool), "--sink", url])
        assert refused.exit_code == 1 and "still refused" in refused.output
        admin.execute(f'DROP TRIGGER no_poison ON "{table}"')
        admin.execute(f'DROP FUNCTION "{table}_no_poison"()')
        retried = runner.invoke(main, ["spool", "retry", "--spool", str(spool), "--sink", url])
        assert retried.exit_code == 0, retried.output
        assert "poison" in correlation_ids(url)
        assert Quarantine(spool).entries() == []
