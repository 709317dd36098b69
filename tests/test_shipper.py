"""Shipper: spool to sink at least once, exactly once in the sink; retries, deadlines,
adoption of dead streams, segment clean-up, the shipper lock, thread and child process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from asgi_audit import AuditMiddleware
from asgi_audit.errors import ShippingStopped, SpoolError
from asgi_audit.recording.spool import Checkpoint, SegmentWriter, StreamDirectory, streams
from asgi_audit.recording.writer import SpoolRecorder
from asgi_audit.shipping.runners import ShipperLock, ShipperProcess, ShipperThread
from asgi_audit.shipping.shipper import Shipper
from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.memory import MemorySink
from asgi_audit.sinks.record import StoredRecord
from harness import EchoApp, call
from spooling import (
    FlakySink,
    record_frames,
    request_data,
    spooled,
    threads_named,
    wait_until,
)


def bodies(count: int, seed: int = 0) -> list[bytes]:
    """Request bodies of assorted sizes, all distinct."""
    rng = random.Random(seed)
    return [b"%d:" % i + rng.randbytes(rng.choice([0, 10, 3000, 70_000])) for i in range(count)]


def record_into(
    recorder: SpoolRecorder,
    data: Sequence[bytes],
    *,
    each_flushed: bool = False,
    **options: Any,
) -> None:
    """Each body through an audited echo app into ``recorder``; flushed at the end (after
    each one with ``each_flushed``, which gives one frame per record)."""
    mw = AuditMiddleware(EchoApp(), recorder=recorder, environ={}, **options)

    async def main() -> None:
        for body in data:
            await call(mw, body)
            if each_flushed:
                assert await asyncio.to_thread(recorder.flush, 30)

    asyncio.run(main())
    assert recorder.flush(timeout=30)


def dead_spool(root: Path, data: Sequence[bytes], **options: Any) -> str:
    """A spool holding ``data`` in the stream of a writer that has gone (lock released);
    ``options`` go to the middleware."""
    recorder = SpoolRecorder(root)
    record_into(recorder, data, each_flushed=True, **options)
    assert recorder.shutdown(timeout=30)
    return recorder.stream


def all_records(sink: Any) -> list[StoredRecord]:
    return list(sink.search(Query(limit=None, with_bodies=True, newest_first=False)))


def check_delivered(records: Sequence[StoredRecord], data: Sequence[bytes]) -> None:
    """Exactly ``data``, once each, with bodies and SHA-256 digests right."""
    assert sorted(request_data(r) for r in records) == sorted(data)
    assert len({r.id for r in records}) == len(records) == len(data)
    for record in records:
        for body in (record.request_body, record.response_body):
            assert body is not None and body.data is not None
            assert body.sha256 == hashlib.sha256(body.data).hexdigest()
            assert body.size == len(body.data)


@pytest.fixture
def recorders() -> Any:
    """Recorders made by a test; each is closed afterwards."""
    made: list[SpoolRecorder] = []
    yield made
    for recorder in made:
        assert recorder.shutdown(timeout=30)


def live_recorder(recorders: list[SpoolRecorder], root: Path, **options: Any) -> SpoolRecorder:
    recorder = SpoolRecorder(root, **options)
    recorders.append(recorder)
    return recorder


def test_ship_once_delivers_everything_once_with_digests(tmp_path: Path) -> None:
    """Every record reaches the sink once with exact bodies and digests; dead stream removed."""
    spool = tmp_path / "spool"
    data = bodies(12)
    stream = dead_spool(spool, data, memory_limit=5000, spill_dir=tmp_path)
    sink = MemorySink()
    report = Shipper(spool, sink, batch_records=5).ship_once()
    assert report.delivered == 12 and report.batches >= 3
    assert report.adopted == [stream] and report.repaired_bytes == 0
    records = all_records(sink)
    check_delivered(records, data)
    assert sorted(r.seq for r in records) == list(range(1, 13))
    assert list(streams(spool)) == []
    assert Shipper(spool, sink).ship_once().delivered == 0
    assert sink.count() == 12
    sink.close()


def test_checkpoint_advances_and_a_second_pass_delivers_nothing(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """The checkpoint moves past delivered frames: a second pass only ships new records."""
    spool = tmp_path / "spool"
    recorder = live_recorder(recorders, spool)
    record_into(recorder, [b"a", b"b", b"c"])
    sink = FlakySink()
    shipper = Shipper(spool, sink)
    assert shipper.ship_once().delivered == 3
    [stream] = streams(spool)
    [segment] = stream.segments()
    assert stream.checkpoint() == Checkpoint(
        segment, (stream.directory / segment).stat().st_size, 3
    )
    assert shipper.ship_once().delivered == 0
    record_into(recorder, [b"d"])
    assert shipper.ship_once().delivered == 1
    assert [request_data(r) for r in sink.records] == [
        b"a",
        b"b",
        b"c",
        b"d",
    ]
    assert stream.checkpoint().delivered == 4


def test_a_failing_sink_is_retried_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink failing its first calls gets the batch again; each record is stored once;
    the failures are logged once (not once per retry), and the recovery too."""
    spool = tmp_path / "spool"
    data = bodies(6, seed=1)
    dead_spool(spool, data)
    sink = FlakySink(failures=3)
    shipper = Shipper(spool, sink, backoff_initial=0.001, backoff_max=0.01)
    with caplog.at_level(logging.WARNING, logger="asgi_audit.shipping.shipper"):
        report = shipper.ship_once()
    assert report.delivered == 6
    assert sink.calls == 4 and shipper.failures == 3
    assert caplog.text.count("the sink cannot take 6 records") == 1
    assert "takes records again after 3 failures" in caplog.text
    check_delivered(sink.records, data)


