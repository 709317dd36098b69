"""SpoolRecorder: the writer thread between the request path and the spool.

The request path calls :meth:`SpoolRecorder.try_submit`: an append to a deque under a
lock, nothing more. The writer thread wakes when a batch has gathered (by count or
bytes), when asked to flush, or when the batch window (``interval``) has passed, takes
everything queued, redacts and frames it, and appends it to the spool as one frame with
one write; then syncs according to ``fsync``:

* ``always``: every record is written and synced before it counts as acknowledged
  (the writer is woken for each record);
* ``batch`` (default): written at least every ``interval``, synced at most that often;
  a SIGKILL loses at most what was still queued, a power loss at most one window;
* ``off``: written, never synced (the kernel decides).

Lifecycle, after OpenTelemetry's ``BatchProcessor``: constructing it starts nothing;
:meth:`start` (at lifespan startup, or by the first :meth:`try_submit` of a process)
starts the thread and does nothing else, since it runs on the event loop. Everything that
touches the disk happens on the writer thread: the stream's directory, its lock and its
first segment are made when the first batch is written, so an app that never audits an
exchange leaves no trace in the spool. :meth:`flush` and :meth:`shutdown` take a timeout
in seconds. A forked child starts afresh (``_forks``). The thread never raises into the
app: a failing write is retried with exponential backoff (0.05 s doubling to 5 s), counted,
and logged once per kind of error with a summary a minute; a stream that cannot be opened
loses the batch (counted in ``lost``) and refuses exchanges for ``retry_seconds`` before
trying again.

A failed sync is fatal for what was written since the last good one ("fsyncgate": the
kernel may have dropped those pages, and a second sync can succeed without writing them).
So every frame written since the last good sync is kept in memory (a large record: its
spill files) until a sync covers it; when one fails, the segment is sealed, a new one is
started and those frames are written to it again, and only a sync that succeeds
acknowledges them. The sealed segment may hold copies: sinks ignore an id they hold.

``Exchange.on_written``: each exchange accepted by :meth:`SpoolRecorder.try_submit` is
told exactly once, on the writer thread, whether its record is kept (written and synced
per ``fsync``; written, with ``off``) or not (lost, dropped, not encodable, or given up at
the shutdown deadline). An exchange carrying one wakes the writer at once, and the sync
that follows covers everything written meanwhile: one sync for many waiting responses.

A body whose bytes cannot be read (its spill failed) costs only its own record those
bytes: the record is written without them, saying why in its ``error``
(``bodies_not_kept``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .._forks import after_fork
from ..capture.record import Body, Exchange
from ..capture.settings import DEFAULT_SECRET_HEADERS, FsyncPolicy, Overflow
from ..errors import RecorderClosed, SpoolError
from . import packing, stats
from .chain import StreamChain
from .frames import (
    CHECKPOINT,
    KIND,
    PACKED,
    RECORD_HEADER,
    encode_frame,
    frame_crc,
    frame_header,
    record_header,
)
from .handoff import RoomSignal, memory_weight
from .metadata import exchange_metadata
from .redact import Step, header_redactor, query_redactor, run_pipeline
from .redact_body import UNPARSEABLE, BodyRedaction, BodyRedactor, body_kind
from .redact_query import QueryRedactor
from .signing import Signer
from .spool import SegmentWriter, spool_bytes

logger = logging.getLogger("asgi_audit.recorder")

MAX_FRAME_BYTES = 16 << 20
TAKE_RECORDS = 256
"""The most records one turn of the writer takes from the queue. A response held by
``overflow="block"`` waits for the writer's next take, that is for it to finish the
current one: kept to a few milliseconds of work (~10 ms of small records), the wait at
saturation is that, not the time to write a whole queue of them (~0.5 s for 10,000)."""
INLINE_HASH = 64 << 10
"""Bodies smaller than this are hashed (and packed) on the writer thread itself, not by
the hasher's threads."""
HASHER_THREADS = 2
"""A large body's digest and its compression, each on its own thread."""
PACK_IN_WRITER = 4 << 10
"""Bodies smaller than this are left unpacked in the spool (the sink packs them)."""
REDACT_LIMIT = 8 << 20
"""A body with redaction rules and more stored bytes than this is not parsed in the
writer: it is stored as the unparseable marker (unless ``redact_unparseable="keep"``)."""
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
"""Seconds between retries of a failing write or sync: doubling from the first to the
most."""
SUMMARY_SECONDS = 60.0
"""A failure that goes on is summed up in the log at most this often."""
BODIES = ("request", "response")
STATS_SECONDS = 1.0
"""How often the writer publishes its counters for the shipper's ``/metrics``."""

FramedRecord = tuple[bytes, list[bytes], list[bytes]]
"""One record ready for a frame: encoded metadata, request chunks, response chunks."""

Hook = Callable[[], None]
"""Called on the writer thread (see ``on_start``, ``on_open``, ``on_tick``)."""


