"""The S3 sink: writes batches as immutable objects, and reads them back through indexes.

Objects cannot be appended to or updated in place, so every ``write_batch`` writes new
objects and never changes one: a data object per batch (and stream), then its index
objects. Nothing reads a data object without an index, so a crash between the two leaves
nothing visible, and the retry completes it.

Idempotency and duplicates. The shipper delivers at least once. A batch delivered again
after a crash has the same stream and first/last sequence numbers, hence the same keys;
every PUT is create-only, so the copy already there stays (no second version in a
versioned or locked bucket) and the write counts as done. If what is there differs from
the new batch (the shipper's redaction changed between attempts), the stored object wins
and the indexes are built from it, so they always describe the data they point to. A
batch may also come back with other boundaries (the shipper may re-batch): then the
records it shares with the earlier batch are stored twice, under two keys. Readers
de-duplicate by record id within an hour partition (both copies started at the same time,
so they are always in the same one): the first occurrence in key order wins, key order
being stream then first sequence number, then position in the batch. A re-delivered copy
is the same spool record as the original, so which copy wins does not change what readers
get. ``count`` counts distinct ids.

Refusals. A record whose bodies cannot fit one object (:data:`MAX_OBJECT_BYTES`, the
single-PUT limit) or cannot be encoded is refused before anything is sent, naming it. A
PUT the store refuses for its key or bytes (:class:`~.bucket.ObjectRefused`) refuses the
records of that object: all of them when the key was refused (they share the stream that
names it), the one record when the object held one, else the batch without ids (the
shipper splits it). Keys themselves are bounded (:mod:`.keys`), so a long stream id no
longer makes one.

Checkpoints. One object per checkpoint, ``checkpoints/<stream>/<index>.json`` (see
:mod:`.keys`), holding its JSON text as given (see :mod:`asgi_audit.sinks.checkpoint_rows`),
written with the same create-only PUT as data (Object Lock retention included), so a
re-delivered checkpoint finds its key taken and the first copy stays. Reads list the
prefix (of one stream's segment, or all) and GET each object: a read of N checkpoints
costs N GETs, fine for the few a stream writes. The stream is taken from the JSON, whole,
so a bounded segment never mixes two streams.

Costs: a write is 1 + (hours touched) PUTs. A search lists the hour prefixes of its range
(directly for ranges up to :data:`DIRECT_HOURS`, else by discovering the days and hours that
exist) and reads each listed index once per sink (an LRU cache; indexes never change);
a search by stream reads only the indexes under that stream's segments.
``get`` looks first in the hour of the id's UUIDv7 time and the hour before (the id is made
when the exchange ends), then in every hour. ``count`` reads every index.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ...errors import ConfigError, CorruptRecord, RecordRefused, SinkError
from .. import checkpoint_rows, refusal
from ..protocols import Query
from ..query import matches, order_key
from ..record import StoredBody, StoredRecord
from .bucket import Bucket, ObjectRefused
from .frames import Placed, decode_record_frame, encode_data_object, placed_frames
from .index import (
    CACHE_RECORDS,
    IndexCache,
    IndexEntry,
    decode_index,
    encode_indexes,
    ranged_runs,
    read_chunks,
)
from .keys import (
    INDEX_SUFFIX,
    checkpoint_key,
    checkpoint_listed,
    checkpoint_prefix,
    data_key,
    day_listed,
    hour_listed,
    hour_of,
    id_hours,
    index_hour_prefix,
    index_key,
    index_prefix,
    segment_of,
    stream_segment,
    stream_segments,
)
from .url import S3Options

logger = logging.getLogger("asgi_audit.sinks.s3")

MAX_OBJECT_BYTES = 5 << 30
"""The largest object one PUT may create (S3's limit; objects are never multipart here)."""
FRAME_MARGIN = 1 << 20
"""Room kept in an object for a record's metadata and frame header."""

DIRECT_HOURS = 72
"""Ranges up to this many hours list each hour prefix directly; longer or open ones first
list which days (then hours) exist, so a query since 1970 costs a few calls, not 500,000."""


class S3Sink:
    """A sink over a bucket and prefix (see the package docstring for the layout)."""

    keeps_packed = True
    """Bodies the spool packed are stored as they are (see ``Sink.write_batch``)."""

    def __init__(self, options: S3Options, *, cache_records: int = CACHE_RECORDS) -> None:
        self.options = options
        self.bucket = options.bucket
        self.prefix = options.prefix
        self._root = f"{options.prefix}/" if options.prefix else ""
        self._cache = IndexCache(cache_records)
        self._bucket = Bucket(options, repr(self))
        try:
            self._bucket.check()
        except SinkError as exc:
            # The endpoint is unreachable now: open anyway, so a shipper starting during an
            # outage keeps its records spooled and retries, rather than dying.
            logger.warning("%r: bucket not checked yet (%s); will check before writing", self, exc)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"S3Sink(s3://{self.bucket}/{self.prefix})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client (thread-safe); SinkError once closed."""
        return self._bucket.client

    def close(self) -> None:
        self._bucket.close()
        self._cache.clear()

    # Writing

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        self.client  # noqa: B018  (raises when closed, even for an empty batch)
        if not records:
            return
        self._check_bucket()
        unique: dict[str, StoredRecord] = {}
        for record in records:
            unique.setdefault(record.id, record)
        too_large = {
            record.id: f"its bodies take {size} bytes; one object holds at most "
            f"{MAX_OBJECT_BYTES - FRAME_MARGIN}"
            for record in unique.values()
            if (size := _kept_size(record.request_body) + _kept_size(record.response_body))
            > MAX_OBJECT_BYTES - FRAME_MARGIN
        }
        if too_large:
            raise refusal.refused(repr(self), too_large)
        by_stream: dict[str, list[StoredRecord]] = {}
        for record in unique.values():
            by_stream.setdefault(record.stream, []).append(record)
        # The shipper's batches hold one stream; a mixed batch is split so that a key (stream,
        # first and last seq) never holds records of another stream.
        for stream, group in by_stream.items():
            self._write_group(stream, group)

    def _check_bucket(self) -> None:
        """Check the bucket before the first write, if opening could not (an outage)."""
        if not self._bucket.checked:
            try:
                self._bucket.check()
            except ConfigError as exc:
                raise SinkError(f"{self!r}: {exc.problem}") from exc

    def write_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> None:
        self.client  # noqa: B018  (raises when closed, even for no checkpoints)
        found = checkpoint_rows.checked(checkpoints, repr(self))
        if not found:
            return
        self._check_bucket()
        for checkpoint in found:
            body = checkpoint.text.encode("utf-8")
            md5 = hashlib.md5(body, usedforsecurity=False).digest()
            key = checkpoint_key(checkpoint.stream, checkpoint.index)
            try:
                # False: the key is taken by an earlier copy, which stays (write once).
                self._bucket.put(self._root + key, body, md5, "application/json")
            except ObjectRefused as exc:
                which = checkpoint_rows.describe(checkpoint.value())
                raise RecordRefused(f"{self!r}: {which} refused: {exc.detail}") from exc

    def checkpoints(self, stream: str | None = None) -> Iterator[dict[str, Any]]:
        self.client  # noqa: B018
        found: list[checkpoint_rows.Checkpoint] = []
        for key in self._bucket.keys(self._root + checkpoint_prefix(stream)):
            listed = checkpoint_listed(key.removeprefix(self._root))
            if listed is None:
                continue  # not an object of this sink's: ignored, as in index folders
            source = f"{self!r}: {key}"
            checkpoint = checkpoint_rows.parse(self._bucket.get(key), source)
            if (stream_segment(checkpoint.stream), checkpoint.index) != listed:
                raise CorruptRecord(f"{source} holds the checkpoint of another stream or index")
            found.append(checkpoint)
        return iter(checkpoint_rows.ordered(found, stream))

    def _write_group(self, stream: str, records: list[StoredRecord]) -> None:
        try:
            self._put_group(stream, records)
        except ObjectRefused as exc:
            ids = [record.id for record in records]
            if exc.about_key:
                raise refusal.all_refused(repr(self), ids, exc.detail) from exc.__cause__
            raise refusal.batch_refused(repr(self), ids, exc.detail) from exc.__cause__

    def _put_group(self, stream: str, records: list[StoredRecord]) -> None:
        first, last = records[0].seq, records[-1].seq
        data = data_key(hour_of(records[0].started_at_ns), stream, first, last)
        try:
            body, placed = encode_data_object(records)
        except RecordRefused as exc:  # a record that cannot be encoded
            raise RecordRefused(f"{self!r}: {exc}", ids=exc.ids) from exc.__cause__
        if len(body) > MAX_OBJECT_BYTES:
            raise refusal.batch_refused(
                repr(self),
                [record.id for record in records],
                f"the batch's object would take {len(body)} bytes, over {MAX_OBJECT_BYTES}",
            )
        digest = hashlib.md5(body, usedforsecurity=False)
        if not self._bucket.put(
            self._root + data, body, digest.digest(), "application/octet-stream"
        ):
            existing = self._placed_in_existing(self._root + data, digest.hexdigest())
            if existing is not None:
                placed = existing
        del body
        for hour, packed in encode_indexes(data, stream, first, last, placed).items():
            md5 = hashlib.md5(packed, usedforsecurity=False).digest()
            self._bucket.put(
                self._root + index_key(hour, stream, first, last), packed, md5, "application/zstd"
            )

    def _placed_in_existing(self, key: str, md5_hex: str) -> list[Placed] | None:
        """The data object was there already (a re-delivery). None if it holds exactly our
        bytes (its ETag is their MD5: one PUT, never multipart); else where its own frames
        are, so that the indexes describe what is stored."""
        if self._bucket.etag(key) == md5_hex:
            return None
        stored = self._bucket.get(key)
        logger.warning(
            "%r: %s already holds other bytes for the same stream and sequence numbers; "
            "the stored copy stays",
            self,
            key,
        )
        return list(placed_frames(stored, source=f"{self!r}: {key}"))

    # Reading

    def search(self, query: Query) -> Iterator[StoredRecord]:
        self.client  # noqa: B018  (raises now when closed, not at the first next())
        return self._search(query)

    def _search(self, query: Query) -> Iterator[StoredRecord]:
        remaining = query.limit
        if remaining is not None and remaining <= 0:
            return
        for hour in self._hours(query.since_ns, query.until_ns, query.newest_first):
            found = [
                (entry, record)
                for entry in self._hour_entries(hour, query.stream)
                if matches(query, record := entry.record())
            ]
            found.sort(key=lambda item: order_key(item[1]), reverse=query.newest_first)
            if remaining is not None:
                found = found[:remaining]
                remaining -= len(found)
            if not query.with_bodies:
                yield from (record for _, record in found)
            else:
                for chunk in read_chunks([entry for entry, _ in found]):
                    yield from self._read_many(chunk)
            if remaining == 0:
                return

    def get(self, record_id: str) -> StoredRecord | None:
        self.client  # noqa: B018
        tried: set[int] = set()
        for hour in id_hours(record_id):
            tried.add(hour)
            entry = self._find(hour, record_id)
            if entry is not None:
                return self._read(entry)
        for hour in self._hours(None, None, newest_first=True):
            if hour not in tried:
                entry = self._find(hour, record_id)
                if entry is not None:
                    return self._read(entry)
        return None

    def count(self) -> int:
        self.client  # noqa: B018
        return sum(len(self._hour_entries(hour)) for hour in self._hours(None, None, False))

    def _find(self, hour: int, record_id: str) -> IndexEntry | None:
        for entry in self._hour_entries(hour):
            if entry.id == record_id:
                return entry
        return None

    def _read(self, entry: IndexEntry) -> StoredRecord:
        """One record with its bodies: a ranged GET of its frame, checked."""
        return self._decode(entry, self._bucket.get(entry.data_key, entry.offset, entry.length), 0)

    def _decode(self, entry: IndexEntry, data: bytes, at: int) -> StoredRecord:
        """The record of ``entry`` from ``data`` (which holds its frame at ``at``), checked
        against what the index says."""
        base = entry.offset - at
        frame = decode_record_frame(data, at, source=f"{self!r}: {entry.data_key}", base=base)
        if frame.meta.get("id") != entry.id or frame.end - at != entry.length:
            raise CorruptRecord(
                f"{self!r}: {entry.data_key} at byte {entry.offset} does not hold record "
                f"{entry.id} as its index says"
            )
        return frame.record()

    def _read_many(self, entries: list[IndexEntry]) -> list[StoredRecord]:
        """Several records with bodies, in the given order, with few GETs: frames of one
        data object that lie close together are fetched by one ranged GET (a batch's
        records are usually listed together), instead of one request per record."""
        if len(entries) == 1:
            return [self._read(entries[0])]
        records: dict[int, StoredRecord] = {}
        by_key: dict[str, list[tuple[int, IndexEntry]]] = {}
        for position, entry in enumerate(entries):
            by_key.setdefault(entry.data_key, []).append((position, entry))
        for key, located in by_key.items():
            located.sort(key=lambda item: item[1].offset)
            for run in ranged_runs(located):
                start = run[0][1].offset
                end = max(entry.offset + entry.length for _, entry in run)
                data = self._bucket.get(key, start, end - start)
                for position, entry in run:
                    records[position] = self._decode(entry, data, entry.offset - start)
        return [records[position] for position in range(len(entries))]

    def _hour_entries(self, hour: int, stream: str | None = None) -> list[IndexEntry]:
        """Every record of one hour partition (of ``stream``'s indexes only, when given:
        a record is indexed under its own stream's segment), first occurrence by key
        order per id."""
        listed = self._bucket.keys(self._root + index_hour_prefix(hour))
        segments = None if stream is None else stream_segments(stream)
        seen: set[str] = set()
        entries: list[IndexEntry] = []
        for key in sorted(
            key
            for key in listed
            if key.endswith(INDEX_SUFFIX) and (segments is None or segment_of(key) in segments)
        ):
            for entry in self._index(key):
                if entry.id not in seen:
                    seen.add(entry.id)
                    entries.append(entry)
        return entries

    def _index(self, key: str) -> list[IndexEntry]:
        entries = self._cache.get(key)
        if entries is None:
            entries = decode_index(self._bucket.get(key), self._root, f"{self!r}: index {key}")
            self._cache.put(key, entries)
        return entries

    def _hours(
        self, since_ns: int | None, until_ns: int | None, newest_first: bool
    ) -> Iterator[int]:
        """Hour partitions that may hold records of ``[since, until)``, in query order."""
        low = None if since_ns is None else hour_of(since_ns)
        high = None if until_ns is None else hour_of(until_ns - 1)
        if low is not None and high is not None:
            if high < low:
                return
            if high - low < DIRECT_HOURS:
                hours = range(low, high + 1)
                yield from reversed(hours) if newest_first else hours
                return
        days = sorted(self._days())
        if newest_first:
            days.reverse()
        for day in days:
            first, last = day * 24, day * 24 + 23
            if (low is not None and last < low) or (high is not None and first > high):
                continue
            hours_of_day = sorted(
                hour
                for hour in self._day_hours(day)
                if (low is None or hour >= low) and (high is None or hour <= high)
            )
            yield from reversed(hours_of_day) if newest_first else hours_of_day

    def _days(self) -> Iterator[int]:
        for common in self._bucket.prefixes(self._root + index_prefix()):
            day = day_listed(common)
            if day is not None:
                yield day

    def _day_hours(self, day: int) -> Iterator[int]:
        for common in self._bucket.prefixes(self._root + index_prefix(day)):
            hour = hour_listed(common, day)
            if hour is not None:
                yield hour


def _kept_size(body: StoredBody | None) -> int:
    """Bytes a body takes in a frame (packed, or its data, which packing only shrinks)."""
    if body is None:
        return 0
    if body.packed is not None:
        return len(body.packed)
    return 0 if body.data is None else len(body.data)
