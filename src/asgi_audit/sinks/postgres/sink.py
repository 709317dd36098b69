"""The PostgreSQL sink itself: ``postgresql://user@host:5432/db?table=audit_records``.

Loaded by :func:`asgi_audit.sinks.postgres.open_url` only: the application checks its URL
with :mod:`.url`, which imports no driver. The statements it shares with the SQLite sink
(rows, WHERE clause, keyset pages, layout version) are in :mod:`asgi_audit.sinks.sql`.

On Kubernetes a service runs as many short-lived pods; their records belong in one place
the team already operates. This sink keeps one row per exchange, like the SQLite sink:
indexed columns copy what the CLI filters and sorts on, ``metadata`` holds the whole
record as JSON text and is the source of truth when reading back, and the bodies are
``bytea``, through :mod:`.packing` (zstd when that pays, with an encoding column), so
what comes back is exactly what was captured.

Partitions. The table is range-partitioned by UTC day on ``started_at_ns`` itself (bigint
ranges ``[day * 86400e9, (day + 1) * 86400e9)``), not on a derived ``timestamptz``:
the nanosecond value is what every query filters and pages on, so partition pruning
applies to the CLI's queries directly, no rounding can put a record on the wrong side of a
boundary, and nothing has to be computed twice (a generated column cannot be a partition
key anyway). A generated ``started_at timestamptz`` column is there for people writing
SQL. Partitions for yesterday to three days ahead are created at start-up and once a day
after; a batch holding a record of any other day creates that day's partition first (a
record shipped late, or replayed from an old spool, must be accepted: refusing it would
block its stream forever). Retention drops whole partitions (:meth:`apply_retention`),
which costs no vacuum and no index churn, unlike ``DELETE``.

Idempotency. A unique constraint on a partitioned table must include the partition key,
so the primary key is ``(started_at_ns, id)``. That still makes a record id unique: a
record's start time is part of the record, fixed when the exchange began and carried
unchanged through the spool, so a redelivered record always has the same key and
``ON CONFLICT DO NOTHING`` keeps the first copy. Ids repeated inside one batch are
dropped before the database sees them, keeping the first occurrence as the other sinks do.

Writes. A batch is copied (binary ``COPY``, so body bytes travel as they are rather than
as hex text) into a temporary staging table, then moved with one ``INSERT ... SELECT ...
ON CONFLICT DO NOTHING``, in one transaction: one commit, so one WAL flush per batch. The
staging table is created once per connection, ``ON COMMIT DELETE ROWS`` (so the sink
needs session-level connections: direct, or PgBouncer in session mode). A session whose
``synchronous_commit`` is ``off`` is set back to ``on``: the shipper drops spooled records
once ``write_batch`` returns, so the commit must be durable by then.

Refusals. What a row cannot hold is refused before anything is sent, naming the records
(:func:`asgi_audit.sinks.sql.rows`): a ``bytea`` or ``text`` value, or a whole row, over
:data:`MAX_BYTES` (PostgreSQL's 1 GB; the server would fail to allocate it, after the
client had copied it), an integer out of its column's range (binary COPY would wrap it
silently), a start time with no possible day partition. What the server refuses for the
data itself, in the COPY or the INSERT, is a :class:`RecordRefused` too (see
:func:`refused_by_server`): SQLSTATE class 22 (data exceptions: NUL or invalid UTF-8,
values out of range), class 23 but ``unique_violation`` (duplicates are skipped by
``ON CONFLICT DO NOTHING``; a unique violation can then only be a race, retried) and
``check_violation`` (the missing-partition case, handled above), and 54000 (an index row
too large). The transaction is rolled back, so the connection goes back to the pool
clean. Indexed text is bounded (:func:`asgi_audit.sinks.sql.bounded`), so a long
``X-Request-ID`` is stored and found rather than refused.

Connections. A small ``psycopg_pool.ConnectionPool`` (one connection kept, at most four:
the shipper writes with one, a CLI or viewer in the same process may read meanwhile),
opened at first use so that configuration can be checked without a server, closed by
:meth:`close`. Connections are checked when taken from the pool, so those a server
restart has killed are replaced; an operation that fails on a connection lost midway is
run once more on a fresh one (writes are idempotent, so that is safe). Anything else, or a
second failure, raises :class:`SinkError`, and the shipper backs off and retries later.

Schema. A ``<table>_schema_version`` table records the layout version of ``<table>``;
start-up creates or migrates the layout under an advisory lock (many pods start at once),
and refuses a layout newer than this code knows.

Checkpoints. The streams' checkpoints live in ``<table>_checkpoints`` (stream bounded like
the records' column, ``idx``, ``at_ns``, and ``body``, the JSON text and the source of
truth; primary key ``(stream, idx)``), written with ``ON CONFLICT DO NOTHING`` in one
transaction per call (see :mod:`asgi_audit.sinks.checkpoint_rows`). It is not partitioned:
retention drops days of records, and the checkpoints that vouch for the days kept must
outlive it. A table added is a compatible change, so it does not change the layout
version: writers create it when missing (in a layout of version 1 made before it existed,
too) under the same advisory lock; readers, which never run DDL, read a missing one as no
checkpoints.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from ..._urls import mask_in
from ...errors import ConfigError, RecordRefused, SinkError
from .. import checkpoint_rows, refusal
from .. import sql as shared
from ..protocols import Query
from ..record import StoredRecord
from .url import not_a_url, parse_url, without_secrets

DAY_NS = 86_400 * 1_000_000_000
DAYS_BEHIND = 1
DAYS_AHEAD = 3
"""Partitions kept ready around today, so that writes near midnight need no DDL."""

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4
POOL_TIMEOUT = 5.0
"""Seconds to wait for a pooled connection; a shipper blocked longer cannot meet its
shutdown deadline, and while the server is down waiting longer does not help."""
CONNECT_TIMEOUT = 10
"""libpq ``connect_timeout`` unless the URL sets one: an unroutable host fails, not hangs."""
DDL_LOCK_TIMEOUT = "10s"
"""Partition DDL waits this long for the parent's lock (long readers) before giving up."""

