"""SpoolRecorder behind a real AuditMiddleware: exact bodies, order, redaction, batching,
back-pressure, flush and close."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_audit import AuditMiddleware
from asgi_audit.recording import writer as spool_recorder
from asgi_audit.recording.redact import MARKER
from asgi_audit.recording.spool import SegmentWriter, StreamDirectory, streams
from asgi_audit.recording.writer import SpoolRecorder
from harness import EchoApp, call
from spooling import (
    SECRET_REQUEST_HEADERS,
    exchange,
    frame_count,
    spooled,
    threads_named,
    wait_until,
)

THREAD = "asgi-audit-recorder"


@pytest.fixture
def recorders() -> Iterator[list[SpoolRecorder]]:
    """Recorders made by a test; each is closed (thread joined, lock released) afterwards."""
    made: list[SpoolRecorder] = []
    yield made
    for recorder in made:
        assert recorder.shutdown(timeout=30)


def make(recorders: list[SpoolRecorder], root: Path, **options: Any) -> SpoolRecorder:
    recorder = SpoolRecorder(root, **options)
    recorders.append(recorder)
    return recorder


def audited(recorder: SpoolRecorder, app: Any = None, **options: Any) -> AuditMiddleware:
    return AuditMiddleware(app or EchoApp(), recorder=recorder, environ={}, **options)


def run_all(mw: AuditMiddleware, bodies: list[bytes], **options: Any) -> list[bytes]:
    """Each body through the middleware, one after the other, in one event loop."""

    async def main() -> list[bytes]:
        return [await call(mw, body, **options) for body in bodies]

    return asyncio.run(main())


def test_bodies_are_stored_exactly_in_memory_and_spilled(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """In-memory and spilled bodies come back exact, with sizes and digests; no spill left."""
    spill = tmp_path / "spill"
    spill.mkdir()
    recorder = make(recorders, tmp_path / "spool")
    mw = audited(recorder, memory_limit=1000, spill_dir=spill)
    rng = random.Random(7)
    bodies = [b"", b"x", rng.randbytes(999), rng.randbytes(1001), rng.randbytes(300_000)]
    answers = run_all(mw, bodies, chunk=777)
    assert answers == bodies
    assert recorder.flush(timeout=30)
    records = spooled(tmp_path / "spool")
    assert len(records) == len(bodies)
    for record, body in zip(records, bodies, strict=True):
        assert record.request == body and record.response == body
        for name in ("request_body", "response_body"):
            meta = record.meta[name]
            assert meta["size"] == len(body) and meta["stored"] and not meta["truncated"]
            # spilled bodies carry the digest the spill worker computed, other bodies the
            # one the spool writer computed (the chain covers every body's digest); what
            # is stored is all that was received
            assert meta["sha256"] == hashlib.sha256(body).hexdigest() == meta["stored_sha256"]
        assert record.meta["request_size"] == record.meta["response_size"] == len(body)
        assert record.meta["outcome"] == "complete" and record.meta["status"] == 200
    assert list(spill.rglob("*.body")) == []  # no spill file left (their folder may stay)


def test_truncated_body_keeps_true_size_and_digest(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """Past body_limit the spool holds the prefix, the true size and the full digest."""
    recorder = make(recorders, tmp_path / "spool")
    data = random.Random(1).randbytes(50_000)
    mw = audited(recorder, memory_limit=100, body_limit=10_000, spill_dir=tmp_path)
    run_all(mw, [data])
    assert recorder.flush(timeout=30)
    [record] = spooled(tmp_path / "spool")
    assert record.request == data[:10_000]
    meta = record.meta["request_body"]
    assert meta["truncated"] and meta["size"] == len(data)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()


def test_seq_increases_by_one_per_record(tmp_path: Path, recorders: list[SpoolRecorder]) -> None:
    """Records carry seq 1, 2, 3... in the order they were handed off, and one stream."""
    recorder = make(recorders, tmp_path / "spool", batch_records=3)
    run_all(audited(recorder), [b"%d" % i for i in range(20)])
    assert recorder.flush(timeout=30)
    records = spooled(tmp_path / "spool")
    assert [r.meta["seq"] for r in records] == list(range(1, 21))
    assert [r.request for r in records] == [b"%d" % i for i in range(20)]
    assert [s.name for s in streams(tmp_path / "spool")] == [recorder.stream]


def headers_of(record: Any, field: str) -> dict[str, str]:
    return dict(record.meta[field])


def test_secret_headers_are_redacted_by_default(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """Secret headers reach the spool only as [REDACTED], listed; other headers are kept."""
    recorder = make(recorders, tmp_path / "spool")
    mw = audited(recorder)
    headers = [*SECRET_REQUEST_HEADERS, (b"X-Other", b"visible")]
    asyncio.run(call(mw, b"{}", headers=headers))
    assert recorder.flush(timeout=30)
    [record] = spooled(tmp_path / "spool")
    request = headers_of(record, "request_headers")
    for name, _ in SECRET_REQUEST_HEADERS:
        assert request[name.decode()] == MARKER
    assert request["X-Other"] == "visible" and request["host"] == "test"
    response = headers_of(record, "response_headers")
    assert response["set-cookie"] == MARKER
    assert response["content-type"] == "application/octet-stream"
    assert record.meta["redacted_headers"] == sorted(
        ["authorization", "cookie", "x-api-key", "proxy-authorization", "set-cookie"]
    )
    raw = b"".join(
        (s.directory / seg).read_bytes()
        for s in streams(tmp_path / "spool")
        for seg in s.segments()
    )
    for _, secret in [*SECRET_REQUEST_HEADERS, (b"", b"token=xyz")]:
        assert secret not in raw


def test_redacted_header_list_is_configurable(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """redact_headers names exactly the headers replaced (any case); [] turns it off."""
    custom = make(recorders, tmp_path / "custom", redact_headers=["X-Other"])
    off = make(recorders, tmp_path / "off", redact_headers=[])
    headers = [*SECRET_REQUEST_HEADERS, (b"x-other", b"visible")]
    for recorder in (custom, off):
        asyncio.run(call(audited(recorder), b"{}", headers=headers))
        assert recorder.flush(timeout=30)
    [record] = spooled(tmp_path / "custom")
    request = headers_of(record, "request_headers")
    assert request["x-other"] == MARKER
    assert request["authorization"] == "Bearer s3cret"
    assert record.meta["redacted_headers"] == ["x-other"]
    [record] = spooled(tmp_path / "off")
    assert headers_of(record, "request_headers") == {
        "host": "test",
        **{k.decode(): v.decode() for k, v in headers},
    }
    assert headers_of(record, "response_headers")["set-cookie"] == "token=xyz"
    assert record.meta["redacted_headers"] == []


def test_no_thread_and_no_files_before_the_first_exchange(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """Nothing starts before the first exchange; then one writer thread serves them all."""
    before = len(threads_named(THREAD))
    recorder = make(recorders, tmp_path / "spool")
    mw = audited(recorder)
    assert len(threads_named(THREAD)) == before
    assert not (tmp_path / "spool").exists()
    assert recorder.flush(timeout=1)  # nothing to flush
    run_all(mw, [b"a"])
    assert len(threads_named(THREAD)) == before + 1
    run_all(mw, [b"b", b"c"])
    assert len(threads_named(THREAD)) == before + 1
    assert recorder.shutdown(timeout=30)
    assert len(threads_named(THREAD)) == before


def test_close_drains_everything_and_releases_the_stream(tmp_path: Path) -> None:
    """shutdown() writes everything queued, joins the thread and releases the writer lock."""
    recorder = SpoolRecorder(tmp_path / "spool", interval=60.0, batch_records=10_000)
    before = len(threads_named(THREAD))
    run_all(audited(recorder), [b"%d" % i for i in range(50)])
    stream = StreamDirectory(tmp_path / "spool" / "streams" / recorder.stream)
    assert recorder.queued == 50  # the batch window is a minute: nothing written yet
    assert recorder.shutdown(timeout=30)
    assert len(threads_named(THREAD)) == before
    assert recorder.queued == 0
    assert [r.request for r in spooled(tmp_path / "spool")] == [b"%d" % i for i in range(50)]
    assert not stream.writer_alive()
    assert recorder.shutdown(timeout=30)  # twice is fine


def test_exchange_after_close_neither_hangs_nor_raises_into_the_app(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An exchange after shutdown() gets its response; the loss is counted, the loop never spins."""
    recorder = SpoolRecorder(tmp_path / "spool")
    mw = audited(recorder, overflow="block")
    run_all(mw, [b"before"])
    assert recorder.shutdown(timeout=30)

    async def late() -> bytes:
        return await asyncio.wait_for(call(mw, b"after"), 10)

    with caplog.at_level("WARNING", logger="asgi_audit"):
        assert asyncio.run(late()) == b"after"
    assert mw.failures + mw.dropped == 1
    assert [r.request for r in spooled(tmp_path / "spool")] == [b"before"]


