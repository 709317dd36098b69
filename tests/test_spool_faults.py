"""The spool under faults: a disk that fills up, fails a sync, runs out of descriptors; a
body whose spill failed; a damaged checkpoint; a lenient umask. Every record submitted
ends up in the spool (at least once: a rewrite after a failed sync may leave a copy in the
sealed segment, which sinks absorb by id), or is reported lost through ``on_written``."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from asgi_audit import AuditMiddleware
from asgi_audit.capture.record import Body
from asgi_audit.capture.spill import SpillJob
from asgi_audit.recording import spool as spool_module
from asgi_audit.recording import writer as writer_module
from asgi_audit.recording.frames import Frame, Tail, decode_payload, encode_frame, read_frames
from asgi_audit.recording.handoff import MemoryRecorder
from asgi_audit.recording.spool import (
    Checkpoint,
    SegmentWriter,
    StreamDirectory,
    private_directory,
    segment_name,
    streams,
    try_lock,
    unlock,
)
from asgi_audit.recording.writer import SpoolRecorder
from harness import EchoApp, call
from spooling import FlakySink, Outcomes, exchange, spooled, spooled_ids, wait_until

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EIO = OSError(errno.EIO, os.strerror(errno.EIO))


class Faults:
    """Makes ``os.<name>`` raise a given error for its next ``times`` calls that ``when``
    selects, then behave again; counts the calls that went through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.real: Callable[..., Any] = getattr(os, name)
        self.errors: list[OSError] = []
        self.broken: OSError | None = None
        """Fail every call while set."""
        self.when: Callable[..., bool] = lambda *args: True
        self.failed = 0
        self.passed = 0
        self.events: list[str] = []
        monkeypatch.setattr(os, name, self)

    def fail(self, error: OSError, times: int = 1) -> Faults:
        self.errors.extend([error] * times)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (self.errors or self.broken is not None) and self.when(*args):
            self.failed += 1
            self.events.append("failed")
            error = self.errors.pop(0) if self.errors else self.broken
            assert error is not None
            raise error
        result = self.real(*args, **kwargs)
        self.passed += 1
        self.events.append("passed")
        return result


@pytest.fixture
def recorders() -> Iterator[list[SpoolRecorder]]:
    made: list[SpoolRecorder] = []
    yield made
    for recorder in made:
        recorder.shutdown(timeout=30)


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "BACKOFF_FIRST", 0.001)
    monkeypatch.setattr(writer_module, "BACKOFF_MAX", 0.01)


def make(recorders: list[SpoolRecorder], root: Path, **options: Any) -> SpoolRecorder:
    options.setdefault("interval", 60.0)
    options.setdefault("batch_records", 10_000)
    recorder = SpoolRecorder(root, **options)
    recorders.append(recorder)
    return recorder


def submit_all(recorder: SpoolRecorder, exchanges: Iterable[Any]) -> list[Any]:
    made = list(exchanges)
    for one in made:
        assert recorder.try_submit(one)
    return made


def stream_of(root: Path) -> StreamDirectory:
    [stream] = streams(root)
    return stream


# -- a failed sync ---------------------------------------------------------------------


