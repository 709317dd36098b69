"""``s3://bucket/prefix?endpoint_url=...``: S3-compatible object storage, one object per batch.

Why object storage: pods come and go, so records must leave the pod; a bucket is cheap,
has no server for the team to run, keeps data for years, and with Object Lock can make it
write-once. Objects cannot be appended to or updated in place, so the layout below is
built from immutable objects only: every ``write_batch`` writes new objects and never
changes one.

Layout (``<prefix>/`` may be empty)::

    <prefix>/dt=YYYY-MM-DD/hour=HH/<stream>/<first-seq>-<last-seq>.aab
    <prefix>/index/dt=YYYY-MM-DD/hour=HH/<stream>/<first-seq>-<last-seq>.json.zst

The data object (``.aab``, "asgi-audit batch") holds every record of the batch; its date and
hour are those of the batch's first record start (UTC). Sequence numbers are zero-padded to
12 digits so that key order is sequence order. ``<stream>`` is the stream id with every
byte outside ``[A-Za-z0-9_.-]`` (and a leading ``.``) written as ``~XX``: keys stay ASCII,
no segment is ``.`` or ``..``, and two streams never share a key.

Index objects are what readers read. A batch gets one per hour its records *started* in,
holding only those records: a long exchange that started at 11:58 and was recorded in a
batch keyed 12:00 is indexed under ``hour=11``. So a time-range search lists only the
``dt=/hour=`` prefixes of the range, every record of an hour partition started in that
hour, and results can be produced hour by hour, in order, stopping at the limit. An index
is zstd-compressed JSON: ``{"format", "version", "data"`` (the data object's key relative to
the prefix), ``"stream", "first_seq", "last_seq", "records": [{"offset", "length",
"record"}]}`` where ``record`` is :meth:`StoredRecord.metadata` and ``offset``/``length``
locate the record's frame in the data object, so ``get`` fetches one record with a ranged
GET and listings never download a body.

Data object format: a plain concatenation of self-contained frames (no object header, so
any frame can be read alone)::

    frame  := header meta request response
    header := "AAB1" | meta_enc u8 | request_enc u8 | response_enc u8 | 0 u8
              | meta_len u32 | request_len u64 | response_len u64 | crc32 u32   (big-endian)
    meta   := JSON of StoredRecord.metadata()      request/response := stored body bytes

Each of the three parts is compressed on its own (encoding 1 = zstd, 0 = as is), by
:mod:`.packing`: zstd where it saves a tenth, raw otherwise (images, random bytes, tiny
parts). Per-part rather than whole-object compression keeps frames independently readable
(ranged GET of one record) and still shrinks JSON bodies about ninefold. An absent body and
a body whose bytes were not kept have length 0 and the metadata tells them apart from an
empty body (``stored``). The CRC-32 covers meta, request and response as stored; readers
check it. Since frames carry their metadata too, indexes can be rebuilt from data objects.

Idempotency and duplicates. The shipper delivers at least once. A batch delivered again
after a crash has the same stream and first/last sequence numbers, hence the same keys;
every PUT carries ``If-None-Match: *``, so the copy already there stays (no second version
in a versioned or locked bucket) and the write counts as done. If what is there differs
from the new batch (the shipper's redaction changed between attempts), the stored object
wins and the indexes are built from it, so they always describe the data they point to.
A batch may also come back with other boundaries (the shipper may re-batch): then the
records it shares with the earlier batch are stored twice, under two keys. Readers
de-duplicate by record id within an hour partition (both copies started at the same time,
so they are always in the same one): the first occurrence in key order wins, key order
being stream then first sequence number, then position in the batch. A re-delivered copy
is the same spool record as the original, so which copy wins does not change what readers
get. ``count`` counts distinct ids.

Object Lock: ``?object_lock=governance|compliance&retain_days=N`` puts every object (data
and index) under that retention mode until N days after its write. The bucket must have
Object Lock enabled (checked at open, a :class:`ConfigError` otherwise). A bucket with a
default retention rule needs no option at all. Retention (deleting old data) is a
lifecycle rule on the bucket, since objects are never rewritten.

Credentials come from boto3's usual chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(and ``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` or ``?profile=``, the shared credentials file,
web identity (EKS service accounts), container and instance roles; never the URL.

Costs: a write is 1 + (hours touched) PUTs. A search lists the hour prefixes of its range
(directly for ranges up to :data:`DIRECT_HOURS`, else by discovering the days and hours that
exist) and reads each listed index once per instance (an LRU cache; indexes never change).
``get`` looks first in the hour of the id's UUIDv7 time and the hour before (the id is made
when the exchange ends), then in every hour. ``count`` reads every index.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import logging
import re
import string
import struct
import threading
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import zstandard

from ..errors import ConfigError
from ..recording import packing
from ._common import dumps_json, matches, order_key
from .protocols import Query, SinkError
from .record import StoredRecord

logger = logging.getLogger("asgi_audit.sinks.s3")

HOUR_NS = 3600 * 1_000_000_000
SEQ_DIGITS = 12
DATA_SUFFIX = ".aab"
INDEX_SUFFIX = ".json.zst"
INDEX_DIR = "index"
INDEX_FORMAT = "asgi-audit.s3-index"
INDEX_VERSION = 1
FRAME_MAGIC = b"AAB1"
DIRECT_HOURS = 72
"""Ranges up to this many hours list each hour prefix directly; longer or open ones first
list which days (then hours) exist, so a query since 1970 costs a few calls, not 500,000."""
CACHE_RECORDS = 50_000
"""Index entries kept in memory per instance (about 2-3 KB each)."""
INDEX_LEVEL = 3
READ_CHUNK_BYTES = 16 << 20
"""A search with bodies fetches at most about this many bytes of frames at a time."""
READ_GAP_BYTES = 256 << 10
"""Frames of one data object at most this far apart are fetched by one ranged GET."""

_HEADER = struct.Struct(">4sBBBBIQQI")
_CODES: dict[str, int] = {"identity": 0, "zstd": 1}
_NAMES = {code: name for name, code in _CODES.items()}
_KEY_SAFE = frozenset(string.ascii_letters + string.digits + "_-.")
_DAY = re.compile(r"dt=(\d{4})-(\d{2})-(\d{2})/$")
_HOUR = re.compile(r"hour=(\d{2})/$")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_OPTIONS = (
    "endpoint_url",
    "region",
    "profile",
    "addressing_style",
    "object_lock",
    "retain_days",
)
_EXAMPLE = "s3://bucket/prefix?endpoint_url=https://s3.example.com&region=us-east-1"
_MISSING_BOTO3 = "s3:// needs boto3: pip install 'asgi-audit[s3]'"

_local = threading.local()


# URL ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Options:
    """What an ``s3://`` URL says, checked."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str | None = None
    object_lock: str | None = None
    """``GOVERNANCE`` or ``COMPLIANCE``."""
    retain_days: int | None = None


