"""What the SQL sinks (SQLite, PostgreSQL) share, so that they store and answer alike.

Both keep one row per exchange with the same columns: the indexed copies of what queries
filter and sort on, ``metadata`` (the whole record as JSON, the source of truth when
reading back) and the stored body bytes with their encodings. Here are the row a record
becomes (and the checks that refuse a record no row can hold), the record a row becomes
again, the WHERE clause of a :class:`Query`, keyset paging, and the layout version. What
differs between the two databases is passed in as a :class:`Dialect` (placeholder style,
what text the database can hold, partition pruning); DDL, connections and bulk loading
stay with each sink. What the two share for their ``checkpoints`` tables is in
:mod:`.checkpoint_rows`.

Bounded index columns. The copied columns hold values that came from the client
(``X-Request-ID``, the path) or from configuration; PostgreSQL refuses a B-tree entry
over 2704 bytes, and a refused row used to stop its stream's delivery for good. So a
copied text longer than :data:`INDEX_BYTES` (UTF-8) is stored as its first bytes, cut on
a character boundary, then ``…`` and 16 hex digits of the SHA-256 of the whole value
(:func:`bounded`): distinct long values stay distinct, and the column never grows. The
exact value is in ``metadata``, which is what records are read back from; queries look
the bounded form up in the index and keep only the records whose exact value matches
(:func:`keyset_pages`), so a search by a long correlation id finds its record, and a
short value that happens to equal a bounded one finds nothing it should not. Rows
written before the columns were bounded (same layout version: the columns did not change,
only what is written into them) hold the whole value, so a long query value is looked up
in both forms (:func:`where`). Record ids are not bounded (they are keys, and made by
asgi-audit): an id longer than :data:`INDEX_BYTES` is refused.

Nothing here imports a database driver.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any

from ..errors import CorruptRecord
from ..recording import packing
from .protocols import Query
from .query import matches
from .record import StoredRecord, json_text, kept_bytes
from .refusal import refused

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

INDEX_BYTES = 256
"""The most UTF-8 bytes a copied text column holds (see "Bounded index columns" above):
far under PostgreSQL's 2704-byte B-tree entry even for ``(route, started_at_ns, id)``."""
DIGEST_CHARS = 16
"""Hex digits of SHA-256 that end a bounded value (64 bits: no accidental collisions)."""
_MARK = "\u2026"

INT64 = (-(1 << 63), (1 << 63) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)
"""Ranges of the integer columns: a value outside them is refused, not wrapped (psycopg's
binary COPY of 2**40 into an int4 column stores 0 without a word)."""

_TEXTS = ("stream", "method", "path", "outcome", "correlation_id", "service")
_OPTIONAL_TEXTS = ("route", "trace_id")
_INTEGERS = (("started_at_ns", INT64, False), ("seq", INT64, False), ("status", INT32, True))
"""The integer columns: name, range, and whether None is allowed."""
_texts = attrgetter(*_TEXTS)
_optional_texts = attrgetter(*_OPTIONAL_TEXTS)
_JUST_STR = frozenset({str})
_STR_OR_NONE = frozenset({str, type(None)})


def bounded(value: str) -> str:
    """``value`` when its UTF-8 form fits :data:`INDEX_BYTES`, else its first bytes (cut
    on a character boundary), ``…`` and :data:`DIGEST_CHARS` hex digits of the SHA-256
    of the whole of it: short enough to index, and still telling long values apart."""
    if len(value) <= INDEX_BYTES // 4:  # at most 4 bytes a character: fits
        return value
    data = value.encode("utf-8", "surrogatepass")
    if len(data) <= INDEX_BYTES:
        return value
    digest = hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]
    cut = INDEX_BYTES - len(_MARK.encode()) - DIGEST_CHARS
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # not inside a character
        cut -= 1
    return data[:cut].decode("utf-8", "surrogatepass") + _MARK + digest