def test_a_failed_sync_acknowledges_nothing_until_a_rewrite_is_synced(
    tmp_path: Path,
    recorders: list[SpoolRecorder],
    monkeypatch: pytest.MonkeyPatch,
    fast_backoff: None,
) -> None:
    """While syncs fail, flush() does not return and no record is acknowledged; the
    segment is sealed and the records written again to a new one; once a sync succeeds
    every record is acknowledged, once, and is in the spool."""
    root = tmp_path / "spool"
    recorder = make(recorders, root)
    sync = Faults(monkeypatch, "fdatasync")
    outcomes = Outcomes()
    first = submit_all(recorder, (outcomes.exchange(b"%d" % i) for i in range(5)))
    assert recorder.flush(timeout=30)
    sync.broken = EIO
    second = submit_all(recorder, (outcomes.exchange(b"late %d" % i) for i in range(5)))
    assert not recorder.flush(timeout=0.5)
    assert all(outcomes.calls.get(e.id) is None for e in second)
    assert sync.failed >= 2  # retried: each time sealed, rewritten, synced again
    sync.broken = None
    assert recorder.flush(timeout=30)
    assert sync.events[-1] == "passed"
    assert outcomes.calls == {e.id: [True] for e in first + second}
    ids = spooled_ids(root)
    assert set(ids) == {e.id for e in first + second}
    assert [ids.count(e.id) for e in first] == [1] * 5  # synced before: never rewritten
    assert recorder.sync_failures == sync.failed
    assert len(stream_of(root).segments()) >= 2


def test_a_failed_sync_at_rotation_rewrites_both_segments_records(
    tmp_path: Path,
    recorders: list[SpoolRecorder],
    monkeypatch: pytest.MonkeyPatch,
    fast_backoff: None,
) -> None:
    """Records written to a segment that was rotated away from are covered by the next
    sync too: when it fails, they are written again like the current segment's."""
    root = tmp_path / "spool"
    recorder = make(recorders, root, segment_bytes=1, batch_records=1, fsync="batch")
    sync = Faults(monkeypatch, "fdatasync").fail(EIO, times=1)
    outcomes = Outcomes()
    exchanges = submit_all(recorder, (outcomes.exchange(b"%d" % i) for i in range(6)))
    assert recorder.flush(timeout=30)
    assert sync.failed == 1
    assert set(spooled_ids(root)) == {e.id for e in exchanges}
    assert outcomes.calls == {e.id: [True] for e in exchanges}


def test_a_large_record_is_rewritten_from_its_spill_file(
    tmp_path: Path,
    recorders: list[SpoolRecorder],
    monkeypatch: pytest.MonkeyPatch,
    fast_backoff: None,
) -> None:
    """A record streamed from its spill file is streamed again after a failed sync: the
    spill file stays until the rewrite is synced, and goes then."""
    monkeypatch.setattr(writer_module, "MAX_FRAME_BYTES", 4000)
    root = tmp_path / "spool"
    spill = tmp_path / "spill"
    spill.mkdir()
    recorder = make(recorders, root)
    sync = Faults(monkeypatch, "fdatasync").fail(EIO, times=2)
    body = os.urandom(50_000)
    mw = AuditMiddleware(
        EchoApp(), recorder=recorder, environ={}, memory_limit=1000, spill_dir=spill
    )
    assert asyncio.run(call(mw, body, chunk=7000)) == body
    assert recorder.flush(timeout=30)
    assert sync.failed == 2
    records = spooled(root)
    assert records and all(r.request == body and r.response == body for r in records)
    assert len({r.meta["id"] for r in records}) == 1
    assert list(spill.rglob("*.body")) == []


# -- failing writes --------------------------------------------------------------------


