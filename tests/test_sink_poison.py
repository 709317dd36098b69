"""Records a sink cannot take: what it refuses for good (RecordRefused, naming the records
when it can tell), what stays a retry (SinkError), and that a refusal leaves the sink
usable. Each sink is tried on its real server: SQLite, the PostgreSQL on 127.0.0.1:5432,
SeaweedFS; JSON Lines on disk.

The shipper quarantines what a RecordRefused names (or splits the batch to find them) and
retries everything else, so a refusal by mistake loses records while a retry by mistake
only waits: the tests pin both sides."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_audit.errors import RecordRefused, SinkError
from asgi_audit.sinks import Query, open_sink, sql
from asgi_audit.sinks.sql import INDEX_BYTES, bounded
from asgi_audit.sinks.sqlite.sink import SqliteSink
from factories import Records, body
from postgres_server import admin_connection, fresh_table, store_url
from seaweed import SeaweedServer
from test_sinks import long_text


@pytest.fixture
def make() -> Records:
    return Records()


# Bounded index values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "a" * 256,
        "a" * 257,
        "\u00e9" * 200,
        "\U0001f600" * 100,
        "x" + "\u65e5" * 300,
        long_text(10_000),
    ],
)
def test_bounded_values_fit_and_cut_on_a_character(value: str) -> None:
    """At most INDEX_BYTES of UTF-8, never half a character, and the value itself when it
    fits; the same value always gives the same key."""
    key = bounded(value)
    size = len(key.encode("utf-8"))
    assert size <= INDEX_BYTES
    if len(value.encode("utf-8")) <= INDEX_BYTES:
        assert key == value
    else:
        head, mark, digest = key.rpartition("\u2026")
        assert mark and len(digest) == 16 and value.startswith(head)
        assert size > INDEX_BYTES - 4  # a cut only drops a partial character
    assert bounded(value) == key


def test_long_values_sharing_a_beginning_get_distinct_keys() -> None:
    base = long_text(1000)
    keys = {bounded(base + suffix) for suffix in ("", "a", "b", "\u00e9", " ")}
    assert len(keys) == 5


# SQLite -------------------------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteSink]:
    store = open_sink(f"sqlite:///{tmp_path / 'audit.db'}")
    assert isinstance(store, SqliteSink)
    with contextlib.closing(store):
        yield store


def connection_of(store: SqliteSink) -> sqlite3.Connection:
    connection = store._connection
    assert connection is not None
    return connection


def test_sqlite_refuses_a_body_over_its_length_limit_naming_it(
    sqlite_store: SqliteSink, make: Records
) -> None:
    """SQLITE_LIMIT_LENGTH (1e9 by default; lowered here on the real connection) bounds
    a value and a row: a record over it is refused before the transaction, by id, and the
    batch's other records are stored once it is taken out."""
    connection_of(sqlite_store).setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 200_000)
    good = [make(), make()]
    big = make(request_body=body(os.urandom(320_000)))  # 320 kB, incompressible
    with pytest.raises(RecordRefused) as raised:
        sqlite_store.write_batch([good[0], big, good[1]])
    assert raised.value.ids == (big.id,)
    assert big.id in str(raised.value) and "request_body" in str(raised.value)
    assert sqlite_store.count() == 0
    sqlite_store.write_batch(good)
    assert sqlite_store.count() == 2


