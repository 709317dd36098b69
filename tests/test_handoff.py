"""Handing a finished exchange to the recorder never breaks the response.

A recorder that raises is counted as a failure and never masks the app's own error; a full
recorder drops (counted) with ``overflow="drop"`` or, with ``overflow="block"``, makes only
that exchange wait for room, without blocking the event loop or letting a keep-alive client
run ahead. An exchange cancelled while waiting, or mid-response, is still handed off.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from asgi_audit import Exchange, MemoryRecorder
from asgi_audit._types import Receive, Scope, Send
from harness import (
    Client,
    ReplayApp,
    check_body,
    drain_worker,
    http_scope,
    middleware,
    request,
    response,
    run,
    same_objects,
)


class BrokenRecorder:
    """A recorder whose try_submit (or room) raises."""

    def __init__(self, *, full: bool = False) -> None:
        self.full = full
        self.calls = 0

    def try_submit(self, exchange: Exchange, *, force: bool = False) -> bool:
        self.calls += 1
        if self.full and not force:
            return False
        raise RuntimeError("recorder down")

    async def room(self) -> None:
        raise RuntimeError("recorder down")

    def flush(self, timeout: float | None = None) -> bool:
        raise RuntimeError("recorder down")

    def shutdown(self, timeout: float | None = None) -> bool:
        raise RuntimeError("recorder down")


@pytest.mark.parametrize("full", [False, True])
def test_failing_recorder_never_breaks_a_good_response(full: bool, tmp_path: Path) -> None:
    """A recorder that raises is counted as a failure; the client gets the whole response."""
    broken = BrokenRecorder(full=full)
    messages = response(b"fine" * 100)
    app, client = ReplayApp(messages), Client(request(b"x" * 100))
    audited = middleware(app, broken, memory_limit=10, spill_dir=tmp_path)
    run(audited, http_scope(), client)
    assert same_objects(client.sent, messages)
    assert broken.calls >= 1
    assert (audited.failures, audited.dropped) == (1, 0)
    drain_worker()
    assert list(tmp_path.rglob("*.body")) == []  # no spill file left (their folder may stay)


def test_failing_recorder_does_not_mask_the_app_error() -> None:
    """When both the app and the recorder fail, the app's own exception propagates."""
    error = LookupError("app")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise error

    audited = middleware(app, BrokenRecorder())
    with pytest.raises(LookupError, match="app") as raised:
        run(audited, http_scope(), Client(request(b"")))
    assert raised.value is error
    assert audited.failures == 1


def test_overflow_drop_counts_and_discards(tmp_path: Path) -> None:
    """With overflow='drop' a full recorder loses the exchange, counted; the response is fine."""
    recorder = MemoryRecorder(max_records=1)
    messages = response(b"r" * 50)
    audited = middleware(
        ReplayApp(messages), recorder, overflow="drop", memory_limit=0, spill_dir=tmp_path
    )
    first, second = Client(request(b"first" * 20)), Client(request(b"second" * 20))
    run(audited, http_scope(), first)
    run(audited, http_scope(), second)
    assert same_objects(second.sent, messages)
    assert audited.dropped == 1
    [kept] = recorder.take_all()
    try:
        check_body(kept.request_body, b"first" * 20)
    finally:
        kept.discard()
    drain_worker()
    assert list(tmp_path.rglob("*.body")) == []  # no spill file left (their folder may stay)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("consumer", ["task", "thread"])
def test_overflow_block_waits_for_room_without_blocking_the_loop(consumer: str) -> None:
    """overflow='block' suspends only the exchange until a consumer takes a record."""
    recorder = MemoryRecorder(max_records=1)
    messages = response(b"done")
    audited = middleware(ReplayApp(messages), recorder, overflow="block")

    async def main() -> None:
        await audited(http_scope(), Client(request(b"1")).receive, Client().send)
        assert len(recorder) == 1
        client = Client(request(b"2"))
        exchange = asyncio.create_task(audited(http_scope(), client.receive, client.send))
        ticks = 0
        for _ in range(100):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 100 and not exchange.done()
        assert same_objects(client.sent, messages)  # the response went out already
        if consumer == "task":
            taken = recorder.take()
        else:
            taken = await asyncio.to_thread(recorder.take, 5)
        assert taken is not None
        await asyncio.wait_for(exchange, 10)

    asyncio.run(main())
    [second] = recorder.take_all()
    check_body(second.request_body, b"2")
    assert audited.dropped == 0