def test_failing_writes_back_off_and_log_once_per_kind(
    tmp_path: Path,
    recorders: list[SpoolRecorder],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disk that is full for a while: retries wait longer each time, the log says so
    once (not a traceback per retry), then says it works again; nothing is lost or
    written twice."""
    root = tmp_path / "spool"
    recorder = make(recorders, root)
    pauses: list[float] = []
    pause = recorder._pause

    def recording(seconds: float) -> None:
        pauses.append(seconds)
        pause(min(seconds, 0.01))

    monkeypatch.setattr(recorder, "_pause", recording)
    outcomes = Outcomes()
    assert recorder.try_submit(outcomes.exchange(b"opens the stream"))
    assert recorder.flush(timeout=30)
    writev = Faults(monkeypatch, "writev").fail(ENOSPC, times=8)
    with caplog.at_level(logging.WARNING, logger="asgi_audit.recorder"):
        exchanges = submit_all(recorder, (outcomes.exchange(b"%d" % i) for i in range(3)))
        assert recorder.flush(timeout=30)
    assert writev.failed == 8
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    failed = [r for r in caplog.records if "spool write failed" in r.getMessage()]
    assert len(failed) == 1 and "No space left" in failed[0].getMessage()
    assert any("works again, after 8 failures" in r.getMessage() for r in caplog.records)
    ids = spooled_ids(root)
    assert sorted(ids[1:]) == sorted(e.id for e in exchanges)  # each once
    assert all(calls == [True] for calls in outcomes.calls.values())


def test_a_failure_that_goes_on_is_summed_up(
    tmp_path: Path,
    recorders: list[SpoolRecorder],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fast_backoff: None,
) -> None:
    """Past the summary interval, one line counts the failures of that kind so far."""
    monkeypatch.setattr(writer_module, "SUMMARY_SECONDS", 0.0)
    recorder = make(recorders, tmp_path / "spool")
    assert recorder.try_submit(exchange(b"opens"))
    assert recorder.flush(timeout=30)
    Faults(monkeypatch, "writev").fail(ENOSPC, times=2).fail(EIO, times=2)
    with caplog.at_level(logging.WARNING, logger="asgi_audit.recorder"):
        assert recorder.try_submit(exchange(b"x"))
        assert recorder.flush(timeout=30)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("spool write failed (" in m for m in messages) == 2  # one per errno
    assert any("failed 2 times since" in m and "No space" in m for m in messages)
    assert any("failed 2 times since" in m and "Input/output" in m for m in messages)


def test_shutdown_gives_up_on_a_spool_that_stays_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shutdown(timeout) returns False at its deadline while writes fail; the thread then
    gives up: each exchange is told it was not kept, and the thread ends."""
    recorder = SpoolRecorder(tmp_path / "spool", interval=60.0)
    assert recorder.try_submit(exchange(b"opens"))
    assert recorder.flush(timeout=30)
    writev = Faults(monkeypatch, "writev")
    writev.broken = ENOSPC
    outcomes = Outcomes()
    exchanges = submit_all(recorder, (outcomes.exchange(b"%d" % i) for i in range(3)))
    assert wait_until(lambda: writev.failed >= 1)
    started = time.monotonic()
    assert not recorder.shutdown(timeout=0.5)
    assert time.monotonic() - started < 5
    assert wait_until(lambda: len(outcomes.calls) == 3, timeout=10)
    assert outcomes.calls == {e.id: [False] for e in exchanges}
    assert recorder.lost == 3
    assert wait_until(lambda: recorder._thread is None, timeout=10)
    assert recorder.shutdown(timeout=5)


# -- rotation ----------------------------------------------------------------------------


def frame(n: int) -> tuple[bytes, bytes]:
    return encode_frame([({"n": n}, [b"x" * 10], [])])


def numbers(root: Path) -> list[list[int]]:
    stream = stream_of(root)
    return [
        [record.meta["n"] for record in spooled_segment(stream.directory / segment)]
        for segment in stream.segments()
    ]


def spooled_segment(path: Path) -> list[Any]:
    return [r for i in read_frames(path) if isinstance(i, Frame) for r in decode_payload(i.payload)]


def test_rotation_that_cannot_open_a_segment_stays_on_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No descriptor left (EMFILE) when a segment is due for rotation: the frame goes to
    the current, still open segment; rotation works again once descriptors are back."""
    writer = SegmentWriter(tmp_path, "s", segment_bytes=1)
    writer.open()
    try:
        writer.append(*frame(0))
        opens = Faults(monkeypatch, "open").fail(OSError(errno.EMFILE, "Too many open files"))
        opens.when = lambda path, *rest: str(path).endswith(".seg")
        with caplog.at_level(logging.WARNING, logger="asgi_audit.spool"):
            writer.append(*frame(1))
            writer.sync()
            writer.append(*frame(2))
        assert opens.failed == 1
        assert "cannot start a new spool segment" in caplog.text
        assert "rotate again" in caplog.text
    finally:
        writer.close()
    assert numbers(tmp_path) == [[0, 1], [2]]


def test_rotation_whose_directory_sync_fails_leaves_no_empty_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new segment was made but its directory could not be synced: it is removed (a
    later segment would tell the shipper the current one is finished) and the append
    fails, to be retried; the writer is still on its current segment."""
    writer = SegmentWriter(tmp_path, "s", segment_bytes=1)
    writer.open()
    try:
        writer.append(*frame(0))

        def failing(path: Path) -> None:
            raise EIO

        monkeypatch.setattr(spool_module, "fsync_directory", failing)
        with pytest.raises(OSError, match="Input/output error"):
            writer.append(*frame(1))
        assert stream_of(tmp_path).segments() == [segment_name(1)]
        monkeypatch.undo()
        writer.append(*frame(1))
    finally:
        writer.close()
    assert numbers(tmp_path) == [[0], [1]]


def test_a_fragment_that_cannot_be_cut_off_is_never_written_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write fails part-way and the fragment cannot be cut off either: the retry goes to
    a new segment, so no good frame ever follows a fragment; the old segment's good
    frames are still synced."""
    writer = SegmentWriter(tmp_path, "s")
    writer.open()
    synced: list[int] = []
    real_sync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real_sync(fd)

    try:
        writer.append(*frame(0))
        real_write = os.write

        def short_writev(fd: int, buffers: list[bytes]) -> int:
            return real_write(fd, b"".join(buffers)[:30])

        with monkeypatch.context() as patch:
            patch.setattr(os, "writev", short_writev)
            Faults(patch, "write").fail(ENOSPC)
            Faults(patch, "ftruncate").fail(EIO)
            with pytest.raises(OSError, match="No space"):
                writer.append(*frame(1))
        writer.append(*frame(1))
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        writer.sync()
        assert len(synced) == 2  # the left segment, then the new one
    finally:
        writer.close()
    stream = stream_of(tmp_path)
    first, second = (stream.directory / name for name in stream.segments())
    assert [r.meta["n"] for r in spooled_segment(first)] == [0]
    *_, tail = read_frames(first)
    assert isinstance(tail, Tail) and tail.reason == "torn"
    assert [r.meta["n"] for r in spooled_segment(second)] == [1]


def test_a_sealed_segment_is_never_appended_to_again(tmp_path: Path) -> None:
    """After seal() (a failed sync), the next frame starts a new segment."""
    writer = SegmentWriter(tmp_path, "s")
    writer.open()
    try:
        writer.append(*frame(0))
        writer.seal()
        writer.append(*frame(1))
        writer.append(*frame(2))
    finally:
        writer.close()
    assert numbers(tmp_path) == [[0], [1, 2]]


def test_rotated_segments_are_synced_before_being_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment rotated away from stays open until a sync covers it, which syncs it
    before the current one; a sync that fails leaves it to be sealed."""
    writer = SegmentWriter(tmp_path, "s", segment_bytes=1)
    writer.open()
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        for n in range(3):
            writer.append(*frame(n))
        assert synced == []  # rotation itself syncs nothing
        writer.sync()
        assert len(synced) == 3 and len(set(synced)) == 3
    finally:
        writer.close()


# -- a body whose spill failed -----------------------------------------------------------


def failed_spill(size: int, error: BaseException) -> Body:
    """A body whose spill worker raised (a full temporary directory)."""
    job = SpillJob(1 << 20, True, None)
    future: Future[str | None] = Future()
    future.set_exception(error)
    job.last = future
    return Body(size=size, complete=True, job=job)


def test_a_body_whose_spill_failed_costs_only_its_own_bytes(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """The record is written without that body, saying why; the other records of the
    batch are written whole."""
    root = tmp_path / "spool"
    recorder = make(recorders, root)
    outcomes = Outcomes()
    before = outcomes.exchange(b"before", b"ok")
    broken = outcomes.exchange(b"", b"fine", request_body=failed_spill(5000, ENOSPC))
    after = outcomes.exchange(b"after", b"ok")
    submit_all(recorder, [before, broken, after])
    assert recorder.flush(timeout=30)
    records = spooled(root)
    assert [r.meta["id"] for r in records] == [before.id, broken.id, after.id]
    assert [r.meta["seq"] for r in records] == [1, 2, 3]
    assert (records[0].request, records[2].request) == (b"before", b"after")
    kept = records[1]
    assert kept.request == b"" and kept.response == b"fine"
    assert kept.meta["request_body"] == {
        "size": 5000,
        "sha256": None,
        "stored": False,
        "truncated": False,
        "complete": True,
        "sent_path": None,
        "stored_sha256": None,
        "redacted": [],
        "unparseable": False,
    }
    assert kept.meta["error"] == (
        "request body not kept: spill failed: [Errno 28] No space left on device"
    )
    assert recorder.bodies_not_kept == 1
    assert outcomes.calls == {e.id: [True] for e in (before, broken, after)}


class VanishingBody(Body):
    """A body whose bytes can be read ``reads`` times, then no more (the file is gone)."""

    def __init__(self, data: bytes, reads: int) -> None:
        super().__init__(size=len(data), complete=True, chunks=[data])
        self.reads = reads

    def chunks(self) -> Iterator[bytes]:
        if self.reads <= 0:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x.body")
        self.reads -= 1
        return super().chunks()


@pytest.mark.parametrize("reads", [0, 1])
def test_a_large_body_that_cannot_be_read_again_is_left_out(
    tmp_path: Path,
    recorders: list[SpoolRecorder],
    monkeypatch: pytest.MonkeyPatch,
    reads: int,
) -> None:
    """A streamed record whose bytes go away before its checksum is taken, or between
    the checksum and the write: written without that body, under the same seq, and no
    fragment is left behind."""
    monkeypatch.setattr(writer_module, "MAX_FRAME_BYTES", 1000)
    root = tmp_path / "spool"
    recorder = make(recorders, root)
    body = VanishingBody(os.urandom(3000), reads)
    submit_all(recorder, [exchange(request_body=body), exchange(b"next")])
    assert recorder.flush(timeout=30)
    first, second = spooled(root)  # the segment ends cleanly: no fragment
    assert first.request == b"" and first.meta["request_body"]["stored"] is False
    assert "request body not kept: spill file unreadable" in first.meta["error"]
    assert [first.meta["seq"], second.meta["seq"]] == [1, 2]
    assert second.request == b"next"


# -- on_written ----------------------------------------------------------------------------


def test_every_exchange_is_told_once_from_many_threads(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """Exchanges with a callback submitted from many threads: each is told True exactly
    once, and the spool holds each exactly once."""
    root = tmp_path / "spool"
    recorder = make(recorders, root, max_records=100_000)
    outcomes = Outcomes()
    made: list[Any] = []
    lock = threading.Lock()

    def producer() -> None:
        mine = [outcomes.exchange(b"%d" % i) for i in range(100)]
        with lock:
            made.extend(mine)
        for one in mine:
            assert recorder.try_submit(one)

    threads = [threading.Thread(target=producer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorder.flush(timeout=60)
    assert outcomes.calls == {e.id: [True] for e in made}
    assert sorted(spooled_ids(root)) == sorted(e.id for e in made)


def test_waiting_exchanges_share_one_write_and_one_sync(
    tmp_path: Path, recorders: list[SpoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: what queued while the writer was busy is written as one frame and
    synced once, and each waiting exchange is told as soon as that sync is done, without
    waiting for the batch window (a minute here)."""
    root = tmp_path / "spool"
    recorder = make(recorders, root)
    gate = threading.Event()
    appended: list[int] = []
    original = SegmentWriter.append

    def held(self: SegmentWriter, header: bytes, payload: bytes) -> None:
        gate.wait(30)
        appended.append(len(payload))
        original(self, header, payload)

    monkeypatch.setattr(SegmentWriter, "append", held)
    syncs = Faults(monkeypatch, "fdatasync")
    outcomes = Outcomes()
    first = outcomes.exchange(b"first")
    assert recorder.try_submit(first)
    assert wait_until(lambda: recorder.queued == 0)  # taken: the writer waits at the gate
    rest = submit_all(recorder, (outcomes.exchange(b"%d" % i) for i in range(20)))
    gate.set()
    assert wait_until(lambda: len(outcomes.calls) == 21, timeout=10)
    assert outcomes.calls == {e.id: [True] for e in [first, *rest]}
    # the stream's first chain checkpoint, then the first record, then the 20 as one
    assert len(appended) == 3 and syncs.passed == 2


def test_an_exchange_is_told_false_when_the_stream_cannot_be_opened(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the spool's folder should be")
    recorder = SpoolRecorder(blocked / "spool", retry_seconds=0.0)
    outcomes = Outcomes()
    lost = outcomes.exchange(b"lost")
    assert recorder.try_submit(lost)
    assert recorder.flush(timeout=30)
    assert outcomes.calls == {lost.id: [False]}
    assert recorder.lost == 1
    assert recorder.shutdown(timeout=30)


def test_a_callback_that_raises_is_counted_and_stops_nothing(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    root = tmp_path / "spool"
    recorder = make(recorders, root)
    outcomes = Outcomes()

    def raising(kept: bool) -> None:
        raise RuntimeError("the waiter is gone")

    bad = exchange(b"bad", on_written=raising)
    good = outcomes.exchange(b"good")
    submit_all(recorder, [bad, good])
    assert recorder.flush(timeout=30)
    assert recorder.callback_errors == 1
    assert outcomes.calls == {good.id: [True]}
    assert sorted(spooled_ids(root)) == sorted([bad.id, good.id])


def test_an_exchange_that_cannot_be_encoded_is_told_false(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    recorder = make(recorders, tmp_path / "spool")
    outcomes = Outcomes()
    bad = outcomes.exchange(b"bad")
    bad.path = "/orders/\udcff"  # a lone surrogate: not UTF-8
    good = outcomes.exchange(b"good")
    submit_all(recorder, [bad, good])
    assert recorder.flush(timeout=30)
    assert outcomes.calls == {bad.id: [False], good.id: [True]}


def test_exchanges_dropped_over_the_disk_cap_are_told_false(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    recorder = make(recorders, tmp_path / "spool", disk_cap=1, overflow="drop")
    outcomes = Outcomes()
    first = outcomes.exchange(b"fits")
    submit_all(recorder, [first])
    assert recorder.flush(timeout=30)
    over = submit_all(recorder, [outcomes.exchange(b"over"), outcomes.exchange(b"cap")])
    assert recorder.flush(timeout=30)
    assert outcomes.calls == {first.id: [True], over[0].id: [False], over[1].id: [False]}


def test_with_fsync_off_an_exchange_is_kept_once_written(
    tmp_path: Path, recorders: list[SpoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = Faults(monkeypatch, "fdatasync")
    recorder = make(recorders, tmp_path / "spool", fsync="off", segment_bytes=1)
    outcomes = Outcomes()
    made = submit_all(recorder, (outcomes.exchange(b"%d" % i) for i in range(3)))
    assert wait_until(lambda: len(outcomes.calls) == 3, timeout=10)
    assert outcomes.calls == {e.id: [True] for e in made}
    assert syncs.passed == 0  # rotation does not sync either


def test_a_writer_thread_that_dies_tells_every_exchange(
    tmp_path: Path, recorders: list[SpoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that ends the writer thread: what it wrote is synced at close and told True,
    what was still queued is told False; the next exchange starts a new thread."""
    root = tmp_path / "spool"
    recorder = make(recorders, root)
    outcomes = Outcomes()

    def broken(elapsed: float, closing: bool) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(recorder, "_sync_due", broken)
    made = submit_all(recorder, (outcomes.exchange(b"%d" % i) for i in range(5)))
    assert wait_until(lambda: len(outcomes.calls) == 5, timeout=10)
    assert all(len(calls_) == 1 for calls_ in outcomes.calls.values())
    written = [e.id for e in made if outcomes.calls[e.id] == [True]]
    assert sorted(spooled_ids(root)) == sorted(written)
    monkeypatch.undo()
    later = outcomes.exchange(b"later")
    assert recorder.try_submit(later)
    assert recorder.flush(timeout=30)
    assert outcomes.calls[later.id] == [True]


def test_memory_recorder_tells_an_exchange_it_is_kept_on_acceptance() -> None:
    recorder = MemoryRecorder(max_records=1)
    outcomes = Outcomes()
    kept, refused = outcomes.exchange(b"kept"), outcomes.exchange(b"refused")
    assert recorder.try_submit(kept)
    assert not recorder.try_submit(refused)
    assert outcomes.calls == {kept.id: [True]}
    recorder.take_all()


# -- file modes ------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o000])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_everything_in_the_spool_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Directories 0700, files 0600: segments, locks, the checkpoint (and its temporary),
    even where an earlier version left them 0755 / 0644."""
    root = tmp_path / "spool"
    legacy = root / "streams" / "old"
    legacy.mkdir(parents=True)
    for directory in (root, root / "streams", legacy):
        os.chmod(directory, 0o755)
    (legacy / "writer.lock").touch(mode=0o644)
    os.chmod(legacy / "writer.lock", 0o644)
    (root / "shipper.lock").touch()
    os.chmod(root / "shipper.lock", 0o666)
    recorder = SpoolRecorder(root, segment_bytes=1)
    for n in range(3):
        assert recorder.try_submit(exchange(b"%d" % n))
    assert recorder.flush(timeout=30)
    stream = StreamDirectory(root / "streams" / recorder.stream)
    (stream.directory / "checkpoint.tmp").touch()
    os.chmod(stream.directory / "checkpoint.tmp", 0o644)
    stream.save_checkpoint(Checkpoint(stream.segments()[0], 0, 0))
    assert recorder.shutdown(timeout=30)
    private_directory(root)  # what the shipper does for the spool root
    for lock in (root / "shipper.lock", legacy / "writer.lock"):
        fd = try_lock(lock)
        assert fd is not None
        unlock(fd)
    private_directory(legacy)
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = 0o700 if path.is_dir() else 0o600
        assert mode == expected, f"{path}: {oct(mode)}"


def test_private_directory_leaves_shared_parents_alone(tmp_path: Path) -> None:
    """Parents that were there already keep their mode; a sticky directory (/tmp) given
    as the spool itself is not narrowed."""
    parent = tmp_path / "shared"
    parent.mkdir(mode=0o755)
    os.chmod(parent, 0o755)
    private_directory(parent / "a" / "b")
    assert stat.S_IMODE(parent.stat().st_mode) == 0o755
    assert stat.S_IMODE((parent / "a").stat().st_mode) == 0o700
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    private_directory(sticky)
    assert stat.S_IMODE(sticky.stat().st_mode) == 0o1777


# -- the checkpoint --------------------------------------------------------------------------


def stream_with_segments(tmp_path: Path, sizes: list[int]) -> StreamDirectory:
    directory = tmp_path / "streams" / "s"
    directory.mkdir(parents=True)
    for index, size in enumerate(sizes, start=1):
        (directory / segment_name(index)).write_bytes(bytes(size))
    return StreamDirectory(directory)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"segment": "000000000001.seg", "off',
        b"not json",
        b"[1, 2, 3]",
        b'"a string"',
        b'{"segment": 1, "offset": 0, "delivered": 0}',
        b'{"segment": "000000000001.seg", "offset": "10", "delivered": 0}',
        b'{"segment": "000000000001.seg", "offset": -1, "delivered": 0}',
        b'{"segment": "000000000001.seg", "offset": true, "delivered": 0}',
        b'{"segment": "000000000001.seg", "offset": 1.5, "delivered": 0}',
        b'{"segment": "../../etc/passwd", "offset": 0, "delivered": 0}',
        b'{"offset": 0, "delivered": 0}',
        b"\xff\xfe\x00",
    ],
)
def test_a_damaged_checkpoint_starts_the_stream_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    """A checkpoint that is not one is warned about, naming the stream, and delivery
    starts over from the first segment (sinks absorb what is delivered twice)."""
    spool_module._warned.clear()
    stream = stream_with_segments(tmp_path, [100])
    (stream.directory / "checkpoint").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="asgi_audit.spool"):
        assert stream.checkpoint() == Checkpoint("", 0, 0)
        assert stream.checkpoint() == Checkpoint("", 0, 0)
    assert caplog.text.count("the checkpoint of spool stream s is damaged") == 1


def test_a_checkpoint_past_the_end_of_its_segment_is_its_end(tmp_path: Path) -> None:
    stream = stream_with_segments(tmp_path, [100, 50])
    stream.save_checkpoint(Checkpoint(segment_name(2), 5000, 7))
    assert stream.checkpoint() == Checkpoint(segment_name(2), 50, 7)


def test_a_checkpoint_naming_a_missing_segment(tmp_path: Path) -> None:
    """Segments after the missing one: delivery goes on with them. None after it (the
    segments are older than the checkpoint, as a reused stream name leaves them): the
    stream starts over rather than skipping them for ever."""
    stream = stream_with_segments(tmp_path, [10, 10, 10])
    os.unlink(stream.directory / segment_name(2))
    stream.save_checkpoint(Checkpoint(segment_name(2), 5, 3))
    assert stream.checkpoint() == Checkpoint(segment_name(2), 5, 3)
    stream.save_checkpoint(Checkpoint(segment_name(9), 5, 3))
    assert stream.checkpoint() == Checkpoint("", 0, 3)


def test_a_writer_starts_past_the_segment_its_checkpoint_names(tmp_path: Path) -> None:
    """A reused stream name whose segments were all delivered and removed: the new
    writer's segments sort after the checkpoint's, so the shipper reads them."""
    stream = stream_with_segments(tmp_path, [])
    stream.save_checkpoint(Checkpoint(segment_name(7), 100, 3))
    writer = SegmentWriter(tmp_path, "s")
    writer.open()
    writer.close()
    assert stream.segments() == [segment_name(8)]


def test_the_shipper_redelivers_a_stream_whose_checkpoint_is_damaged(
    tmp_path: Path,
) -> None:
    """End to end: a damaged checkpoint does not wedge the shipper; the records are
    delivered (again) and the checkpoint is whole once more."""
    from asgi_audit.shipping.shipper import Shipper  # the shipping room, above this one

    root = tmp_path / "spool"
    recorder = SpoolRecorder(root)
    made = submit_all(recorder, (exchange(b"%d" % i) for i in range(3)))
    assert recorder.shutdown(timeout=30)
    stream = stream_of(root)
    sink = FlakySink()
    Shipper(root, sink, keep_delivered=True).ship_once(timeout=30)
    (stream.directory / "checkpoint").write_bytes(b'{"segment": "0000')
    Shipper(root, sink, keep_delivered=True).ship_once(timeout=30)
    assert [r.id for r in sink.records] == [e.id for e in made] * 2
    assert stream.checkpoint().segment == stream.segments()[-1]
