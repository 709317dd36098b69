"""The SQLite sink itself: one row per exchange in one file.

Loaded by :func:`asgi_audit.sinks.sqlite.open_url` only, so that an application, which
only checks its sink URL, never imports :mod:`sqlite3`. The statements it shares with the
PostgreSQL sink (rows, WHERE clause, keyset pages) are in :mod:`asgi_audit.sinks.sql`.

Durability: WAL journal with ``synchronous=FULL``. The shipper advances its spool
checkpoint as soon as ``write_batch`` returns, so a commit must already be on disk then.
In WAL mode ``synchronous=NORMAL`` only syncs the WAL at checkpoints: a power cut (not a
process crash) can roll back the last commits after they were acknowledged, and the spool
would no longer hold them. FULL syncs the WAL at every commit; the shipper commits one
transaction per batch, so that is one fsync per batch, not per record.

Concurrency: the shipper writes from one thread while the CLI or viewer read from other
processes; WAL lets readers proceed during a write, and ``busy_timeout`` makes a second
writer wait instead of failing at once. One connection per instance, shared between
threads under a lock.

Layout: the indexed columns copy what queries filter and sort on, bounded to 256 bytes
(:func:`asgi_audit.sinks.sql.bounded`); the ``metadata`` column holds the whole record
(:meth:`StoredRecord.metadata`) as JSON and is the source of truth when reading back; the
body columns hold the stored bytes exactly, last in the row so that listings never read
their overflow pages.

Checkpoints: a ``checkpoints`` table beside ``records`` (stream bounded like the records'
column, ``idx``, ``at_ns``, and ``body``, the JSON text and the source of truth), keyed
``(stream, idx)``, written with ``INSERT OR IGNORE`` in one transaction per call (see
:mod:`asgi_audit.sinks.checkpoint_rows`). A new table is a compatible change: it is
created when missing, in files of layout version 1 as in new ones, so the version stays.

Refusals: a record SQLite cannot hold (a value or row over ``SQLITE_LIMIT_LENGTH``, 1e9
bytes by default; an integer outside 64 bits; an id too long to index) is refused by
:func:`asgi_audit.sinks.sql.rows` before the transaction starts, naming it; what SQLite
itself refuses while a row is inserted (``sqlite3.DataError``, such as "string or blob too
big", and ``sqlite3.IntegrityError``: duplicates are ignored by ``INSERT OR IGNORE``, so any
that is raised is something else) is a :class:`RecordRefused` naming the row's record.
A batch's rows go in with one ``executemany``; only when SQLite refuses one are they tried
again one by one, in a transaction rolled back afterwards, to know which. Everything else
(locked, I/O error, disk full) stays a :class:`SinkError`, retried.

Modes: the file is created 0600 before SQLite opens it; SQLite gives its ``-wal``,
``-shm`` and ``-journal`` files the main file's mode, so they are 0600 too (see
:mod:`asgi_audit.sinks.files`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError, RecordRefused, SinkError
from ...recording.spool import fsync_directory
from .. import checkpoint_rows, refusal, sql
from ..files import create_private_file, ensure_directory
from ..protocols import Query
from ..record import StoredRecord

BUSY_TIMEOUT_MS = 10_000

STATUS_SORT_MOST = 5000
"""Records of the queried statuses above which a search walks the time index instead."""
_DIALECT = sql.Dialect("?", sql.surrogate_safe, plain=str.isascii)
"""SQLite text must be valid UTF-8: lone surrogates are escaped in index columns (ASCII
text has none, and is taken as it is)."""

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER PRIMARY KEY,
        applied_at_ns INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS records (
        id TEXT PRIMARY KEY,
        stream TEXT NOT NULL,
        seq INTEGER NOT NULL,
        started_at_ns INTEGER NOT NULL,
        method TEXT NOT NULL,
        route TEXT,
        path TEXT NOT NULL,
        status INTEGER,
        outcome TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        trace_id TEXT,
        service TEXT NOT NULL,
        metadata TEXT NOT NULL,
        request_body BLOB,
        response_body BLOB,
        request_encoding TEXT NOT NULL DEFAULT 'identity',
        response_encoding TEXT NOT NULL DEFAULT 'identity'
    )
    """,
    # Listings walk time order; the other filters are the ones `ls` offers, and
    # (stream, seq) is how verification walks a hash chain.
    "CREATE INDEX IF NOT EXISTS records_started ON records (started_at_ns, id)",
    "CREATE INDEX IF NOT EXISTS records_route ON records (route, started_at_ns, id)",
    "CREATE INDEX IF NOT EXISTS records_status ON records (status, started_at_ns)",
    "CREATE INDEX IF NOT EXISTS records_correlation ON records (correlation_id)",
    "CREATE INDEX IF NOT EXISTS records_trace ON records (trace_id)",
    "CREATE INDEX IF NOT EXISTS records_stream ON records (stream, seq)",
    # Checkpoints are read by stream in index order: the primary key is that order.
    """
    CREATE TABLE IF NOT EXISTS checkpoints (
        stream TEXT NOT NULL,
        idx INTEGER NOT NULL,
        at_ns INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (stream, idx)
    ) WITHOUT ROWID
    """,
)