_STAGING = sql.Identifier("pg_temp", "asgi_audit_staging")

_NOT_TEXT = {
    "started_at_ns": "int8",
    "seq": "int8",
    "status": "int4",
    "request_body": "bytea",
    "response_body": "bytea",
}

_COLUMNS = tuple((name, _NOT_TEXT.get(name, "text")) for name in shared.ROW_COLUMNS)
"""What a batch carries, in COPY order (that of :func:`shared.row`), with the binary COPY
type of each."""

_COLUMN_LIST = sql.SQL(", ").join(sql.Identifier(name) for name, _ in _COLUMNS)
_COPY_TYPES = [kind for _, kind in _COLUMNS]


_BOUNDS = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")

MAX_BYTES = (1 << 30) - (1 << 20)
"""The most bytes a value, or a whole row, may take: PostgreSQL cannot hold a ``bytea``
or ``text`` of 1 GB (nor allocate a row that large), and a MiB is kept for the rest."""

_DAYS = range(-(1 << 63) // DAY_NS + 1, (1 << 63) // DAY_NS)
"""Days whose partition bounds fit ``bigint`` (and whose names a ``date`` can spell)."""


def _partition_day(record: StoredRecord) -> str | None:
    """Why no day partition can hold ``record`` (its start is too far from 1970), or None."""
    if record.started_at_ns // DAY_NS not in _DAYS:
        return f"started_at_ns {record.started_at_ns} is outside the days partitions can cover"
    return None


_DIALECT = shared.Dialect(
    "%s", shared.nul_and_surrogate_safe, prune_partitions=True, check=_partition_day
)
"""PostgreSQL text holds neither NUL nor lone surrogates; both are escaped in index
columns (the JSON metadata keeps the exact value), and pages are bounded so that the
planner prunes partitions."""

_LIMITS = shared.Limits(MAX_BYTES, MAX_BYTES)

_REFUSED_CLASSES = ("22", "23")
_NOT_REFUSED = frozenset({"23505", "23514"})
"""unique_violation (a race with another writer: the retry's ON CONFLICT skips the row)
and check_violation (a day partition dropped under the writer: created on the retry)."""
_REFUSED_STATES = frozenset({"54000"})
"""program_limit_exceeded: "index row size ... exceeds btree version 4 maximum 2704"."""


def refused_by_server(exc: psycopg.Error) -> bool:
    """Whether the server (or psycopg, for NUL in text) refused what a batch holds, which
    no retry changes, rather than failed to store it now."""
    if isinstance(exc, psycopg.DataError):  # class 22, and psycopg's own (NUL in text)
        return True
    state = exc.sqlstate or ""
    if state in _REFUSED_STATES:
        return True
    return state[:2] in _REFUSED_CLASSES and state not in _NOT_REFUSED


T = TypeVar("T")
Connection = psycopg.Connection[TupleRow]


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition of the records table: its name and the start times it holds."""

    name: str
    low_ns: int
    high_ns: int
    """Exclusive."""

    @property
    def days(self) -> range:
        """The whole UTC days (numbered from the epoch) this partition covers."""
        return range(-(-self.low_ns // DAY_NS), self.high_ns // DAY_NS)


def _conninfo(url: str, libpq_url: str) -> str:
    """The connection string: libpq's own reading of the URL, with this sink's defaults."""
    try:
        params: dict[str, Any] = conninfo_to_dict(libpq_url)
    except (psycopg.Error, UnicodeDecodeError) as exc:
        # parse_url refuses what libpq would, so only an older libpq that lacks a
        # parameter gets here; its message may quote the URL's parts, passwords included.
        reason = without_secrets(" ".join(str(exc).split()), libpq_url)
        raise not_a_url(url, f"libpq: {reason}") from None
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    params.setdefault("application_name", "asgi-audit")
    return make_conninfo("", **params)


class PostgresSink:
    """A sink over one partitioned table (see the module docstring for the choices).

    ``create=False`` (readers such as the CLI) refuses a table that does not exist rather
    than creating an empty one under a mistyped name, and creates no partitions."""

    keeps_packed = True
    """Bodies the spool packed are stored as they are (see ``Sink.write_batch``)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        parsed = parse_url(url)
        self.table = parsed.table
        self.display = parsed.display
        self._url = url
        self._libpq_url = parsed.libpq_url
        self._conninfo = _conninfo(url, parsed.libpq_url)
        self._create = create
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Connection] | None = None
        self._closed = False
        self._ready = False
        self._days: set[int] = set()
        self._ahead_day: int | None = None
        names = {
            "t": sql.Identifier(self.table),
            "version_table": sql.Identifier(f"{self.table}_schema_version"),
            "checkpoints": sql.Identifier(f"{self.table}_checkpoints"),
        }
        self._names = names
        self._insert = sql.SQL(
            "INSERT INTO {t} ({columns}) SELECT {columns} FROM {staging}"
            " ON CONFLICT (started_at_ns, id) DO NOTHING"
        ).format(columns=_COLUMN_LIST, staging=_STAGING, **names)
        self._copy = sql.SQL("COPY {staging} ({columns}) FROM STDIN (FORMAT BINARY)").format(
            staging=_STAGING, columns=_COLUMN_LIST
        )
        self._insert_checkpoint = sql.SQL(
            "INSERT INTO {checkpoints} ({columns}) VALUES ({values})"
            " ON CONFLICT (stream, idx) DO NOTHING"
        ).format(
            columns=sql.SQL(", ").join(map(sql.Identifier, checkpoint_rows.SQL_COLUMNS)),
            values=sql.SQL(", ").join(sql.Placeholder() for _ in checkpoint_rows.SQL_COLUMNS),
            **names,
        )

    def __repr__(self) -> str:
        return f"PostgresSink({self.display!r})"

    # Sink ---------------------------------------------------------------------------

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        first: dict[str, StoredRecord] = {}
        for record in records:
            first.setdefault(record.id, record)
        self._check_open()
        if not first:
            return
        # The CPU work (JSON, zstd, checks) is done before a connection is taken.
        rows = shared.rows(list(first.values()), _DIALECT, _LIMITS, repr(self))
        days = {record.started_at_ns // DAY_NS for record in first.values()}
        ids = list(first)
        self._run(f"batch of {len(rows)} not stored", lambda c: self._write(c, rows, days, ids))

    def write_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> None:
        self._check_open()
        found = checkpoint_rows.checked(checkpoints, repr(self))
        if not found:
            return
        rows = checkpoint_rows.sql_rows(found, _DIALECT)

        def write(connection: Connection) -> None:
            try:
                with connection.transaction(), connection.cursor() as cursor:
                    cursor.executemany(self._insert_checkpoint, rows)
            except psycopg.Error as exc:
                if refused_by_server(exc):
                    state = f" [SQLSTATE {exc.sqlstate}]" if exc.sqlstate else ""
                    raise RecordRefused(
                        f"{self!r}: {len(rows)} checkpoints refused: "
                        f"{refusal.short(self._reason(exc))}{state}"
                    ) from exc
                raise

        self._run(f"{len(rows)} checkpoints not stored", write)

    def checkpoints(self, stream: str | None = None) -> Iterator[dict[str, Any]]:
        self._check_open()
        where, params = checkpoint_rows.stream_where(stream, _DIALECT)
        select = sql.SQL("SELECT stream, idx, body FROM {checkpoints}" + where).format(
            **self._names
        )

        def read(connection: Connection) -> list[TupleRow]:
            if not self._has_table(connection, f"{self.table}_checkpoints"):
                return []  # a reader on a layout made before checkpoints existed
            return connection.execute(select, params).fetchall()

        rows = self._run("query failed", read)
        return iter(checkpoint_rows.from_sql_rows(rows, stream, _DIALECT, repr(self)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # Queries -------------------------------------------------------------------------

    def search(self, query: Query) -> Iterator[StoredRecord]:
        self._check_open()

        def run(statement: str, params: list[Any]) -> list[TupleRow]:
            composed = sql.SQL(statement).format(**self._names)
            return self._fetch(composed, params, binary=query.with_bodies)

        return shared.search(query, "{t}", _DIALECT, run)

    def get(self, record_id: str) -> StoredRecord | None:
        statement = sql.SQL(
            f"SELECT {shared.BODY_COLUMNS} FROM {{t}} WHERE id = %s ORDER BY started_at_ns LIMIT 1"
        ).format(**self._names)
        rows = self._fetch(statement, (_DIALECT.text(record_id),), binary=True)
        return None if not rows else shared.record_from_row(rows[0], record_id)

    def count(self) -> int:
        rows = self._fetch(sql.SQL("SELECT count(*) FROM {t}").format(**self._names), ())
        return int(rows[0][0])

    def ready(self) -> None:
        """Connect now and check the layout (create or migrate it, for writers); raises
        :class:`SinkError` with the reason when that cannot be done."""
        self._check_open()
        self._run("not ready", lambda connection: None)

    # Partitions and retention --------------------------------------------------------

    def partitions(self) -> list[Partition]:
        """Every partition of the records table, oldest first."""
        return self._run("cannot list partitions", self._list_partitions)

    def apply_retention(self, keep_days: int, *, now_ns: int | None = None) -> list[str]:
        """Drop the partitions whose every record started more than ``keep_days`` days ago.

        Whole partitions go (no ``DELETE``, no vacuum); a day is dropped once its last
        nanosecond is older than the cutoff, so records live ``keep_days`` to
        ``keep_days + 1`` days. Returns the names of the dropped partitions, oldest first."""
        if keep_days < 1:
            raise ValueError(f"keep_days must be at least 1 (got {keep_days})")
        cutoff = (time.time_ns() if now_ns is None else now_ns) - keep_days * DAY_NS
        return self._run("retention not applied", lambda c: self._drop_before(c, cutoff))

    # Internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SinkError(f"{self!r} is closed")

    def _open_pool(self) -> ConnectionPool[Connection]:
        with self._lock:
            if self._closed:
                raise SinkError(f"{self!r} is closed")
            if self._pool is None:
                pool: ConnectionPool[Connection] = ConnectionPool(
                    self._conninfo,
                    kwargs={"autocommit": True},
                    min_size=POOL_MIN_SIZE,
                    max_size=POOL_MAX_SIZE,
                    open=False,
                    configure=_configure,
                    check=ConnectionPool.check_connection,
                    name=f"asgi-audit {self.table}",
                    timeout=POOL_TIMEOUT,
                    num_workers=2,
                )
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    def _run(self, failure: str, work: Callable[[Connection], T]) -> T:
        """Run ``work`` on a pooled connection, once more on a fresh one if the first was
        lost midway; every database error leaves as :class:`SinkError`."""
        for attempt in (1, 2):
            pool = self._open_pool()
            try:
                with pool.connection() as connection:
                    if not self._ready:
                        self._prepare(connection)
                    return work(connection)
            except PoolTimeout as exc:
                raise SinkError(f"{self!r}: {failure}: {self._unreachable(exc)}") from exc
            except psycopg.OperationalError as exc:
                if attempt == 2 or self._closed:
                    raise SinkError(f"{self!r}: {failure}: {self._reason(exc)}") from exc
            except psycopg.Error as exc:
                raise SinkError(f"{self!r}: {failure}: {self._reason(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _reason(self, exc: psycopg.Error) -> str:
        """The server's or libpq's message on one line, with this sink's URL and its
        passwords masked (libpq quotes parts of what it was given)."""
        text = _reason(exc)
        text = mask_in(mask_in(text, self._url), self._libpq_url)
        return without_secrets(text, self._libpq_url)

    def _unreachable(self, timeout: PoolTimeout) -> str:
        """Why no connection came: the pool only says it waited, so ask the server."""
        try:
            with psycopg.connect(self._conninfo, connect_timeout=3) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error as exc:
            return self._reason(exc)
        return f"all {POOL_MAX_SIZE} connections busy ({timeout})"

    def _fetch(
        self, statement: sql.Composed, params: Sequence[Any], *, binary: bool = False
    ) -> list[TupleRow]:
        def work(connection: Connection) -> list[TupleRow]:
            with connection.cursor() as cursor:
                cursor.execute(statement, params, binary=binary)
                return cursor.fetchall()

        self._check_open()
        return self._run("query failed", work)

    # Schema

    def _prepare(self, connection: Connection) -> None:
        """Create or migrate the layout (writers), check it exists (readers), and have
        partitions ready around today. Runs once per instance, on its first operation."""
        with self._lock:
            if self._ready:
                return
            _check_server(connection, self)
            with connection.transaction():
                self._advisory_lock(connection)
                version = self._layout_version(connection)
                if version is None and not self._create:
                    raise SinkError(
                        f"{self!r}: no asgi-audit table {self.table!r} in this database"
                    )
                self._migrate(connection, version or 0)
                if self._create:
                    self._create_checkpoints(connection)
            self._days = {day for part in self._list_partitions(connection) for day in part.days}
            if self._create:
                self._ensure_days(connection, set())
            self._ready = True

    def _advisory_lock(self, connection: Connection) -> None:
        """Serialise DDL on this table across processes (pods start together)."""
        connection.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s || current_schema(), 0))",
            (f"asgi-audit:{self.table}@",),
        )

    def _has_table(self, connection: Connection, name: str) -> bool:
        exists = connection.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
        return bool(exists and exists[0])

    def _layout_version(self, connection: Connection) -> int | None:
        if not self._has_table(connection, f"{self.table}_schema_version"):
            return None
        row = connection.execute(
            sql.SQL("SELECT max(version) FROM {version_table}").format(**self._names)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _migrate(self, connection: Connection, version: int) -> None:
        if version > shared.LAYOUT_VERSION:
            raise SinkError(f"{self!r}: " + shared.newer_layout(f"table {self.table!r}", version))
        if version == 0:
            taken = connection.execute("SELECT to_regclass(%s)", (self.table,)).fetchone()
            if taken and taken[0] is not None:
                raise SinkError(
                    f"{self!r}: a table {self.table!r} exists but was not made by asgi-audit"
                    " (no schema version); choose another ?table="
                )
            connection.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {version_table} ("
                    " version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(**self._names)
            )
        for target in range(version + 1, shared.LAYOUT_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                connection.execute(sql.SQL(statement).format(**self._names))
            connection.execute(
                sql.SQL("INSERT INTO {version_table} (version) VALUES (%s)").format(**self._names),
                (target,),
            )

    def _create_checkpoints(self, connection: Connection) -> None:
        """The checkpoints table, when missing: a compatible addition to layout 1 (see the
        module docstring), so it is created here rather than by a migration."""
        if self._has_table(connection, f"{self.table}_checkpoints"):
            return  # no DDL (nor its lock) when there is nothing to do
        for statement in _CHECKPOINTS:
            connection.execute(sql.SQL(statement).format(**self._names))

    # Partitions

    def _list_partitions(self, connection: Connection) -> list[Partition]:
        rows = connection.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(%s)",
            (self.table,),
        ).fetchall()
        found = []
        for name, bound in rows:
            match = _BOUNDS.search(bound or "")
            if match:
                found.append(Partition(name, int(match.group(1)), int(match.group(2))))
        return sorted(found, key=lambda part: part.low_ns)

    def _ensure_days(self, connection: Connection, days: set[int]) -> None:
        """Create the partitions of ``days`` (and those around today, once a day) that
        the last look at the catalog did not show."""
        today = time.time_ns() // DAY_NS
        wanted = set(days)
        if self._ahead_day != today:
            wanted.update(range(today - DAYS_BEHIND, today + DAYS_AHEAD + 1))
        if wanted <= self._days:
            self._ahead_day = today
            return
        with connection.transaction():
            connection.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
            self._advisory_lock(connection)
            existing = {day for part in self._list_partitions(connection) for day in part.days}
            for day in sorted(wanted - existing):
                connection.execute(
                    sql.SQL(
                        "CREATE TABLE {part} PARTITION OF {t} FOR VALUES FROM ({low}) TO ({high})"
                    ).format(
                        part=sql.Identifier(_partition_name(self.table, day)),
                        low=sql.Literal(day * DAY_NS),
                        high=sql.Literal((day + 1) * DAY_NS),
                        **self._names,
                    )
                )
        self._days = existing | wanted
        self._ahead_day = today

    def _write(
        self, connection: Connection, rows: list[shared.Row], days: set[int], ids: list[str]
    ) -> None:
        for attempt in (1, 2):
            self._ensure_days(connection, days)
            try:
                # A failure rolls the transaction back (staging rows included): the
                # connection goes back to the pool clean.
                with connection.transaction(), connection.cursor() as cursor:
                    with cursor.copy(self._copy) as copy:
                        copy.set_types(_COPY_TYPES)
                        for row in rows:
                            copy.write_row(row)
                    cursor.execute(self._insert)
                return
            except psycopg.errors.CheckViolation:
                # No partition for a day this instance thought existed: retention
                # elsewhere dropped it. Look at the catalog again and create it.
                if attempt == 2:
                    raise
                self._days = set()
            except psycopg.Error as exc:
                if refused_by_server(exc):
                    raise self._refused(ids, exc) from exc
                raise

    def _refused(self, ids: list[str], exc: psycopg.Error) -> RecordRefused:
        state = f" [SQLSTATE {exc.sqlstate}]" if exc.sqlstate else ""
        return refusal.batch_refused(repr(self), ids, self._reason(exc) + state)

    def _drop_before(self, connection: Connection, cutoff_ns: int) -> list[str]:
        with connection.transaction():
            connection.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
            self._advisory_lock(connection)
            old = [part for part in self._list_partitions(connection) if part.high_ns <= cutoff_ns]
            for part in old:
                connection.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(part.name)))
        dropped = {day for part in old for day in part.days}
        self._days -= dropped
        return [part.name for part in old]


