"""``mode``: when a response may finish relative to its record.

``batch`` sends the last message at once; ``blocking`` holds it until the recorder has
kept the record; ``blocking-strict`` withholds it (and the server closes the connection)
when the record cannot be kept."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from asgi_audit import AuditMiddleware, ConfigError, Exchange, MemoryRecorder
from asgi_audit._types import Message
from asgi_audit.errors import RecordNotWritten
from asgi_audit.recording.writer import SpoolRecorder
from harness import EchoApp, http_scope
from session import serving
from spooling import spooled


class HeldRecorder(MemoryRecorder):
    """Accepts exchanges and lets the test say when (and whether) each is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Exchange] = []
        self.arrived = threading.Event()

    def try_submit(self, exchange: Exchange, *, force: bool = False) -> bool:
        callback, exchange.on_written = exchange.on_written, None
        accepted = super().try_submit(exchange, force=force)
        exchange.on_written = callback
        self.pending.append(exchange)
        self.arrived.set()
        return accepted

    def settle(self, ok: bool) -> None:
        for exchange in self.pending:
            assert exchange.on_written is not None
            exchange.on_written(ok)
        self.pending.clear()


async def exchange_with(mw: AuditMiddleware, sent: list[Message]) -> None:
    body = b'{"order": 1}'
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await mw(http_scope(), receive, send)


def last_sent(sent: list[Message]) -> bool:
    return any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)


@pytest.mark.parametrize("mode", ["blocking", "blocking-strict"])
def test_last_message_waits_for_the_record(mode: str) -> None:
    recorder = HeldRecorder()
    mw = AuditMiddleware(EchoApp(), recorder=recorder, mode=mode, environ={})
    sent: list[Message] = []

    async def main() -> None:
        task = asyncio.create_task(exchange_with(mw, sent))
        await asyncio.to_thread(recorder.arrived.wait, 10)
        await asyncio.sleep(0.05)
        assert not last_sent(sent)  # the record is not kept yet: the response waits
        assert any(m["type"] == "http.response.start" for m in sent)
        await asyncio.to_thread(recorder.settle, True)  # from another thread, as a writer
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert last_sent(sent)
    (kept,) = recorder.take_all()
    assert kept.outcome == "complete" and kept.status == 200
    assert kept.response_body is not None and b"".join(kept.response_body.chunks())


def test_blocking_sends_anyway_when_the_record_cannot_be_kept() -> None:
    recorder = HeldRecorder()
    mw = AuditMiddleware(EchoApp(), recorder=recorder, mode="blocking", environ={})
    sent: list[Message] = []

    async def main() -> None:
        task = asyncio.create_task(exchange_with(mw, sent))
        await asyncio.to_thread(recorder.arrived.wait, 10)
        recorder.settle(False)
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert last_sent(sent)
    assert mw.unwritten == 1


def test_blocking_strict_withholds_the_response() -> None:
    recorder = HeldRecorder()
    mw = AuditMiddleware(EchoApp(), recorder=recorder, mode="blocking-strict", environ={})
    sent: list[Message] = []

    async def main() -> None:
        task = asyncio.create_task(exchange_with(mw, sent))
        await asyncio.to_thread(recorder.arrived.wait, 10)
        recorder.settle(False)
        with pytest.raises(RecordNotWritten):
            await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert not last_sent(sent)
    assert mw.unwritten == 1


def test_batch_mode_does_not_wait() -> None:
    recorder = HeldRecorder()
    mw = AuditMiddleware(EchoApp(), recorder=recorder, environ={})
    sent: list[Message] = []
    asyncio.run(asyncio.wait_for(exchange_with(mw, sent), 10))
    assert last_sent(sent) and len(recorder.pending) == 1


def test_mode_is_validated_and_read_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="mode"):
        AuditMiddleware(EchoApp(), recorder=MemoryRecorder(), mode="eventually", environ={})
    mw = AuditMiddleware(
        EchoApp(), recorder=MemoryRecorder(), environ={"ASGI_AUDIT_MODE": "blocking-strict"}
    )
    assert mw.settings.mode == "blocking-strict"


def test_blocking_strict_on_a_real_server_closes_the_connection(tmp_path: Path) -> None:
    """Over a real socket: with a spool that cannot be written, the client gets no
    complete response (the connection is closed); with a working one, it does, and the
    record is in the spool before the response is complete."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the spool's folder should be")
    broken = SpoolRecorder(blocked / "spool", retry_seconds=0.0)
    app = AuditMiddleware(EchoApp(), recorder=broken, mode="blocking-strict", environ={})
    with (
        serving(app, lifespan="off") as url,
        httpx.Client(base_url=url, timeout=10) as client,
        pytest.raises(httpx.HTTPError),
    ):
        client.post("/orders", content=b'{"a": 1}')
    broken.shutdown(10)

    working = SpoolRecorder(tmp_path / "spool", fsync="always")
    app = AuditMiddleware(EchoApp(), recorder=working, mode="blocking-strict", environ={})
    with serving(app, lifespan="off") as url, httpx.Client(base_url=url, timeout=10) as client:
        for number in range(20):
            body = b'{"n": %d}' % number
            assert client.post("/orders", content=body).content == body
            # Written before the client saw the response end: no flush needed to read it.
            assert body in [r.request for r in spooled(tmp_path / "spool")]
    assert working.shutdown(10)