def parse_url(url: str) -> S3Options:
    """Read ``s3://bucket/prefix?option=value&...``; every mistake is a :class:`ConfigError`."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise ConfigError("sink", f"expected an s3:// URL such as {_EXAMPLE!r} (got {url!r})")
    if "@" in parts.netloc:
        raise ConfigError(
            "sink",
            "credentials do not belong in the URL; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or mount a credentials file)",
        )
    bucket = parts.netloc
    if not bucket:
        raise ConfigError("sink", f"{url!r} names no bucket; expected {_EXAMPLE!r}")
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(
            "sink",
            f"{bucket!r} is not a bucket name (letters, digits, '.', '-', '_'); the endpoint "
            f"goes in ?endpoint_url=, as in {_EXAMPLE!r}",
        )
    if parts.fragment:
        raise ConfigError("sink", f"unexpected '#{parts.fragment}' in {url!r}")
    prefix = unquote(parts.path).strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise ConfigError("sink", f"prefix {prefix!r} has an empty, '.' or '..' segment")
    values: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise ConfigError(
                "sink", f"unknown option {key!r} in {url!r}; known: {', '.join(_OPTIONS)}"
            )
        if key in values:
            raise ConfigError("sink", f"option {key!r} given twice in {url!r}")
        if not value:
            raise ConfigError("sink", f"option {key!r} has no value in {url!r}")
        values[key] = value
    endpoint = values.get("endpoint_url")
    if endpoint is not None and not re.match(r"https?://[^/?#]+", endpoint):
        raise ConfigError("sink", f"endpoint_url must be http(s)://host[:port] (got {endpoint!r})")
    style = values.get("addressing_style")
    if style is not None and style not in ("auto", "path", "virtual"):
        raise ConfigError("sink", f"addressing_style is auto, path or virtual (got {style!r})")
    mode = values.get("object_lock")
    if mode is not None and mode.lower() not in ("governance", "compliance"):
        raise ConfigError("sink", f"object_lock is governance or compliance (got {mode!r})")
    days_text = values.get("retain_days")
    days: int | None = None
    if days_text is not None:
        if not days_text.isdigit() or int(days_text) < 1:
            raise ConfigError(
                "sink", f"retain_days must be a whole number >= 1 (got {days_text!r})"
            )
        days = int(days_text)
    if (mode is None) != (days is None):
        raise ConfigError(
            "sink", "object_lock and retain_days go together: ?object_lock=compliance&retain_days=N"
        )
    return S3Options(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint,
        region=values.get("region"),
        profile=values.get("profile"),
        addressing_style=style,
        object_lock=None if mode is None else mode.upper(),
        retain_days=days,
    )


def key_segment(text: str) -> str:
    """``text`` as one safe, reversible key segment (see the module docstring)."""
    if not text:
        return "~"
    out: list[str] = []
    for position, char in enumerate(text):
        if char in _KEY_SAFE and not (position == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"~{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def hour_path(hour: int) -> str:
    """``dt=YYYY-MM-DD/hour=HH`` of an hour number (hours since the epoch, UTC)."""
    moment = datetime.fromtimestamp(hour * 3600, tz=UTC)
    return f"dt={moment:%Y-%m-%d}/hour={moment:%H}"


def hour_of(started_at_ns: int) -> int:
    return started_at_ns // HOUR_NS


def batch_name(first_seq: int, last_seq: int) -> str:
    return f"{first_seq:0{SEQ_DIGITS}d}-{last_seq:0{SEQ_DIGITS}d}"


# Frames -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Frame:
    """One decoded frame: the metadata and, when asked for, the body bytes."""

    meta: dict[str, Any]
    request: bytes | None
    response: bytes | None
    end: int


def encode_frame(record: StoredRecord, meta: dict[str, Any]) -> list[bytes]:
    """The frame of one record as a header and its three parts (joined by the caller)."""
    meta_bytes, meta_encoding = packing.encode(dumps_json(meta).encode("utf-8"))
    request, request_encoding = packing.encode_body(record.request_body)
    response, response_encoding = packing.encode_body(record.response_body)
    parts = [meta_bytes or b"", request or b"", response or b""]
    crc = zlib.crc32(parts[2], zlib.crc32(parts[1], zlib.crc32(parts[0])))
    header = _HEADER.pack(
        FRAME_MAGIC,
        _CODES[meta_encoding],
        _CODES[request_encoding],
        _CODES[response_encoding],
        0,
        len(parts[0]),
        len(parts[1]),
        len(parts[2]),
        crc,
    )
    return [header, *parts]


def decode_frame(buffer: bytes, offset: int = 0, *, bodies: bool = True) -> _Frame:
    """The frame starting at ``offset``; ``ValueError`` when it is cut short or corrupt."""
    if len(buffer) - offset < _HEADER.size:
        raise ValueError(f"frame at byte {offset} is cut short")
    (
        magic,
        meta_code,
        request_code,
        response_code,
        _flags,
        meta_len,
        request_len,
        response_len,
        crc,
    ) = _HEADER.unpack_from(buffer, offset)
    if magic != FRAME_MAGIC:
        raise ValueError(f"no frame at byte {offset} (magic {magic!r})")
    start = offset + _HEADER.size
    ends = (start + meta_len, start + meta_len + request_len)
    end = ends[1] + response_len
    if end > len(buffer):
        raise ValueError(f"frame at byte {offset} is cut short")
    view = memoryview(buffer)
    parts = (view[start : ends[0]], view[ends[0] : ends[1]], view[ends[1] : end])
    if zlib.crc32(parts[2], zlib.crc32(parts[1], zlib.crc32(parts[0]))) != crc:
        raise ValueError(f"frame at byte {offset} fails its checksum")
    try:
        meta_raw = packing.decode(bytes(parts[0]), _NAMES[meta_code])
        meta = json.loads(meta_raw or b"")
        request = packing.decode(bytes(parts[1]), _NAMES[request_code]) if bodies else None
        response = packing.decode(bytes(parts[2]), _NAMES[response_code]) if bodies else None
    except (KeyError, zstandard.ZstdError, json.JSONDecodeError) as exc:
        raise ValueError(f"frame at byte {offset} cannot be decoded: {exc}") from exc
    return _Frame(meta, request, response, end)


def _record(frame: _Frame) -> StoredRecord:
    return StoredRecord.from_metadata(frame.meta, frame.request, frame.response)


# Indexes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where one record's frame is, and its metadata (shared: copy before handing out)."""

    id: str
    data_key: str
    offset: int
    length: int
    meta: dict[str, Any]

    def record(self) -> StoredRecord:
        meta = dict(self.meta)
        meta["redacted_headers"] = list(meta.get("redacted_headers") or [])
        return StoredRecord.from_metadata(meta)