_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # Text columns compare as bytes (COLLATE "C"): ids sort as Python sorts them, the
        # same in every database whatever its locale, and index comparisons are cheaper.
        """
        CREATE TABLE {t} (
            started_at_ns bigint NOT NULL,
            id text COLLATE "C" NOT NULL,
            stream text COLLATE "C" NOT NULL,
            seq bigint NOT NULL,
            method text COLLATE "C" NOT NULL,
            route text COLLATE "C",
            path text COLLATE "C" NOT NULL,
            status integer,
            outcome text COLLATE "C" NOT NULL,
            correlation_id text COLLATE "C" NOT NULL,
            trace_id text COLLATE "C",
            service text COLLATE "C" NOT NULL,
            started_at timestamptz
                GENERATED ALWAYS AS (to_timestamp(started_at_ns / 1e9::float8)) STORED,
            metadata text NOT NULL,
            request_encoding text NOT NULL DEFAULT 'identity',
            response_encoding text NOT NULL DEFAULT 'identity',
            request_body bytea,
            response_body bytea,
            PRIMARY KEY (started_at_ns, id)
        ) PARTITION BY RANGE (started_at_ns)
        """,
        # packing already compressed what pays; pglz would only spend CPU finding out
        # that zstd frames and random bytes do not shrink. Partitions inherit this.
        "ALTER TABLE {t} ALTER COLUMN request_body SET STORAGE EXTERNAL,"
        " ALTER COLUMN response_body SET STORAGE EXTERNAL",
        # The filters `ls` offers; (stream, seq) is how verification walks a hash chain;
        # id alone is how `show` finds a record (the primary key leads with the time).
        "CREATE INDEX ON {t} (id)",
        "CREATE INDEX ON {t} (route, started_at_ns, id)",
        "CREATE INDEX ON {t} (status, started_at_ns)",
        "CREATE INDEX ON {t} (correlation_id)",
        "CREATE INDEX ON {t} (trace_id)",
        "CREATE INDEX ON {t} (stream, seq)",
    ),
}
"""Statements that bring the layout from the previous version to each version."""