def test_overflow_block_waits_without_blocking_the_loop(
    tmp_path: Path, recorders: list[SpoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """overflow=block: exchanges wait for room while the loop runs on; all are written."""
    recorder = make(recorders, tmp_path / "spool", max_records=2, batch_records=1)
    gate = threading.Event()
    original = SegmentWriter.append

    def stalled(self: SegmentWriter, header: bytes, payload: bytes) -> None:
        gate.wait(30)
        original(self, header, payload)

    monkeypatch.setattr(SegmentWriter, "append", stalled)
    refused = 0
    submit = recorder.try_submit

    def counting(exchange: Any, *, force: bool = False) -> bool:
        nonlocal refused
        accepted = submit(exchange, force=force)
        refused += not accepted
        return accepted

    monkeypatch.setattr(recorder, "try_submit", counting)
    mw = audited(recorder, overflow="block")
    count = 12

    async def main() -> tuple[list[bytes], int, int]:
        tasks = [asyncio.create_task(call(mw, b"%d" % i)) for i in range(count)]
        # at most four fit (a batch of two held by the stalled writer, two queued)
        for _ in range(2000):
            if refused >= count - 4:
                break
            await asyncio.sleep(0.005)
        ticks = 0
        for _ in range(20):  # the loop keeps turning while they wait
            await asyncio.sleep(0)
            ticks += 1
        waiting = sum(not t.done() for t in tasks)
        gate.set()
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return answers, ticks, waiting

    answers, ticks, waiting = asyncio.run(main())
    assert answers == [b"%d" % i for i in range(count)]
    assert refused >= count - 4 and ticks == 20 and waiting >= count - 4
    assert recorder.flush(timeout=30)
    assert sorted(r.request for r in spooled(tmp_path / "spool")) == sorted(answers)
    assert mw.dropped == 0 and mw.failures == 0


def test_a_full_queue_is_taken_in_turns_so_a_held_response_waits_for_one(
    tmp_path: Path, recorders: list[SpoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """overflow=block at saturation: the writer takes at most TAKE_RECORDS a turn and
    makes room after each, so a held response waits for one turn's work, not for the
    whole queue to be written."""
    recorder = make(recorders, tmp_path / "spool", max_records=1000, batch_records=1, interval=60.0)
    gate = threading.Event()
    sizes: list[int] = []
    original = SpoolRecorder._record

    def slow(self: SpoolRecorder, batch: list[Any]) -> None:
        gate.wait(30)
        sizes.append(len(batch))
        time.sleep(0.05)  # a slow disk: each turn takes a while
        original(self, batch)

    monkeypatch.setattr(SpoolRecorder, "_record", slow)

    async def held() -> int:
        gate.set()
        await asyncio.wait_for(recorder.room(), 10)
        return recorder.queued

    try:
        assert recorder.try_submit(exchange(b"first"))
        assert wait_until(lambda: recorder.queued == 0)  # the writer holds it, stalled
        for index in range(1000):
            assert recorder.try_submit(exchange(b"%d" % index))
        assert not recorder.try_submit(exchange(b"one too many"))
        queued_when_admitted = asyncio.run(held())
    finally:
        gate.set()
    assert queued_when_admitted >= 1000 - 2 * spool_recorder.TAKE_RECORDS
    assert recorder.try_submit(exchange(b"admitted"))
    assert recorder.flush(timeout=60)
    assert max(sizes) <= spool_recorder.TAKE_RECORDS
    assert sum(sizes) == 1002
    assert len(spooled(tmp_path / "spool")) == 1002


def test_batch_policy_puts_many_records_in_one_frame(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """Under a burst, fsync='batch' writes fewer frames than records."""
    recorder = make(recorders, tmp_path / "spool", fsync="batch", interval=60.0)
    count = 100

    async def burst() -> None:
        mw = audited(recorder)
        await asyncio.gather(*(call(mw, b"%d" % i) for i in range(count)))

    asyncio.run(burst())
    assert recorder.flush(timeout=30)
    assert len(spooled(tmp_path / "spool")) == count
    assert frame_count(tmp_path / "spool") < count / 10


def test_always_policy_writes_each_record_without_waiting_for_the_window(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """fsync='always' writes each record at once, not at the end of the batch window."""
    recorder = make(recorders, tmp_path / "spool", fsync="always", interval=60.0)
    mw = audited(recorder)
    for i in range(5):
        run_all(mw, [b"%d" % i])

        def written(count: int = i + 1) -> bool:
            return len(spooled(tmp_path / "spool")) == count

        assert wait_until(written, timeout=20)
    assert recorder.flush(timeout=20)


def test_batch_policy_waits_for_the_window_unless_flushed(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """fsync='batch' with a long window keeps records queued until a flush asks for them."""
    recorder = make(recorders, tmp_path / "spool", fsync="batch", interval=60.0)
    mw = audited(recorder)
    run_all(mw, [b"first", b"second"])
    assert recorder.queued == 2
    assert recorder.flush(timeout=20)
    assert recorder.queued == 0
    assert [r.request for r in spooled(tmp_path / "spool")] == [b"first", b"second"]


def test_flush_returns_only_once_written_records_are_synced(
    tmp_path: Path, recorders: list[SpoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """flush() returns only once the records it covers are synced, not merely written."""
    synced_at: list[int] = []
    original = SegmentWriter.sync

    def sync(self: SegmentWriter) -> None:
        original(self)
        synced_at.append(self.bytes_written)

    monkeypatch.setattr(SegmentWriter, "sync", sync)
    recorder = make(recorders, tmp_path / "spool", fsync="batch", interval=60.0, batch_records=1)
    mw = audited(recorder)
    run_all(mw, [b"one"])
    assert wait_until(lambda: len(spooled(tmp_path / "spool")) == 1, timeout=20)
    assert recorder.flush(timeout=20)
    writer = recorder._writer
    assert writer is not None
    assert synced_at and synced_at[-1] == writer.bytes_written


def test_fsync_off_never_syncs_while_running(
    tmp_path: Path, recorders: list[SpoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync='off' writes without syncing; flush still waits for the write."""
    calls: list[int] = []
    original = SegmentWriter.sync

    def sync(self: SegmentWriter) -> None:
        calls.append(1)
        original(self)

    monkeypatch.setattr(SegmentWriter, "sync", sync)
    recorder = make(recorders, tmp_path / "spool", fsync="off")
    run_all(audited(recorder), [b"a", b"b"])
    assert recorder.flush(timeout=20)
    assert [r.request for r in spooled(tmp_path / "spool")] == [b"a", b"b"]
    assert calls == []


def test_a_record_that_cannot_be_encoded_does_not_stop_the_writer(
    tmp_path: Path, recorders: list[SpoolRecorder], caplog: pytest.LogCaptureFixture
) -> None:
    """A record that cannot be encoded is skipped and counted; the writer writes the rest."""
    recorder = make(recorders, tmp_path / "spool", batch_records=1000)
    mw = audited(recorder)

    async def main() -> None:
        await call(mw, b"a")
        await call(mw, b"bad", path="/orders/\udcff")
        await call(mw, b"c")

    with caplog.at_level("WARNING", logger="asgi_audit.recording.handoff"):
        asyncio.run(main())
        assert recorder.flush(timeout=20)
    run_all(mw, [b"d"])
    assert recorder.flush(timeout=20)
    assert [r.request for r in spooled(tmp_path / "spool")] == [b"a", b"c", b"d"]
    assert recorder.errors == 1
    assert len(threads_named(THREAD)) >= 1


def test_a_stream_that_cannot_be_opened_loses_that_batch_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream that cannot be opened (another live writer holds it) loses the batch that
    found it so (counted, warned once), refuses exchanges for ``retry_seconds`` (the
    middleware counts them), then opens with a later batch."""
    holder = SegmentWriter(tmp_path / "spool", "fixed")
    holder.open()
    recorder = SpoolRecorder(tmp_path / "spool", stream=lambda: "fixed", retry_seconds=0.5)
    mw = audited(recorder)
    try:
        with caplog.at_level("WARNING", logger="asgi_audit"):
            run_all(mw, [b"lost"])
            assert recorder.flush(timeout=30)
            assert recorder.lost == 1
            run_all(mw, [b"refused"])
        assert mw.failures == 1
        assert "cannot open spool stream" in caplog.text
    finally:
        holder.close()
    time.sleep(0.6)
    run_all(mw, [b"kept"])
    assert recorder.shutdown(timeout=30)
    assert [r.request for r in spooled(tmp_path / "spool")] == [b"kept"]
    assert (mw.failures, recorder.lost) == (1, 1)


def test_default_stream_names_differ_between_recorders(tmp_path: Path) -> None:
    """Two recorders of one pid (a restarted PID 1) write two different streams."""
    first = SpoolRecorder(tmp_path / "spool")
    run_all(audited(first), [b"1"])
    assert first.shutdown(timeout=30)
    second = SpoolRecorder(tmp_path / "spool")
    run_all(audited(second), [b"2"])
    assert second.shutdown(timeout=30)
    assert first.stream != second.stream
    assert len(list(streams(tmp_path / "spool"))) == 2


def test_over_the_disk_cap_with_drop_counts_and_flush_returns(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """Over disk_cap with overflow='drop', records are counted dropped and flush() returns."""
    recorder = make(recorders, tmp_path / "spool", disk_cap=1, overflow="drop")
    mw = audited(recorder, overflow="drop")
    run_all(mw, [b"fits"])  # the spool is empty: this one is written
    assert recorder.flush(timeout=20)
    run_all(mw, [b"over", b"cap"])
    assert recorder.flush(timeout=20)
    assert recorder.dropped == 2
    assert [r.request for r in spooled(tmp_path / "spool")] == [b"fits"]


def test_over_the_disk_cap_with_block_waits_then_close_writes_anyway(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """Over disk_cap with overflow='block', the writer waits for room; shutdown() does not
    wait for a shipper that may never come: it writes past the cap and loses nothing."""
    recorder = make(recorders, tmp_path / "spool", disk_cap=1, interval=0.01)
    mw = audited(recorder)
    run_all(mw, [b"fits"])
    assert recorder.flush(timeout=20)
    run_all(mw, [b"waits"])
    assert not recorder.flush(timeout=0.3)  # held back by the cap
    assert recorder.shutdown(timeout=20)
    assert [r.request for r in spooled(tmp_path / "spool")] == [b"fits", b"waits"]


def test_frames_are_bounded_by_the_bytes_they_carry(
    tmp_path: Path, recorders: list[SpoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of spilled bodies is split over frames bounded by the bytes they carry."""
    monkeypatch.setattr(spool_recorder, "MAX_FRAME_BYTES", 100_000)
    recorder = make(recorders, tmp_path / "spool", interval=60.0, batch_records=10_000)
    bodies = [random.Random(i).randbytes(30_000) for i in range(10)]

    async def burst() -> None:
        mw = audited(recorder, memory_limit=1000, spill_dir=tmp_path)
        await asyncio.gather(*(call(mw, body) for body in bodies))

    asyncio.run(burst())
    assert recorder.flush(timeout=30)
    records = spooled(tmp_path / "spool")
    assert sorted(r.request for r in records) == sorted(bodies)
    # each record carries 60 kB (request and response): two per frame at most
    assert frame_count(tmp_path / "spool") >= len(bodies) / 2


def test_a_large_spilled_body_is_streamed_into_its_own_frame(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """A 48 MiB body that spilled to disk goes from its spill file into the spool in
    blocks: exact bytes, a frame of its own, and the writer never holds it whole."""
    import tracemalloc

    block = random.Random(3).randbytes(1 << 20)
    body = block * 48
    recorder = make(recorders, tmp_path / "spool")
    mw = audited(
        recorder,
        EchoApp(chunk=1 << 20),
        memory_limit=1 << 20,
        body_limit=None,
        spill_dir=tmp_path,
    )
    run_all(mw, [b"small"])
    assert recorder.flush(timeout=30)
    tracemalloc.start()
    try:
        run_all(mw, [body], chunk=1 << 20)
        tracemalloc.reset_peak()  # the request itself was built by the test: not counted
        assert recorder.flush(timeout=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    records = spooled(tmp_path / "spool")
    assert [len(r.request) for r in records] == [5, len(body)]
    assert hashlib.sha256(records[1].request).digest() == hashlib.sha256(body).digest()
    assert records[1].response == body
    assert frame_count(tmp_path / "spool") == 2
    assert peak < 16 << 20, f"the writer held {peak >> 20} MiB"


def test_a_forked_child_starts_its_own_writer_and_stream(tmp_path: Path) -> None:
    """After a fork (gunicorn's workers), the child's first exchange starts a writer of its
    own on a stream of its own; the parent's writer goes on with the parent's stream."""
    recorder = SpoolRecorder(tmp_path / "spool")
    mw = audited(recorder)
    run_all(mw, [b"parent-1"])
    assert recorder.flush(timeout=30)
    parent_stream = recorder.stream
    with warnings.catch_warnings():  # Python 3.12+ warns about forking with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 1
        try:
            run_all(mw, [b"child"])
            same = recorder.stream == parent_stream
            code = 0 if recorder.shutdown(timeout=30) and not same else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    run_all(mw, [b"parent-2"])
    assert recorder.shutdown(timeout=30)
    assert recorder.stream == parent_stream
    by_stream: dict[str, list[bytes]] = {}
    for record in spooled(tmp_path / "spool"):
        by_stream.setdefault(record.meta["stream"], []).append(record.request)
    assert sorted(by_stream.values()) == [[b"child"], [b"parent-1", b"parent-2"]]
    assert len(list(streams(tmp_path / "spool"))) == 2
