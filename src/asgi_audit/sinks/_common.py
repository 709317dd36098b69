"""Pieces the stores share: one reading of a :class:`Query`, and one way to make directories.

Stores that filter in Python (memory, jsonl) use :func:`matches` and :func:`order_key` so
they answer a query exactly as the SQL store does; the contract suite holds them to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..recording import packing
from .protocols import Query
from .record import StoredRecord


def matches(query: Query, record: StoredRecord) -> bool:
    """Whether ``record`` passes every filter of ``query`` (limit and order aside)."""
    if query.since_ns is not None and record.started_at_ns < query.since_ns:
        return False
    if query.until_ns is not None and record.started_at_ns >= query.until_ns:
        return False
    if query.route is not None and record.route != query.route:
        return False
    if query.method is not None and record.method != query.method:
        return False
    if query.correlation_id is not None and record.correlation_id != query.correlation_id:
        return False
    if query.status_low is None and query.status_high is None:
        return True
    # A status filter never matches an exchange that has no status (no response started).
    if record.status is None:
        return False
    if query.status_low is not None and record.status < query.status_low:
        return False
    return query.status_high is None or record.status <= query.status_high


def order_key(record: StoredRecord) -> tuple[int, str]:
    """The one order every reader uses: start time, then id to break ties stably."""
    return (record.started_at_ns, record.id)


def without_bodies(record: StoredRecord) -> StoredRecord:
    """The record with body bytes left out, as listings return it (sizes and digests kept)."""
    changes = {
        name: dataclasses.replace(body, data=None)
        for name in ("request_body", "response_body")
        if (body := getattr(record, name)) is not None
    }
    return dataclasses.replace(record, **changes) if changes else record


def ensure_directory(directory: Path) -> None:
    """Create ``directory`` (and parents) now, so a bad path fails at start-up, not at ship."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "sink", f"cannot create directory {os.fspath(directory)!r}: {exc.strerror or exc}"
        ) from exc


def dumps_json(value: object) -> str:
    """Compact JSON, readable non-ASCII, yet never failing on a lone surrogate.

    Text reaching a store is latin-1 headers and server-decoded paths, so surrogates should
    not occur; if one does, the record is escaped to ASCII rather than refused, since a
    record the store refuses would be retried forever and hold up its whole stream.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value, separators=(",", ":"))
    return text


BODY_COLUMNS = "metadata, request_body, response_body, request_encoding, response_encoding"
"""What the SQL stores read to rebuild a record with its bodies (see :func:`record_from_row`)."""


def indexed_columns(record: StoredRecord, text: Callable[[str], str]) -> tuple[Any, ...]:
    """The columns both SQL stores index, in their shared order (method through
    ``metadata``); ``text`` makes a string safe for the database's text type."""
    return (
        text(record.method),
        None if record.route is None else text(record.route),
        text(record.path),
        record.status,
        text(record.outcome),
        text(record.correlation_id),
        None if record.trace_id is None else text(record.trace_id),
        text(record.service),
        dumps_json(record.metadata()),
    )


def encoded_bodies(record: StoredRecord) -> tuple[bytes | None, str, bytes | None, str]:
    """(request, its encoding, response, its encoding) as the SQL stores keep them."""
    request, request_encoding = packing.encode_body(record.request_body)
    response, response_encoding = packing.encode_body(record.response_body)
    return request, request_encoding, response, response_encoding


def record_from_row(row: Sequence[Any]) -> StoredRecord:
    """A record from ``metadata`` alone, or from the :data:`BODY_COLUMNS` in that order."""
    metadata = json.loads(row[0])
    if len(row) == 1:
        return StoredRecord.from_metadata(metadata)
    return StoredRecord.from_metadata(
        metadata, packing.decode(row[1], row[3]), packing.decode(row[2], row[4])
    )


PageFetch = Callable[[tuple[int, str] | None, int], Sequence[Sequence[Any]]]
"""``(after, size) -> rows``: up to ``size`` rows ``(started_at_ns, id, *BODY_COLUMNS or
metadata)`` past the keyset position ``after`` (None: from the start), in query order."""


def keyset_pages(limit: int | None, page_rows: int, fetch: PageFetch) -> Iterator[StoredRecord]:
    """Records page by page on ``(started_at_ns, id)``, the way both SQL stores read: no
    cursor or transaction spans the caller's loop, and each page is an index range scan
    however far in it starts."""
    remaining = limit
    last: tuple[int, str] | None = None
    while remaining is None or remaining > 0:
        size = page_rows if remaining is None else min(page_rows, remaining)
        rows = fetch(last, size)
        for row in rows:
            yield record_from_row(row[2:])
        if len(rows) < size:
            return
        last = (rows[-1][0], rows[-1][1])
        if remaining is not None:
            remaining -= len(rows)