_CHECKPOINTS = (
    # Not partitioned: retention drops days of records, never checkpoints. The key is
    # the order readers want (the stream is bounded like the records' column).
    """
    CREATE TABLE IF NOT EXISTS {checkpoints} (
        stream text COLLATE "C" NOT NULL,
        idx bigint NOT NULL,
        at_ns bigint NOT NULL,
        body text NOT NULL,
        PRIMARY KEY (stream, idx)
    )
    """,
)
"""Statements that create the checkpoints table (see the module docstring)."""


def _configure(connection: Connection) -> None:
    """Each new pooled connection: its staging table, and commits that are durable."""
    row = connection.execute("SHOW synchronous_commit").fetchone()
    if row is not None and row[0] == "off":
        connection.execute("SET synchronous_commit = on")
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind in _COLUMNS
    )
    connection.execute(
        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
            _STAGING, columns
        )
    )


def _check_server(connection: Connection, sink: PostgresSink) -> None:
    if connection.info.server_version < 110000:
        raise SinkError(f"{sink!r}: PostgreSQL 11 or newer is needed (partitioned keys)")
    encoding = connection.info.parameter_status("server_encoding")
    if encoding not in ("UTF8", None):
        raise SinkError(
            f"{sink!r}: the database encoding is {encoding}; paths and headers need UTF8"
        )


def _partition_name(table: str, day: int) -> str:
    return f"{table}_p{(date(1970, 1, 1) + timedelta(days=day)):%Y%m%d}"


def _reason(exc: psycopg.Error) -> str:
    """The server's message, on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def open_postgres(url: str, *, create: bool = True) -> PostgresSink:
    """The sink at ``url``. Readers (``create=False``) connect now, so a missing table or
    an unreachable server is one clear error before any work starts."""
    sink = PostgresSink(url, create=create)
    if not create:
        try:
            sink.ready()
        except SinkError as exc:
            sink.close()
            raise ConfigError("sink", str(exc)) from None
    return sink
