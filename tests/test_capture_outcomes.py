"""How an exchange ends is recorded as its outcome, and an app's error stays the app's.

An exception from the app, before or after the response started, reaches the server as the
very same object while the record keeps what was sent; a client that goes away is a
``client_disconnected`` outcome, but uvicorn's disconnect after a finished response is not;
a response with trailers completes only at its last trailers.
"""

from __future__ import annotations

import asyncio

import pytest

from asgi_audit import MemoryRecorder
from asgi_audit._types import Message, Receive, Scope, Send
from harness import (
    DISCONNECT,
    Client,
    ReplayApp,
    check_body,
    http_scope,
    middleware,
    only,
    request,
    response,
    run,
    same_objects,
)


def test_exception_before_response_start_propagates_unchanged(recorder: MemoryRecorder) -> None:
    """An app error before the response starts reaches the server as the same object."""
    error = ValueError("boom")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise error

    client = Client(request(b"payload"))
    with pytest.raises(ValueError, match="boom") as raised:
        run(middleware(app, recorder), http_scope(), client)
    assert raised.value is error
    assert client.sent == []
    exchange = only(recorder)
    assert (exchange.outcome, exchange.error, exchange.status) == ("app_error", "ValueError", None)
    check_body(exchange.request_body, b"payload")


def test_exception_after_response_start_propagates_unchanged(recorder: MemoryRecorder) -> None:
    """An app error mid-response propagates as is; the record keeps what was sent."""
    error = KeyError("late")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise error

    client = Client(request(b""))
    with pytest.raises(KeyError, match="late") as raised:
        run(middleware(app, recorder), http_scope(), client)
    assert raised.value is error
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    exchange = only(recorder)
    assert (exchange.outcome, exchange.error, exchange.status) == ("app_error", "KeyError", 200)
    check_body(exchange.response_body, b"part", complete=False)


def test_app_that_never_reads_the_body_leaves_it_incomplete(recorder: MemoryRecorder) -> None:
    """An early answer without reading a declared body records the request body as incomplete."""
    app, client = ReplayApp(response(b"no", status=401), read=False), Client(request(b"hello"))
    scope = http_scope(headers=[(b"content-length", b"5")])
    run(middleware(app, recorder), scope, client)
    exchange = only(recorder)
    assert exchange.outcome == "complete"
    assert exchange.request_body is not None
    assert not exchange.request_body.complete
    assert exchange.request_body.read() == b""
    assert exchange.request_size == 0


def test_disconnect_before_the_response_completes_is_a_client_disconnect(
    recorder: MemoryRecorder,
) -> None:
    """http.disconnect while the response is still streaming marks client_disconnected."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"tick", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"

    run(middleware(app, recorder), http_scope(), Client([*request(b"x"), DISCONNECT]))
    exchange = only(recorder)
    assert (exchange.outcome, exchange.error) == ("client_disconnected", None)
    check_body(exchange.response_body, b"tick", complete=False)


def test_response_sent_after_a_disconnect_is_still_a_client_disconnect(
    recorder: MemoryRecorder,
) -> None:
    """Sending the whole response after seeing http.disconnect is still client_disconnected."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        assert (await receive())["type"] == "http.disconnect"  # request.is_disconnected()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"too late"})

    run(middleware(app, recorder), http_scope(), Client([*request(b"x"), DISCONNECT]))
    assert only(recorder).outcome == "client_disconnected"


def test_disconnect_after_the_response_completed_is_not_a_client_disconnect(
    recorder: MemoryRecorder,
) -> None:
    """uvicorn answers every receive after the response with http.disconnect: still complete."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()

        async def listen() -> None:  # Starlette's StreamingResponse.listen_for_disconnect
            while (await receive())["type"] != "http.disconnect":
                pass

        listener = asyncio.create_task(listen())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await listener
        await receive()

    client = Client(request(b"x"), disconnect_after_response=True)
    run(middleware(app, recorder), http_scope(), client)
    exchange = only(recorder)
    assert (exchange.outcome, exchange.error) == ("complete", None)
    check_body(exchange.response_body, b"abc")


def test_send_raising_oserror_is_a_client_disconnect_and_propagates(
    recorder: MemoryRecorder,
) -> None:
    """An OSError from send (ASGI 2.4: client gone) propagates and marks client_disconnected."""
    error = OSError("connection reset")

    def fail(message: Message) -> BaseException | None:
        return error if message["type"] == "http.response.body" else None

    app, client = ReplayApp(response(b"data")), Client(request(b"x"), fail=fail)
    with pytest.raises(OSError, match="connection reset") as raised:
        run(middleware(app, recorder), http_scope(), client)
    assert raised.value is error
    exchange = only(recorder)
    assert (exchange.outcome, exchange.error) == ("client_disconnected", "OSError")


def test_response_with_trailers_completes_at_the_last_trailers(recorder: MemoryRecorder) -> None:
    """With trailers announced, the response completes at trailers with more_trailers false."""
    messages: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": [], "trailers": True},
        {"type": "http.response.body", "body": b"payload", "more_body": False},
        {"type": "http.response.trailers", "headers": [(b"x-a", b"1")], "more_trailers": True},
        {"type": "http.response.trailers", "headers": [(b"x-b", b"2")], "more_trailers": False},
    ]
    app, client = ReplayApp(messages), Client(request(b""))
    run(middleware(app, recorder), http_scope(), client)
    assert same_objects(client.sent, messages)
    exchange = only(recorder)
    assert exchange.outcome == "complete"
    assert exchange.response_trailers == [(b"x-a", b"1"), (b"x-b", b"2")]
    check_body(exchange.response_body, b"payload")


def test_response_missing_its_announced_trailers_is_not_complete(
    recorder: MemoryRecorder,
) -> None:
    """A last body message does not complete a response whose trailers never came."""
    messages = response(b"payload", trailers=True)
    run(middleware(ReplayApp(messages), recorder), http_scope(), Client(request(b"")))
    exchange = only(recorder)
    assert exchange.outcome != "complete"
    assert exchange.response_body is not None and not exchange.response_body.complete