def test_deadline_while_the_sink_is_down_stops_and_keeps_everything(tmp_path: Path) -> None:
    """Sink down past the deadline: ShippingStopped, checkpoint kept, shipped by a later pass."""
    spool = tmp_path / "spool"
    data = bodies(5, seed=2)
    dead_spool(spool, data)
    down = FlakySink(failures=10**9)
    shipper = Shipper(spool, down, backoff_initial=0.01, backoff_max=0.02)
    with pytest.raises(ShippingStopped):
        shipper.ship_once(timeout=0.2)
    assert down.calls >= 1 and down.records == []
    [stream] = streams(spool)
    assert stream.checkpoint() == Checkpoint("", 0, 0)
    assert sorted(r.request for r in spooled(spool)) == sorted(data)
    sink = MemorySink()
    assert Shipper(spool, sink).ship_once().delivered == 5
    check_delivered(all_records(sink), data)
    assert list(streams(spool)) == []
    sink.close()


class FailsAfter(FlakySink):
    """A sink that takes its first ``good`` batches, then stays down."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        if len(self.batches) >= self.good:
            raise ConnectionError("sink down")
        super().write_batch(records)


def test_batches_delivered_before_an_outage_are_not_shipped_again(tmp_path: Path) -> None:
    """Progress made before the sink went down is kept: the next pass ships only the rest."""
    spool = tmp_path / "spool"
    data = [b"%d" % i for i in range(7)]
    dead_spool(spool, data)
    first = FailsAfter(good=2)
    with pytest.raises(ShippingStopped):
        Shipper(spool, first, batch_records=2, backoff_initial=0.01).ship_once(timeout=0.2)
    assert [request_data(r) for r in first.records] == data[:4]
    [stream] = streams(spool)
    assert stream.checkpoint().delivered == 4
    second = FlakySink()
    assert Shipper(spool, second, batch_records=2).ship_once().delivered == 3
    assert [request_data(r) for r in second.records] == data[4:]


def test_stop_event_interrupts_the_backoff(tmp_path: Path) -> None:
    """A set stop event ends a pass waiting for a down sink, without advancing anything."""
    spool = tmp_path / "spool"
    dead_spool(spool, [b"x"])
    stop = threading.Event()
    stop.set()
    with pytest.raises(ShippingStopped):
        Shipper(spool, FlakySink(failures=1), backoff_initial=30).ship_once(stop=stop)
    assert [r.request for r in spooled(spool)] == [b"x"]


def test_dead_stream_with_a_torn_tail_is_repaired_and_shipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead stream's torn tail is cut and reported, the rest shipped, the stream removed."""
    spool = tmp_path / "spool"
    data = [b"one", b"two", b"three"]
    dead_spool(spool, data)
    [stream] = streams(spool)
    [segment] = stream.segments()
    path = stream.directory / segment
    last = record_frames(path)[-1]
    with open(path, "r+b") as handle:  # cut the last record's frame in the middle
        handle.truncate(last.end - 20)
    sink = MemorySink()
    with caplog.at_level(logging.WARNING, logger="asgi_audit.recording.spool"):
        report = Shipper(spool, sink).ship_once()
    assert report.repaired_bytes > 0
    assert report.delivered == 2 and report.adopted == [stream.name]
    assert "torn" in caplog.text
    assert sorted(request_data(r) for r in all_records(sink)) == [
        b"one",
        b"two",
    ]
    assert not stream.directory.exists()
    sink.close()


