"""The middleware driven through raw ASGI: transparency, exact capture, outcomes, hand-off."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import random
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asgi_audit import AuditMiddleware, Exchange, Level, MemoryRecorder
from asgi_audit._types import ASGIApp, Message, Receive, Scope, Send
from asgi_audit.capture import markers
from asgi_audit.capture.record import Body
from asgi_audit.capture.spill import executor

MiB = 1 << 20
DISCONNECT: Message = {"type": "http.disconnect"}


# --- raw ASGI plumbing --------------------------------------------------------------------


def http_scope(
    path: str = "/orders",
    method: str = "POST",
    headers: Iterable[tuple[bytes, bytes]] = (),
    **extra: Any,
) -> Scope:
    """An HTTP scope as a server would build it."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    scope.update(extra)
    return scope


class Client:
    """The server side of one exchange: hands out request messages, records what it is sent.

    ``receive`` and ``send`` are plain closures, so identity checks on them are meaningful.
    After the queued messages run out, ``receive`` returns ``http.disconnect`` (as uvicorn
    does once the response is complete), or waits for the response first when
    ``disconnect_after_response`` is set.
    """

    def __init__(
        self,
        incoming: Iterable[Message] = (),
        *,
        fail: Callable[[Message], BaseException | None] | None = None,
        disconnect_after_response: bool = False,
    ) -> None:
        self.incoming = list(incoming)
        self.sent: list[Message] = []
        self.done = asyncio.Event() if disconnect_after_response else None

        async def receive() -> Message:
            if self.incoming:
                return self.incoming.pop(0)
            if self.done is not None:
                await self.done.wait()
            return DISCONNECT

        async def send(message: Message) -> None:
            error = fail(message) if fail is not None else None
            if error is not None:
                raise error
            self.sent.append(message)
            if (
                self.done is not None
                and message["type"] == "http.response.body"
                and not message.get("more_body", False)
            ):
                self.done.set()

        self.receive: Receive = receive
        self.send: Send = send


def request(*chunks: bytes) -> list[Message]:
    """``http.request`` messages carrying ``chunks`` (one empty message for no chunks)."""
    parts = list(chunks) or [b""]
    return [
        {"type": "http.request", "body": c, "more_body": i < len(parts) - 1}
        for i, c in enumerate(parts)
    ]


def response(*chunks: bytes, status: int = 200, **start: Any) -> list[Message]:
    """A start message and ``http.response.body`` messages carrying ``chunks``."""
    parts = list(chunks) or [b""]
    first: Message = {"type": "http.response.start", "status": status, "headers": [], **start}
    return [first] + [
        {"type": "http.response.body", "body": c, "more_body": i < len(parts) - 1}
        for i, c in enumerate(parts)
    ]


class ReplayApp:
    """Reads the whole request body (unless told not to), then sends the given messages."""

    def __init__(self, messages: list[Message], *, read: bool = True) -> None:
        self.messages = messages
        self.read = read
        self.received: list[Message] = []
        self.receive: Receive | None = None
        self.send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.receive, self.send = receive, send
        while self.read:
            message = await receive()
            self.received.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        for message in self.messages:
            await send(message)


def run(app: ASGIApp, scope: Scope, client: Client) -> None:
    asyncio.run(app(scope, client.receive, client.send))  # type: ignore[arg-type]


def middleware(app: ASGIApp, recorder: MemoryRecorder | Any, **options: Any) -> AuditMiddleware:
    """An AuditMiddleware isolated from the environment."""
    return AuditMiddleware(app, recorder=recorder, environ={}, **options)


def only(recorder: MemoryRecorder) -> Exchange:
    """The single exchange the recorder holds (left there, for the fixture to discard)."""
    exchanges = recorder.take_all()
    assert len(exchanges) == 1, exchanges
    for exchange in exchanges:
        recorder.try_submit(exchange, force=True)
    return exchanges[0]


def drain_worker() -> None:
    """Wait until the shared spill worker has run everything queued so far."""
    executor().submit(lambda: None).result(timeout=30)


def check_body(
    body: Body | None,
    data: bytes,
    *,
    body_limit: int | None = None,
    over_limit: str = "truncate",
    complete: bool = True,
) -> None:
    """The body stores ``data`` (or its allowed prefix) with true size and digest."""
    assert body is not None
    limit = len(data) if body_limit is None else body_limit
    assert body.size == len(data)
    assert body.complete is complete
    assert body.sha256() == hashlib.sha256(data).hexdigest()
    if len(data) > limit and over_limit == "skip_body":
        assert body.skipped and body.read() == b""
    else:
        assert not body.skipped
        assert body.truncated is (len(data) > limit)
        assert body.read() == data[:limit]