def utf8_size(value: str | bytes | None) -> int:
    """Bytes ``value`` takes in the database (text as UTF-8)."""
    if value is None:
        return 0
    if isinstance(value, bytes) or value.isascii():
        return len(value)
    return len(value.encode("utf-8", "surrogatepass"))


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
    check: Callable[[StoredRecord], str | None] | None = None
    """What else the database cannot take of a record (a start time it has no partition
    name for, say): the reason, or None."""
    plain: Callable[[str], bool] | None = None
    """A quick test for text that is ASCII and that :attr:`text` leaves as it is, true of
    a concatenation only when true of each part (as ``str.isascii``); None: no such test,
    :attr:`text` is always applied. Index columns are made for every record written; what
    passes it, and fits :data:`INDEX_BYTES`, is taken as it is."""

    def index(self, value: str) -> str:
        """``value`` as a copied column holds it: made safe by :attr:`text`, then
        :func:`bounded`."""
        if self.plain is not None and len(value) <= INDEX_BYTES and self.plain(value):
            return value  # what text() and bounded() would give back
        return bounded(self.text(value))


@dataclass(frozen=True, slots=True)
class Limits:
    """The most bytes one value and one whole row may take in a database; a record over
    them is refused before anything is sent (rather than failing in, or exhausting the
    memory of, the driver or the server)."""

    field_bytes: int
    row_bytes: int


ROW_OVERHEAD = 64 << 10
"""Bytes a row's limit keeps for what is not its values (headers, the index copies)."""


def indexed_columns(record: StoredRecord, dialect: Dialect) -> tuple[Any, ...]:
    """The columns both SQL sinks index, in their shared order (method through
    ``metadata``): texts made safe for the database and bounded (:meth:`Dialect.index`),
    and the whole record as JSON."""
    texts = _indexed_texts(record)
    if not _all_plain(texts, dialect):
        index = dialect.index
        texts = (
            index(record.method),
            None if record.route is None else index(record.route),
            index(record.path),
            index(record.outcome),
            index(record.correlation_id),
            None if record.trace_id is None else index(record.trace_id),
            index(record.service),
        )
    method, route, path, outcome, correlation_id, trace_id, service = texts
    return (
        method,
        route,
        path,
        record.status,
        outcome,
        correlation_id,
        trace_id,
        service,
        json_text(record.metadata()),
    )


_indexed_texts = attrgetter(
    "method", "route", "path", "outcome", "correlation_id", "trace_id", "service"
)


def _all_plain(texts: tuple[str | None, ...], dialect: Dialect) -> bool:
    """Whether each of ``texts`` (None aside) is its own index column: it passes
    :attr:`Dialect.plain` and fits :data:`INDEX_BYTES` (see :meth:`Dialect.index`), told
    at once for all of them, as they usually are."""
    if dialect.plain is None:
        return False
    try:
        present = tuple(filter(None, texts))  # "" is its own index column too
        longest = max(map(len, present), default=0)
        return longest <= INDEX_BYTES and dialect.plain("".join(present))
    except TypeError:  # not all texts: each is told by Dialect.index
        return False


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
        dialect.index(record.stream),
        record.seq,
        *indexed_columns(record, dialect),
        request_encoding,
        response_encoding,
        request,
        response,
    )


def rows(
    records: Sequence[StoredRecord], dialect: Dialect, limits: Limits, label: str
) -> list[Row]:
    """The rows of ``records``, or :class:`~asgi_audit.errors.RecordRefused` naming every
    record no row can hold (``label`` starts its message): a field of the wrong type or
    out of its column's range, an id too long to index, a value or row over ``limits``,
    metadata that cannot be written as JSON. Checked here, record by record, so that the
    refusal names its records and nothing half-written reaches the database."""
    made: list[Row] = []
    reasons: dict[str, str] = {}
    for record in records:
        reason = wrong_fields(record, dialect)
        if reason is None:
            try:
                made.append(row(record, dialect))
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                reason = f"cannot be encoded ({type(exc).__name__}: {exc})"
            else:
                if not _surely_fits(made[-1], limits):
                    reason = too_large(made[-1], limits)
        if reason is not None:
            reasons[record.id if isinstance(record.id, str) else repr(record.id)] = reason
    if reasons:
        raise refused(label, reasons)
    return made


