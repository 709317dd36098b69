"""Index objects: what readers read, so that listings never download a record's bodies.

A batch gets one index object per hour its records *started* in, holding only those
records: a long exchange that started at 11:58 and was recorded in a batch keyed 12:00 is
indexed under ``hour=11``. So every record of an hour partition started in that hour, and
a search can produce results hour by hour, in order, stopping at its limit.

An index is zstd-compressed JSON: ``{"format", "version", "data"`` (the data object's key
relative to the prefix), ``"stream", "first_seq", "last_seq", "records": [{"offset",
"length", "record"}]}`` where ``record`` is :meth:`StoredRecord.metadata` and
``offset``/``length`` locate the record's frame in the data object (see :mod:`.frames`),
so that ``get`` reads one record with a ranged GET.

Index objects are written once and never replaced, so a parsed one can be cached for as
long as the sink is open (:class:`IndexCache`), and reading neighbouring frames together
(:func:`read_chunks`, :func:`ranged_runs`) never risks mixing versions.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

from ...errors import CorruptRecord
from ...recording import packing
from ..record import StoredRecord, json_text
from .frames import Placed
from .keys import hour_of

INDEX_FORMAT = "asgi-audit.s3-index"
INDEX_VERSION = 1
INDEX_LEVEL = 3
CACHE_RECORDS = 50_000
"""Index entries kept in memory per sink (about 2-3 KB each)."""
READ_CHUNK_BYTES = 16 << 20
"""A search with bodies fetches at most about this many bytes of frames at a time."""
READ_GAP_BYTES = 256 << 10
"""Frames of one data object at most this far apart are fetched by one ranged GET."""


@dataclass(frozen=True, slots=True)
class IndexEntry:
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


class IndexCache:
    """Parsed index objects by key, least recently used dropped past a number of entries.
    Index objects are written once and never replaced, so a cached one is never stale."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, list[IndexEntry]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> list[IndexEntry] | None:
        with self._lock:
            entries = self._items.get(key)
            if entries is not None:
                self._items.move_to_end(key)
            return entries

    def put(self, key: str, entries: list[IndexEntry]) -> None:
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


def encode_indexes(
    data_key: str, stream: str, first_seq: int, last_seq: int, placed: list[Placed]
) -> dict[int, bytes]:
    """The index objects of one data object (``data_key`` relative to the prefix), by the
    hour their records started in."""
    by_hour: dict[int, list[dict[str, Any]]] = {}
    for start, length, meta in placed:
        entry = {"offset": start, "length": length, "record": meta}
        by_hour.setdefault(hour_of(meta["started_at_ns"]), []).append(entry)
    return {
        hour: packing.compressor(INDEX_LEVEL).compress(
            json_text(
                {
                    "format": INDEX_FORMAT,
                    "version": INDEX_VERSION,
                    "data": data_key,
                    "stream": stream,
                    "first_seq": first_seq,
                    "last_seq": last_seq,
                    "records": entries,
                }
            ).encode("utf-8")
        )
        for hour, entries in by_hour.items()
    }


def decode_index(raw: bytes, root: str, source: str) -> list[IndexEntry]:
    """The entries of an index object, their data keys under ``root`` (the prefix);
    :class:`CorruptRecord` naming ``source`` when it cannot be read."""
    try:
        index = json.loads(packing.decompressor().decompress(raw))
    except (zstandard.ZstdError, ValueError) as exc:
        raise CorruptRecord(f"{source} cannot be read: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise CorruptRecord(f"{source} is not an asgi-audit index")
    if index.get("version") != INDEX_VERSION:
        raise CorruptRecord(
            f"{source} has version {index.get('version')}; this asgi-audit reads version "
            f"{INDEX_VERSION} (upgrade asgi-audit)"
        )
    try:
        data_key = root + index["data"]
        return [
            IndexEntry(
                item["record"]["id"], data_key, item["offset"], item["length"], item["record"]
            )
            for item in index["records"]
        ]
    except (KeyError, TypeError) as exc:
        raise CorruptRecord(f"{source} cannot be read: malformed ({exc!r})") from exc


def read_chunks(entries: list[IndexEntry]) -> Iterator[list[IndexEntry]]:
    """Consecutive slices of ``entries`` holding at most READ_CHUNK_BYTES of frames (or
    one frame): the bodies a search holds in memory at once stay bounded."""
    chunk: list[IndexEntry] = []
    size = 0
    for entry in entries:
        if chunk and size + entry.length > READ_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += entry.length
    if chunk:
        yield chunk


def ranged_runs(
    located: list[tuple[int, IndexEntry]],
) -> Iterator[list[tuple[int, IndexEntry]]]:
    """Frames sorted by offset, grouped where the gap between two is at most READ_GAP_BYTES
    (reading a small gap costs less than another request)."""
    run: list[tuple[int, IndexEntry]] = []
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