def same_objects(got: list[Message], expected: list[Message]) -> bool:
    return len(got) == len(expected) and all(a is b for a, b in zip(got, expected, strict=True))


# --- transparency and exactness, for any chunking ---------------------------------------


@st.composite
def split_bodies(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """Arbitrary bytes, arbitrarily split into chunks (empty chunks included)."""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=400))
    else:
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(draw(st.integers(0, 200_000)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=30)))
    return data, [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _messages(kind: str, chunks: list[bytes], omit: bool) -> list[Message]:
    """Body messages; with ``omit``, empty bodies and a false ``more_body`` are left out."""
    out: list[Message] = []
    for i, chunk in enumerate(chunks):
        message: Message = {"type": kind}
        if chunk or not omit:
            message["body"] = chunk
        if i < len(chunks) - 1 or not omit:
            message["more_body"] = i < len(chunks) - 1
        out.append(message)
    return out


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(
    req=split_bodies(),
    resp=split_bodies(),
    memory_limit=st.sampled_from([0, 1, 100, 64 << 10, 1 << 30]),
    body_limit=st.one_of(st.none(), st.integers(0, 300), st.integers(0, 250_000)),
    over_limit=st.sampled_from(["truncate", "skip_body"]),
    omit=st.booleans(),
    trailers=st.booleans(),
)
def test_any_chunking_is_forwarded_untouched_and_recorded_exactly(
    req: tuple[bytes, list[bytes]],
    resp: tuple[bytes, list[bytes]],
    memory_limit: int,
    body_limit: int | None,
    over_limit: str,
    omit: bool,
    trailers: bool,
) -> None:
    """Both directions pass the very message objects through and the record is exact."""
    request_data, request_chunks = req
    response_data, response_chunks = resp
    incoming = _messages("http.request", request_chunks, omit)
    start: Message = {"type": "http.response.start", "status": 201, "headers": [(b"a", b"b")]}
    outgoing = [start, *_messages("http.response.body", response_chunks, omit)]
    if trailers:
        start["trailers"] = True
        outgoing.append({"type": "http.response.trailers", "headers": [(b"x-sum", b"1")]})

    plain_app, plain_client = ReplayApp(outgoing), Client(incoming)
    run(plain_app, http_scope(), plain_client)
    assert same_objects(plain_app.received, incoming)

    recorder = MemoryRecorder()
    with tempfile.TemporaryDirectory() as spill_dir:
        app, client = ReplayApp(outgoing), Client(incoming)
        audited = middleware(
            app,
            recorder,
            memory_limit=memory_limit,
            body_limit=body_limit,
            over_limit=over_limit,
            spill_dir=spill_dir,
        )
        run(audited, http_scope(), client)
        assert same_objects(app.received, plain_app.received)
        assert same_objects(client.sent, plain_client.sent)
        [exchange] = recorder.take_all()
        try:
            assert exchange.outcome == "complete" and exchange.error is None
            assert exchange.status == 201
            assert exchange.request_size == len(request_data)
            assert exchange.response_size == len(response_data)
            check_body(
                exchange.request_body, request_data, body_limit=body_limit, over_limit=over_limit
            )
            check_body(
                exchange.response_body, response_data, body_limit=body_limit, over_limit=over_limit
            )
            for body in (exchange.request_body, exchange.response_body):
                assert body is not None and body.memory_size <= memory_limit
                event("spilled" if body.spill_path else "in memory")
                event("skipped" if body.skipped else "truncated" if body.truncated else "whole")
        finally:
            exchange.discard()
        drain_worker()
        assert os.listdir(spill_dir) == []


# --- body shapes ----------------------------------------------------------------------------


def test_empty_bodies_are_recorded_as_empty(recorder: MemoryRecorder) -> None:
    """An exchange with no body bytes either way records two empty, complete bodies."""
    app, client = ReplayApp(response()), Client([{"type": "http.request"}])
    run(middleware(app, recorder), http_scope(method="GET"), client)
    exchange = only(recorder)
    check_body(exchange.request_body, b"")
    check_body(exchange.response_body, b"")
    assert (exchange.request_size, exchange.response_size) == (0, 0)
    assert exchange.outcome == "complete"


def test_one_byte_chunks_are_reassembled_exactly(recorder: MemoryRecorder, tmp_path: Path) -> None:
    """Thousands of 1-byte chunks each way, spilled in batches, come back byte for byte."""
    data = os.urandom(3000)
    chunks = [data[i : i + 1] for i in range(len(data))]
    app, client = ReplayApp(response(*chunks[::-1])), Client(request(*chunks))
    run(middleware(app, recorder, memory_limit=100, spill_dir=tmp_path), http_scope(), client)
    exchange = only(recorder)
    check_body(exchange.request_body, data)
    check_body(exchange.response_body, b"".join(chunks[::-1]))
    assert len(client.sent) == len(chunks) + 1


def test_one_50_mb_chunk_each_way_spills_and_is_exact(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """A single 50 MB chunk each way is spilled to disk, stored whole, and cleaned up."""
    data = os.urandom(50 * MiB)
    app, client = ReplayApp(response(data)), Client(request(data))
    audited = middleware(
        app, recorder, memory_limit=4 * MiB, body_limit=64 * MiB, spill_dir=tmp_path
    )
    run(audited, http_scope(), client)
    exchange = only(recorder)
    assert client.sent[1]["body"] is data
    for body in (exchange.request_body, exchange.response_body):
        check_body(body, data)
        assert body is not None and body.memory_size == 0
        assert body.spill_path is not None and Path(body.spill_path).parent == tmp_path
    recorder.take_all()
    exchange.discard()
    drain_worker()
    assert list(tmp_path.iterdir()) == []


def test_one_50_mb_chunk_is_truncated_at_the_body_limit(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """Over body_limit the stored copy is the prefix; size and digest cover all 50 MB."""
    data = os.urandom(50 * MiB)
    app, client = ReplayApp(response(b"ok")), Client(request(data))
    run(
        middleware(app, recorder, memory_limit=MiB, body_limit=3 * MiB, spill_dir=tmp_path),
        http_scope(),
        client,
    )
    check_body(only(recorder).request_body, data, body_limit=3 * MiB)


def test_stream_of_unknown_length(recorder: MemoryRecorder) -> None:
    """A chunked request and a streamed response of unannounced length are recorded whole."""
    rng = random.Random(7)
    request_chunks = [rng.randbytes(rng.randrange(0, 5000)) for _ in range(200)]
    response_chunks = [rng.randbytes(rng.randrange(0, 5000)) for _ in range(200)]
    streamed: list[Message] = [
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"transfer-encoding", b"chunked")],
        },
        *({"type": "http.response.body", "body": c, "more_body": True} for c in response_chunks),
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]
    app, client = ReplayApp(streamed), Client(request(*request_chunks))
    scope = http_scope(headers=[(b"transfer-encoding", b"chunked")])
    run(middleware(app, recorder, memory_limit=64 << 10), scope, client)
    exchange = only(recorder)
    check_body(exchange.request_body, b"".join(request_chunks))
    check_body(exchange.response_body, b"".join(response_chunks))


