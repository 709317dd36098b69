"""What the SQL sinks (SQLite, PostgreSQL) share, so that they store and answer alike.

Both keep one row per exchange with the same columns: the indexed copies of what queries
filter and sort on, ``metadata`` (the whole record as JSON, the source of truth when
reading back) and the stored body bytes with their encodings. Here are the row a record
becomes, the record a row becomes again, the WHERE clause of a :class:`Query`, keyset
paging, and the layout version. What differs between the two databases is passed in as
a :class:`Dialect` (placeholder style, what text the database can hold, partition
pruning); DDL, connections and bulk loading stay with each sink.

Nothing here imports a database driver.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptRecord
from ..recording import packing
from .protocols import Query
from .record import StoredRecord, json_text, kept_bytes

LAYOUT_VERSION = 1
"""Version of the SQL sinks' table layout (not of the record schema, which the JSON
carries); a sink refuses a table or file of a newer layout."""

PAGE_ROWS = 256
PAGE_ROWS_WITH_BODIES = 16
"""Rows per read; bodies may be megabytes each, so those pages are kept short."""

BODY_COLUMNS = "metadata, request_body, response_body, request_encoding, response_encoding"
"""What the SQL sinks read to rebuild a record with its bodies (see :func:`record_from_row`)."""

ROW_COLUMNS = (
    "started_at_ns",
    "id",
    "stream",
    "seq",
    "method",
    "route",
    "path",
    "status",
    "outcome",
    "correlation_id",
    "trace_id",
    "service",
    "metadata",
    "request_encoding",
    "response_encoding",
    "request_body",
    "response_body",
)
"""The columns a write fills, in the order of :func:`row` (inserts name them, so this is
not the order of the table's columns)."""

Row = tuple[Any, ...]


def surrogate_safe(value: str) -> str:
    """``value`` as valid UTF-8 text (what SQLite needs): a lone surrogate is escaped
    (``\\udc80``). Only index columns are escaped: the JSON metadata keeps the exact value."""
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def nul_and_surrogate_safe(value: str) -> str:
    """PostgreSQL text holds neither NUL nor lone surrogates: both are escaped (NUL as
    ``\\x00``), as :func:`surrogate_safe` does."""
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    return surrogate_safe(value)


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the SQL sinks in the statements they share."""

    placeholder: str
    """How a statement marks a parameter: ``?`` (sqlite3) or ``%s`` (psycopg)."""
    text: Callable[[str], str]
    """Makes a string safe for the database's text type; applied alike to what is written
    to the indexed columns and to the values a query compares them with."""
    prune_partitions: bool = False
    """Whether keyset pages also bound ``started_at_ns`` alone, which a planner can use to
    skip partitions (the row comparison cannot)."""


def indexed_columns(record: StoredRecord, text: Callable[[str], str]) -> tuple[Any, ...]:
    """The columns both SQL sinks index, in their shared order (method through
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
        json_text(record.metadata()),
    )


def encoded_bodies(record: StoredRecord) -> tuple[bytes | None, str, bytes | None, str]:
    """(request, its encoding, response, its encoding) as the SQL sinks keep them."""
    request, request_encoding = kept_bytes(record.request_body)
    response, response_encoding = kept_bytes(record.response_body)
    return request, request_encoding, response, response_encoding


def row(record: StoredRecord, dialect: Dialect) -> Row:
    """The values of :data:`ROW_COLUMNS` for ``record``."""
    request, request_encoding, response, response_encoding = encoded_bodies(record)
    return (
        record.started_at_ns,
        dialect.text(record.id),
        dialect.text(record.stream),
        record.seq,
        *indexed_columns(record, dialect.text),
        request_encoding,
        response_encoding,
        request,
        response,
    )


def record_from_row(row: Sequence[Any], record_id: str | None = None) -> StoredRecord:
    """A record from ``metadata`` alone, or from the :data:`BODY_COLUMNS` in that order.

    :class:`CorruptRecord`, naming ``record_id`` when given, when the row cannot be read
    back: metadata that is not the JSON of a record, or body bytes that do not unpack."""
    try:
        metadata = json.loads(row[0])
        if not isinstance(metadata, dict):
            raise TypeError(f"a JSON {type(metadata).__name__}, not an object")
        if len(row) == 1:
            return StoredRecord.from_metadata(metadata)
        request = packing.decode(row[1], row[3])
        response = packing.decode(row[2], row[4])
        return StoredRecord.from_metadata(metadata, request, response)
    except CorruptRecord as exc:
        raise CorruptRecord(f"{_which(record_id)}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:  # JSON and UTF-8 errors are ValueError
        raise CorruptRecord(f"{_which(record_id)}: metadata is not a record ({exc!r})") from exc


def _which(record_id: str | None) -> str:
    return "a stored record" if record_id is None else f"record {record_id!r}"


def where(query: Query, dialect: Dialect) -> tuple[list[str], list[Any]]:
    """The conditions (to be joined by AND) and their parameters that select what
    ``query`` filters on; limit and order are the pages' business."""
    text = dialect.text
    conditions: list[str] = []
    params: list[Any] = []
    for clause, value in (
        ("started_at_ns >=", query.since_ns),
        ("started_at_ns <", query.until_ns),
        ("route =", None if query.route is None else text(query.route)),
        ("method =", None if query.method is None else text(query.method)),
        ("status >=", query.status_low),
        ("status <=", query.status_high),
        ("correlation_id =", None if query.correlation_id is None else text(query.correlation_id)),
    ):
        if value is not None:
            conditions.append(f"{clause} {dialect.placeholder}")
            params.append(value)
    return conditions, params


PageStatement = Callable[[tuple[int, str] | None, int], tuple[str, list[Any]]]
"""``(after, size) -> (statement, parameters)``: see :func:`page_statements`."""


def page_statements(query: Query, table: str, dialect: Dialect) -> PageStatement:
    """The statement reading one page of ``query`` from ``table`` (written into the SQL as
    it is): up to ``size`` rows ``(started_at_ns, id, *BODY_COLUMNS or metadata)`` past
    the keyset position ``after`` (None: from the start), in the query's order."""
    conditions, params = where(query, dialect)
    columns = BODY_COLUMNS if query.with_bodies else "metadata"
    order, after, bound = ("DESC", "<", "<=") if query.newest_first else ("ASC", ">", ">=")
    mark = dialect.placeholder

    def statement(last: tuple[int, str] | None, size: int) -> tuple[str, list[Any]]:
        page_conditions = list(conditions)
        page_params = list(params)
        if last is not None:
            if dialect.prune_partitions:
                # The plain bound lets the planner prune partitions; the row comparison
                # is the exact keyset condition.
                page_conditions.append(f"started_at_ns {bound} {mark}")
                page_params.append(last[0])
            page_conditions.append(f"(started_at_ns, id) {after} ({mark}, {mark})")
            page_params.extend(last)
        text = (
            f"SELECT started_at_ns, id, {columns} FROM {table}"
            f"{' WHERE ' + ' AND '.join(page_conditions) if page_conditions else ''}"
            f" ORDER BY started_at_ns {order}, id {order} LIMIT {mark}"
        )
        return text, [*page_params, size]

    return statement


PageFetch = Callable[[tuple[int, str] | None, int], Sequence[Sequence[Any]]]
"""``(after, size) -> rows``: up to ``size`` rows ``(started_at_ns, id, *BODY_COLUMNS or
metadata)`` past the keyset position ``after`` (None: from the start), in query order."""


def keyset_pages(limit: int | None, page_rows: int, fetch: PageFetch) -> Iterator[StoredRecord]:
    """Records page by page on ``(started_at_ns, id)``, the way both SQL sinks read: no
    cursor or transaction spans the caller's loop, and each page is an index range scan
    however far in it starts."""
    remaining = limit
    last: tuple[int, str] | None = None
    while remaining is None or remaining > 0:
        size = page_rows if remaining is None else min(page_rows, remaining)
        rows = fetch(last, size)
        for found in rows:
            yield record_from_row(found[2:], found[1])
        if len(rows) < size:
            return
        last = (rows[-1][0], rows[-1][1])
        if remaining is not None:
            remaining -= len(rows)


def search(
    query: Query,
    table: str,
    dialect: Dialect,
    run: Callable[[str, list[Any]], Sequence[Sequence[Any]]],
) -> Iterator[StoredRecord]:
    """The records ``query`` selects from ``table``, read page by page (see
    :func:`keyset_pages`); ``run(statement, parameters)`` gives the rows of one page."""
    statement = page_statements(query, table, dialect)
    page_rows = PAGE_ROWS_WITH_BODIES if query.with_bodies else PAGE_ROWS
    return keyset_pages(query.limit, page_rows, lambda last, size: run(*statement(last, size)))


def newer_layout(what: str, found: int) -> str:
    """The message refusing ``what`` (a file, a table) of layout version ``found``."""
    return (
        f"{what} has layout version {found}, newer than this asgi-audit understands "
        f"({LAYOUT_VERSION}); upgrade asgi-audit"
    )
