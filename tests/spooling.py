"""Helpers for the durable-path tests: reading a spool back, waiting on its threads, a
flaky sink. Driving exchanges through raw ASGI is the shared harness's job (``harness``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from asgi_audit.recording.frames import Frame, SpooledRecord, Tail, decode_payload, read_frames
from asgi_audit.recording.spool import streams
from asgi_audit.sinks.record import StoredRecord

SECRET_REQUEST_HEADERS = [
    (b"authorization", b"Bearer s3cret"),
    (b"cookie", b"session=abc"),
    (b"x-api-key", b"key-123"),
    (b"proxy-authorization", b"Basic cHJveHk="),
]


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