def test_non_utf8_and_non_json_bodies_are_stored_as_raw_bytes(recorder: MemoryRecorder) -> None:
    """Invalid UTF-8, broken JSON and compressed bodies are kept byte for byte, undecoded."""
    broken = b'{"amount": \xff\xfe\x00 not json'
    compressed = gzip.compress(b'{"ok": true}' * 100)
    app = ReplayApp(response(compressed, headers=[(b"content-encoding", b"gzip")]))
    client = Client(request(broken))
    scope = http_scope(headers=[(b"content-type", b"application/json")])
    run(middleware(app, recorder), scope, client)
    exchange = only(recorder)
    check_body(exchange.request_body, broken)
    check_body(exchange.response_body, compressed)
    assert client.sent[1]["body"] is compressed


# --- exceptions and outcomes ----------------------------------------------------------------


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


def test_pathsend_is_forwarded_and_recorded_by_path(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """http.response.pathsend passes through as is; the record names the file, unread."""
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.7 " + os.urandom(1000))
    messages: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.pathsend", "path": str(path)},
    ]
    app, client = ReplayApp(messages), Client(request(b""))
    scope = http_scope(method="GET", extensions={"http.response.pathsend": {}})
    run(middleware(app, recorder), scope, client)
    assert same_objects(client.sent, messages)
    exchange = only(recorder)
    assert exchange.outcome == "complete"
    body = exchange.response_body
    assert body is not None and body.sent_path == str(path)
    assert exchange.response_size == body.file_size() == len(b"%PDF-1.7 ") + 1000
    # Kept by reference: the bytes are read when the record is consumed, which shows the
    # middleware neither read nor hashed them during the exchange.
    with path.open("ab") as handle:
        handle.write(b"%%EOF")
    content = path.read_bytes()
    assert body.sha256() == hashlib.sha256(content).hexdigest()
    exchange.discard()
    assert path.read_bytes() == content


