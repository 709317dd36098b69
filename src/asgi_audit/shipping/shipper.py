"""Shipper: from the spool to the sink, at least once.

It reads every stream's frames past its durable checkpoint, does the per-body CPU work
the sink needs (SHA-256 where the tap did not compute it), hands batches to the sink,
retries with exponential backoff and jitter while the sink is down, and moves the
checkpoint only after the sink has committed. Delivered segments are deleted; a dead
process's stream is adopted (torn tail cut off and reported), shipped, then removed.

Where it runs (a child process, a sidecar, a thread) is :mod:`.runners`' business.
"""

from __future__ import annotations

import functools
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

from ..errors import RecordRefused, ShippingStopped
from ..recording import packing
from ..recording.frames import (
    CHECKPOINT,
    KIND,
    Damage,
    Frame,
    SpooledRecord,
    Tail,
    checkpoint_of,
    decode_payload,
    read_frames,
)
from ..recording.spool import Checkpoint, StreamDirectory, streams, try_lock, unlock
from ..sinks import BatchWriter
from ..sinks.record import StoredRecord
from .quarantine import Quarantine

logger = logging.getLogger("asgi_audit.shipper")


EMPTY_STREAM_GRACE = 60.0
"""Seconds a stream directory without segments is left alone (its writer is starting)."""


@dataclass
class ShipReport:
    """What one pass delivered, set aside and repaired."""

    delivered: int = 0
    batches: int = 0
    repaired_bytes: int = 0
    adopted: list[str] = field(default_factory=list)
    pending_streams: int = 0
    quarantined: int = 0
    checkpoints: int = 0
    damaged: list[tuple[str, str, int, int]] = field(default_factory=list)
    """Byte ranges skipped as damaged: (stream, segment, first byte, end)."""


Entry = tuple[SpooledRecord, StoredRecord]
"""A record on its way: as the spool holds it (for the quarantine) and as sinks take it."""


class _Batch(list[Entry]):
    """Records on their way, and the chain checkpoints read among them."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: list[dict[str, Any]] = []


def stored_record(spooled: SpooledRecord) -> StoredRecord:
    """Settle a spooled record: digests computed where the tap and the spool writer left
    them out; bodies left packed (``decode_payload(unpack=False)``) stay packed only."""
    request_packed, response_packed = spooled.request_packed, spooled.response_packed
    request = None if _packed_only(spooled.request, request_packed) else spooled.request
    response = None if _packed_only(spooled.response, response_packed) else spooled.response
    meta = spooled.meta
    if not (_digested(meta.get("request_body")) and _digested(meta.get("response_body"))):
        meta = _with_digests(spooled)
    record = StoredRecord.from_metadata(meta, request, response)
    if record.request_body is not None:
        record.request_body.packed = request_packed
    if record.response_body is not None:
        record.response_body.packed = response_packed
    return record


def _packed_only(data: bytes, packed: bytes | None) -> bool:
    """Whether a body was left packed: a packed body is never empty, so empty bytes
    beside packed ones mean the spool's reader did not unpack it."""
    return packed is not None and not data


def _digested(body: object) -> bool:
    """Whether a spooled body description needs nothing more (absent, or with its digest):
    the usual case, in which the spooled meta is read as it is, not copied."""
    return body is None or (type(body) is dict and bool(body.get("sha256")))


