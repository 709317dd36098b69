"""BodyTap: bounded copies of byte streams, exact sizes and digests, spill files cleaned up."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asgi_audit import AuditMiddleware, MemoryRecorder
from asgi_audit._types import Message, Receive, Scope, Send
from asgi_audit.capture.record import Body
from asgi_audit.capture.tap import MAX_BACKLOG, BodyTap, OverLimit
from harness import Client, http_scope
from harness import drain_worker as _drain_worker

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
BATCH = 64 << 10
"""The smallest batch a tap hands to the spill worker (its batch size for small limits)."""


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A byte string and an arbitrary split of it into chunks (empty chunks included)."""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=600))
    else:
        size = draw(st.integers(min_value=0, max_value=5 * BATCH))
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=40)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return data, chunks


def _limit(draw: st.DrawFn, size: int) -> int:
    """Small limits around the body size, so that both spilling and truncation happen."""
    return draw(st.one_of(st.integers(0, 2 * size + 2), st.sampled_from([0, 1, BATCH, 1 << 30])))


@st.composite
def _tap_cases(draw: st.DrawFn) -> tuple[bytes, list[bytes], int, int | None, OverLimit]:
    data, chunks = draw(_streams())
    memory_limit = _limit(draw, len(data))
    body_limit = draw(st.one_of(st.none(), st.just(0), st.integers(0, 2 * len(data) + 2)))
    over: OverLimit = draw(st.sampled_from(["truncate", "skip_body"]))
    return data, chunks, memory_limit, body_limit, over


def _spill_files(root: str | Path) -> list[Path]:
    """Spill files left under a spill directory (in process folders, or directly)."""
    return sorted(Path(root).glob("asgi-audit-*.body")) + sorted(
        Path(root).glob("*/asgi-audit-*.body")
    )


def _check_body(body: Body, data: bytes, body_limit: int | None, over: OverLimit) -> None:
    """The stored bytes are the allowed prefix, with the true size and whole-stream digest."""
    limit = len(data) if body_limit is None else body_limit
    over_limit = len(data) > limit
    assert body.size == len(data)
    assert body.sha256() == hashlib.sha256(data).hexdigest()
    if over_limit and over == "skip_body":
        assert body.skipped
        assert not body.truncated
        assert body.read() == b""
        assert body.stored_size == 0
    else:
        assert not body.skipped
        assert body.truncated is over_limit
        assert body.read() == data[:limit]
        assert body.stored_size == min(len(data), limit)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(_tap_cases())
def test_any_chunking_stores_the_prefix_with_true_size_and_digest(
    case: tuple[bytes, list[bytes], int, int | None, OverLimit],
) -> None:
    """Any split of any bytes under any limits keeps exactly the allowed prefix, in bounds."""
    data, chunks, memory_limit, body_limit, over = case
    with tempfile.TemporaryDirectory() as spill_dir:
        tap = BodyTap(
            memory_limit=memory_limit, body_limit=body_limit, over_limit=over, spill_dir=spill_dir
        )
        for chunk in chunks:
            tap.feed(chunk)
        assert tap.size == len(data)
        body = tap.close(complete=True)
        assert body is not None
        assert body.complete
        _check_body(body, data, body_limit, over)
        assert body.memory_size <= memory_limit
        path = body.spill_path
        event("spilled to a file" if path else "in memory")
        event("skipped" if body.skipped else "truncated" if body.truncated else "whole")
        if path is not None:
            assert Path(path).parent.parent == Path(spill_dir)  # this process's folder
            if not body.skipped:  # the file holds as many bytes, encrypted
                assert Path(path).stat().st_size == len(body.read())
        body.discard()
        _drain_worker()
        assert _spill_files(spill_dir) == []


def test_empty_body_is_complete_and_hashed() -> None:
    """A body with no bytes (or only empty chunks) stores nothing and hashes the empty string."""
    tap = BodyTap(memory_limit=0, body_limit=0)
    tap.feed(b"")
    tap.feed(b"")
    body = tap.close(complete=True)
    assert body is not None
    assert (body.size, body.read(), body.memory_size) == (0, b"", 0)
    assert body.sha256() == EMPTY_SHA256
    assert not body.truncated and not body.skipped and body.complete
    assert body.spill_path is None


def test_incomplete_stream_says_so() -> None:
    """Closing a stream before its last chunk marks the body not complete, bytes kept."""
    tap = BodyTap(memory_limit=100, body_limit=None)
    tap.feed(b"abc")
    body = tap.close(complete=False)
    assert body is not None
    assert not body.complete
    assert body.read() == b"abc"


