"""Shipper: from the spool to the sink, at least once.

It reads every stream's frames past its durable checkpoint, does the per-body CPU work
the sink needs (SHA-256 where the tap did not compute it), hands batches to the sink,
retries with exponential backoff and jitter while the sink is down, and moves the
checkpoint only after the sink has committed. Delivered segments are deleted; a dead
process's stream is adopted (torn tail cut off and reported), shipped, then removed.

Where it runs (a child process, a sidecar, a thread) is :mod:`.runners`' business.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ShippingStopped
from ..recording import packing
from ..recording.frames import Frame, SpooledRecord, Tail, decode_payload, read_frames
from ..recording.spool import Checkpoint, StreamDirectory, streams, try_lock, unlock
from ..sinks import BatchWriter
from ..sinks.record import StoredRecord

logger = logging.getLogger("asgi_audit.shipper")


EMPTY_STREAM_GRACE = 60.0
"""Seconds a stream directory without segments is left alone (its writer is starting)."""


@dataclass
class ShipReport:
    """What one pass delivered and repaired."""

    delivered: int = 0
    batches: int = 0
    repaired_bytes: int = 0
    adopted: list[str] = field(default_factory=list)
    pending_streams: int = 0


def stored_record(spooled: SpooledRecord) -> StoredRecord:
    """Settle a spooled record: digests computed where the tap and the spool writer left
    them out; bodies left packed (``decode_payload(unpack=False)``) stay packed only."""
    meta = dict(spooled.meta)
    kept: list[bytes | None] = []
    for name, data, packed in (
        ("request_body", spooled.request, spooled.request_packed),
        ("response_body", spooled.response, spooled.response_packed),
    ):
        packed_only = packed is not None and not data  # a packed body is never empty
        kept.append(None if packed_only else data)
        body = meta.get(name)
        if body is None:
            continue
        body = dict(body)
        if not body.get("sha256"):
            plain = packing.decode(packed, "zstd") if packed_only else data
            body["sha256"] = _digest(body, plain or b"")
        meta[name] = body
    record = StoredRecord.from_metadata(meta, kept[0], kept[1])
    if record.request_body is not None:
        record.request_body.packed = spooled.request_packed
    if record.response_body is not None:
        record.response_body.packed = spooled.response_packed
    return record


def _digest(body: dict[str, Any], data: bytes) -> str:
    path = body.get("sent_path")
    if path:
        hasher = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    hasher.update(block)
        except OSError:
            return ""
        return hasher.hexdigest()
    return hashlib.sha256(data).hexdigest()


class Shipper:
    """Delivers one spool directory to one sink."""

    def __init__(
        self,
        spool: str | os.PathLike[str],
        sink: BatchWriter,
        *,
        batch_records: int = 500,
        batch_bytes: int = 32 << 20,
        keep_delivered: bool = False,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
    ) -> None:
        self.root = Path(spool)
        self.sink = sink
        self.unpack = not getattr(sink, "keeps_packed", False)
        """Sinks that keep packed bodies as they are get them packed only (Sink docs)."""
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.keep_delivered = keep_delivered
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.failures = 0
        self.delivered = 0

    def ship_once(
        self, *, timeout: float | None = None, stop: threading.Event | None = None
    ) -> ShipReport:
        """Deliver everything the spool holds now; raises :class:`ShippingStopped` when
        ``timeout`` (seconds) passes, or ``stop`` is set, while the sink is down."""
        deadline = None if timeout is None else time.monotonic() + timeout
        report = ShipReport()
        for stream in streams(self.root):
            self._ship_stream(stream, report, deadline, stop)
        return report

    def _ship_stream(
        self,
        stream: StreamDirectory,
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        # A writer makes its directory, then locks it, then makes its first segment: a
        # young directory without segments is a writer starting, not a dead stream.
        try:
            if not stream.segments() and time.time() - stream.directory.stat().st_mtime < (
                EMPTY_STREAM_GRACE
            ):
                return
            # A dead stream's writer lock is held while it is repaired, shipped and
            # removed: a writer arriving meanwhile is refused, rather than having its
            # files deleted under it.
            adopted = try_lock(stream.directory / "writer.lock")
        except FileNotFoundError:  # removed meanwhile
            return
        try:
            self._ship_locked(stream, adopted is None, report, deadline, stop)
        finally:
            if adopted is not None:
                unlock(adopted)

    def _ship_locked(
        self,
        stream: StreamDirectory,
        alive: bool,
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        checkpoint = stream.checkpoint()
        segments = stream.segments()
        batch: list[StoredRecord] = []
        size = 0
        position = checkpoint
        for index, segment in enumerate(segments):
            if checkpoint.segment and segment < checkpoint.segment:
                continue
            last = index == len(segments) - 1
            start = checkpoint.offset if segment == checkpoint.segment else 0
            for item in read_frames(stream.directory / segment, start):
                if isinstance(item, Frame):
                    for spooled in decode_payload(item.payload, unpack=self.unpack):
                        record = stored_record(spooled)
                        batch.append(record)
                        size += len(spooled.request_packed or spooled.request)
                        size += len(spooled.response_packed or spooled.response)
                    position = Checkpoint(segment, item.end, position.delivered)
                    if len(batch) >= self.batch_records or size >= self.batch_bytes:
                        position = self._deliver(stream, batch, position, report, deadline, stop)
                        batch, size = [], 0
                    continue
                assert isinstance(item, Tail)
                if item.reason != "end" and not (alive and last):  # a live writer's tail
                    # may be a frame still being written; anywhere else it is damage
                    report.repaired_bytes += stream.truncate(segment, item.offset, item.reason)
                position = Checkpoint(segment, item.offset, position.delivered)
        if batch:
            position = self._deliver(stream, batch, position, report, deadline, stop)
        elif position != checkpoint and position.segment:
            stream.save_checkpoint(position)
        self._clean(stream, alive, report)

    def _deliver(
        self,
        stream: StreamDirectory,
        batch: list[StoredRecord],
        position: Checkpoint,
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> Checkpoint:
        delay = self.backoff_initial
        while True:
            try:
                self.sink.write_batch(batch)
                break
            except Exception as exc:
                self.failures += 1
                logger.warning(
                    "asgi-audit: sink refused %d records (%s); retrying in %.1fs",
                    len(batch),
                    exc,
                    delay,
                )
                pause = delay * random.uniform(0.5, 1.5)
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise ShippingStopped from exc
                if stop is not None:
                    if stop.wait(pause):
                        raise ShippingStopped from exc
                else:
                    time.sleep(pause)
                delay = min(delay * 2, self.backoff_max)
        delivered = Checkpoint(position.segment, position.offset, position.delivered + len(batch))
        stream.save_checkpoint(delivered)
        self.delivered += len(batch)
        report.delivered += len(batch)
        report.batches += 1
        return delivered

    def _clean(self, stream: StreamDirectory, alive: bool, report: ShipReport) -> None:
        """Delete delivered segments; remove a dead stream once it is fully delivered."""
        checkpoint = stream.checkpoint()
        segments = stream.segments()
        if not checkpoint.segment:
            if not alive and not segments:
                stream.remove()
            return
        done = [s for s in segments if s < checkpoint.segment]
        if not self.keep_delivered:
            for segment in done:
                stream.remove_segment(segment)
        remaining = [s for s in segments if s >= checkpoint.segment]
        fully = remaining == [checkpoint.segment] and (
            (stream.directory / checkpoint.segment).stat().st_size <= checkpoint.offset
        )
        if not alive and fully:
            report.adopted.append(stream.name)
            if not self.keep_delivered:
                stream.remove()
        elif remaining and not fully:
            report.pending_streams += 1

    def run(
        self, stop: threading.Event, *, poll: float = 0.2, on_pass: Callable[[], None] | None = None
    ) -> None:
        """Ship until ``stop`` is set, then make one last pass (the caller bounds it by
        stopping the sink or letting the process exit)."""
        while not stop.is_set():
            try:
                self.ship_once(stop=stop)
            except ShippingStopped:
                break
            except Exception:
                self.failures += 1
                logger.warning("asgi-audit: shipping pass failed", exc_info=True)
            if on_pass is not None:
                on_pass()
            stop.wait(poll)
