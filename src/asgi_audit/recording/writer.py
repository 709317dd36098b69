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
app: a failing write is retried, counted and logged; a stream that cannot be opened loses
the batch (counted in ``lost``) and refuses exchanges for ``retry_seconds`` before trying
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from .._forks import after_fork
from ..capture.record import Body, Exchange
from ..capture.settings import DEFAULT_SECRET_HEADERS, FsyncPolicy, Overflow
from ..errors import RecorderClosed, SpoolError
from . import packing
from .frames import PACKED, RECORD_HEADER, encode_frame, frame_header, record_header
from .handoff import RoomSignal, memory_weight
from .metadata import exchange_metadata
from .redact import Step, header_redactor, run_pipeline
from .spool import SegmentWriter, spool_bytes

logger = logging.getLogger("asgi_audit.recorder")

MAX_FRAME_BYTES = 16 << 20

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
        on_start: Hook | None = None,
        on_open: Hook | None = None,
        on_tick: Hook | None = None,
        tick_seconds: float = 5.0,
        retry_seconds: float = 1.0,
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
        self.pipeline: list[Step] = [header_redactor(redact_headers)]
        self._on_start = on_start
        self._on_open = on_open
        self._on_tick = on_tick
        self.tick_seconds = tick_seconds
        self.retry_seconds = retry_seconds
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.lost = 0
        """Exchanges taken from the queue but not written: the stream could not be opened."""
        self._writer: SegmentWriter | None = None
        self._hasher: ThreadPoolExecutor | None = None
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
        self.stream = ""

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
                or queued + 1 >= self.batch_records
                or self._bytes >= self.batch_bytes
            ):
                self._wake.notify()
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
            self._wake.notify()
            while self._flushed < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def shutdown(self, timeout: float | None = None) -> bool:
        """Drain the queue into the spool, stop the thread, release the stream; False when
        ``timeout`` passed first (the thread then finishes on its own)."""
        with self._lock:
            thread = self._thread
            self._closing = True
            self._wake.notify_all()
        if thread is None:
            self._closed = True
            return True
        thread.join(timeout)
        drained = not thread.is_alive()
        if drained:
            self._closed = True
        return drained

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._hook(self._on_start, "start")
        last_sync = last_tick = time.monotonic()
        unsynced = False
        written = 0  # records written since the last sync: acknowledged once synced
        # Hashing a body runs beside its compression (both without the GIL): the writer
        # is one thread, and doing both in turn made it the pipeline's slowest stage.
        hasher = self._hasher = ThreadPoolExecutor(1, thread_name_prefix="asgi-audit-hasher")
        try:
            while True:
                with self._lock:
                    if not self._queue and not self._closing and self._flush_asked <= self._flushed:
                        self._wake.wait(self.interval)
                    batch = self._take()
                    closing = self._closing and not self._queue
                if batch:
                    count = len(batch)  # _write may drop (clear) the batch: still taken
                    writer = self._writer or self._open()
                    if writer is None:
                        self._lose(batch)
                        self._acknowledge(count)
                    else:
                        try:
                            self._write(writer, batch)
                        except Exception:  # never let one batch stop the writer for good
                            self.errors += 1
                            logger.warning("asgi-audit: could not write a batch", exc_info=True)
                            self._discard(batch)
                        unsynced = True
                        written += count
                now = time.monotonic()
                writer = self._writer
                if (
                    writer is not None
                    and unsynced
                    and (
                        self.fsync == "always"
                        or closing
                        or (self.fsync == "batch" and now - last_sync >= self.interval)
                        or self._flush_asked > self._flushed
                    )
                    and self.fsync != "off"
                ):
                    self._sync(writer)
                    last_sync, unsynced = now, False
                if written and (not unsynced or self.fsync == "off"):
                    self._acknowledge(written)
                    written = 0
                if self._on_tick is not None and now - last_tick >= self.tick_seconds:
                    last_tick = now
                    self._hook(self._on_tick, "periodic check")
                if closing:
                    break
        finally:
            hasher.shutdown(wait=True)
            writer = self._writer
            self._writer = None
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
            with self._lock:
                self._thread = None
                self._closed = self._closing
                self._flushed = self._submitted
                self._wake.notify_all()

    def _open(self) -> SegmentWriter | None:
        """Open this process's stream (directory, writer lock, first segment), on the
        writer thread; None when that fails, warning at the first failure and again once
        the stream opens (the retries between are logged at debug level)."""
        writer = SegmentWriter(
            self.root, self.stream, segment_bytes=self.segment_bytes, segment_age=self.segment_age
        )
        try:
            writer.open()
        except (OSError, SpoolError) as exc:
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
        self._hook(self._on_open, "open")
        return writer

    def _lose(self, batch: list[Exchange]) -> None:
        self.lost += len(batch)
        self._discard(batch)

    @staticmethod
    def _discard(batch: list[Exchange]) -> None:
        for exchange in batch:
            with contextlib.suppress(Exception):
                exchange.discard()

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
        while self._queue and (not taken or size < MAX_FRAME_BYTES):
            exchange, weight = self._queue.popleft()
            self._bytes -= weight
            size += weight
            taken.append(exchange)
        if taken and self._refused:
            self._refused = False
            self._room.notify_all()
        return taken

    def _acknowledge(self, count: int) -> None:
        with self._lock:
            self._flushed += count
            if self._flush_asked and self._flushed >= self._flush_asked:
                self._wake.notify_all()

    def _write(self, writer: SegmentWriter, batch: list[Exchange]) -> None:
        self._respect_disk_cap(batch)
        records: list[FramedRecord] = []
        size = 0
        for exchange in batch:
            request, response = _kept(exchange.request_body), _kept(exchange.response_body)
            carried = _stored_size(request) + _stored_size(response)
            large = carried >= MAX_FRAME_BYTES
            try:
                if large:
                    meta = self._draft(exchange)
                else:
                    packed: list[str] = []
                    digests: dict[str, str] = {}
                    request_chunks = self._pack(request, "request", packed, digests)
                    response_chunks = self._pack(response, "response", packed, digests)
                    meta = self._draft(exchange, packed, digests)
            except Exception:
                self.errors += 1
                logger.warning("asgi-audit: could not encode a record", exc_info=True)
                continue
            if large:
                # Spilled bodies weigh nothing in the queue: a large one is streamed from
                # its spill file into a frame of its own, never held in memory whole.
                if records:
                    self._append(writer, records)
                    records, size = [], 0
                self._append_large(writer, meta, request, response, carried)
                continue
            records.append((meta, request_chunks, response_chunks))
            size += carried
            if size >= MAX_FRAME_BYTES:
                self._append(writer, records)
                records, size = [], 0
        if records:
            self._append(writer, records)
        for exchange in batch:
            exchange.discard()

    def _append(self, writer: SegmentWriter, records: list[FramedRecord]) -> None:
        header, payload = encode_frame(records)
        self._retrying(lambda: writer.append(header, payload))
        self.written += len(records)

    def _append_large(
        self,
        writer: SegmentWriter,
        meta: bytes,
        request: Body | None,
        response: Body | None,
        carried: int,
    ) -> None:
        """One record as its own frame, read in blocks twice: once for the checksum the
        header carries, once to write (the second read comes from the page cache)."""
        request_size, response_size = _stored_size(request), _stored_size(response)

        def parts() -> Iterator[bytes]:
            yield record_header(meta, request_size, response_size)
            yield meta
            yield from _chunks_of(request)
            yield from _chunks_of(response)

        crc = 0
        for part in parts():
            crc = zlib.crc32(part, crc)
        length = RECORD_HEADER.size + len(meta) + carried
        self._retrying(lambda: writer.append_stream(frame_header(crc, length), parts, length))
        self.written += 1

    def _retrying(self, write: Callable[[], None]) -> None:
        while True:
            try:
                write()
                return
            except OSError:
                self.errors += 1
                logger.warning("asgi-audit: spool write failed; retrying", exc_info=True)
                time.sleep(min(1.0, self.interval * 4))

    def _respect_disk_cap(self, batch: list[Exchange]) -> None:
        if self.disk_cap is None:
            return
        while spool_bytes(self.root) >= self.disk_cap:
            if self._closing and self.overflow == "block":
                # Shutting down: writing past the cap loses nothing, waiting for the
                # shipper to make room could outlast the shutdown deadline.
                logger.warning("asgi-audit: spool over its disk cap at shutdown; writing anyway")
                return
            if self.overflow == "drop":
                self.dropped += len(batch)
                logger.warning("asgi-audit: spool over its disk cap; dropping %d", len(batch))
                for exchange in batch:
                    exchange.discard()
                batch.clear()
                return
            time.sleep(self.interval)

    def _sync(self, writer: SegmentWriter) -> None:
        try:
            writer.sync()
        except OSError:
            self.errors += 1
            logger.warning("asgi-audit: spool sync failed", exc_info=True)

    def _pack(
        self, body: Body | None, name: str, packed: list[str], digests: dict[str, str]
    ) -> list[bytes]:
        """The body's bytes as the spool keeps them: zstd-packed when that pays (``name``
        is then added to ``packed``). Its SHA-256 goes into ``digests`` unless the tap
        knows it already, so that the shipper need not hash, or unpack, it. Packing here,
        without the GIL, spares the copy into the frame, the checksums, the write, the
        sync and the shipper's read most of their bytes."""
        chunks = _chunks(body)
        if body is None or body.stored_size < packing.MIN_SIZE:
            return chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        hasher = self._hasher
        assert hasher is not None  # made by the writer thread, the only caller
        digest = None if body.known_sha256() else hasher.submit(_sha256, data)
        small = packing.pack(data)
        if digest is not None:
            digests[name] = digest.result()
        if small is None:
            return chunks
        packed.append(name)
        return [small]

    def _draft(
        self,
        exchange: Exchange,
        packed: list[str] | None = None,
        digests: dict[str, str] | None = None,
    ) -> bytes:
        """The record's metadata, redacted and encoded, with the next ``seq``; ``packed``
        names the bodies the spool keeps zstd-packed, ``digests`` the ones computed here."""
        meta = exchange_metadata(exchange)
        meta["seq"] = self._seq + 1
        meta = run_pipeline(self.pipeline, meta)
        if packed:
            meta[PACKED] = packed
        for name, digest in (digests or {}).items():
            meta[f"{name}_body"]["sha256"] = digest
        # Encoded here, one record at a time: a record that cannot be encoded (a lone
        # surrogate in a path) is skipped alone, and leaves no gap in ``seq``.
        encoded = orjson.dumps(meta)
        self._seq += 1
        return encoded


def _kept(body: Body | None) -> Body | None:
    """The body whose bytes go into the spool (None when none are kept)."""
    if body is None or body.skipped or body.sent_path is not None:
        return None
    return body


def _stored_size(body: Body | None) -> int:
    return 0 if body is None else body.stored_size


def _chunks_of(body: Body | None) -> Iterator[bytes]:
    if body is not None:
        yield from body.chunks()


def _chunks(body: Body | None) -> list[bytes]:
    return list(_chunks_of(body))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