def test_a_live_writers_torn_tail_is_left_alone(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """A live writer's unfinished frame is not cut; the frames before it are shipped."""
    spool = tmp_path / "spool"
    recorder = live_recorder(recorders, spool)
    record_into(recorder, [b"whole"])
    [stream] = streams(spool)
    [segment] = stream.segments()
    path = stream.directory / segment
    good = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b"AAB1\x00\x00")  # the first bytes of a frame being written
    sink = FlakySink()
    report = Shipper(spool, sink).ship_once()
    assert report.delivered == 1 and report.repaired_bytes == 0
    assert path.stat().st_size == good + 6
    assert stream.checkpoint().offset == good


def test_delivered_segments_are_deleted_the_active_one_kept(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """On a live stream, delivered segments are deleted and the active one is kept."""
    spool = tmp_path / "spool"
    recorder = live_recorder(recorders, spool, segment_age=0.0)
    record_into(recorder, [b"1", b"2", b"3", b"4"], each_flushed=True)
    [stream] = streams(spool)
    before = stream.segments()
    assert len(before) == 5  # the first holds the stream's first chain checkpoint
    sink = FlakySink()
    assert Shipper(spool, sink).ship_once().delivered == 4
    assert stream.segments() == before[-1:]
    assert stream.directory.exists()


def test_keep_delivered_keeps_segments(tmp_path: Path, recorders: list[SpoolRecorder]) -> None:
    """keep_delivered=True ships but deletes nothing."""
    spool = tmp_path / "spool"
    recorder = live_recorder(recorders, spool, segment_age=0.0)
    record_into(recorder, [b"1", b"2", b"3"], each_flushed=True)
    [stream] = streams(spool)
    before = stream.segments()
    sink = FlakySink()
    assert Shipper(spool, sink, keep_delivered=True).ship_once().delivered == 3
    assert stream.segments() == before
    assert Shipper(spool, sink, keep_delivered=True).ship_once().delivered == 0
    assert len(sink.records) == 3


def test_many_streams_are_all_shipped(tmp_path: Path, recorders: list[SpoolRecorder]) -> None:
    """Dead and live streams in one spool are shipped in one pass; only the dead go."""
    spool = tmp_path / "spool"
    dead_spool(spool, [b"dead-1", b"dead-2"])
    live = live_recorder(recorders, spool)
    record_into(live, [b"live"])
    sink = FlakySink()
    report = Shipper(spool, sink).ship_once()
    assert report.delivered == 3
    assert [s.name for s in streams(spool)] == [live.stream]


def test_an_adopted_stream_is_not_removed_under_a_new_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer arriving while a dead stream is removed is refused, not deleted under."""
    spool = tmp_path / "spool"
    directory = spool / "streams" / "s"
    directory.mkdir(parents=True)  # a stale stream directory, never written
    os.utime(directory, (time.time() - 3600, time.time() - 3600))
    original = StreamDirectory.remove
    arrived: list[SegmentWriter] = []
    refused: list[Exception] = []

    def remove(self: StreamDirectory) -> None:
        writer = SegmentWriter(spool, "s")
        try:
            writer.open()
            arrived.append(writer)
        except SpoolError as exc:
            refused.append(exc)
        original(self)

    monkeypatch.setattr(StreamDirectory, "remove", remove)
    Shipper(spool, FlakySink()).ship_once()
    for writer in arrived:
        alive = (writer.directory / "writer.lock").exists()
        writer.close()
        assert alive, "the live writer's stream was deleted under it"
    assert len(refused) == 1


def test_a_starting_writers_empty_directory_is_left_alone(tmp_path: Path) -> None:
    """A fresh stream directory without segments is left alone; a stale one is removed."""
    spool = tmp_path / "spool"
    fresh = spool / "streams" / "fresh"
    stale = spool / "streams" / "stale"
    fresh.mkdir(parents=True)
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    Shipper(spool, FlakySink()).ship_once()
    assert [s.name for s in streams(spool)] == ["fresh"]
    assert list(fresh.iterdir()) == []
    writer = SegmentWriter(spool, "fresh")
    writer.open()
    writer.close()


def test_shipper_lock_is_exclusive(tmp_path: Path) -> None:
    """Only one holder ships a spool: a second lock fails until the first is released."""
    first, second = ShipperLock(tmp_path), ShipperLock(tmp_path)
    assert not second.held_elsewhere()
    assert first.acquire()
    try:
        assert not second.acquire()
        assert second.held_elsewhere()
        assert not first.held_elsewhere()
        assert first.acquire()  # asking again while holding it keeps it
        assert not second.acquire()
    finally:
        first.release()
    assert second.acquire()
    second.release()


def test_shipper_thread_delivers_everything_by_stop(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """A ShipperThread ships while records arrive; stop() makes a last pass and joins."""
    spool = tmp_path / "spool"
    recorder = live_recorder(recorders, spool)
    sink = MemorySink()
    before = len(threads_named("asgi-audit-shipper"))
    shipper = ShipperThread(spool, sink)
    shipper.start()
    first = bodies(5, seed=3)
    record_into(recorder, first)
    assert wait_until(lambda: sink.count() == 5)
    second = bodies(5, seed=4)
    record_into(recorder, second)
    assert recorder.shutdown(timeout=30)
    assert shipper.stop(30)
    assert len(threads_named("asgi-audit-shipper")) == before
    check_delivered(all_records(sink), first + second)
    assert list(streams(spool)) == []
    assert ShipperLock(spool).acquire()
    sink.close()


class StuckSink(FlakySink):
    """A sink whose first write blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        self.entered.set()
        self.release.wait(30)
        super().write_batch(records)


def test_shipper_thread_stop_that_times_out_reports_it_and_frees_the_lock(
    tmp_path: Path,
) -> None:
    """stop() timing out on a stuck sink says False; the thread still frees the lock."""
    spool = tmp_path / "spool"
    dead_spool(spool, [b"x"])
    sink = StuckSink()
    shipper = ShipperThread(spool, sink)
    shipper.start()
    assert sink.entered.wait(30)
    assert not shipper.stop(0.1)
    sink.release.set()
    assert wait_until(lambda: not threads_named("asgi-audit-shipper"), timeout=30)
    lock = ShipperLock(spool)
    assert lock.acquire()
    lock.release()
    assert len(sink.records) == 1


@pytest.mark.timeout(120)
def test_shipper_process_ships_and_exits_cleanly(
    tmp_path: Path, recorders: list[SpoolRecorder]
) -> None:
    """A child process ships a recorder's records to SQLite and exits 0 on stop()."""
    spool = tmp_path / "spool"
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    recorder = live_recorder(recorders, spool)
    child = ShipperProcess(spool, url)
    child.start()
    process = child.process
    assert process is not None
    try:
        first = bodies(4, seed=5)
        record_into(recorder, first)

        def stored() -> int:
            if not (tmp_path / "audit.db").exists():
                return 0
            with closing(open_sink(url)) as store:
                return store.count()

        assert wait_until(lambda: stored() == 4, timeout=60)
        second = bodies(3, seed=6)
        record_into(recorder, second)
        assert recorder.shutdown(timeout=30)
        assert child.stop(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    assert process.returncode == 0
    with closing(open_sink(url)) as store:
        check_delivered(all_records(store), first + second)
    assert list(streams(spool)) == []


def test_shipper_process_defers_to_a_lock_holder(tmp_path: Path) -> None:
    """With the spool's shipper lock held (a sidecar), the child waits for it: it opens
    no sink, and stops cleanly when asked."""
    lock = ShipperLock(tmp_path)
    assert lock.acquire()
    try:
        child = ShipperProcess(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}")
        child.start()
        time.sleep(1.0)
        assert child.running()
        assert child.stop(2)
    finally:
        lock.release()
    assert not os.path.exists(tmp_path / "audit.db")


@pytest.mark.timeout(120)
def test_shipper_process_stopped_right_after_start_still_makes_its_last_pass(
    tmp_path: Path,
) -> None:
    """A child stopped right after start still makes its last pass and exits 0."""
    spool = tmp_path / "spool"
    data = bodies(3, seed=7)
    dead_spool(spool, data)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    child = ShipperProcess(spool, url)
    child.start()
    process = child.process
    assert process is not None
    try:
        assert child.stop(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    assert process.returncode == 0
    with closing(open_sink(url)) as store:
        check_delivered(all_records(store), data)


SHIP = [sys.executable, "-m", "asgi_audit", "ship"]


def test_a_standby_child_waits_for_the_lock_and_exits_cleanly(tmp_path: Path) -> None:
    """A child shipper that finds the spool's lock taken waits for it (the holder may be
    a stopping process's shipper); asked to stop, it waits until its drain deadline, then
    exits 0 saying who delivers, with no other output (its stdin watcher must not abort
    the interpreter at exit)."""
    import subprocess

    lock = ShipperLock(tmp_path)
    assert lock.acquire()
    environment = {**os.environ, "ASGI_AUDIT_SINK": f"sqlite:///{tmp_path / 'audit.db'}"}
    try:
        for _ in range(3):  # the abort was a race at exit: try it a few times
            child = subprocess.Popen(
                [*SHIP, "--spool", str(tmp_path), "--child-of", str(os.getpid())],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environment,
            )
            assert child.stdin is not None and child.stderr is not None
            with pytest.raises(subprocess.TimeoutExpired):
                child.wait(timeout=1.5)  # waiting for the lock, not gone
            child.stdin.write(b"drain 0.5\n")
            child.stdin.close()
            returncode = child.wait(timeout=60)
            errors = child.stderr.read().decode()
            child.stderr.close()
            assert returncode == 0
            assert "another shipper still held" in errors
            assert "Traceback" not in errors and "Fatal" not in errors
    finally:
        lock.release()


def test_a_sidecar_waits_for_a_store_that_cannot_be_opened_yet(tmp_path: Path) -> None:
    """`asgi-audit ship` keeps the spool and retries while the store cannot be opened (its
    directory is not there yet), then delivers everything and stops on SIGTERM."""
    import signal
    import subprocess
    import sys

    spool = tmp_path / "spool"
    data = bodies(5)
    dead_spool(spool, data)
    blocker = tmp_path / "store"
    blocker.write_bytes(b"not a directory yet")
    url = f"sqlite:///{blocker / 'audit.db'}"
    shipper = subprocess.Popen(
        [sys.executable, "-m", "asgi_audit", "ship", "--spool", str(spool), "--sink", url],
        stderr=subprocess.PIPE,
    )
    try:
        assert shipper.stderr is not None
        assert b"cannot open the sink" in shipper.stderr.readline() + shipper.stderr.readline()
        blocker.unlink()
        blocker.mkdir()

        def delivered() -> int:
            if not (blocker / "audit.db").exists():
                return 0
            with closing(open_sink(url, create=False)) as store:
                return store.count()

        assert wait_until(lambda: delivered() == len(data), timeout=60)
        shipper.send_signal(signal.SIGTERM)
        assert shipper.wait(60) == 0
    finally:
        if shipper.poll() is None:
            shipper.kill()
            shipper.wait(30)
        if shipper.stderr is not None:
            shipper.stderr.close()


def test_compressible_bodies_travel_packed_and_are_compressed_once(tmp_path: Path) -> None:
    """JSON-like bodies are zstd-packed in the spool (a fraction of their size on disk),
    come back exact with their digests, and the store keeps the spool's packed bytes as
    they are; incompressible bodies travel as captured."""
    spool = tmp_path / "spool"
    document = b'{"lines": [%s]}' % b", ".join(
        b'{"sku": "SKU-%06d", "quantity": %d}' % (i, i % 7) for i in range(6000)
    )
    noise = random.Random(3).randbytes(50_000)
    data = [document, noise, b"tiny"]
    dead_spool(spool, data, memory_limit=1 << 20)
    raw = sum(len(body) for body in data) * 2
    on_disk = sum(path.stat().st_size for path in spool.rglob("*") if path.is_file())
    assert on_disk < raw / 3  # the document (2 x ~210 kB) shrinks; the noise does not
    by_body = {r.request: r for r in spooled(spool)}
    assert set(by_body) == set(data) and all("spool_packed" not in r.meta for r in by_body.values())
    packed = by_body[document]
    assert packed.request_packed is not None and packed.response_packed is not None
    assert len(packed.request_packed) < len(document) / 5
    assert by_body[noise].request_packed is None and by_body[b"tiny"].request_packed is None
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    with closing(open_sink(url)) as sink:
        assert Shipper(spool, sink).ship_once().delivered == 3
        check_delivered(all_records(sink), data)
    with closing(sqlite3.connect(tmp_path / "audit.db")) as db:
        rows = db.execute(
            "SELECT request_body, request_encoding, response_encoding FROM records"
        ).fetchall()
        described = [json.loads(m) for (m,) in db.execute("SELECT metadata FROM records")]
    kept = {encoding: body for body, encoding, _ in rows}
    assert kept["zstd"] == packed.request_packed  # compressed in the spool writer only
    assert sorted(encoding for _, _, encoding in rows) == ["identity", "identity", "zstd"]
    # bodies that reached the store packed only are still described by their plain size
    sizes = sorted(
        m["request_body"]["stored_size"] for m in described if m["request_body"]["stored"]
    )
    assert sizes == sorted(len(body) for body in data)