def wrong_fields(record: StoredRecord, dialect: Dialect) -> str | None:
    """Why the columns cannot hold ``record`` (a type, a range, an id too long), or None."""
    if not isinstance(record.id, str) or not record.id:
        return f"its id is not a non-empty string ({type(record.id).__name__})"
    # Run for every record shipped, so the usual case (exact types, in range) is told by a
    # few C-level checks; the loops below, which name what is wrong, run only otherwise.
    plain_id = dialect.plain is not None and dialect.plain(record.id)
    short_id = plain_id and len(record.id) <= INDEX_BYTES  # ASCII: a byte a character
    if not short_id and utf8_size(dialect.text(record.id)) > INDEX_BYTES:
        return f"its id has more than {INDEX_BYTES} bytes"
    if not (
        _JUST_STR.issuperset(map(type, _texts(record)))
        and _STR_OR_NONE.issuperset(map(type, _optional_texts(record)))
    ):
        for name in _TEXTS:
            if not isinstance(getattr(record, name), str):
                return f"{name} is a {type(getattr(record, name)).__name__}, not a string"
        for name in _OPTIONAL_TEXTS:
            if not isinstance(getattr(record, name), str | None):
                return f"{name} is a {type(getattr(record, name)).__name__}, not a string"
    started, seq, status = record.started_at_ns, record.seq, record.status
    if not (
        type(started) is int
        and _INT64_LOW <= started <= _INT64_HIGH
        and type(seq) is int
        and _INT64_LOW <= seq <= _INT64_HIGH
        and (status is None or (type(status) is int and _INT32_LOW <= status <= _INT32_HIGH))
    ):
        for name, (low, high), optional in _INTEGERS:
            value = getattr(record, name)
            if value is None and optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                return f"{name} is a {type(value).__name__}, not an integer"
            if not low <= value <= high:
                return f"{name} {value} is out of its column's range [{low}, {high}]"
    return None if dialect.check is None else dialect.check(record)


_INT64_LOW, _INT64_HIGH = INT64
_INT32_LOW, _INT32_HIGH = INT32


def too_large(values: Row, limits: Limits) -> str | None:
    """Why ``values`` (a row) is over ``limits``, or None."""
    total = ROW_OVERHEAD
    for name, value in zip(ROW_COLUMNS, values, strict=True):
        if isinstance(value, str | bytes):
            size = utf8_size(value)
            if size > limits.field_bytes:
                return f"{name} has {size} bytes, over the {limits.field_bytes} a value may hold"
            total += size
    if total > limits.row_bytes:
        return f"the row has {total} bytes, over the {limits.row_bytes} a row may hold"
    return None


_SIZED_COLUMNS = tuple(
    at for at, name in enumerate(ROW_COLUMNS) if name not in ("started_at_ns", "seq", "status")
)
_sized_values = itemgetter(*_SIZED_COLUMNS)
"""The values of a :func:`row` that are text, bytes or None (the others are integers)."""


def _surely_fits(values: Row, limits: Limits) -> bool:
    """Whether a :func:`row` is certainly within ``limits``, told without measuring each
    value in UTF-8 (as :func:`too_large` does, for every record written otherwise): no
    character takes more than 4 bytes, so 4 times the sum of the lengths bounds every
    value and the row. False only means :func:`too_large` must tell."""
    if len(values) != len(ROW_COLUMNS):
        return False
    try:
        bound = 4 * sum(map(len, filter(None, _sized_values(values))))
    except TypeError:  # not a row of :func:`row`'s types: too_large tells
        return False
    return bound <= limits.field_bytes and ROW_OVERHEAD + bound <= limits.row_bytes


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