def test_early_hints_and_unknown_messages_pass_through(recorder: MemoryRecorder) -> None:
    """early_hint and other extension messages are forwarded untouched and not a start."""
    messages: list[Message] = [
        {"type": "http.response.early_hint", "links": ["</app.css>; rel=preload"]},
        {"type": "http.response.debug", "info": {"template": "x"}},
        *response(b"body", status=202),
    ]
    app, client = ReplayApp(messages), Client(request(b""))
    scope = http_scope(extensions={"http.response.early_hint": {}})
    run(middleware(app, recorder), scope, client)
    assert same_objects(client.sent, messages)
    exchange = only(recorder)
    assert (exchange.status, exchange.outcome) == (202, "complete")
    check_body(exchange.response_body, b"body")


# --- what is not audited is not touched -------------------------------------------------


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_non_http_scopes_get_the_original_callables(kind: str, recorder: MemoryRecorder) -> None:
    """lifespan and websocket scopes reach the app with the server's own receive and send."""
    app, client = ReplayApp([{"type": f"{kind}.x"}], read=False), Client()
    scope: Scope = {"type": kind, "asgi": {"version": "3.0"}, "path": "/ws", "headers": []}
    run(middleware(app, recorder), scope, client)
    assert app.receive is client.receive and app.send is client.send
    assert len(recorder) == 0


def test_excluded_path_gets_the_original_callables(recorder: MemoryRecorder) -> None:
    """An excluded exchange is not tapped: the app gets the server's receive and send."""
    app, client = ReplayApp(response(b"ok")), Client(request(b"x"))
    run(middleware(app, recorder, exclude=["/health"]), http_scope("/health"), client)
    assert app.receive is client.receive and app.send is client.send
    assert len(recorder) == 0