class _IndexCache:
    """Parsed index objects by key, least recently used dropped past a number of entries.
    Index objects are written once and never replaced, so a cached one is never stale."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, list[_Entry]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> list[_Entry] | None:
        with self._lock:
            entries = self._items.get(key)
            if entries is not None:
                self._items.move_to_end(key)
            return entries

    def put(self, key: str, entries: list[_Entry]) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = entries
            self._size += len(entries)
            while self._size > self.capacity and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


def _compress(data: bytes) -> bytes:
    # One compressor per thread: zstandard's objects must not be shared between threads.
    compressor: zstandard.ZstdCompressor | None = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=INDEX_LEVEL)
    return compressor.compress(data)


def _decompress(data: bytes) -> bytes:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor.decompress(data)


# The store ----------------------------------------------------------------------------


class S3Sink:
    """Sink and Reader over a bucket and prefix (see the module docstring for the layout)."""

    keeps_packed = True
    """Bodies the spool packed are stored as they are (see ``Sink.write_batch``)."""

    def __init__(self, options: S3Options, *, cache_records: int = CACHE_RECORDS) -> None:
        self.options = options
        self.bucket = options.bucket
        self.prefix = options.prefix
        self._root = f"{options.prefix}/" if options.prefix else ""
        self._cache = _IndexCache(cache_records)
        self._client: Any = _make_client(options)
        self._checked = False
        try:
            self._check_bucket()
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
        client = self._client
        if client is None:
            raise SinkError(f"{self!r} is closed")
        return client

    # Writing

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        client = self.client
        if not records:
            return
        if not self._checked:
            try:
                self._check_bucket()
            except ConfigError as exc:
                raise SinkError(f"{self!r}: {exc.problem}") from exc
        unique: dict[str, StoredRecord] = {}
        for record in records:
            unique.setdefault(record.id, record)
        by_stream: dict[str, list[StoredRecord]] = {}
        for record in unique.values():
            by_stream.setdefault(record.stream, []).append(record)
        # The shipper's batches hold one stream; a mixed batch is split so that a key (stream,
        # first and last seq) never holds records of another stream.
        for stream, group in by_stream.items():
            self._write_group(client, stream, group)

    def _write_group(self, client: Any, stream: str, records: list[StoredRecord]) -> None:
        name = batch_name(records[0].seq, records[-1].seq)
        stream_key = key_segment(stream)
        data_key = (
            f"{hour_path(hour_of(records[0].started_at_ns))}/{stream_key}/{name}{DATA_SUFFIX}"
        )
        chunks: list[bytes] = []
        placed: list[tuple[int, int, dict[str, Any]]] = []
        offset = 0
        for record in records:
            meta = record.metadata()
            frame = encode_frame(record, meta)
            length = sum(len(part) for part in frame)
            chunks.extend(frame)
            placed.append((offset, length, meta))
            offset += length
        body = b"".join(chunks)
        del chunks
        digest = hashlib.md5(body, usedforsecurity=False)
        if not self._put(client, self._root + data_key, body, digest.digest()):
            existing = self._placed_in_existing(client, data_key, digest.hexdigest())
            if existing is not None:
                placed = existing
        del body
        by_hour: dict[int, list[dict[str, Any]]] = {}
        for start, length, meta in placed:
            entry = {"offset": start, "length": length, "record": meta}
            by_hour.setdefault(hour_of(meta["started_at_ns"]), []).append(entry)
        for hour, entries in by_hour.items():
            index = {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "data": data_key,
                "stream": stream,
                "first_seq": records[0].seq,
                "last_seq": records[-1].seq,
                "records": entries,
            }
            key = f"{self._root}{INDEX_DIR}/{hour_path(hour)}/{stream_key}/{name}{INDEX_SUFFIX}"
            packed = _compress(dumps_json(index).encode("utf-8"))
            self._put(client, key, packed, hashlib.md5(packed, usedforsecurity=False).digest())

    def _put(self, client: Any, key: str, body: bytes, md5: bytes) -> bool:
        """Create ``key``; False when it exists already (kept as it is: write once).
        Content-MD5 lets the server refuse bytes damaged on the way, and is what S3 asks
        for with Object Lock."""
        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": body,
            "ContentMD5": base64.b64encode(md5).decode("ascii"),
            "ContentType": "application/zstd"
            if key.endswith(INDEX_SUFFIX)
            else "application/octet-stream",
            "IfNoneMatch": "*",
        }
        if self.options.object_lock is not None and self.options.retain_days is not None:
            params["ObjectLockMode"] = self.options.object_lock
            params["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(
                days=self.options.retain_days
            )
        try:
            client.put_object(**params)
        except ClientError as exc:
            if _status(exc) == 412 or _code(exc) == "PreconditionFailed":
                return False
            raise self._failure(exc, f"cannot store {key}") from exc
        except BotoCoreError as exc:
            raise self._failure(exc, f"cannot store {key}") from exc
        return True

    def _placed_in_existing(
        self, client: Any, data_key: str, md5_hex: str
    ) -> list[tuple[int, int, dict[str, Any]]] | None:
        """The data object was there already (a re-delivery). None if it holds exactly our
        bytes (its ETag is their MD5: one PUT, never multipart); else where its own frames
        are, so that the indexes describe what is stored."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._root + data_key
        try:
            head = client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, f"cannot read {key}") from exc
        etag = str(head.get("ETag", "")).strip('"')
        if etag == md5_hex:
            return None
        stored = self._get(key)
        logger.warning(
            "%r: %s already holds other bytes for the same stream and sequence numbers; "
            "the stored copy stays",
            self,
            key,
        )
        placed: list[tuple[int, int, dict[str, Any]]] = []
        offset = 0
        while offset < len(stored):
            try:
                frame = decode_frame(stored, offset, bodies=False)
            except ValueError as exc:
                raise SinkError(f"{self!r}: {key}: {exc}") from exc
            placed.append((offset, frame.end - offset, frame.meta))
            offset = frame.end
        return placed

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
                for entry in self._hour_entries(hour)
                if matches(query, record := entry.record())
            ]
            found.sort(key=lambda item: order_key(item[1]), reverse=query.newest_first)
            if remaining is not None:
                found = found[:remaining]
                remaining -= len(found)
            if not query.with_bodies:
                yield from (record for _, record in found)
            else:
                for chunk in _read_chunks([entry for entry, _ in found]):
                    yield from self._read_many(chunk)
            if remaining == 0:
                return

    def get(self, record_id: str) -> StoredRecord | None:
        self.client  # noqa: B018
        tried: set[int] = set()
        for hour in _id_hours(record_id):
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

    def close(self) -> None:
        client, self._client = self._client, None
        self._cache.clear()
        if client is not None:
            client.close()

    def _find(self, hour: int, record_id: str) -> _Entry | None:
        for entry in self._hour_entries(hour):
            if entry.id == record_id:
                return entry
        return None

    def _read(self, entry: _Entry) -> StoredRecord:
        """One record with its bodies: a ranged GET of its frame, checked."""
        return self._decode(entry, self._get(entry.data_key, entry.offset, entry.length), 0)

    def _decode(self, entry: _Entry, data: bytes, at: int) -> StoredRecord:
        """The record of ``entry`` from ``data`` (which holds its frame at ``at``), checked
        against what the index says."""
        try:
            frame = decode_frame(data, at)
        except ValueError as exc:
            raise SinkError(f"{self!r}: {entry.data_key}: {exc}") from exc
        if frame.meta.get("id") != entry.id or frame.end - at != entry.length:
            raise SinkError(
                f"{self!r}: {entry.data_key} at byte {entry.offset} does not hold record "
                f"{entry.id} as its index says"
            )
        return _record(frame)

    def _read_many(self, entries: list[_Entry]) -> list[StoredRecord]:
        """Several records with bodies, in the given order, with few GETs: frames of one
        data object that lie close together are fetched by one ranged GET (a batch's
        records are usually listed together), instead of one request per record."""
        if len(entries) == 1:
            return [self._read(entries[0])]
        records: dict[int, StoredRecord] = {}
        by_key: dict[str, list[tuple[int, _Entry]]] = {}
        for position, entry in enumerate(entries):
            by_key.setdefault(entry.data_key, []).append((position, entry))
        for key, located in by_key.items():
            located.sort(key=lambda item: item[1].offset)
            for run in _runs(located):
                start = run[0][1].offset
                end = max(entry.offset + entry.length for _, entry in run)
                data = self._get(key, start, end - start)
                for position, entry in run:
                    records[position] = self._decode(entry, data, entry.offset - start)
        return [records[position] for position in range(len(entries))]

    def _hour_entries(self, hour: int) -> list[_Entry]:
        """Every record of one hour partition, first occurrence by key order per id."""
        prefix = f"{self._root}{INDEX_DIR}/{hour_path(hour)}/"
        keys = sorted(key for key in self._keys(prefix) if key.endswith(INDEX_SUFFIX))
        seen: set[str] = set()
        entries: list[_Entry] = []
        for key in keys:
            for entry in self._index(key):
                if entry.id not in seen:
                    seen.add(entry.id)
                    entries.append(entry)
        return entries

    def _index(self, key: str) -> list[_Entry]:
        entries = self._cache.get(key)
        if entries is not None:
            return entries
        raw = self._get(key)
        try:
            index = json.loads(_decompress(raw))
        except (zstandard.ZstdError, json.JSONDecodeError) as exc:
            raise SinkError(f"{self!r}: index {key} cannot be read: {exc}") from exc
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise SinkError(f"{self!r}: {key} is not an asgi-audit index")
        if index.get("version") != INDEX_VERSION:
            raise SinkError(
                f"{self!r}: index {key} has version {index.get('version')}; this asgi-audit "
                f"reads version {INDEX_VERSION} (upgrade asgi-audit)"
            )
        data_key = self._root + index["data"]
        entries = [
            _Entry(item["record"]["id"], data_key, item["offset"], item["length"], item["record"])
            for item in index["records"]
        ]
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
        epoch = date(1970, 1, 1)
        for common in self._prefixes(f"{self._root}{INDEX_DIR}/"):
            match = _DAY.search(common)
            if match:
                with contextlib.suppress(ValueError):
                    yield (date(*map(int, match.groups())) - epoch).days

    def _day_hours(self, day: int) -> Iterator[int]:
        path = hour_path(day * 24).split("/")[0]
        for common in self._prefixes(f"{self._root}{INDEX_DIR}/{path}/"):
            match = _HOUR.search(common)
            if match and int(match.group(1)) < 24:
                yield day * 24 + int(match.group(1))

    # S3 calls

    def _get(self, key: str, offset: int | None = None, length: int | None = None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset is not None and length is not None:
            if length == 0:
                return b""
            params["Range"] = f"bytes={offset}-{offset + length - 1}"
        try:
            response = self.client.get_object(**params)
            with contextlib.closing(response["Body"]) as stream:
                data: bytes = stream.read()
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, f"cannot read {key}") from exc
        if length is not None and len(data) != length:
            raise SinkError(f"{self!r}: {key}: read {len(data)} bytes at {offset}, not {length}")
        return data

    def _list(self, prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            params["Delimiter"] = delimiter
        while True:
            try:
                page: dict[str, Any] = self.client.list_objects_v2(**params)
            except (ClientError, BotoCoreError) as exc:
                raise self._failure(exc, f"cannot list {prefix}") from exc
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            params["ContinuationToken"] = token

    def _keys(self, prefix: str) -> Iterator[str]:
        for page in self._list(prefix, None):
            for item in page.get("Contents") or []:
                yield str(item["Key"])

    def _prefixes(self, prefix: str) -> Iterator[str]:
        for page in self._list(prefix, "/"):
            for item in page.get("CommonPrefixes") or []:
                yield str(item["Prefix"])

    def _check_bucket(self) -> None:
        """The bucket exists, the credentials open it, and it has Object Lock if asked.
        ConfigError for what a person must fix; SinkError when the endpoint is unreachable."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        client = self.client
        where = self.options.endpoint_url or "the default AWS endpoint"
        try:
            client.head_bucket(Bucket=self.bucket)
            if self.options.object_lock is not None:
                lock = client.get_object_lock_configuration(Bucket=self.bucket)
                if lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
                    raise self._no_object_lock()
        except NoCredentialsError as exc:
            raise ConfigError(
                "sink",
                f"no credentials for s3://{self.bucket}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or mount a shared credentials file",
            ) from exc
        except ClientError as exc:
            status, code = _status(exc), _code(exc)
            if code in ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"):
                raise self._no_object_lock() from exc
            if status == 404 or code in ("NoSuchBucket", "NotFound"):
                raise ConfigError(
                    "sink",
                    f"bucket {self.bucket!r} does not exist at {where}; create it first "
                    "(asgi-audit never creates buckets: versioning, Object Lock, lifecycle and "
                    "access are the bucket owner's choice)",
                ) from exc
            if status in (401, 403):
                raise ConfigError(
                    "sink",
                    f"access to bucket {self.bucket!r} at {where} denied ({code}): check the "
                    "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the "
                    "bucket policy",
                ) from exc
            raise self._failure(exc, "cannot check the bucket") from exc
        except BotoCoreError as exc:
            raise self._failure(exc, f"cannot reach {where}") from exc
        self._checked = True

    def _no_object_lock(self) -> ConfigError:
        return ConfigError(
            "sink",
            f"object_lock={self.options.object_lock.lower() if self.options.object_lock else ''}"
            f" needs Object Lock, and bucket {self.bucket!r} has no Object Lock enabled; "
            "create the bucket with Object Lock (which also turns on versioning) or drop "
            "object_lock from the URL",
        )

    def _failure(self, exc: Exception, doing: str) -> SinkError:
        if _code(exc) == "NoSuchBucket":
            return SinkError(f"{self!r}: {doing}: bucket {self.bucket!r} does not exist")
        return SinkError(f"{self!r}: {doing}: {exc}")


def check_url(url: str) -> S3Options:
    """What the app checks at start-up: the URL's form, and that boto3 is installed (found,
    not imported: the app process never needs it, only the shipper does)."""
    options = parse_url(url)
    if importlib.util.find_spec("boto3") is None:
        raise ConfigError("sink", _MISSING_BOTO3)
    return options


def _make_client(options: S3Options) -> Any:
    # Imported here, not at module level: parse_url and check_url work without boto3.
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound
    except ImportError as exc:
        raise ConfigError("sink", f"{_MISSING_BOTO3} ({exc})") from None
    try:
        session = boto3.session.Session(profile_name=options.profile)
    except ProfileNotFound as exc:
        raise ConfigError("sink", f"AWS profile {options.profile!r} not found: {exc}") from exc
    settings: dict[str, Any] = {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"mode": "standard", "max_attempts": 3},
        "max_pool_connections": 16,
    }
    if options.addressing_style is not None:
        settings["s3"] = {"addressing_style": options.addressing_style}
    try:
        # Every PUT carries Content-MD5 already: skip the extra CRC that boto3 >= 1.36 adds
        # by default (some S3-compatible servers refuse it); frames carry their own CRC-32.
        config = Config(
            **settings,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    except TypeError:  # botocore < 1.36 has neither option, nor the default they undo
        config = Config(**settings)
    try:
        return session.client(
            "s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config
        )
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError("sink", f"cannot make an S3 client: {exc}") from exc


def _read_chunks(entries: list[_Entry]) -> Iterator[list[_Entry]]:
    """Consecutive slices of ``entries`` holding at most READ_CHUNK_BYTES of frames (or
    one frame): the bodies a search holds in memory at once stay bounded."""
    chunk: list[_Entry] = []
    size = 0
    for entry in entries:
        if chunk and size + entry.length > READ_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += entry.length
    if chunk:
        yield chunk


def _runs(located: list[tuple[int, _Entry]]) -> Iterator[list[tuple[int, _Entry]]]:
    """Frames sorted by offset, grouped where the gap between two is at most READ_GAP_BYTES
    (reading a small gap costs less than another request)."""
    run: list[tuple[int, _Entry]] = []
    end = 0
    for item in located:
        entry = item[1]
        if run and entry.offset - end > READ_GAP_BYTES:
            yield run
            run = []
        run.append(item)
        end = max(end, entry.offset + entry.length) if len(run) > 1 else entry.offset + entry.length
    if run:
        yield run


def _id_hours(record_id: str) -> list[int]:
    """Hours to look in first for ``record_id``: a UUIDv7 id is made when the exchange ends,
    so its start is in that hour or (for a long exchange) before it."""
    try:
        value = uuid.UUID(record_id)
    except ValueError:
        return []
    if value.version != 7:
        return []
    hour = hour_of((value.int >> 80) * 1_000_000)
    return [hour, hour - 1]


def _status(exc: Exception) -> int | None:
    """The HTTP status of a botocore ``ClientError`` (None for other errors)."""
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _code(exc: Exception) -> str:
    """The S3 error code of a botocore ``ClientError`` ("" for other errors)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
