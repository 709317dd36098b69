"""The one raw-ASGI harness the tests share.

Many tests drive the middleware, or an app behind it, without a server: they need an HTTP
scope as a server builds it, a server side that hands out request messages and keeps what
it is sent, an app that replays a response and one that echoes the request, and a lifespan
driver. Test files used to carry their own copies of these, and the copies had drifted (one
scope could not carry an undecodable path, another took no extra keys). This is the single
copy, so a change to how a scope, a disconnect or a lifespan looks reaches every test at
once. The checks the capture tests share on what was recorded live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from asgi_audit import AuditMiddleware, Exchange, MemoryRecorder
from asgi_audit._types import ASGIApp, Message, Receive, Scope, Send
from asgi_audit.capture.record import Body
from asgi_audit.capture.spill import executor

DISCONNECT: Message = {"type": "http.disconnect"}
"""What a server answers a receive with once the client is gone (or the response is done)."""


# --- scopes and messages ----------------------------------------------------------------


def http_scope(
    path: str = "/orders",
    method: str = "POST",
    headers: Iterable[tuple[bytes, bytes]] = (),
    **extra: Any,
) -> Scope:
    """An HTTP scope as a server would build it (``extra`` keys added or replaced)."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    scope.update(extra)
    return scope


def split(data: bytes, size: int) -> list[bytes]:
    """``data`` in chunks of ``size`` bytes (one empty chunk for no data)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


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


# --- the server side ----------------------------------------------------------------------


class Client:
    """The server side of one exchange: hands out request messages, records what it is sent.

    ``receive`` and ``send`` are plain closures, so identity checks on them are meaningful;
    they hold the lists, not the client, so a finished client (and every message it was
    sent) is freed at once rather than at the next garbage collection, which the memory
    tests rely on. After the queued messages run out, ``receive`` returns
    ``http.disconnect`` (as uvicorn does once the response is complete), or waits for the
    response first when ``disconnect_after_response`` is set.
    """

    def __init__(
        self,
        incoming: Iterable[Message] = (),
        *,
        fail: Callable[[Message], BaseException | None] | None = None,
        disconnect_after_response: bool = False,
    ) -> None:
        self.incoming = queued = list(incoming)
        self.sent: list[Message] = []
        self.done = done = asyncio.Event() if disconnect_after_response else None
        sent = self.sent

        async def receive() -> Message:
            if queued:
                return queued.pop(0)
            if done is not None:
                await done.wait()
            return DISCONNECT

        async def send(message: Message) -> None:
            error = fail(message) if fail is not None else None
            if error is not None:
                raise error
            sent.append(message)
            if (
                done is not None
                and message["type"] == "http.response.body"
                and not message.get("more_body", False)
            ):
                done.set()

        self.receive: Receive = receive
        self.send: Send = send

    @property
    def body(self) -> bytes:
        """The response body bytes the client was sent."""
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def run(app: ASGIApp, scope: Scope, client: Client) -> None:
    """Run one exchange of ``app`` against ``client`` on a fresh event loop."""
    asyncio.run(app(scope, client.receive, client.send))  # type: ignore[arg-type]


async def call(
    app: ASGIApp,
    body: bytes = b"",
    *,
    chunk: int = 4096,
    headers: Sequence[tuple[bytes, bytes]] = (),
    path: str = "/orders",
) -> bytes:
    """One POST of ``body`` (in ``chunk``-byte parts) through ``app``; the response body."""
    client = Client(request(*split(body, chunk)))
    await app(http_scope(path, headers=headers), client.receive, client.send)
    return client.body


@contextlib.asynccontextmanager
async def lifespan(
    app: ASGIApp, on_send: Callable[[Message], None] | None = None
) -> AsyncIterator[list[Message]]:
    """Run ``app``'s lifespan as a server does: startup now, shutdown on exit.

    Yields the messages the app sent (``on_send`` sees each as it arrives)."""
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []
    arrived = asyncio.Event()

    async def receive() -> Message:
        return await incoming.get()

    async def send(message: Message) -> None:
        if on_send is not None:
            on_send(message)
        sent.append(message)
        arrived.set()

    async def until(kind: str) -> None:
        while not any(m["type"].startswith(kind) for m in sent):
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 30)

    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    async def serve() -> None:
        await app(scope, receive, send)

    task = asyncio.create_task(serve())
    try:
        await incoming.put({"type": "lifespan.startup"})
        await until("lifespan.startup.")
        yield sent
        await incoming.put({"type": "lifespan.shutdown"})
        await until("lifespan.shutdown.")
    finally:
        await asyncio.wait_for(task, 60)


# --- apps -----------------------------------------------------------------------------------


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


class EchoApp:
    """Answers with the request body echoed (or ``response``) in chunks; lifespan too.

    The response carries a Set-Cookie and an ordinary header."""

    def __init__(self, response: bytes | None = None, chunk: int = 4096) -> None:
        self.response = response
        self.chunk = chunk
        self.started = False
        self.stopped = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.started = True
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.stopped = True
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        data = body if self.response is None else self.response
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"set-cookie", b"token=xyz"),
                ],
            }
        )
        parts = split(data, self.chunk)
        for i, part in enumerate(parts):
            await send(
                {"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1}
            )


# --- the middleware and what it recorded -------------------------------------------------


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
    """The very same message objects, in the same order (not merely equal ones)."""
    return len(got) == len(expected) and all(a is b for a, b in zip(got, expected, strict=True))