def _with_digests(spooled: SpooledRecord) -> dict[str, Any]:
    """A copy of the spooled meta with the bodies' missing digests computed (the spooled
    meta itself is left as read: the quarantine may still need it)."""
    meta = dict(spooled.meta)
    for name, data, packed in (
        ("request_body", spooled.request, spooled.request_packed),
        ("response_body", spooled.response, spooled.response_packed),
    ):
        packed_only = _packed_only(data, packed)
        body = meta.get(name)
        if body is None:
            continue
        body = dict(body)
        if not body.get("sha256"):
            plain = packing.decode(packed, "zstd") if packed_only else data
            body["sha256"] = _digest(body, plain or b"")
        meta[name] = body
    return meta


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
        self.delivered_bytes = 0
        """Body bytes (as received) of the records delivered."""
        self.quarantined = 0
        self.damaged_bytes = 0
        self.quarantine = Quarantine(self.root)
        self.failure_log = FailureLog()
        self._told_no_checkpoints = False

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
        batch = _Batch()
        size = 0
        position = checkpoint
        for index, segment in enumerate(segments):
            if checkpoint.segment and segment < checkpoint.segment:
                continue
            last = index == len(segments) - 1
            start = checkpoint.offset if segment == checkpoint.segment else 0
            for item in read_frames(stream.directory / segment, start):
                if isinstance(item, Frame):
                    for spooled in self._records(item, stream, segment, report):
                        found = checkpoint_of(spooled.meta)
                        if found is not None:
                            batch.checkpoints.append(found)
                            continue
                        entry = self._settle(spooled, stream, report)
                        if entry is None:
                            continue
                        batch.append(entry)
                        size += len(spooled.request_packed or spooled.request)
                        size += len(spooled.response_packed or spooled.response)
                    position = Checkpoint(segment, item.end, position.delivered)
                    if len(batch) >= self.batch_records or size >= self.batch_bytes:
                        position = self._deliver(stream, batch, position, report, deadline, stop)
                        batch, size = _Batch(), 0
                    continue
                if isinstance(item, Damage):
                    self._damaged(stream, segment, item.offset, item.end, item.reason, report)
                    position = Checkpoint(segment, item.end, position.delivered)
                    continue
                assert isinstance(item, Tail)
                if item.reason != "end" and not (alive and last):  # a live writer's tail
                    # may be a frame still being written; anywhere else it is damage
                    report.repaired_bytes += stream.truncate(segment, item.offset, item.reason)
                position = Checkpoint(segment, item.offset, position.delivered)
        if batch or batch.checkpoints:
            position = self._deliver(stream, batch, position, report, deadline, stop)
        elif position != checkpoint and position.segment:
            stream.save_checkpoint(position)
        self._clean(stream, alive, report)

    def _records(
        self, frame: Frame, stream: StreamDirectory, segment: str, report: ShipReport
    ) -> list[SpooledRecord]:
        """The records of a frame; a frame whose checksum holds but whose records cannot
        be decoded (written by a broken or unknown writer) is reported as damage."""
        try:
            return list(decode_payload(frame.payload, unpack=self.unpack))
        except Exception as exc:
            self._damaged(stream, segment, frame.offset, frame.end, f"undecodable ({exc})", report)
            return []

    def _settle(
        self, spooled: SpooledRecord, stream: StreamDirectory, report: ShipReport
    ) -> Entry | None:
        """The record as sinks take it; one that cannot be made into a record goes to
        the quarantine (None)."""
        try:
            return spooled, stored_record(spooled)
        except Exception as exc:
            self.quarantine.put(spooled, f"not a valid record: {exc!r}", stream.name)
            report.quarantined += 1
            self.quarantined += 1
            return None

    def _damaged(
        self,
        stream: StreamDirectory,
        segment: str,
        offset: int,
        end: int,
        reason: str,
        report: ShipReport,
    ) -> None:
        report.damaged.append((stream.name, segment, offset, end))
        self.damaged_bytes += end - offset
        logger.warning(
            "asgi-audit: spool segment %s is damaged at bytes %d-%d (%s); skipped, the "
            "records around it are shipped",
            stream.directory / segment,
            offset,
            end,
            reason,
        )

    def _deliver(
        self,
        stream: StreamDirectory,
        batch: _Batch,
        position: Checkpoint,
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> Checkpoint:
        """Deliver ``batch`` (records the sink refuses for good go to the quarantine),
        then its chain checkpoints, then move the spool's checkpoint past it."""
        if batch:
            self._write(stream, batch, report, deadline, stop)
        if batch.checkpoints:
            self._write_checkpoints(stream, batch.checkpoints, report, deadline, stop)
        delivered = Checkpoint(position.segment, position.offset, position.delivered + len(batch))
        stream.save_checkpoint(delivered)
        return delivered

    def _write(
        self,
        stream: StreamDirectory,
        batch: list[Entry],
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        """Write ``batch``, retrying while the sink is unavailable. A batch it refuses for
        what it holds is split in halves until the refused records are alone (or named
        by the sink), and those are quarantined."""
        pending = [batch]
        while pending:
            part = pending.pop()
            try:
                records = [record for _, record in part]
                self._write_retrying(
                    functools.partial(self.sink.write_batch, records), len(records), deadline, stop
                )
            except RecordRefused as refused:
                named = set(refused.ids)
                if named and any(record.id in named for _, record in part):
                    self._set_aside([e for e in part if e[1].id in named], refused, stream, report)
                    rest = [e for e in part if e[1].id not in named]
                    if rest:
                        pending.append(rest)
                elif len(part) == 1:
                    self._set_aside(part, refused, stream, report)
                else:
                    middle = len(part) // 2
                    pending.extend((part[middle:], part[:middle]))
                continue
            self.delivered += len(part)
            self.delivered_bytes += sum(r.request_size + r.response_size for _, r in part)
            report.delivered += len(part)
            report.batches += 1

    def _set_aside(
        self,
        entries: list[Entry],
        refused: RecordRefused,
        stream: StreamDirectory,
        report: ShipReport,
    ) -> None:
        reason = str(refused)
        cause = refused.__cause__
        if cause is not None and str(cause) and str(cause) not in reason:
            reason = f"{reason}: {cause}"
        for spooled, _ in entries:
            self.quarantine.put(spooled, reason, stream.name)
        report.quarantined += len(entries)
        self.quarantined += len(entries)

    def _write_checkpoints(
        self,
        stream: StreamDirectory,
        checkpoints: list[dict[str, Any]],
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        """Store the chain's checkpoints beside the records (a sink without checkpoints,
        a test's, is told once); one the sink refuses goes to the quarantine."""
        write = getattr(self.sink, "write_checkpoints", None)
        if write is None:
            if not self._told_no_checkpoints:
                self._told_no_checkpoints = True
                logger.warning(
                    "asgi-audit: %r keeps no checkpoints; the chain cannot be verified there",
                    self.sink,
                )
            return
        try:
            self._write_retrying(lambda: write(checkpoints), len(checkpoints), deadline, stop)
        except RecordRefused as refused:
            for found in checkpoints:
                meta = {KIND: CHECKPOINT, CHECKPOINT: found}
                self.quarantine.put(SpooledRecord(meta, b"", b""), str(refused), stream.name)
            report.quarantined += len(checkpoints)
            self.quarantined += len(checkpoints)
            return
        report.checkpoints += len(checkpoints)

    def _write_retrying(
        self,
        write: Callable[[], None],
        count: int,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        """``write()`` (one call to the sink) until it succeeds; :class:`RecordRefused` is
        raised to the caller, any other error is taken for a sink that is unavailable for
        now."""
        delay = self.backoff_initial
        while True:
            try:
                write()
            except RecordRefused:
                raise
            except Exception as exc:
                self.failures += 1
                self.failure_log.failed(exc, count, delay)
                pause = delay * random.uniform(0.5, 1.5)
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise ShippingStopped from exc
                if stop is not None:
                    if stop.wait(pause):
                        raise ShippingStopped from exc
                else:
                    time.sleep(pause)
                delay = min(delay * 2, self.backoff_max)
                continue
            self.failure_log.succeeded()
            return

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


class FailureLog:
    """Logs a sink's failures without flooding: the first of each kind as a warning,
    then one summary a minute while they go on, and one line when the sink recovers."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._kinds: dict[str, int] = {}
        self._since = 0.0
        self._last_summary = 0.0
        self._total = 0

    def failed(self, exc: BaseException, records: int, delay: float) -> None:
        now = time.monotonic()
        kind = type(exc).__name__
        if not self._total:
            self._since = self._last_summary = now
        self._total += 1
        if kind not in self._kinds:
            self._kinds[kind] = 1
            logger.warning(
                "asgi-audit: the sink cannot take %d records (%s: %s); the spool keeps "
                "them, retrying in %.1f s and backing off",
                records,
                kind,
                exc,
                delay,
            )
            return
        self._kinds[kind] += 1
        if now - self._last_summary >= self.every:
            self._last_summary = now
            logger.warning(
                "asgi-audit: the sink has failed %d times in %.0f s (%s); still retrying",
                self._total,
                now - self._since,
                ", ".join(f"{k} x{n}" for k, n in self._kinds.items()),
            )

    def succeeded(self) -> None:
        if self._total:
            logger.warning(
                "asgi-audit: the sink takes records again after %d failures in %.0f s",
                self._total,
                time.monotonic() - self._since,
            )
            self._kinds.clear()
            self._total = 0