def where(query: Query, dialect: Dialect, status: str = "status") -> tuple[list[str], list[Any]]:
    """The conditions (to be joined by AND) and their parameters that select what
    ``query`` filters on; limit and order are the pages' business.

    Text is compared in the form the columns hold (:meth:`Dialect.index`), which may
    select records whose exact value differs (a bounded value, an escaped character):
    :func:`keyset_pages` keeps only the records that match exactly. A value long enough
    to be bounded is also looked up whole, as rows written before bounding hold it.
    ``status`` is how the status column is named in the conditions (``+status`` keeps
    SQLite's planner off its index: see :data:`STATUS_SORT_MOST`)."""
    mark = dialect.placeholder
    conditions: list[str] = []
    params: list[Any] = []
    for clause, number in (
        ("started_at_ns >=", query.since_ns),
        ("started_at_ns <", query.until_ns),
        (f"{status} >=", query.status_low),
        (f"{status} <=", query.status_high),
    ):
        if number is not None:
            conditions.append(f"{clause} {mark}")
            params.append(number)
    for column, text in (
        ("route", query.route),
        ("method", query.method),
        ("correlation_id", query.correlation_id),
        ("stream", query.stream),
    ):
        if text is None:
            continue
        key, whole = dialect.index(text), dialect.text(text)
        if key == whole:
            conditions.append(f"{column} = {mark}")
            params.append(key)
        else:
            conditions.append(f"{column} IN ({mark}, {mark})")
            params.extend((key, whole))
    return conditions, params


PageStatement = Callable[[tuple[int, str] | None, int], tuple[str, list[Any]]]
"""``(after, size) -> (statement, parameters)``: see :func:`page_statements`."""


def page_statements(
    query: Query, table: str, dialect: Dialect, status: str = "status"
) -> PageStatement:
    """The statement reading one page of ``query`` from ``table`` (written into the SQL as
    it is): up to ``size`` rows ``(started_at_ns, id, *BODY_COLUMNS or metadata)`` past
    the keyset position ``after`` (None: from the start), in the query's order."""
    conditions, params = where(query, dialect, status)
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


def keyset_pages(
    limit: int | None,
    page_rows: int,
    fetch: PageFetch,
    keep: Callable[[StoredRecord], bool] | None = None,
) -> Iterator[StoredRecord]:
    """Records page by page on ``(started_at_ns, id)``, the way both SQL sinks read: no
    cursor or transaction spans the caller's loop, and each page is an index range scan
    however far in it starts. ``keep`` drops records the indexed columns selected but
    whose exact values do not match (see :func:`where`); ``limit`` counts kept ones."""
    remaining = limit
    last: tuple[int, str] | None = None
    while remaining is None or remaining > 0:
        size = page_rows if remaining is None else min(page_rows, remaining)
        page = fetch(last, size)
        for found in page:
            record = record_from_row(found[2:], found[1])
            if keep is not None and not keep(record):
                continue
            yield record
            if remaining is not None:
                remaining -= 1
                if remaining == 0:
                    return
        if len(page) < size:
            return
        last = (page[-1][0], page[-1][1])


def search(
    query: Query,
    table: str,
    dialect: Dialect,
    run: Callable[[str, list[Any]], Sequence[Sequence[Any]]],
    status: str = "status",
) -> Iterator[StoredRecord]:
    """The records ``query`` selects from ``table``, read page by page (see
    :func:`keyset_pages`); ``run(statement, parameters)`` gives the rows of one page."""
    statement = page_statements(query, table, dialect, status)
    page_rows = PAGE_ROWS_WITH_BODIES if query.with_bodies else PAGE_ROWS
    return keyset_pages(
        query.limit,
        page_rows,
        lambda last, size: run(*statement(last, size)),
        lambda record: matches(query, record),
    )


def newer_layout(what: str, found: int) -> str:
    """The message refusing ``what`` (a file, a table) of layout version ``found``."""
    return (
        f"{what} has layout version {found}, newer than this asgi-audit understands "
        f"({LAYOUT_VERSION}); upgrade asgi-audit"
    )
