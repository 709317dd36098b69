"""Helpers for the durable-path tests: reading a spool back, waiting on its threads, a
flaky sink. Driving exchanges through raw ASGI is the shared harness's job (``harness``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from asgi_audit.capture.levels import Level
from asgi_audit.capture.record import Body, Exchange, new_record_id
from asgi_audit.recording.frames import (
    Frame,
    SpooledRecord,
    Tail,
    checkpoint_of,
    decode_payload,
    read_frames,
)
from asgi_audit.recording.spool import streams
from asgi_audit.sinks.record import StoredRecord

SECRET_REQUEST_HEADERS = [
    (b"authorization", b"Bearer s3cret"),
    (b"cookie", b"session=abc"),
    (b"x-api-key", b"key-123"),
    (b"proxy-authorization", b"Basic cHJveHk="),
]


def spooled(root: Path, *, checkpoints: bool = False) -> list[SpooledRecord]:
    """Every exchange's record (or every checkpoint) in every segment of a spool, stream by
    stream, in order."""
    found: list[SpooledRecord] = []
    for stream in streams(root):
        for segment in stream.segments():
            for item in read_frames(stream.directory / segment):
                if isinstance(item, Frame):
                    found.extend(
                        record
                        for record in decode_payload(item.payload)
                        if (checkpoint_of(record.meta) is not None) == checkpoints
                    )
                else:
                    assert item.reason == "end", item
    return found


def spooled_ids(root: Path, key: str = "id") -> list[str]:
    """The id (or another meta ``key``) of every record the spool holds, in order,
    duplicates included; damaged stretches (a sealed segment whose unsynced pages were
    lost) are skipped, as the shipper skips them."""
    found: list[str] = []
    for stream in streams(root):
        for segment in stream.segments():
            for item in read_frames(stream.directory / segment):
                if isinstance(item, Frame):
                    found.extend(
                        r.meta[key]
                        for r in decode_payload(item.payload)
                        if checkpoint_of(r.meta) is None
                    )
    return found


def exchange(
    request: bytes = b"",
    response: bytes = b"",
    *,
    on_written: Callable[[bool], None] | None = None,
    request_body: Body | None = None,
) -> Exchange:
    """A finished exchange built directly (no middleware): in-memory bodies, a fresh id."""
    return Exchange(
        id=new_record_id(),
        stream="test",
        level=Level.REQUEST_RESPONSE,
        method="POST",
        scheme="http",
        host="test",
        path="/orders",
        query=b"",
        http_version="1.1",
        client=None,
        request_headers=[],
        started_at_ns=time.time_ns(),
        started_mono_ns=time.monotonic_ns(),
        status=200,
        ended_mono_ns=time.monotonic_ns(),
        request_body=request_body or Body(size=len(request), complete=True, chunks=[request]),
        response_body=Body(size=len(response), complete=True, chunks=[response]),
        request_size=len(request),
        response_size=len(response),
        on_written=on_written,
    )


class Outcomes:
    """Collects what ``on_written`` says for each exchange, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, list[bool]] = {}

    def callback(self, exchange_id: str) -> Callable[[bool], None]:
        def written(kept: bool) -> None:
            with self._lock:
                self.calls.setdefault(exchange_id, []).append(kept)

        return written

    def exchange(
        self, request: bytes = b"", response: bytes = b"", request_body: Body | None = None
    ) -> Exchange:
        made = exchange(request, response, request_body=request_body)
        made.on_written = self.callback(made.id)
        return made


def frame_count(root: Path) -> int:
    """How many frames of exchanges' records the spool's segments hold."""
    count = 0
    for stream in streams(root):
        for segment in stream.segments():
            count += len(record_frames(stream.directory / segment))
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


def record_frames(path: Path) -> list[Frame]:
    """The frames of a segment that hold exchanges' records (not the stream's chain
    checkpoints, which the writer puts between them)."""
    return [
        item
        for item in read_frames(path)
        if isinstance(item, Frame)
        and any(checkpoint_of(r.meta) is None for r in decode_payload(item.payload))
    ]
