"""Helpers for the durable-path tests: raw ASGI exchanges and reading a spool back."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from asgi_audit._types import ASGIApp, Message, Receive, Scope, Send
from asgi_audit.recording.frames import Frame, SpooledRecord, Tail, decode_payload, read_frames
from asgi_audit.recording.spool import streams
from asgi_audit.sinks.record import StoredRecord

SECRET_REQUEST_HEADERS = [
    (b"authorization", b"Bearer s3cret"),
    (b"cookie", b"session=abc"),
    (b"x-api-key", b"key-123"),
    (b"proxy-authorization", b"Basic cHJveHk="),
]


def http_scope(
    path: str = "/orders",
    method: str = "POST",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> Scope:
    """An HTTP scope as a server would build it."""
    return {
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


def split(data: bytes, size: int) -> list[bytes]:
    """``data`` in chunks of ``size`` bytes (one empty chunk for no data)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


class EchoApp:
    """Reads the request body, answers with ``response`` (default: the request echoed) in
    chunks, with a Set-Cookie and an ordinary header. Answers lifespan messages too."""

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


async def call(
    app: ASGIApp,
    body: bytes = b"",
    *,
    chunk: int = 4096,
    headers: Sequence[tuple[bytes, bytes]] = (),
    path: str = "/orders",
) -> bytes:
    """One exchange through ``app``; returns the response body the client got."""
    incoming = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for parts in [split(body, chunk)]
        for i, part in enumerate(parts)
    ]
    received: list[bytes] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            received.append(message.get("body", b""))

    await app(http_scope(path, headers=headers), receive, send)
    return b"".join(received)


def spooled(root: Path) -> list[SpooledRecord]:
    """Every record in every segment of a spool, stream by stream, in order."""
    found: list[SpooledRecord] = []
    for stream in streams(root):
        for segment in stream.segments():
            for item in read_frames(stream.directory / segment):
                if isinstance(item, Frame):
                    found.extend(decode_payload(item.payload))
                else:
                    assert item.reason == "end", item
    return found


def frame_count(root: Path) -> int:
    """How many frames the spool's segments hold."""
    count = 0
    for stream in streams(root):
        for segment in stream.segments():
            count += sum(isinstance(i, Frame) for i in read_frames(stream.directory / segment))
    return count


def tails(root: Path) -> list[Tail]:
    """Where reading each segment stops."""
    found = []
    for stream in streams(root):
        for segment in stream.segments():
            *_, tail = read_frames(stream.directory / segment)
            assert isinstance(tail, Tail)
            found.append(tail)
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def request_data(record: StoredRecord) -> bytes:
    """The stored request body bytes of a delivered record."""
    assert record.request_body is not None and record.request_body.data is not None
    return record.request_body.data


def threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


class FlakySink:
    """A sink that raises for its first ``failures`` batches, then keeps what it is given."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.batches: list[list[StoredRecord]] = []
        self.closed = False

    @property
    def records(self) -> list[StoredRecord]:
        return [record for batch in self.batches for record in batch]

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"sink down (call {self.calls})")
        self.batches.append(list(records))

    def close(self) -> None:
        self.closed = True


@contextlib.asynccontextmanager
async def lifespan(
    app: ASGIApp, on_send: Callable[[Message], None] | None = None
) -> AsyncIterator[list[Message]]:
    """Run ``app``'s lifespan as a server does: startup now, shutdown on exit. Yields the
    messages the app sent (``on_send`` sees each as it arrives)."""
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
