"""The middleware's durable path end to end, in process: lifespan startup, exchanges,
lifespan shutdown; then the records are in the sink (or, with ship='off', in the spool)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from asgi_audit import AuditMiddleware
from asgi_audit._types import Message, Receive, Scope, Send
from asgi_audit.recording.spool import streams
from asgi_audit.shipping.delivery import Delivery
from asgi_audit.shipping.shipper import Shipper
from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.memory import MemorySink
from asgi_audit.sinks.record import StoredRecord
from harness import EchoApp, call, lifespan
from spooling import request_data, spooled, threads_named, wait_until

DATA = [b"%d:" % i + bytes([i]) * (i * 997) for i in range(10)]


def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


def records_of(url: str) -> list[StoredRecord]:
    with closing(open_sink(url)) as store:
        return list(store.search(Query(limit=None, with_bodies=True, newest_first=False)))


def check(records: list[StoredRecord], data: list[bytes]) -> None:
    """Every body of ``data`` once, echoed back, with its digest."""
    assert sorted(request_data(r) for r in records) == sorted(data)
    assert len({r.id for r in records}) == len(data)
    for record in records:
        assert record.request_body is not None and record.response_body is not None
        assert record.response_body.data == record.request_body.data
        data_ = record.request_body.data
        assert data_ is not None
        assert record.request_body.sha256 == hashlib.sha256(data_).hexdigest()
        assert record.status == 200 and record.outcome == "complete"


def durable(mw: AuditMiddleware) -> Delivery:
    """The middleware's durable recorder (built when no recorder= is given)."""
    assert isinstance(mw.recorder, Delivery)
    return mw.recorder


def audited(tmp_path: Path, **options: Any) -> AuditMiddleware:
    return AuditMiddleware(
        EchoApp(), spool=tmp_path / "spool", environ={}, shutdown_timeout=60, **options
    )


def test_lifespan_shutdown_delivers_everything_before_completing(tmp_path: Path) -> None:
    """By lifespan.shutdown.complete every record is in the sink; no thread is left."""
    url = memory_url()
    mw = audited(tmp_path, sink=url, ship="thread")
    before = {
        name: len(threads_named(name)) for name in ("asgi-audit-recorder", "asgi-audit-shipper")
    }
    at_completion: list[int] = []

    def on_send(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            at_completion.append(MemorySink(url.removeprefix("memory://")).count())

    async def main() -> list[Message]:
        async with lifespan(mw, on_send) as sent:
            answers = [await call(mw, body) for body in DATA]
            assert answers == DATA
        return sent

    sent = asyncio.run(main())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert at_completion == [len(DATA)]
    check(records_of(url), DATA)
    assert list(streams(tmp_path / "spool")) == []
    assert {name: len(threads_named(name)) for name in before} == before


def test_lifespan_shutdown_waits_for_an_exchange_still_running(tmp_path: Path) -> None:
    """An exchange still running when shutdown begins is waited for and delivered too."""
    url = memory_url()
    release = asyncio.Event

    class SlowApp(EchoApp):
        gate: asyncio.Event | None = None

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/slow":
                assert self.gate is not None
                await self.gate.wait()
            await super().__call__(scope, receive, send)

    app = SlowApp()
    mw = AuditMiddleware(
        app, spool=tmp_path / "spool", sink=url, ship="thread", environ={}, shutdown_timeout=60
    )

    async def main() -> None:
        app.gate = release()
        async with lifespan(mw):
            await call(mw, b"quick")
            slow = asyncio.create_task(call(mw, b"slow", path="/slow"))
            await asyncio.sleep(0.01)
            assert not slow.done()
            # shutdown begins on leaving the block; open the gate a little later
            asyncio.get_running_loop().call_later(0.1, app.gate.set)
        assert await slow == b"slow"

    asyncio.run(main())
    assert sorted(request_data(r) for r in records_of(url)) == [
        b"quick",
        b"slow",
    ]


def test_ship_off_leaves_records_for_a_sidecar(tmp_path: Path) -> None:
    """ship='off' leaves the records in the spool; a later Shipper pass delivers them."""
    mw = audited(tmp_path, sink=memory_url(), ship="off")

    async def main() -> None:
        async with lifespan(mw):
            for body in DATA:
                await call(mw, body)

    asyncio.run(main())
    assert sorted(r.request for r in spooled(tmp_path / "spool")) == sorted(DATA)
    sink = MemorySink()
    report = Shipper(tmp_path / "spool", sink).ship_once()
    assert report.delivered == len(DATA)
    check(list(sink.search(Query(limit=None, with_bodies=True))), DATA)
    assert list(streams(tmp_path / "spool")) == []
    sink.close()


@pytest.mark.timeout(120)
def test_ship_process_delivers_by_shutdown(tmp_path: Path) -> None:
    """ship='process': lifespan shutdown waits for the child's last pass; all is stored."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    mw = audited(tmp_path, sink=url)

    async def main() -> None:
        async with lifespan(mw):
            for body in DATA:
                await call(mw, body)

    asyncio.run(main())
    assert durable(mw)._process is None
    check(records_of(url), DATA)
    assert list(streams(tmp_path / "spool")) == []


def test_a_worker_takes_over_shipping_when_the_shipper_goes(tmp_path: Path) -> None:
    """Two workers on one spool: one child ships, the other's waits for the lock; when the
    shipping worker stops, the waiting child takes over and the other's records arrive."""
    from asgi_audit.shipping.runners import ShipperLock

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    first, second = audited(tmp_path, sink=url), audited(tmp_path, sink=url)

    async def serve(mw: AuditMiddleware, bodies: list[bytes]) -> None:
        for body in bodies:
            await call(mw, body)

    asyncio.run(serve(first, DATA[:1]))
    lock = ShipperLock(tmp_path / "spool")
    assert wait_until(lock.held_elsewhere)
    asyncio.run(serve(second, DATA[1:]))
    assert second.recorder.flush(30)  # its stream is open: it has tried to start a shipper
    standby = durable(second)._process
    assert standby is not None and standby.running()  # waiting for the lock, not gone
    assert first.recorder.shutdown(60)
    assert wait_until(lambda: len(records_of(url)) == len(DATA), timeout=60)
    assert second.recorder.shutdown(60)
    check(records_of(url), DATA)