def test_small_body_stays_in_memory_by_reference() -> None:
    """Under the memory limit the tap keeps the very chunk objects, without copying."""
    chunks = [b"a" * 10, b"b" * 20]
    tap = BodyTap(memory_limit=30, body_limit=None)
    for chunk in chunks:
        tap.feed(chunk)
    body = tap.close(complete=True)
    assert body is not None
    assert all(a is b for a, b in zip(body.chunks(), chunks, strict=True))
    assert body.memory_size == 30
    assert body.spill_path is None


def test_large_body_spills_to_a_file_and_discard_removes_it(tmp_path: Path) -> None:
    """Past the memory limit the bytes go to a file in this process's folder of spill_dir;
    discard() deletes it."""
    data = os.urandom(3 * BATCH + 17)
    tap = BodyTap(memory_limit=1000, body_limit=None, spill_dir=str(tmp_path))
    for start in range(0, len(data), 5000):
        tap.feed(data[start : start + 5000])
    body = tap.close(complete=True)
    assert body is not None
    assert body.memory_size == 0
    assert body.spill_path is not None
    raw = Path(body.spill_path).read_bytes()
    assert len(raw) == len(data) and raw != data  # encrypted: no body on disk in clear
    assert body.read() == data
    assert body.sha256() == hashlib.sha256(data).hexdigest()
    assert Path(body.spill_path).parent.name.startswith(f"{os.getpid()}.")
    body.discard()
    assert _spill_files(tmp_path) == []


def test_discard_before_the_worker_finishes_still_removes_the_file(
    tmp_path: Path, held_worker: threading.Event
) -> None:
    """discard() while batches are still queued removes the spill file once they have run."""
    data = os.urandom(2 * BATCH)
    tap = BodyTap(memory_limit=0, body_limit=None, spill_dir=str(tmp_path))
    tap.feed(data)
    body = tap.close(complete=True)
    assert body is not None
    body.discard()
    held_worker.set()
    _drain_worker()
    assert _spill_files(tmp_path) == []


def test_tap_that_does_not_keep_counts_only() -> None:
    """A counting tap (keep=False) returns no body but knows the true size."""
    tap = BodyTap(memory_limit=10, body_limit=10, keep=False)
    tap.feed(b"x" * 100)
    assert tap.size == 100
    assert tap.close(complete=True) is None


def test_stop_keeping_after_spilling_removes_the_file(tmp_path: Path) -> None:
    """A tap told to stop keeping mid-stream drops its spill file and keeps counting."""
    tap = BodyTap(memory_limit=0, body_limit=None, spill_dir=str(tmp_path))
    tap.feed(os.urandom(2 * BATCH))
    tap.stop_keeping()
    tap.feed(b"more")
    assert tap.size == 2 * BATCH + 4
    assert tap.close(complete=True) is None
    _drain_worker()
    assert _spill_files(tmp_path) == []


def test_truncated_in_memory_prefix_when_body_limit_is_below_memory_limit() -> None:
    """body_limit below memory_limit keeps the prefix in RAM, never on disk."""
    data = bytes(range(256)) * 4
    tap = BodyTap(memory_limit=10_000, body_limit=100)
    for start in range(0, len(data), 7):
        tap.feed(data[start : start + 7])
    body = tap.close(complete=True)
    assert body is not None
    assert body.truncated
    assert body.read() == data[:100]
    assert body.spill_path is None
    assert body.memory_size == 100
    assert body.sha256() == hashlib.sha256(data).hexdigest()


def test_skip_body_stores_nothing_but_size_and_digest(tmp_path: Path) -> None:
    """over_limit='skip_body' stores no bytes of an oversize body, only size and digest."""
    data = os.urandom(5000)
    tap = BodyTap(
        memory_limit=100, body_limit=1000, over_limit="skip_body", spill_dir=str(tmp_path)
    )
    tap.feed(data)
    body = tap.close(complete=True)
    assert body is not None
    assert body.skipped and not body.truncated
    assert body.read() == b""
    assert list(body.chunks()) == []
    assert body.sha256() == hashlib.sha256(data).hexdigest()
    body.discard()
    assert _spill_files(tmp_path) == []