def test_unmatched_route_gets_the_original_callables(
    recorder: MemoryRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path no rule can match (and no marker in use) is decided at once and not tapped."""
    monkeypatch.setattr(markers, "_marked", 0)
    app, client = ReplayApp(response(b"ok")), Client(request(b"x"))
    run(middleware(app, recorder, routes=["/orders/{oid}"]), http_scope("/users/1"), client)
    assert app.receive is client.receive and app.send is client.send
    assert len(recorder) == 0


# --- levels and lazy route decisions ------------------------------------------------------


def test_metadata_level_records_sizes_without_bodies(recorder: MemoryRecorder) -> None:
    """At Metadata the record has sizes, status and outcome, but no body bytes."""
    app, client = ReplayApp(response(b"12345678")), Client(request(b"abc", b"de"))
    run(middleware(app, recorder, level="Metadata"), http_scope(), client)
    exchange = only(recorder)
    assert exchange.level is Level.METADATA
    assert (exchange.request_body, exchange.response_body) == (None, None)
    assert (exchange.request_size, exchange.response_size) == (5, 8)
    assert exchange.outcome == "complete"


@pytest.mark.parametrize(("status", "keeps"), [(200, False), (404, False), (503, True)])
def test_status_filter_keeps_bodies_only_for_listed_statuses(
    status: int, keeps: bool, recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """statuses=['5xx'] with otherwise='Metadata' keeps bodies only for server errors."""
    app = ReplayApp(response(b"resp" * 100, status=status))
    audited = middleware(
        app, recorder, statuses=["5xx"], otherwise="Metadata", memory_limit=10, spill_dir=tmp_path
    )
    run(audited, http_scope(), Client(request(b"req" * 100)))
    exchange = only(recorder)
    assert (exchange.request_size, exchange.response_size) == (300, 400)
    if keeps:
        assert exchange.level is Level.REQUEST_RESPONSE
        check_body(exchange.request_body, b"req" * 100)
        check_body(exchange.response_body, b"resp" * 100)
    else:
        assert exchange.level is Level.METADATA
        assert (exchange.request_body, exchange.response_body) == (None, None)
        drain_worker()
        assert list(tmp_path.iterdir()) == []


def _route(template: str) -> SimpleNamespace:
    """A routed-route stand-in: what Starlette puts in scope['route']."""
    pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
    return SimpleNamespace(path_format=template, path_regex=re.compile(f"^{pattern}$"))


def _routing_app(template: str | None) -> ReplayApp:
    """A raw app that plays router: fills scope['route'] and scope['endpoint'] before its
    first receive (None: no route matched)."""

    async def endpoint() -> None:
        """The matched endpoint."""

    class Routed(ReplayApp):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if template is not None:
                scope["route"], scope["endpoint"] = _route(template), endpoint
            await super().__call__(scope, receive, send)

    return Routed(response(b"order 7"))


def test_route_template_rule_decided_at_first_receive(recorder: MemoryRecorder) -> None:
    """A template rule is decided from scope['route'] once routing ran; the match is audited."""
    app, incoming = _routing_app("/orders/{oid}"), request(b'{"qty":', b" 1}")
    run(
        middleware(app, recorder, routes=["/orders/{oid}"]),
        http_scope("/orders/7"),
        Client(incoming),
    )
    assert same_objects(app.received, incoming)
    exchange = only(recorder)
    assert exchange.route == "/orders/{oid}"
    check_body(exchange.request_body, b'{"qty": 1}')
    check_body(exchange.response_body, b"order 7")


def test_route_template_rule_rejects_other_routes_with_the_same_prefix(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """A path sharing the template's prefix but routed elsewhere is not recorded, nor kept."""
    app = _routing_app("/orders/{oid}/items")
    client = Client(request(b"x" * 1000))
    audited = middleware(
        app, recorder, routes=["/orders/{oid}"], memory_limit=10, spill_dir=tmp_path
    )
    run(audited, http_scope("/orders/7/items"), client)
    assert len(recorder) == 0
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    drain_worker()
    assert list(tmp_path.iterdir()) == []


def test_route_known_only_at_response_start_still_keeps_the_request_body(
    recorder: MemoryRecorder,
) -> None:
    """When the route appears only after the body was read, the decision waits and keeps it."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        scope["route"] = _route("/orders/{oid}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    run(
        middleware(app, recorder, routes=["/orders/{oid}"]),
        http_scope("/orders/9"),
        Client(request(b"ab", b"cd")),
    )
    exchange = only(recorder)
    assert exchange.route == "/orders/{oid}"
    check_body(exchange.request_body, b"abcd")


def test_unrouted_request_under_a_template_prefix_is_not_recorded(
    recorder: MemoryRecorder,
) -> None:
    """A deferred exchange whose app never sets a route (a 404) is not recorded."""
    app = _routing_app(None)
    run(
        middleware(app, recorder, routes=["/orders/{oid}"]),
        http_scope("/orders/"),
        Client(request(b"x")),
    )
    assert len(recorder) == 0


# --- hand-off: failing and full recorders, cancellation -----------------------------------


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
    assert list(tmp_path.iterdir()) == []


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
    assert list(tmp_path.iterdir()) == []


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


# --- a failing spill worker never reaches the app -------------------------------------------


@pytest.mark.timeout(30)
def test_backlogged_spill_that_fails_does_not_reach_the_app(
    recorder: MemoryRecorder, tmp_path: Path, held_worker: threading.Event
) -> None:
    """A spill worker that lags then fails slows the app's receive but never raises into it."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    chunk = b"z" * (64 << 10)
    incoming = request(*[chunk] * 12)
    app = ReplayApp(response(b"ok"))
    audited = middleware(app, recorder, memory_limit=0, body_limit=None, spill_dir=spill_dir)
    spill_dir.rmdir()  # every spill write now fails on the worker

    async def main() -> None:
        client = Client(incoming)
        exchange = asyncio.create_task(audited(http_scope(), client.receive, client.send))
        for _ in range(50):
            await asyncio.sleep(0)
        assert 0 < len(app.received) < len(incoming)  # waiting for the worker to catch up
        held_worker.set()
        await asyncio.wait_for(exchange, 20)
        assert same_objects(client.sent, app.messages)

    asyncio.run(main())
    assert same_objects(app.received, incoming)
    for exchange in recorder.take_all():
        exchange.discard()