@pytest.mark.timeout(30)
def test_overflow_block_holds_the_last_message_while_the_recorder_is_full() -> None:
    """Once the recorder has refused an exchange, later responses wait for room before
    their last message: a keep-alive client cannot run ahead of the recorder and pile up
    finished exchanges in memory."""
    recorder = MemoryRecorder(max_records=1)
    messages = response(b"done")
    audited = middleware(ReplayApp(messages), recorder, overflow="block")

    async def settle() -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def main() -> None:
        await audited(http_scope(), Client(request(b"1")).receive, Client().send)
        second_client, third_client = Client(request(b"2")), Client(request(b"3"))
        second = asyncio.create_task(
            audited(http_scope(), second_client.receive, second_client.send)
        )
        await settle()
        assert same_objects(second_client.sent, messages)  # refused only once it finished
        third = asyncio.create_task(audited(http_scope(), third_client.receive, third_client.send))
        await settle()
        assert same_objects(third_client.sent, messages[:-1])  # the last message is held
        assert not second.done() and not third.done()
        assert recorder.take() is not None  # room: the second goes in, the third goes out
        await asyncio.wait_for(second, 10)
        await settle()
        assert same_objects(third_client.sent, messages)
        assert recorder.take() is not None
        await asyncio.wait_for(third, 10)

    asyncio.run(main())
    [third_exchange] = recorder.take_all()
    check_body(third_exchange.request_body, b"3")
    assert audited.dropped == 0


@pytest.mark.timeout(30)
def test_overflow_block_on_a_byte_bound_waits_for_room_without_spinning() -> None:
    """A recorder full by bytes (not count) makes the exchange wait, not spin the loop."""
    recorder = MemoryRecorder(max_records=100, max_bytes=1000)
    audited = middleware(ReplayApp(response(b"")), recorder, overflow="block")

    async def main() -> None:
        await audited(http_scope(), Client(request(b"a" * 600)).receive, Client().send)
        client = Client(request(b"b" * 600))
        exchange = asyncio.create_task(audited(http_scope(), client.receive, client.send))
        for _ in range(100):
            await asyncio.sleep(0)
        assert not exchange.done()
        assert recorder.take() is not None
        await asyncio.wait_for(exchange, 10)

    asyncio.run(main())
    [second] = recorder.take_all()
    check_body(second.request_body, b"b" * 600)


@pytest.mark.timeout(30)
def test_exchange_cancelled_while_waiting_for_room_is_forced_in() -> None:
    """Cancelling an exchange blocked on a full recorder hands its record off past the bound."""
    recorder = MemoryRecorder(max_records=1)
    audited = middleware(ReplayApp(response(b"ok")), recorder, overflow="block")

    async def main() -> None:
        await audited(http_scope(), Client(request(b"1")).receive, Client().send)
        client = Client(request(b"2"))
        task = asyncio.create_task(audited(http_scope(), client.receive, client.send))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done() and len(client.sent) == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    first, second = recorder.take_all()
    check_body(first.request_body, b"1")
    check_body(second.request_body, b"2")
    assert second.outcome == "complete"  # the response itself was whole
    assert audited.dropped == 0


@pytest.mark.parametrize("overflow", ["block", "drop"])
def test_cancelled_exchange_is_handed_off_and_not_complete(overflow: str) -> None:
    """A task cancelled mid-response is still recorded (past a full queue when blocking)."""
    recorder = MemoryRecorder(max_records=1)
    sent = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        sent.set()
        await asyncio.Event().wait()  # never finishes on its own

    audited = middleware(app, recorder, overflow=overflow)

    async def main() -> None:
        filler = middleware(ReplayApp(response(b"")), recorder)
        await filler(http_scope(), Client(request(b"")).receive, Client().send)
        client = Client(request(b"x"))
        task = asyncio.create_task(audited(http_scope(), client.receive, client.send))
        await sent.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    exchanges = recorder.take_all()
    if overflow == "drop":
        assert len(exchanges) == 1 and audited.dropped == 1
        return
    assert len(exchanges) == 2
    cancelled = exchanges[1]
    assert cancelled.outcome != "complete"
    assert (cancelled.outcome, cancelled.error) == ("app_error", "CancelledError")
    check_body(cancelled.response_body, b"partial", complete=False)