def _backlogged_tap(tmp_path: Path) -> tuple[BodyTap, bytes]:
    """A tap with more than MAX_BACKLOG batches queued on a held worker."""
    tap = BodyTap(memory_limit=0, body_limit=None, spill_dir=str(tmp_path))
    data = os.urandom((MAX_BACKLOG + 2) * BATCH)
    for start in range(0, len(data), BATCH):
        tap.feed(data[start : start + BATCH])
    assert tap.backlogged
    return tap, data


def test_catch_up_waits_for_the_worker_without_blocking_the_loop(
    tmp_path: Path, held_worker: threading.Event
) -> None:
    """A backlogged tap's catch_up() suspends only its caller until the worker catches up."""
    tap, data = _backlogged_tap(tmp_path)

    async def main() -> int:
        waiting = asyncio.create_task(tap.catch_up())
        ticks = 0
        for _ in range(50):
            await asyncio.sleep(0)
            ticks += 1
        assert not waiting.done()
        held_worker.set()
        await asyncio.wait_for(waiting, 30)
        return ticks

    assert asyncio.run(main()) == 50
    assert not tap.backlogged
    body = tap.close(complete=True)
    assert body is not None
    assert body.read() == data
    assert body.sha256() == hashlib.sha256(data).hexdigest()
    body.discard()


def test_cancelled_catch_up_loses_no_batch(tmp_path: Path, held_worker: threading.Event) -> None:
    """Cancelling a task waiting in catch_up() leaves the queued batches to be hashed and kept."""
    tap, data = _backlogged_tap(tmp_path)

    async def main() -> None:
        waiting = asyncio.create_task(tap.catch_up())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    held_worker.set()
    body = tap.close(complete=False)
    assert body is not None
    assert body.read() == data
    assert body.sha256() == hashlib.sha256(data).hexdigest()
    body.discard()
    assert _spill_files(tmp_path) == []


def test_failed_spill_write_keeps_no_bytes_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spill write that fails drops the body's stored bytes (never returns other bytes),
    keeps its true size and digest, and leaves no partial file."""
    real_writev = os.writev
    calls = 0

    def flaky_writev(fd: int, parts: list[bytes]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, parts)

    monkeypatch.setattr(os, "writev", flaky_writev)  # what the spill worker calls
    data = os.urandom(3 * BATCH)
    tap = BodyTap(memory_limit=0, body_limit=None, spill_dir=str(tmp_path))
    for start in range(0, len(data), BATCH):
        tap.feed(data[start : start + BATCH])
    body = tap.close(complete=True)
    assert body is not None
    assert body.sha256() == hashlib.sha256(data).hexdigest()
    assert (body.size, body.skipped, body.truncated) == (len(data), True, False)
    assert (body.read(), body.stored_size, body.spill_path) == (b"", 0, None)
    assert body._job is not None and body._job.error is not None
    assert body._job.error.startswith("ENOSPC")
    assert _spill_files(tmp_path) == []
    body.discard()


# --- the middleware copies reusable buffers -------------------------------------------


@pytest.mark.parametrize("kind", [bytearray, memoryview])
@pytest.mark.parametrize("memory_limit", [1 << 20, 0])
def test_reused_buffers_are_copied_by_the_middleware(
    kind: type[Any], memory_limit: int, recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """Request and response chunks in a buffer the sender reuses are recorded as they were."""
    request_buffer = bytearray(b"request-1")
    response_buffer = bytearray(b"response-1")
    incoming: list[Message] = [
        {"type": "http.request", "body": kind(request_buffer), "more_body": True},
        {"type": "http.request", "body": b"", "more_body": False},
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        request_buffer[:] = b"REUSED!!!"  # the server reuses its read buffer
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": kind(response_buffer), "more_body": True})
        response_buffer[:] = b"OVERWRITE!"  # the app reuses its write buffer
        await send({"type": "http.response.body", "body": b""})

    middleware = AuditMiddleware(
        app, recorder=recorder, memory_limit=memory_limit, spill_dir=tmp_path, environ={}
    )
    client = Client(incoming)
    asyncio.run(middleware(http_scope("/upload"), client.receive, client.send))
    [exchange] = recorder.take_all()
    try:
        assert exchange.request_body is not None and exchange.response_body is not None
        assert exchange.request_body.read() == b"request-1"
        assert exchange.response_body.read() == b"response-1"
        assert exchange.request_body.sha256() == hashlib.sha256(b"request-1").hexdigest()
        assert exchange.response_body.sha256() == hashlib.sha256(b"response-1").hexdigest()
    finally:
        exchange.discard()
    assert _spill_files(tmp_path) == []