def test_sqlite_own_refusal_is_a_record_refused_naming_the_row(
    sqlite_store: SqliteSink, make: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the checks, SQLite's own "string or blob too big" (sqlite3.DataError) names the
    record being inserted, and the transaction is rolled back whole."""
    connection_of(sqlite_store).setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 200_000)
    monkeypatch.setattr(sql, "too_large", lambda values, limits: None)
    good, big = make(), make(response_body=body(os.urandom(320_000)))
    with pytest.raises(RecordRefused, match="string or blob too big") as raised:
        sqlite_store.write_batch([good, big])
    assert raised.value.ids == (big.id,)
    assert isinstance(raised.value.__cause__, sqlite3.DataError)
    assert sqlite_store.count() == 0
    sqlite_store.write_batch([good])
    assert sqlite_store.get(good.id) == good


def test_sqlite_refusal_inside_a_batch_names_its_row_and_keeps_nothing(
    sqlite_store: SqliteSink, make: Records
) -> None:
    """A batch goes in with one executemany; when SQLite refuses a row in its middle, the
    rows are tried again one by one (in a transaction rolled back too) only to name it:
    nothing of the batch is kept, no transaction is left open, the sink goes on."""
    connection = connection_of(sqlite_store)
    connection.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON records WHEN NEW.path = '/refused'"
        " BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
    )
    batch = [make(), make(), make(path="/refused"), make(), make()]
    with pytest.raises(RecordRefused, match="refused by a trigger") as raised:
        sqlite_store.write_batch(batch)
    assert raised.value.ids == (batch[2].id,)
    assert isinstance(raised.value.__cause__, sqlite3.IntegrityError)
    assert not connection.in_transaction
    assert sqlite_store.count() == 0
    sqlite_store.write_batch(batch[:2] + batch[3:])
    assert sqlite_store.count() == 4


def test_sqlite_checkpoint_refused_inside_a_call_is_named(sqlite_store: SqliteSink) -> None:
    connection = connection_of(sqlite_store)
    connection.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON checkpoints WHEN NEW.idx = 2"
        " BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
    )
    found = [{"stream": "s", "index": n, "at_ns": n} for n in (1, 2, 3)]
    with pytest.raises(RecordRefused, match=r"checkpoint \(stream 's', index 2\) refused"):
        sqlite_store.write_checkpoints(found)
    assert not connection.in_transaction
    assert list(sqlite_store.checkpoints()) == []


def test_sqlite_failure_that_is_no_refusal_is_retried_not_named(
    sqlite_store: SqliteSink, make: Records
) -> None:
    """An error that is not about what a row holds (here a trigger whose table is gone:
    OperationalError) is a SinkError to retry, and the batch is not tried row by row."""
    connection = connection_of(sqlite_store)
    connection.execute("CREATE TABLE gone (x)")
    connection.execute(
        "CREATE TRIGGER broken AFTER INSERT ON records BEGIN INSERT INTO gone VALUES (1); END"
    )
    connection.execute("DROP TABLE gone")
    with pytest.raises(SinkError, match="no such table") as raised:
        sqlite_store.write_batch([make(), make()])
    assert not isinstance(raised.value, RecordRefused)
    assert not connection.in_transaction
    connection.execute("DROP TRIGGER broken")
    sqlite_store.write_batch([make()])
    assert sqlite_store.count() == 1


@pytest.fixture(scope="module")
def over_a_gigabyte() -> bytes:
    """Random bytes (zstd cannot shrink them) just over PostgreSQL's and SQLite's limits."""
    return os.urandom((1 << 30) + (1 << 20))


@pytest.mark.slow
def test_sqlite_refuses_a_body_over_its_default_limit(
    sqlite_store: SqliteSink, make: Records, over_a_gigabyte: bytes
) -> None:
    """At SQLite's real default (1e9 bytes), not a lowered limit: refused by id, and the
    sink goes on."""
    assert connection_of(sqlite_store).getlimit(sqlite3.SQLITE_LIMIT_LENGTH) == 1_000_000_000
    big = make(request_body=body(over_a_gigabyte))
    with pytest.raises(RecordRefused, match="request_body has") as raised:
        sqlite_store.write_batch([big])
    assert raised.value.ids == (big.id,)
    sqlite_store.write_batch([make()])
    assert sqlite_store.count() == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"started_at_ns": 1 << 64}, "started_at_ns"),
        ({"seq": -(1 << 70)}, "seq"),
        ({"status": 1 << 40}, "status"),
        ({"status": "200"}, "status is a str"),
        ({"method": None}, "method is a NoneType"),
        ({"id": "i" * (INDEX_BYTES + 1)}, "id has more than"),
        ({"request_headers": [("x-bytes", b"\x00")]}, "cannot be encoded"),
    ],
)
def test_sqlite_refuses_fields_no_column_can_hold(
    sqlite_store: SqliteSink, make: Records, change: dict[str, Any], reason: str
) -> None:
    """Out-of-range integers (OverflowError in sqlite3), wrong types (INSERT OR IGNORE would
    drop a NULL silently), an id too long to index, metadata JSON cannot encode: refused
    by id, nothing stored."""
    bad = make(**change)
    with pytest.raises(RecordRefused, match=reason) as raised:
        sqlite_store.write_batch([make(), bad])
    assert raised.value.ids == (bad.id,)
    assert sqlite_store.count() == 0


def test_sqlite_lock_wait_is_retried_not_refused(
    tmp_path: Path, sqlite_store: SqliteSink, make: Records
) -> None:
    """A database locked by another writer is an outage (SinkError), not a refusal."""
    connection_of(sqlite_store).execute("PRAGMA busy_timeout = 50")
    with contextlib.closing(sqlite3.connect(sqlite_store.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(SinkError, match="locked") as raised:
            sqlite_store.write_batch([make()])
        assert not isinstance(raised.value, RecordRefused)
        other.execute("ROLLBACK")
    sqlite_store.write_batch([make()])
    assert sqlite_store.count() == 1


def test_sqlite_rows_written_before_bounding_are_still_found(
    sqlite_store: SqliteSink, make: Records
) -> None:
    """Rows of the same layout written before the indexed columns were bounded hold the
    whole value: a search by it still finds them."""
    old = make(correlation_id=long_text(2000, "old"), route="/" + long_text(900, "r"))
    sqlite_store.write_batch([old])
    connection_of(sqlite_store).execute(
        "UPDATE records SET correlation_id = ?, route = ? WHERE id = ?",
        (old.correlation_id, old.route, old.id),
    )
    assert [r.id for r in sqlite_store.search(Query(correlation_id=old.correlation_id))] == [old.id]
    assert [r.id for r in sqlite_store.search(Query(route=old.route))] == [old.id]


def test_sqlite_index_columns_hold_bounded_values(sqlite_store: SqliteSink, make: Records) -> None:
    record = make(correlation_id=long_text(3000), stream=long_text(800, "s"))
    sqlite_store.write_batch([record])
    stored = (
        connection_of(sqlite_store)
        .execute(
            "SELECT correlation_id, stream, json_extract(metadata, '$.correlation_id') FROM records"
        )
        .fetchone()
    )
    assert stored == (bounded(record.correlation_id), bounded(record.stream), record.correlation_id)


# PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_table() as table:
        yield store_url(table)


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Any]:
    store = open_sink(pg_url)
    with contextlib.closing(store):
        yield store


def pg_count(url: str) -> int:
    table = url.rpartition("table=")[2]
    with admin_connection() as connection:
        row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    count = row[0]
    assert isinstance(count, int)
    return count


@pytest.mark.postgres
def test_postgres_stores_the_measured_request_id(pg_store: Any, make: Records) -> None:
    """The measured case: an X-Request-ID of 3,000 characters, whose index entry PostgreSQL
    refused ("index row size 4016 exceeds btree version 4 maximum 2704"), is stored,
    read back and found."""
    record = make(correlation_id=long_text(3000))
    pg_store.write_batch([record, make()])
    assert pg_store.get(record.id) == record
    assert [r.id for r in pg_store.search(Query(correlation_id=record.correlation_id))] == [
        record.id
    ]


@pytest.mark.postgres
def test_postgres_index_refusal_is_a_record_refused_and_the_pool_stays_usable(
    pg_url: str, pg_store: Any, make: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the bound, the server's own refusal (54000, program_limit_exceeded) is a
    RecordRefused: naming the one record of a batch of one, naming none of a batch of
    three (the shipper splits it), rolled back either way; the next write works."""
    monkeypatch.setattr(sql, "INDEX_BYTES", 1 << 20)
    long_id = make(correlation_id=long_text(3000))
    with pytest.raises(RecordRefused, match="exceeds btree") as raised:
        pg_store.write_batch([long_id])
    assert raised.value.ids == (long_id.id,)
    assert long_id.id in str(raised.value) and "54000" in str(raised.value)
    assert getattr(raised.value.__cause__, "sqlstate", None) == "54000"
    batch = [make(), long_id, make()]
    with pytest.raises(RecordRefused) as raised_batch:
        pg_store.write_batch(batch)
    assert raised_batch.value.ids == ()
    assert all(record.id in str(raised_batch.value) for record in batch)
    assert pg_count(pg_url) == 0
    for _ in range(5):  # more than the pool's connections: none was left broken
        pg_store.write_batch([make()])
    assert pg_store.count() == 5


@pytest.mark.postgres
def test_postgres_nul_in_text_is_refused_not_retried(
    pg_store: Any, make: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text holding NUL (which the sink escapes; not escaped here) is refused by the
    server (22021, character_not_in_repertoire): a RecordRefused."""
    from asgi_audit.sinks.postgres import sink as postgres_sink

    unescaped = dataclasses.replace(postgres_sink._DIALECT, text=sql.surrogate_safe)
    monkeypatch.setattr(postgres_sink, "_DIALECT", unescaped)
    record = make(correlation_id="a\x00b")
    with pytest.raises(RecordRefused) as raised:
        pg_store.write_batch([record])
    assert raised.value.ids == (record.id,)
    assert "22021" in str(raised.value)
    monkeypatch.undo()
    pg_store.write_batch([record])
    assert pg_store.get(record.id) == record


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": 1 << 40}, "status"),  # binary COPY into int4 would store 0, silently
        ({"started_at_ns": (1 << 63) - 1}, "partitions"),
        ({"started_at_ns": 1 << 64}, "started_at_ns"),
        ({"id": "i" * 300}, "id has more than"),
        ({"service": None}, "service is a NoneType"),
    ],
)
def test_postgres_refuses_fields_no_column_can_hold(
    pg_url: str, pg_store: Any, make: Records, change: dict[str, Any], reason: str
) -> None:
    bad = make(**change)
    with pytest.raises(RecordRefused, match=reason) as raised:
        pg_store.write_batch([make(), bad])
    assert raised.value.ids == (bad.id,)
    pg_store.write_batch([make()])
    assert pg_count(pg_url) == 1


@pytest.mark.postgres
def test_postgres_refuses_a_body_over_what_a_row_holds(
    pg_url: str, pg_store: Any, make: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bytea holds less than 1 GB: a larger body is refused by id before any byte is sent
    (the limit is lowered here; the check is the same)."""
    from asgi_audit.sinks.postgres import sink as postgres_sink

    monkeypatch.setattr(postgres_sink, "_LIMITS", sql.Limits(1 << 20, 1 << 20))
    big = make(response_body=body(os.urandom(1_600_000)))  # 1.6 MB, incompressible
    good = make()
    with pytest.raises(RecordRefused, match="response_body has") as raised:
        pg_store.write_batch([good, big])
    assert raised.value.ids == (big.id,)
    assert pg_store.count() == 0
    pg_store.write_batch([good])
    assert pg_store.get(good.id) == good


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_refuses_a_body_over_a_gigabyte(
    pg_store: Any, make: Records, over_a_gigabyte: bytes
) -> None:
    """At the real limit: a body bytea cannot hold is refused by id before it is copied
    to the server, and the sink goes on."""
    big = make(response_body=body(over_a_gigabyte))
    with pytest.raises(RecordRefused, match="response_body has") as raised:
        pg_store.write_batch([big, make()])
    assert raised.value.ids == (big.id,)
    pg_store.write_batch([make()])
    assert pg_store.count() == 1


@pytest.mark.postgres
def test_postgres_lock_timeout_is_retried_not_refused(make: Records) -> None:
    """A lock the write cannot get in time (55P03) is an outage: SinkError, not refused."""
    with fresh_table() as table:
        url = store_url(table, options="-c%20lock_timeout%3D300")
        with contextlib.closing(open_sink(url)) as store, admin_connection() as admin:
            store.write_batch([make()])
            with admin.transaction():
                admin.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(SinkError, match="lock") as raised:
                    store.write_batch([make()])
                assert not isinstance(raised.value, RecordRefused)
            store.write_batch([make()])
            assert store.count() == 2


@pytest.mark.postgres
def test_postgres_rows_written_before_bounding_are_still_found(
    pg_url: str, pg_store: Any, make: Records
) -> None:
    """A row holding a whole value of under 2704 bytes (what the server took before the
    columns were bounded) is still found by it."""
    old = make(correlation_id=long_text(1200, "old"))
    pg_store.write_batch([old])
    table = pg_url.rpartition("table=")[2]
    with admin_connection() as admin:
        admin.execute(
            f"UPDATE {table} SET correlation_id = %s WHERE id = %s", (old.correlation_id, old.id)
        )
    assert [r.id for r in pg_store.search(Query(correlation_id=old.correlation_id))] == [old.id]


# S3 ------------------------------------------------------------------------------------


@pytest.fixture
def s3_store(s3_server: SeaweedServer) -> Iterator[Any]:
    bucket = s3_server.make_bucket("poison")
    store = open_sink(s3_server.url(bucket, f"t-{uuid.uuid4().hex[:12]}"))
    with contextlib.closing(store):
        yield store


def object_keys(store: Any) -> list[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}/")
    return [item["Key"] for item in listed.get("Contents", [])]


@pytest.mark.s3
def test_s3_long_streams_get_bounded_distinct_keys(s3_store: Any, make: Records) -> None:
    """A stream id whose escaped form would pass SeaweedFS's 255 bytes a segment (and S3's
    1024 a key) is stored under a bounded segment; two such streams stay apart."""
    stream = "svc." + long_text(2000, "pod")
    first = make(stream=stream, correlation_id=long_text(3000))
    second = make(stream=stream[:-1] + "x")
    s3_store.write_batch([first])
    s3_store.write_batch([second])
    keys = object_keys(s3_store)
    assert len(keys) == 4
    assert all(len(key.encode()) < 1024 for key in keys)
    assert all(len(part) <= 255 for key in keys for part in key.split("/"))
    assert len({key.split("/")[-2] for key in keys}) == 2
    assert s3_store.get(first.id) == first
    assert [r.id for r in s3_store.search(Query(correlation_id=first.correlation_id))] == [first.id]


@pytest.mark.s3
def test_s3_key_too_long_refuses_every_record_of_that_key(
    s3_store: Any, make: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the bound, the server's KeyTooLongError (a 400 about the request itself)
    refuses every record of the object, since they share the stream that names it."""
    from asgi_audit.sinks.s3 import keys

    monkeypatch.setattr(keys, "SEGMENT_BYTES", 10_000)
    stream = "svc." + "p" * 1100  # the key passes 1024 bytes
    batch = [make(stream=stream, seq=seq) for seq in range(3)]
    with pytest.raises(RecordRefused, match="KeyTooLongError") as raised:
        s3_store.write_batch(batch)
    assert raised.value.ids == tuple(record.id for record in batch)
    assert object_keys(s3_store) == []
    monkeypatch.undo()
    s3_store.write_batch(batch)
    assert s3_store.count() == 3


def answer(store: Any, status: int, code: str) -> None:
    """Make the store's next PutObject calls get this error from the wire (parsed by
    botocore as a real one would be)."""
    from botocore.awsrequest import AWSResponse

    xml = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
        f"<Message>told by the test</Message></Error>"
    ).encode()

    class Raw:
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield xml

    def reply(request: Any, **_: Any) -> Any:
        if request.method == "PUT":
            return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, Raw())
        return None

    store.client.meta.events.register_first("before-send.s3.PutObject", reply)


@pytest.mark.s3
def test_s3_entity_too_large_is_refused_naming_a_lone_record(s3_store: Any, make: Records) -> None:
    """EntityTooLarge: about the object's bytes, so the record of a one-record object is
    named; in a larger object the shipper must split to find it."""
    answer(s3_store, 400, "EntityTooLarge")
    lone = make()
    with pytest.raises(RecordRefused, match="EntityTooLarge") as raised:
        s3_store.write_batch([lone])
    assert raised.value.ids == (lone.id,)
    pair = [make(), make()]
    with pytest.raises(RecordRefused) as raised_pair:
        s3_store.write_batch(pair)
    assert raised_pair.value.ids == ()
    assert all(record.id in str(raised_pair.value) for record in pair)


@pytest.mark.s3
@pytest.mark.parametrize(
    ("status", "code"),
    [(403, "AccessDenied"), (403, "SignatureDoesNotMatch"), (400, "RequestTimeout")],
)
def test_s3_errors_not_about_the_content_are_retried(
    s3_store: Any, make: Records, status: int, code: str
) -> None:
    """Credentials, signatures and timeouts are not the records' fault: SinkError."""
    answer(s3_store, status, code)
    with pytest.raises(SinkError, match=code) as raised:
        s3_store.write_batch([make()])
    assert not isinstance(raised.value, RecordRefused)


@pytest.mark.s3
def test_s3_refuses_a_record_over_one_object_by_id(
    s3_store: Any, make: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies larger than one PUT may carry (5 GiB; lowered here) are refused by id before
    anything is built or sent."""
    from asgi_audit.sinks.s3 import sink as s3_sink

    monkeypatch.setattr(s3_sink, "MAX_OBJECT_BYTES", 2 << 20)
    big = make(request_body=body(bytes(3 << 20)))
    with pytest.raises(RecordRefused, match="one object holds at most") as raised:
        s3_store.write_batch([make(), big])
    assert raised.value.ids == (big.id,)
    assert object_keys(s3_store) == []


@pytest.mark.s3
def test_s3_refuses_a_record_it_cannot_encode(s3_store: Any, make: Records) -> None:
    bad = make(request_headers=[("x-bytes", b"\x00")])
    with pytest.raises(RecordRefused, match="cannot be encoded") as raised:
        s3_store.write_batch([make(), bad])
    assert raised.value.ids == (bad.id,)
    assert object_keys(s3_store) == []


# JSON Lines ---------------------------------------------------------------------------


def test_jsonl_refuses_a_record_it_cannot_encode(tmp_path: Path, make: Records) -> None:
    """A record whose line cannot be written is refused by id and nothing is appended,
    so a retry without it does not duplicate the others."""
    good = make()
    bad = make(request_headers=[("x-bytes", b"\x00")])
    with contextlib.closing(open_sink(f"jsonl:///{tmp_path / 'j'}")) as store:
        with pytest.raises(RecordRefused, match="cannot be encoded") as raised:
            store.write_batch([good, bad])
        assert raised.value.ids == (bad.id,)
        assert list(tmp_path.joinpath("j").glob("*.jsonl")) == []
        store.write_batch([good])
        assert store.get(good.id) == good


def test_jsonl_writes_a_body_given_packed_only(tmp_path: Path, make: Records) -> None:
    """A body handed over packed (as to the sinks that keep packed bodies) is unpacked,
    not written as absent."""
    from asgi_audit.recording import packing

    data = b'{"lines": [' + b'{"sku": 1},' * 500 + b"{}]}"
    packed = packing.pack(data)
    assert packed is not None
    record = make(request_body=body(data))
    given = dataclasses.replace(
        record, request_body=dataclasses.replace(body(data), data=None, packed=packed)
    )
    with contextlib.closing(open_sink(f"jsonl:///{tmp_path / 'j'}")) as store:
        store.write_batch([given])
        assert store.get(record.id) == record


def test_every_refusal_is_a_sink_error(make: Records, tmp_path: Path) -> None:
    """RecordRefused is a SinkError: code that only knows SinkError still stops on it."""
    with (
        contextlib.closing(open_sink(f"sqlite:///{tmp_path / 'a.db'}")) as store,
        pytest.raises(SinkError),
    ):
        store.write_batch([make(status=1 << 40)])