class SpoolRecorder:
    """Bounded queue, writer thread, spool segments: the durable ``Recorder``.

    ``on_start`` runs on the writer thread when it starts, ``on_open`` once the stream is
    open (its first batch), ``on_tick`` every ``tick_seconds``: the durable path starts and
    watches the shipper from there, never from the event loop."""

    def __init__(
        self,
        spool: str | os.PathLike[str],
        *,
        service: str = "asgi",
        stream: Callable[[], str] | None = None,
        fsync: FsyncPolicy = "batch",
        interval: float = 0.05,
        max_records: int = 10_000,
        max_bytes: int = 64 << 20,
        batch_records: int = 64,
        batch_bytes: int = 8 << 20,
        segment_bytes: int = 64 << 20,
        segment_age: float = 60.0,
        disk_cap: int | None = None,
        overflow: Overflow = "block",
        redact_headers: Iterable[str] = DEFAULT_SECRET_HEADERS,
        redact_query: Iterable[str] = (),
        body_redactor: BodyRedactor | None = None,
        signer: Signer | None = None,
        checkpoint_interval: float = 60.0,
        on_start: Hook | None = None,
        on_open: Hook | None = None,
        on_tick: Hook | None = None,
        tick_seconds: float = 5.0,
        retry_seconds: float = 1.0,
        extra_stats: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        self.root = Path(spool)
        self.service = service
        self._stream_of = stream
        self.fsync = fsync
        self.interval = interval
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.segment_bytes = segment_bytes
        self.segment_age = segment_age
        self.disk_cap = disk_cap
        self.overflow = overflow
        self.pipeline: list[Step] = [
            header_redactor(redact_headers),
            query_redactor(QueryRedactor(redact_query)),
        ]
        self.body_redactor = body_redactor
        """Redacts JSON and form bodies before they are hashed and packed (None: kept
        as they are)."""
        self.signer = signer
        self.checkpoint_interval = checkpoint_interval
        self.checkpoints = 0
        """Checkpoints written (the stream's chain: :mod:`.chain`)."""
        self.bodies_redacted = 0
        self._on_start = on_start
        self._on_open = on_open
        self._on_tick = on_tick
        self.tick_seconds = tick_seconds
        self.retry_seconds = retry_seconds
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.lost = 0
        """Exchanges taken from the queue but not written: the stream could not be opened,
        or the shutdown deadline passed while the spool could not be written."""
        self.sync_failures = 0
        """Syncs that failed (each one rewrote what it should have covered)."""
        self.bodies_not_kept = 0
        """Bodies left out of their record because their bytes could not be read."""
        self.callback_errors = 0
        """``on_written`` callbacks that raised."""
        self.body_bytes = 0
        """Bytes of the bodies of the records written (as received, before truncation)."""
        self.takes = 0
        self.taken_records = 0
        self.take_seconds = 0.0
        """Batches taken from the queue and written, the exchanges in them, the seconds
        they took (published as ``batches``, ``batch_records``, ``batch_seconds``)."""
        self._extra_stats = extra_stats
        """More counters to publish (the middleware's: exchanges dropped, failures)."""
        self._stats_at = 0.0
        self._write_log = _FailureLog("spool write", "retrying with backoff")
        self._sync_log = _FailureLog(
            "spool sync", "writing the unsynced records again to a new segment"
        )
        self._body_log = _FailureLog("reading a spilled body", "its record is written without it")
        self._writer: SegmentWriter | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self._sidekick: ThreadPoolExecutor | None = None
        self._starting = threading.Lock()
        self._reset()
        after_fork(self._after_fork)

    def _after_fork(self) -> None:
        self._starting = threading.Lock()  # the parent may have held it while forking
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.forget()  # inherited descriptors: closed here, the parent keeps its lock
        self._reset()

    def _reset(self) -> None:
        """A fresh, idle recorder (at construction, and in a forked child: the parent's
        queue, thread and stream stay the parent's)."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        """Notified when records are acknowledged (``flush`` waits on it)."""
        self._work = threading.Condition(self._lock)
        """Notified when the writer has something to do (it waits on it, idle)."""
        self._queue: deque[tuple[Exchange, int]] = deque()
        self._bytes = 0
        self._refused = False
        self._closing = False
        self._closed = False
        self._refuse_until = 0.0
        self._flush_asked = 0
        self._flushed = 0
        self._submitted = 0
        self._thread: threading.Thread | None = None
        self._room = RoomSignal()
        self._seq = 0
        self._pending: list[_Written] = []
        """Frames written since the last good sync (writer thread only)."""
        self._unacknowledged = 0
        """Exchanges taken but not yet counted for ``flush`` (writer thread only)."""
        self._suspect = False
        """A sync failed and none has succeeded since."""
        self._give_up_at: float | None = None
        """Set by ``shutdown(timeout)``: past it, a writer that is retrying gives up."""
        self._gave_up = False
        self.stream = ""
        self._chain: StreamChain | None = None
        self._checkpoint_at = 0.0

    # -- the request path ------------------------------------------------------------

    def try_submit(self, exchange: Exchange, *, force: bool = False) -> bool:
        if self._thread is None and not self._closed:
            self.start()
        weight = memory_weight(exchange)
        with self._lock:
            if self._closing or self._closed:
                # Refused outright, not "full": nothing will make room again (an
                # overflow="block" caller would wait for room forever).
                raise RecorderClosed("the spool recorder is shut down")
            if self._refuse_until and time.monotonic() < self._refuse_until:
                raise SpoolError(f"spool stream {self.stream} cannot be opened (see the log)")
            queued = len(self._queue)
            if (
                not force
                and queued
                and (queued >= self.max_records or self._bytes + weight > self.max_bytes)
            ):
                self._refused = True
                return False
            self._queue.append((exchange, weight))
            self._bytes += weight
            self._submitted += 1
            if (
                self.fsync == "always"
                or exchange.on_written is not None
                or queued + 1 >= self.batch_records
                or self._bytes >= self.batch_bytes
            ):
                self._work.notify()
        return True

    async def room(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:  # checked and registered together: a take is never missed
            if not self._refused:
                return
            waiter = self._room.register(loop)
        await waiter

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread, and nothing else (this runs on the event loop). A
        recorder that was shut down starts again with an empty queue."""
        with self._starting:
            if self._thread is not None and not self._closed:
                return
            if self._closed:
                self._reset()
            # The start time keeps a reused pid (PID 1 in every container restart) from
            # naming the stream of an earlier process, which the shipper may be adopting.
            self.stream = (
                self._stream_of()
                if self._stream_of
                else f"{self.service}.{os.getpid()}.{time.time_ns()}"
            )
            self._chain = StreamChain(self.stream, self.service, signer=self.signer)
            thread = threading.Thread(target=self._run, name="asgi-audit-recorder", daemon=True)
            self._thread = thread
            thread.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written (and synced unless ``off``),
        or given up (``lost``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._thread is None:
                return True
            target = self._submitted
            self._flush_asked = max(self._flush_asked, target)
            self._work.notify()
            while self._flushed < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def shutdown(self, timeout: float | None = None) -> bool:
        """Drain the queue into the spool, stop the thread, release the stream; False when
        ``timeout`` passed first. The thread then finishes on its own, unless it is
        retrying a spool that cannot be written: then it gives up (what it holds is lost,
        and told so through ``on_written``)."""
        with self._lock:
            thread = self._thread
            self._closing = True
            if timeout is not None:
                give_up = time.monotonic() + timeout
                earlier = self._give_up_at
                self._give_up_at = give_up if earlier is None else min(earlier, give_up)
            self._work.notify_all()
            self._wake.notify_all()
        if thread is None:
            self._closed = True
            return True
        thread.join(timeout)
        drained = not thread.is_alive()
        if drained:
            self._closed = True
        return drained and not self._gave_up

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._hook(self._on_start, "start")
        last_sync = last_tick = time.monotonic()
        # A large body's digest and compression run beside its redaction scan (all
        # three without the GIL): the writer is one thread, and doing them in turn made
        # it the pipeline's slowest stage.
        hasher = self._hasher = ThreadPoolExecutor(
            HASHER_THREADS, thread_name_prefix="asgi-audit-hasher"
        )
        self._sidekick = ThreadPoolExecutor(1, thread_name_prefix="asgi-audit-sidekick")
        try:
            while True:
                batch, closing = self._next_batch()
                if batch:
                    self._unacknowledged += len(batch)
                    started = time.perf_counter()
                    self._record(batch)
                    self.takes += 1
                    self.taken_records += len(batch)
                    self.take_seconds += time.perf_counter() - started
                now = time.monotonic()
                if self._writer is not None and (
                    closing or now - self._checkpoint_at >= self.checkpoint_interval
                ):
                    self._write_checkpoint(self._writer, final=closing)
                if self._pending and self._sync_due(now - last_sync, closing):
                    self._sync_pending()
                    last_sync = now
                if not self._pending:
                    self._acknowledge()
                if self._on_tick is not None and now - last_tick >= self.tick_seconds:
                    last_tick = now
                    self._hook(self._on_tick, "periodic check")
                if now - self._stats_at >= STATS_SECONDS:
                    self._stats_at = now
                    self._publish_stats()
                if closing:
                    break
        except _GiveUp:
            self._gave_up = True
            logger.warning(
                "asgi-audit: the shutdown deadline passed while the spool could not be "
                "written; the records not yet kept are lost"
            )
        except Exception:
            self.errors += 1
            logger.error("asgi-audit: the spool writer stopped", exc_info=True)
        finally:
            hasher.shutdown(wait=True)
            self._sidekick.shutdown(wait=True)
            self._sidekick = None
            self._finish()

    def stats(self) -> dict[str, float]:
        """The counters and gauges the shipper's ``/metrics`` sums (:mod:`.stats`)."""
        values: dict[str, float] = {
            "written": self.written,
            "body_bytes": self.body_bytes,
            "dropped": self.dropped,
            "lost": self.lost,
            "errors": self.errors,
            "bodies_redacted": self.bodies_redacted,
            "batches": self.takes,
            "batch_records": self.taken_records,
            "batch_seconds": self.take_seconds,
            "queue_records": len(self._queue),
            "queue_bytes": self._bytes,
        }
        if self._extra_stats is not None:
            with contextlib.suppress(Exception):
                values.update(self._extra_stats())
        return values

    def _publish_stats(self) -> None:
        """Replace the stream's ``stats.json`` (nothing before the stream is open)."""
        writer = self._writer
        if writer is None:
            return
        with contextlib.suppress(OSError):  # the next second tries again
            stats.publish(writer.directory, self.stats())

    def _next_batch(self) -> tuple[list[Exchange], bool]:
        """What is queued (after waiting up to ``interval`` for something to do), and
        whether this is the last batch before the thread ends."""
        with self._lock:
            if not self._queue and not self._closing and self._flush_asked <= self._flushed:
                self._work.wait(self.interval)
            return self._take(), self._closing and not self._queue

    def _sync_due(self, elapsed: float, closing: bool) -> bool:
        """Whether to sync what was written: per the policy, at the end, for a flush, or at
        once for an exchange whose response waits for its record (``on_written``): one
        sync then covers everything written meanwhile (group commit)."""
        return (
            self.fsync == "always"
            or closing
            or elapsed >= self.interval
            or self._flush_asked > self._flushed
            or any(written.waiting for written in self._pending)
        )

    def _finish(self) -> None:
        """The thread ends (shut down, gave up at the shutdown deadline, or failed): every
        exchange it still holds is settled, and the stream released."""
        self._publish_stats()
        writer, self._writer = self._writer, None
        pending, self._pending = self._pending, []
        kept = not self._suspect
        if writer is not None:
            try:
                writer.close()
            except Exception:
                kept = False
                self.errors += 1
                logger.warning("asgi-audit: could not close the spool stream", exc_info=True)
        for written in pending:
            self._settle_written(written, kept)
        with self._lock:
            leftovers = [exchange for exchange, _ in self._queue]
            self._queue.clear()
            self._bytes = 0
            self._thread = None
            self._closed = self._closing
            self._flushed = self._submitted
            self._unacknowledged = 0
            self._wake.notify_all()
        self._room.notify_all()
        self._lose(leftovers)

    def _open(self) -> SegmentWriter | None:
        """Open this process's stream (directory, writer lock, first segment), on the
        writer thread; None when that fails, warning at the first failure and again once
        the stream opens (the retries between are logged at debug level)."""
        writer = SegmentWriter(
            self.root,
            self.stream,
            segment_bytes=self.segment_bytes,
            segment_age=self.segment_age,
            durable=self.fsync != "off",
        )
        try:
            writer.open()
        except Exception as exc:  # OSError, SpoolError (held by another live writer), ...
            with contextlib.suppress(Exception):
                writer.close()
            self.errors += 1
            with self._lock:
                first = not self._refuse_until
                self._refuse_until = time.monotonic() + self.retry_seconds
            (logger.warning if first else logger.debug)(
                "asgi-audit: cannot open spool stream %s (%s); exchanges are being lost",
                writer.directory,
                exc,
            )
            return None
        with self._lock:
            if self._refuse_until:
                logger.warning("asgi-audit: spool stream %s is open again", writer.directory)
            self._refuse_until = 0.0
        self._writer = writer
        self._write_checkpoint(writer, final=False)  # the stream's first: it is ours
        self._hook(self._on_open, "open")
        return writer

    def _write_checkpoint(self, writer: SegmentWriter, *, final: bool) -> None:
        """Append the stream's next checkpoint (held for the next sync like a record)."""
        chain = self._chain
        assert chain is not None  # made by start(), before the thread
        self._checkpoint_at = time.monotonic()
        checkpoint = chain.checkpoint(at_ns=time.time_ns(), final=final)
        header, payload = encode_frame([({KIND: CHECKPOINT, CHECKPOINT: checkpoint}, [], [])])
        self._retrying(lambda: writer.append(header, payload))
        self.checkpoints += 1
        self._hold(_Written([], header, payload))

    def _record(self, batch: list[Exchange]) -> None:
        # The cap is judged on what the spool held before this batch (and before the
        # stream's first checkpoint, which a new stream writes first).
        self._respect_disk_cap(batch)
        if not batch:
            return
        writer = self._writer or self._open()
        if writer is None:
            self._lose(batch)
            return
        try:
            self._write(writer, batch)
        except Exception:  # a bug: never let one batch stop the writer for good
            self.errors += 1
            logger.warning("asgi-audit: could not write a batch", exc_info=True)

    def _lose(self, exchanges: list[Exchange]) -> None:
        """Exchanges taken but not written (no stream, or the thread ends)."""
        if exchanges:
            self.lost += len(exchanges)
            self._settle(exchanges, False)
            _discard(exchanges)

    def _hook(self, hook: Hook | None, what: str) -> None:
        if hook is None:
            return
        try:
            hook()
        except Exception:
            self.errors += 1
            logger.warning("asgi-audit: %s hook of the spool writer failed", what, exc_info=True)

    def _take(self) -> list[Exchange]:
        taken: list[Exchange] = []
        size = 0
        while self._queue and (not taken or (size < MAX_FRAME_BYTES and len(taken) < TAKE_RECORDS)):
            exchange, weight = self._queue.popleft()
            self._bytes -= weight
            size += weight
            taken.append(exchange)
        if taken and self._refused:
            self._refused = False
            self._room.notify_all()
        return taken

    def _acknowledge(self) -> None:
        """Count everything taken so far as done for :meth:`flush`: called only when
        nothing written awaits a sync, so the count never runs ahead of an earlier record
        still waiting for one."""
        if not self._unacknowledged:
            return
        with self._lock:
            self._flushed += self._unacknowledged
            self._unacknowledged = 0
            if self._flush_asked and self._flushed >= self._flush_asked:
                self._wake.notify_all()

    def _settle(self, exchanges: Iterable[Exchange], kept: bool) -> None:
        """Tell each exchange whose response waits for its record whether it is kept. Runs
        on the writer thread without the lock; a callback that raises is counted, never
        allowed to stop the writer."""
        for exchange in exchanges:
            callback = exchange.on_written
            if callback is None:
                continue
            try:
                callback(kept)
            except Exception:
                self.callback_errors += 1
                (logger.debug if self.callback_errors > 1 else logger.warning)(
                    "asgi-audit: an on_written callback failed", exc_info=True
                )

    # -- writing a batch -------------------------------------------------------------------

    def _write(self, writer: SegmentWriter, batch: list[Exchange]) -> None:
        """Encode and append a batch: records joined into frames carrying at most
        MAX_FRAME_BYTES, a large record streamed into a frame of its own. Whatever goes
        wrong, each exchange ends up written (held until synced) or settled as not kept,
        exactly once."""
        waiting = deque(batch)
        records: list[_Small | _Large] = []
        size = 0
        try:
            while waiting:
                record = self._encode(waiting.popleft())
                if record is None:
                    continue
                records.append(record)
                size += record.carried
                if size >= MAX_FRAME_BYTES:
                    self._append_records(writer, records)
                    size = 0
            self._append_records(writer, records)
        except BaseException:
            chain = self._chain
            for record in records:  # numbered and chained, never written
                if chain is not None:
                    chain.lose(record.seq)
            self._lose([record.exchange for record in records] + list(waiting))
            raise

    def _append_records(self, writer: SegmentWriter, records: list[_Small | _Large]) -> None:
        """Append ``records`` in order, each leaving the list once written: a run of small
        ones as one frame, a large one as a frame of its own."""
        while records:
            first = records[0]
            if isinstance(first, _Large):
                written, taken = self._append_large(writer, first), 1
            else:
                run = _leading_small(records)
                written, taken = self._append_small(writer, run), len(run)
            del records[:taken]
            self.written += len(written.exchanges)
            self.body_bytes += sum(e.request_size + e.response_size for e in written.exchanges)
            self._hold(written)

    def _hold(self, written: _Written) -> None:
        """Keep a written frame until a sync covers it (with ``fsync="off"`` it counts as
        kept at once)."""
        if self.fsync == "off":
            self._settle_written(written, True)
        else:
            self._pending.append(written)

    def _settle_written(self, written: _Written, kept: bool) -> None:
        self._settle(written.exchanges, kept)
        if written.large is not None:
            _discard(written.exchanges)  # its spill files, kept until now

    def _append_small(self, writer: SegmentWriter, records: list[_Small]) -> _Written:
        header, payload = encode_frame([(r.meta, r.request, r.response) for r in records])
        self._retrying(lambda: writer.append(header, payload))
        exchanges = [record.exchange for record in records]
        _discard(exchanges)  # the frame holds their bytes now: spill files can go
        return _Written(exchanges, header, payload)

    def _append_large(self, writer: SegmentWriter, record: _Large) -> _Written:
        """Stream a large record from its spill files into a frame (read twice: once for
        the checksum its header carries, once to write, which comes from the page cache).
        A spill file that cannot be read any more is left out, as :meth:`_encode` does."""
        while True:
            try:
                self._retrying(
                    functools.partial(
                        writer.append_stream, record.header, record.parts, record.length
                    )
                )
            except _Unreadable as failure:
                shown = self._without(record.shown, failure)
                refitted = self._framed(record.exchange, shown, record.seq)
                if isinstance(refitted, _Small):
                    return self._append_small(writer, [refitted])
                record = refitted
                continue
            return _Written([record.exchange], record.header, large=record)

    def _sync_pending(self) -> None:
        """Sync what was written since the last good sync, then settle it as kept.

        A failed ``fdatasync`` may have dropped those pages, and a retry can report
        success without writing them ("fsyncgate"): so the segments written since the
        last good sync are sealed (never appended to again; the shipper still reads them,
        and a sink ignores an id it holds), and the frames are written again, from
        memory, to a new segment, until a sync succeeds."""
        writer = self._writer
        assert writer is not None  # pending frames were written by it
        delay = BACKOFF_FIRST
        while True:
            try:
                writer.sync()
                break
            except OSError as exc:
                self.errors += 1
                self.sync_failures += 1
                self._suspect = True
                self._sync_log.failed(exc)
                writer.seal()
                self._pause(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                self._rewrite(writer)
        self._sync_log.recovered()
        self._suspect = False
        done, self._pending = self._pending, []
        for written in done:
            self._settle_written(written, True)

    def _rewrite(self, writer: SegmentWriter) -> None:
        """Write every pending frame again (the segment starts afresh after ``seal``)."""
        for index, written in enumerate(self._pending):
            if written.large is not None:
                self._pending[index] = self._append_large(writer, written.large)
            else:
                assert written.payload is not None
                self._retrying(functools.partial(writer.append, written.header, written.payload))

    def _retrying(self, write: Callable[[], None]) -> None:
        """Run ``write`` until it works: the disk may be full for a while, and the queue
        before the writer bounds what waits meanwhile. Retries back off exponentially,
        and are logged by kind, not one traceback per attempt."""
        delay = BACKOFF_FIRST
        while True:
            try:
                write()
                break
            except OSError as exc:
                self.errors += 1
                self._write_log.failed(exc)
                self._pause(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self._write_log.recovered()

    def _pause(self, seconds: float) -> None:
        """Wait before a retry; raises :class:`_GiveUp` once a shutdown's deadline has
        passed, so that a disk that stays broken cannot hold the thread for ever."""
        end = time.monotonic() + seconds
        with self._lock:
            while True:
                now = time.monotonic()
                if self._give_up_at is not None and now >= self._give_up_at:
                    raise _GiveUp
                if now >= end:
                    return
                limit = end if self._give_up_at is None else min(end, self._give_up_at)
                self._work.wait(limit - now)

    def _respect_disk_cap(self, batch: list[Exchange]) -> None:
        while self._over_disk_cap():
            if self._closing and self.overflow == "block":
                # Shutting down: writing past the cap loses nothing, waiting for the
                # shipper to make room could outlast the shutdown deadline.
                logger.warning("asgi-audit: spool over its disk cap at shutdown; writing anyway")
                return
            if self.overflow == "drop":
                self.dropped += len(batch)
                logger.warning("asgi-audit: spool over its disk cap; dropping %d", len(batch))
                self._settle(batch, False)
                _discard(batch)
                batch.clear()
                return
            time.sleep(self.interval)

    def _over_disk_cap(self) -> bool:
        if self.disk_cap is None:
            return False
        try:
            return spool_bytes(self.root) >= self.disk_cap
        except OSError:  # cannot tell: writing is what the spool is for
            logger.debug("asgi-audit: cannot measure the spool", exc_info=True)
            return False

    # -- encoding a record -------------------------------------------------------------------

    def _encode(self, exchange: Exchange) -> _Small | _Large | None:
        """One record ready to append, with the next ``seq``; None when it cannot be
        encoded at all (a lone surrogate in a path): skipped alone, counted, settled."""
        seq = self._seq + 1
        try:
            record = self._framed(exchange, self._readable(exchange), seq)
        except Exception:
            self.errors += 1
            logger.warning("asgi-audit: could not encode a record", exc_info=True)
            self._settle([exchange], False)
            _discard([exchange])
            return None
        self._seq = seq
        return record

    def _readable(self, exchange: Exchange) -> Exchange:
        """The exchange as its record will tell it: a body whose spill failed (the spill
        worker raised: a full disk) stands in as not kept, so that it costs only its own
        record its bytes, and never the batch."""
        shown = exchange
        for name in BODIES:
            body = _body(shown, name)
            if body is None:
                continue
            try:
                if body.sent_path is not None:
                    body.file_size()
                else:
                    body.known_sha256()
                    _ = body.stored_size
            except Exception as exc:
                what = "sent file unreadable" if body.sent_path else "spill failed"
                shown = self._without(shown, _Unreadable(name, f"{what}: {exc}", exc))
        return shown

    def _without(self, exchange: Exchange, failure: _Unreadable) -> Exchange:
        """``exchange`` with the body that failed standing in as not kept (its size as
        counted so far), and why in its ``error``."""
        self.bodies_not_kept += 1
        self._body_log.failed(failure.cause)
        body = _body(exchange, failure.body)
        assert body is not None
        stand_in = Body(
            size=max(body.size, 0),
            complete=body.complete,
            truncated=body.truncated,
            skipped=True,
        )
        note = f"{failure.body} body not kept: {failure.reason}"
        error = f"{exchange.error}; {note}" if exchange.error else note
        if failure.body == "request":
            return dataclasses.replace(exchange, request_body=stand_in, error=error)
        return dataclasses.replace(exchange, response_body=stand_in, error=error)

    def _framed(self, exchange: Exchange, shown: Exchange, seq: int) -> _Small | _Large:
        """:meth:`_frame_record`, leaving out each body that turns out unreadable."""
        while True:  # ends: each failure leaves one more body out of the record
            try:
                return self._frame_record(exchange, shown, seq)
            except _Unreadable as failure:
                shown = self._without(shown, failure)

    def _frame_record(self, exchange: Exchange, shown: Exchange, seq: int) -> _Small | _Large:
        """``shown`` (``exchange`` as its record tells it) encoded as record ``seq``;
        raises :class:`_Unreadable` when a kept body's bytes cannot be read."""
        request, response = _kept(shown.request_body), _kept(shown.response_body)
        request_size, response_size = _stored_size(request), _stored_size(response)
        # A record too large for memory is streamed from its spill files, unread: a body
        # of it that has redaction rules cannot be redacted, so it is not kept.
        large = request_size + response_size >= MAX_FRAME_BYTES
        # Only a body of REDACT_LIMIT or more can be too large to redact: the usual
        # record skips the question (and the header scans it takes).
        checked = large or max(request_size, response_size) >= REDACT_LIMIT
        if checked:
            carried = self._carried(request, "request", shown.request_headers, large)
            carried += self._carried(response, "response", shown.response_headers, large)
        else:
            carried = request_size + response_size
        if carried >= MAX_FRAME_BYTES:
            # Spilled bodies weigh nothing in the queue: a large one is streamed from its
            # spill file into a frame of its own, never held in memory whole.
            shown, about = self._unredactable(shown, request, response)
            request, response = _kept(shown.request_body), _kept(shown.response_body)
            meta = self._draft(shown, seq, about=about)
            return _Large.checked(exchange, shown, seq, meta, request, response)
        packed: list[str] = []
        packed_response: list[str] = []
        about = {}
        about_response: dict[str, dict[str, Any]] = {}
        sidekick = self._sidekick
        beside = None
        if sidekick is not None and min(request_size, response_size) >= INLINE_HASH:
            # Two large bodies: the request's is read, scanned and packed on the
            # sidekick thread while this one does the response's (without the GIL, both).
            beside = sidekick.submit(
                self._pack,
                request,
                "request",
                shown.request_headers,
                packed,
                about,
                large,
                checked,
            )
            request_chunks: list[bytes] = []
        else:
            request_chunks = self._pack(
                request, "request", shown.request_headers, packed, about, large, checked
            )
        response_chunks = self._pack(
            response,
            "response",
            shown.response_headers,
            packed_response,
            about_response,
            large,
            checked,
        )
        if beside is not None:
            request_chunks = beside.result()
        packed += packed_response
        about.update(about_response)
        self.bodies_redacted += sum(
            1 for entry in about.values() if "redacted" in entry or entry.get("unparseable")
        )
        meta = self._draft(shown, seq, packed, about)
        return _Small(exchange, seq, carried, meta, request_chunks, response_chunks)

    def _unredactable(
        self, shown: Exchange, request: Body | None, response: Body | None
    ) -> tuple[Exchange, dict[str, dict[str, Any]]]:
        """A large record as it is streamed: each body with redaction rules stands in as
        the unparseable marker (it cannot be read whole to be redacted), with the digest
        of the body as received; ``about`` holds each body's digests."""
        about: dict[str, dict[str, Any]] = {}
        for name, body, headers in (
            ("request", request, shown.request_headers),
            ("response", response, shown.response_headers),
        ):
            if body is None:
                continue
            if not self._too_large_to_redact(body, name, headers, True):
                about[name] = {"stored_sha256": _stored_digest(body, name)}
                continue
            about[name] = {
                "sha256": body.known_sha256() or body.sha256(),
                "stored_sha256": _sha256(UNPARSEABLE),
                "unparseable": True,
            }
            stand_in = Body(
                size=body.size,
                complete=body.complete,
                truncated=body.truncated,
                chunks=[UNPARSEABLE],
            )
            self.bodies_redacted += 1
            if name == "request":
                shown = dataclasses.replace(shown, request_body=stand_in)
            else:
                shown = dataclasses.replace(shown, response_body=stand_in)
        return shown, about

    def _carried(
        self, body: Body | None, name: str, headers: list[tuple[bytes, bytes]], large: bool
    ) -> int:
        """The bytes ``body`` will put in the frame (a marker for one too large to
        redact)."""
        if self._too_large_to_redact(body, name, headers, large):
            return len(UNPARSEABLE)
        return _stored_size(body)

    def _too_large_to_redact(
        self, body: Body | None, name: str, headers: list[tuple[bytes, bytes]], large: bool
    ) -> bool:
        """Whether a body with redaction rules is too large to be parsed here (itself, or
        the record it is part of, which is then streamed unread): it is then stored as
        the unparseable marker (``redact_unparseable="redact"``), never in clear and
        never held in memory whole."""
        redactor = self.body_redactor
        return (
            redactor is not None
            and redactor.unparseable == "redact"
            and body is not None
            and (large or body.stored_size >= REDACT_LIMIT)
            and _has_rules(body, name, headers)
        )

    def _pack(
        self,
        body: Body | None,
        name: str,
        headers: list[tuple[bytes, bytes]],
        packed: list[str],
        about: dict[str, dict[str, Any]],
        large: bool,
        checked: bool = True,
    ) -> list[bytes]:
        """The body's bytes as the spool keeps them: redacted (JSON and form bodies), then
        zstd-packed when that pays (``name`` is then added to ``packed``). ``about[name]``
        gets the SHA-256 of the body as received (unless the tap knows it already) and of
        the bytes stored, which the chain covers, and what redaction replaced. Hashing
        and packing here, without the GIL, spare the copy into the frame, the checksums,
        the write, the sync and the shipper's read most of their bytes."""
        if body is None:
            return []
        entry: dict[str, Any] = {}
        about[name] = entry
        if checked and self._too_large_to_redact(body, name, headers, large):
            if body.known_sha256() is None:
                entry["sha256"] = body.sha256()
            entry.update(unparseable=True, stored_sha256=_sha256(UNPARSEABLE))
            return [UNPARSEABLE]
        chunks = list(_read_body(body, name))
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        hasher = self._hasher
        assert hasher is not None  # made by the writer thread, the only caller
        found = body.known_sha256()
        # Small bodies are hashed here: handing 1 kB to the hasher thread costs more (a
        # queue, a wake-up, GIL hand-offs) than hashing it.
        large_data = len(data) >= INLINE_HASH
        received = hasher.submit(_sha256, data) if large_data and not found else None
        # A large body is packed beside its redaction scan, as if nothing were found
        # (nearly always so): the scan, the digest and the compression, all without the
        # GIL, then take the longest of them rather than their sum.
        guessed = hasher.submit(packing.pack, data) if large_data else None
        stored = data
        redaction = self._redact(data, headers)
        if redaction is not None:
            stored = redaction.data
            entry.update(redacted=redaction.paths, unparseable=redaction.unparseable)
        own = redaction is not None or body.truncated  # stored differs from received
        big = len(stored) >= INLINE_HASH
        stored_digest = hasher.submit(_sha256, stored) if own and big else None
        # Small bodies are not packed here: the shipper's process packs them for the sink
        # (``kept_bytes``), off the app's GIL; a zstd frame for 1 kB would save the spool
        # little and cost the writer a call per body.
        if guessed is not None and stored is data:
            small = guessed.result()
        else:
            small = packing.pack(stored) if len(stored) >= PACK_IN_WRITER else None
        digest = found or (received.result() if received is not None else _sha256(data))
        if found is None:
            entry["sha256"] = digest
        if not own:
            entry["stored_sha256"] = digest
        else:
            entry["stored_sha256"] = (
                stored_digest.result() if stored_digest is not None else _sha256(stored)
            )
        if small is None:
            return chunks if stored is data else [stored]
        packed.append(name)
        return [small]

    def _redact(self, data: bytes, headers: list[tuple[bytes, bytes]]) -> BodyRedaction | None:
        redactor = self.body_redactor
        if redactor is None or not data:
            return None
        content_type, encoding = _content_headers(headers)
        return redactor.redact(data, content_type, encoding)

    def _draft(
        self,
        exchange: Exchange,
        seq: int,
        packed: list[str] | None = None,
        about: dict[str, dict[str, Any]] | None = None,
    ) -> bytes:
        """The record's metadata, redacted, chained and encoded, as record ``seq``;
        ``packed`` names the bodies the spool keeps zstd-packed, ``about`` what the writer
        learnt of each body (digests, redaction)."""
        meta = exchange_metadata(exchange)
        meta = run_pipeline(self.pipeline, meta)
        for name, found in (about or {}).items():
            meta[f"{name}_body"].update(found)
        chain = self._chain
        assert chain is not None  # made by start(), before the thread
        meta["stream"] = chain.stream  # the stream whose chain it joins (the same name,
        # unless a recorder is used without the middleware's identity)
        # Chained and encoded here, one record at a time: a record that cannot be encoded
        # (a lone surrogate in a path) is skipped alone, and leaves no gap in ``seq``.
        # Linked before ``packed`` is added: until then the metadata is its own
        # canonical form, which the chain hashes as it is.
        chain.link(meta, seq)
        if packed:
            meta[PACKED] = packed
        return orjson.dumps(meta)


class _GiveUp(BaseException):
    """The shutdown deadline passed while the writer was retrying. A BaseException, so
    that no ``except Exception`` on the way mistakes it for one record's failure."""


class _Unreadable(Exception):
    """A kept body's bytes cannot be read (its spill failed, its file went away): its
    record is written without them. Never an OSError: those mean the spool itself failed
    and are retried."""

    def __init__(self, body: str, reason: str, cause: BaseException) -> None:
        super().__init__(f"{body} body: {reason}")
        self.body = body
        self.reason = reason
        self.cause = cause


@dataclass(slots=True)
class _Small:
    """A record joined in memory, ready to share a frame."""

    exchange: Exchange
    seq: int
    carried: int
    meta: bytes
    request: list[bytes]
    response: list[bytes]


@dataclass(slots=True)
class _Large:
    """A record whose stored bodies reach MAX_FRAME_BYTES (spilled to disk): written as a
    frame of its own, streamed from its spill files, which stay until the frame is synced
    (it may have to be written again)."""

    exchange: Exchange
    shown: Exchange
    seq: int
    meta: bytes
    request: Body | None
    response: Body | None
    carried: int
    length: int = 0
    header: bytes = b""

    @classmethod
    def checked(
        cls,
        exchange: Exchange,
        shown: Exchange,
        seq: int,
        meta: bytes,
        request: Body | None,
        response: Body | None,
    ) -> _Large:
        """The record with its frame header, whose checksum needs a first read of the
        bodies; raises :class:`_Unreadable` when that read fails."""
        carried = _stored_size(request) + _stored_size(response)
        record = cls(exchange, shown, seq, meta, request, response, carried)
        record.length = RECORD_HEADER.size + len(meta) + carried
        head = record_header(meta, _stored_size(request), _stored_size(response))
        crc = zlib.crc32(meta, zlib.crc32(head, frame_crc(record.length)))
        crc = _body_crc(request, "request", crc)
        record.header = frame_header(_body_crc(response, "response", crc), record.length)
        return record

    def parts(self) -> Iterator[bytes]:
        yield record_header(self.meta, _stored_size(self.request), _stored_size(self.response))
        yield self.meta
        yield from _read_body(self.request, "request")
        yield from _read_body(self.response, "response")


@dataclass(slots=True)
class _Written:
    """A frame appended since the last good sync: its bytes (or the large record to stream
    again) are kept until a sync covers it, and its exchanges settled then."""

    exchanges: list[Exchange]
    header: bytes
    payload: bytes | None = None
    large: _Large | None = None

    @property
    def waiting(self) -> bool:
        """Whether a response waits for this frame's sync (``on_written``)."""
        return any(exchange.on_written is not None for exchange in self.exchanges)


class _FailureLog:
    """Failures of one operation, logged by kind (errno): a warning with its traceback the
    first time, then at most one summary a minute while it goes on, and a line when it
    works again. A disk that stays full must not write a traceback per retry."""

    def __init__(self, what: str, then: str) -> None:
        self.what = what
        self.then = then
        self._kinds: dict[object, _Kind] = {}

    def failed(self, exc: BaseException) -> None:
        key = getattr(exc, "errno", None) or type(exc).__name__
        now = time.monotonic()
        kind = self._kinds.get(key)
        if kind is None:
            self._kinds[key] = _Kind(time.time(), now)
            logger.warning(
                "asgi-audit: %s failed (%s); %s", self.what, exc, self.then, exc_info=exc
            )
            return
        kind.count += 1
        if now - kind.reported >= SUMMARY_SECONDS:
            kind.reported = now
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(kind.since))
            logger.warning(
                "asgi-audit: %s failed %d times since %s (last: %s)",
                self.what,
                kind.count,
                since,
                exc,
            )

    def recovered(self) -> None:
        if not self._kinds:
            return
        failures = sum(kind.count for kind in self._kinds.values())
        self._kinds.clear()
        logger.warning("asgi-audit: %s works again, after %d failures", self.what, failures)


@dataclass(slots=True)
class _Kind:
    since: float
    reported: float
    count: int = 1


def _leading_small(records: list[_Small | _Large]) -> list[_Small]:
    run: list[_Small] = []
    for record in records:
        if not isinstance(record, _Small):
            break
        run.append(record)
    return run


def _body(exchange: Exchange, name: str) -> Body | None:
    return exchange.request_body if name == "request" else exchange.response_body


def _kept(body: Body | None) -> Body | None:
    """The body whose bytes go into the spool (None when none are kept)."""
    if body is None or body.skipped or body.sent_path is not None:
        return None
    return body


def _stored_size(body: Body | None) -> int:
    return 0 if body is None else body.stored_size


def _read_body(body: Body | None, name: str) -> Iterator[bytes]:
    """The stored bytes of a body; a failure to read them is the body's, not the spool's."""
    if body is None:
        return
    try:
        yield from body.chunks()
    except OSError as exc:
        raise _Unreadable(name, f"spill file unreadable: {exc}", exc) from exc


def _body_crc(body: Body | None, name: str, crc: int) -> int:
    """``crc`` continued over a body's stored bytes, which must be as many as it says: a
    frame holds exactly what its header announces."""
    read = 0
    for chunk in _read_body(body, name):
        crc = zlib.crc32(chunk, crc)
        read += len(chunk)
    expected = _stored_size(body)
    if read != expected:
        problem = ValueError(f"{read} bytes where {expected} were stored")
        raise _Unreadable(name, f"spill file changed: {problem}", problem)
    return crc


def _discard(exchanges: Iterable[Exchange]) -> None:
    for exchange in exchanges:
        with contextlib.suppress(Exception):
            exchange.discard()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored_digest(body: Body | None, name: str) -> str | None:
    """SHA-256 of a large body's stored bytes: the tap's digest unless it was truncated
    (then its spill file is read once more)."""
    if body is None:
        return None
    found = body.known_sha256()
    if found is not None and not body.truncated:
        return found
    hasher = hashlib.sha256()
    for chunk in _read_body(body, name):
        hasher.update(chunk)
    return hasher.hexdigest()


def _content_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """The Content-Type and Content-Encoding of a message (latin-1), if any."""
    content_type = encoding = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = value.decode("latin-1")
        elif lowered == b"content-encoding":
            encoding = value.decode("latin-1")
    return content_type, encoding


def _has_rules(body: Body, name: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a body sent with ``headers`` has redaction rules (JSON or a form; one
    without a type that starts like JSON)."""
    kind = body_kind(_content_headers(headers)[0])
    if kind != "sniff":
        return kind is not None
    for chunk in _read_body(body, name):
        start = chunk.lstrip()
        if start:
            return start[:1] in (b"{", b"[")
    return False