class _NotInserted(Exception):
    """A transaction of :func:`_insert_all` failed (and was rolled back); ``at`` is the
    index of the row SQLite refused, None when it was BEGIN or COMMIT, or an error that is
    not a refusal (see :data:`_REFUSED`)."""

    def __init__(self, at: int | None, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.at = at
        self.cause = cause


_FAILED = (sqlite3.Error, OverflowError, UnicodeError)
"""What inserting rows raises (sqlite3's own errors, and binding errors: an integer over
64 bits, a string that is not valid UTF-8)."""

_REFUSED = (sqlite3.DataError, sqlite3.IntegrityError, OverflowError, UnicodeError)
"""What inserting one row raises when SQLite cannot take what it holds (too big, out of
range, not encodable, a constraint other than the primary key) rather than cannot write
now; checks before the transaction find all these first, this is for what they miss."""


def _insert_all(connection: sqlite3.Connection, statement: str, rows: Sequence[Any]) -> None:
    """Every row or none, in one transaction: what both records and checkpoints need.

    The rows go in one ``executemany`` (a statement per row cost more than SQLite's own
    work on a small record). When it fails for what a row holds, the transaction is rolled
    back and the rows are tried again one by one, in a transaction that is rolled back
    too, only to find which row SQLite refuses (``_NotInserted.at``), so that the refusal
    names its record; other failures (locked, I/O) are not tried again here."""
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(statement, rows)
        except _REFUSED as exc:
            _rollback(connection)
            found = _row_at_fault(connection, statement, rows)
            if found is None:  # not refused when alone: failing now, not for good
                raise _NotInserted(None, exc) from exc
            at, cause = found
            raise _NotInserted(at, cause) from cause
        connection.execute("COMMIT")
    except _FAILED as exc:
        _rollback(connection)
        raise _NotInserted(None, exc) from exc


def _row_at_fault(
    connection: sqlite3.Connection, statement: str, rows: Sequence[Any]
) -> tuple[int, BaseException] | None:
    """The index of the first row SQLite refuses, and what it raised, found by inserting
    the rows one by one in a transaction that is then rolled back (nothing is kept); None
    when no row is refused, or the transaction cannot be had."""
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.Error:
        return None
    try:
        for at, values in enumerate(rows):
            try:
                connection.execute(statement, values)
            except _REFUSED as exc:
                return at, exc
            except _FAILED:
                return None
        return None
    finally:
        _rollback(connection)


def _rollback(connection: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (it does on some errors);
    a failure to do so changes nothing for the caller, which reports the first error."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


_INSERT = (
    f"INSERT OR IGNORE INTO records ({', '.join(sql.ROW_COLUMNS)})"
    f" VALUES ({', '.join('?' for _ in sql.ROW_COLUMNS)})"
)
_INSERT_CHECKPOINT = (
    f"INSERT OR IGNORE INTO checkpoints ({', '.join(checkpoint_rows.SQL_COLUMNS)})"
    f" VALUES ({', '.join('?' for _ in checkpoint_rows.SQL_COLUMNS)})"
)


class SqliteSink:
    """A sink over one SQLite file (see the module docstring for the choices)."""

    keeps_packed = True
    """Bodies the spool packed are stored as they are (see ``Sink.write_batch``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        ensure_directory(self.path.parent)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = _connect(self.path)

    def __repr__(self) -> str:
        return f"SqliteSink({os.fspath(self.path)!r})"

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        if not records:
            self._open_connection()
            return
        with self._lock:
            limit = self._open_connection().getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
        # The CPU work (JSON, zstd, checks) is done before the lock is taken.
        rows = sql.rows(records, _DIALECT, sql.Limits(limit, limit), repr(self))
        with self._lock:
            try:
                _insert_all(self._open_connection(), _INSERT, rows)
            except _NotInserted as failed:
                exc = failed.cause
                if failed.at is not None and isinstance(exc, _REFUSED):
                    at_fault = [records[failed.at].id]
                    raise refusal.batch_refused(repr(self), at_fault, str(exc)) from exc
                raise SinkError(f"{self!r}: batch of {len(rows)} not stored: {exc}") from exc

    def write_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self._open_connection()
        found = checkpoint_rows.checked(checkpoints, repr(self))
        if not found:
            return
        rows = checkpoint_rows.sql_rows(found, _DIALECT)
        with self._lock:
            try:
                _insert_all(self._open_connection(), _INSERT_CHECKPOINT, rows)
            except _NotInserted as failed:
                exc = failed.cause
                if failed.at is not None and isinstance(exc, _REFUSED):
                    which = checkpoint_rows.describe(found[failed.at].value())
                    raise RecordRefused(
                        f"{self!r}: {which} refused: {refusal.short(str(exc))}"
                    ) from exc
                raise SinkError(f"{self!r}: {len(rows)} checkpoints not stored: {exc}") from exc

    def checkpoints(self, stream: str | None = None) -> Iterator[dict[str, Any]]:
        where, params = checkpoint_rows.stream_where(stream, _DIALECT)
        rows = self._fetch(f"SELECT stream, idx, body FROM checkpoints{where}", params)
        return iter(checkpoint_rows.from_sql_rows(rows, stream, _DIALECT, repr(self)))

    def search(self, query: Query) -> Iterator[StoredRecord]:
        self._open_connection()
        filtered = query.status_low is not None or query.status_high is not None
        status = "+status" if filtered and self._many_with_status(query) else "status"
        return sql.search(query, "records", _DIALECT, self._fetch, status)

    def _many_with_status(self, query: Query) -> bool:
        """Whether at least :data:`STATUS_SORT_MOST` records have the query's statuses.
        SQLite answers a status filter from the status index and then sorts every match
        by time: fine for a rare status, ~0.65 s for ``2xx`` over 100,000 records. When
        the matches are that many, walking the time index and skipping the others finds a
        page sooner; this probe, bounded by the same number, tells which."""
        low = query.status_low if query.status_low is not None else -(1 << 31)
        high = query.status_high if query.status_high is not None else (1 << 31) - 1
        rows = self._fetch(
            "SELECT count(*) FROM (SELECT 1 FROM records WHERE status >= ? AND status <= ?"
            " LIMIT ?)",
            (low, high, STATUS_SORT_MOST),
        )
        return int(rows[0][0]) >= STATUS_SORT_MOST

    def get(self, record_id: str) -> StoredRecord | None:
        rows = self._fetch(
            f"SELECT {sql.BODY_COLUMNS} FROM records WHERE id = ?",
            (_DIALECT.text(record_id),),
        )
        return None if not rows else sql.record_from_row(rows[0], record_id)

    def count(self) -> int:
        rows = self._fetch("SELECT count(*) FROM records", ())
        return int(rows[0][0])

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            # Recommended before closing: lets SQLite refresh statistics the planner uses.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("PRAGMA optimize")
            connection.close()

    def _open_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise SinkError(f"{self!r} is closed")
        return self._connection

    def _fetch(self, statement: str, params: Sequence[Any]) -> list[sql.Row]:
        with self._lock:
            connection = self._open_connection()
            try:
                return connection.execute(statement, params).fetchall()
            except sqlite3.Error as exc:
                raise SinkError(f"{self!r}: query failed: {exc}") from exc


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # Made here with its mode: SQLite would make it 0666 less the umask, and gives its
        # -wal, -shm and -journal files the mode of this one.
        if create_private_file(path):
            fsync_directory(path.parent)
    except OSError as exc:
        raise ConfigError(
            "sink", f"cannot create SQLite file {os.fspath(path)!r}: {exc.strerror or exc}"
        ) from exc
    try:
        connection = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise ConfigError("sink", f"cannot open SQLite file {os.fspath(path)!r}: {exc}") from exc
    try:
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConfigError(
                "sink", f"SQLite file {os.fspath(path)!r} cannot use WAL (journal_mode={mode})"
            )
        connection.execute("PRAGMA synchronous = FULL")
        # A batch of large bodies grows the WAL; give the space back after each checkpoint.
        connection.execute("PRAGMA journal_size_limit = 67108864")
        _create_schema(connection, path)
    except sqlite3.Error as exc:
        connection.close()
        raise ConfigError("sink", f"cannot use SQLite file {os.fspath(path)!r}: {exc}") from exc
    except BaseException:
        connection.close()
        raise
    return connection


def _create_schema(connection: sqlite3.Connection, path: Path) -> None:
    # IMMEDIATE: two processes opening a new file at once must not both create it.
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            connection.execute(statement)
        found = connection.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        if found is None:
            connection.execute(
                "INSERT INTO schema_version (version, applied_at_ns) VALUES (?, ?)",
                (sql.LAYOUT_VERSION, time.time_ns()),
            )
        elif found > sql.LAYOUT_VERSION:
            raise ConfigError("sink", sql.newer_layout(f"SQLite file {os.fspath(path)!r}", found))
        connection.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise
