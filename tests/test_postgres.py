"""What is particular to the PostgreSQL store, on the real server (the contract suite in
test_sinks.py covers what every store does): day partitions, retention, redelivery and
concurrent writers, reconnection after the server drops its connections, the layout
version, and URL mistakes caught before anything connects."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import conninfo_to_dict

from asgi_audit.capture.settings import load_settings
from asgi_audit.cli import main
from asgi_audit.errors import ConfigError, RecordRefused, SinkError
from asgi_audit.sinks import Query, check_sink_url, open_sink, registry
from asgi_audit.sinks.postgres.sink import DAY_NS, PostgresSink
from asgi_audit.sinks.postgres.url import LIBPQ_KEYWORDS, libpq_options
from asgi_audit.sinks.record import StoredRecord
from factories import BASE_NS, Records, body
from postgres_server import admin_connection, fresh_table, store_url

pytestmark = pytest.mark.postgres

NOW_NS = time.time_ns()
TODAY = NOW_NS // DAY_NS


@pytest.fixture
def table() -> Iterator[str]:
    """A table name of this test's own, dropped afterwards with its checkpoints table."""
    with fresh_table() as name:
        yield name


@pytest.fixture
def sink(table: str) -> Iterator[PostgresSink]:
    """A writer on this test's table, closed at the end."""
    opened = open_sink(store_url(table))
    assert isinstance(opened, PostgresSink)
    with contextlib.closing(opened):
        yield opened


@pytest.fixture
def make() -> Records:
    return Records()


def day_name(table: str, day: int) -> str:
    """The partition name of UTC day number ``day`` (days since the epoch)."""
    return f"{table}_p{datetime.fromtimestamp(day * 86_400, tz=UTC):%Y%m%d}"


def days_ago(days: float, make: Records) -> StoredRecord:
    return make(started_at_ns=NOW_NS - int(days * DAY_NS))


def sql_rows(statement: str, *params: object) -> list[tuple[object, ...]]:
    with admin_connection() as connection:
        cursor = connection.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


# Partitions -------------------------------------------------------------------------------


def test_partitions_cover_around_today_and_every_day_of_a_batch(
    sink: PostgresSink, table: str, make: Records
) -> None:
    """Start-up makes yesterday..today+3; a batch adds its own days, whatever their age."""
    sink.ready()
    around = {day_name(table, TODAY + offset) for offset in range(-1, 4)}
    assert {part.name for part in sink.partitions()} == around
    old = [make(), make(started_at_ns=BASE_NS + 2 * DAY_NS)]
    sink.write_batch(old)
    names = [part.name for part in sink.partitions()]
    assert names == sorted(names)
    assert set(names) == around | {f"{table}_p20240501", f"{table}_p20240503"}
    bounds = {part.name: (part.low_ns, part.high_ns) for part in sink.partitions()}
    day = BASE_NS // DAY_NS
    assert bounds[f"{table}_p20240501"] == (day * DAY_NS, (day + 1) * DAY_NS)
    assert sql_rows(f"SELECT count(*) FROM {table}_p20240503") == [(1,)]


def test_a_record_ten_days_old_is_accepted(sink: PostgresSink, make: Records) -> None:
    """A late record (an old spool shipped at last) lands in a partition made for it."""
    late = days_ago(10, make)
    sink.write_batch([late])
    assert sink.get(late.id) == late
    assert any(TODAY - 10 in part.days for part in sink.partitions())


def test_records_in_one_day_are_pruned_to_that_partition(sink: PostgresSink, make: Records) -> None:
    """A time-bounded listing reads only the partitions of its days (keyset bound included)."""
    sink.write_batch([make(), make(started_at_ns=BASE_NS + 3 * DAY_NS)])
    day = BASE_NS // DAY_NS * DAY_NS
    plan = sql_rows(
        f"EXPLAIN SELECT id FROM {sink.table} WHERE started_at_ns >= %s AND started_at_ns < %s"
        " AND started_at_ns <= %s AND (started_at_ns, id) < (%s, 'x')"
        " ORDER BY started_at_ns DESC, id DESC LIMIT 10",
        day,
        day + DAY_NS,
        BASE_NS,
        BASE_NS,
    )
    text = "\n".join(str(row[0]) for row in plan)
    assert f"{sink.table}_p20240501" in text
    assert f"{sink.table}_p20240504" not in text


# Retention ---------------------------------------------------------------------------------


def test_retention_drops_whole_old_days_only(sink: PostgresSink, table: str, make: Records) -> None:
    """Days entirely older than keep_days go with their records; younger ones stay."""
    old, older, recent, fresh = (days_ago(n, make) for n in (9, 20, 2, 0))
    sink.write_batch([old, older, recent, fresh])
    dropped = sink.apply_retention(7)
    assert dropped == [day_name(table, TODAY - 20), day_name(table, TODAY - 9)]
    assert sink.get(old.id) is None and sink.get(older.id) is None
    assert [r.id for r in sink.search(Query())] == [fresh.id, recent.id]
    assert sink.apply_retention(7) == []
    remaining = {part.name for part in sink.partitions()}
    assert day_name(table, TODAY - 2) in remaining and day_name(table, TODAY + 3) in remaining


def test_writer_recreates_a_day_another_process_dropped(
    sink: PostgresSink, table: str, make: Records
) -> None:
    """A writer that saw a partition before retention dropped it elsewhere still writes."""
    sink.write_batch([days_ago(30, make)])
    with contextlib.closing(PostgresSink(store_url(table))) as janitor:
        assert janitor.apply_retention(7) == [day_name(table, TODAY - 30)]
    late = days_ago(30, make)
    sink.write_batch([late])
    assert sink.count() == 1
    assert sink.get(late.id) == late


def checkpoint(stream: str, index: int) -> dict[str, object]:
    return {"stream": stream, "index": index, "at_ns": NOW_NS - (30 - index) * DAY_NS}


def test_retention_keeps_every_checkpoint(sink: PostgresSink, table: str, make: Records) -> None:
    """Dropping old days of records leaves the checkpoints table and all its rows, those
    of the dropped days included: it is a table of its own, not partitioned."""
    sink.write_batch([days_ago(20, make), days_ago(0, make)])
    written = [checkpoint("orders:pod-a:1", index) for index in (1, 2, 3)]
    sink.write_checkpoints(written)
    assert sink.apply_retention(7) == [day_name(table, TODAY - 20)]
    assert sink.count() == 1
    assert list(sink.checkpoints()) == written
    assert sql_rows(
        "SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)", f"{table}_checkpoints"
    ) == [("r",)]
    assert sql_rows(f"SELECT count(*) FROM {table}_checkpoints") == [(3,)]
    assert f"{table}_checkpoints" not in {part.name for part in sink.partitions()}


def test_retention_rejects_less_than_a_day(sink: PostgresSink) -> None:
    """keep_days below 1 would drop today's partition: refused."""
    with pytest.raises(ValueError, match="at least 1"):
        sink.apply_retention(0)


def test_retention_command(table: str, make: Records) -> None:
    """`asgi-audit retention apply` stores a marker of what goes, drops old days and says
    which; bad input fails cleanly."""
    url = store_url(table)
    with contextlib.closing(open_sink(url)) as writer:
        writer.write_batch([days_ago(12, make), days_ago(1, make)])
    runner = CliRunner()
    result = runner.invoke(main, ["retention", "apply", "--sink", url, "--keep-days", "7"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "retention marker 1: 1 records of 1 stream(s) (unsigned: no signing key)",
        f"dropped {day_name(table, TODAY - 12)}",
        "1 partition(s) dropped; newer than 7 day(s) kept",
    ]
    again = runner.invoke(main, ["retention", "apply", "--sink", url, "--keep-days", "7"])
    assert again.output.startswith("0 partition(s) dropped")
    zero = runner.invoke(main, ["retention", "apply", "--sink", url, "--keep-days", "0"])
    assert zero.exit_code == 2 and "--keep-days" in zero.output


def test_retention_command_on_a_sink_without_retention(tmp_path: Path, make: Records) -> None:
    """Sinks that cannot drop old records say so in one line and exit 1."""
    url = f"sqlite:///{tmp_path}/audit.db"
    with contextlib.closing(open_sink(url)) as writer:
        writer.write_batch([make()])
    result = CliRunner().invoke(main, ["retention", "apply", "--sink", url, "--keep-days", "3"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {url}: this sink has no retention (postgresql:// sinks have)"
    ]


def test_retention_command_on_a_missing_table(table: str) -> None:
    """The CLI does not create a store it was only asked to prune."""
    url = store_url(table)
    result = CliRunner().invoke(main, ["retention", "apply", "--sink", url, "--keep-days", "3"])
    assert result.exit_code == 1
    assert "no asgi-audit table" in result.output and len(result.output.splitlines()) == 1
    assert sql_rows("SELECT to_regclass(%s)::text", table) == [(None,)]


# Redelivery and concurrent writers --------------------------------------------------------


def test_redelivery_by_another_instance_keeps_one_row(table: str, make: Records) -> None:
    """A batch shipped again after a crash, by a new process, adds no row."""
    batch = [make() for _ in range(20)]
    for _ in range(2):
        with contextlib.closing(open_sink(store_url(table))) as writer:
            writer.write_batch(batch)
            writer.write_batch(batch[5:])
    assert sql_rows(f"SELECT count(*), count(DISTINCT id) FROM {table}") == [(20, 20)]


def test_four_writers_at_once_store_every_record_once(table: str) -> None:
    """Four pods ship concurrently, each also re-sending a neighbour's batches, across days
    none of them has a partition for yet: every record is stored exactly once."""
    streams = []
    for pod in range(4):
        make = Records()
        streams.append(
            [
                make(stream=f"orders:pod-{pod}:1", started_at_ns=BASE_NS + n * DAY_NS // 4)
                for n in range(40)
            ]
        )
    failures: list[BaseException] = []
    start = threading.Barrier(4)

    def ship(pod: int) -> None:
        try:
            with contextlib.closing(open_sink(store_url(table))) as writer:
                start.wait(timeout=30)
                mine, theirs = streams[pod], streams[(pod + 1) % 4]
                for first in range(0, 40, 8):
                    writer.write_batch(mine[first : first + 8])
                    writer.write_batch(theirs[first : first + 8])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=ship, args=(pod,)) for pod in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert not any(thread.is_alive() for thread in threads)
    assert sql_rows(f"SELECT count(*), count(DISTINCT id) FROM {table}") == [(160, 160)]
    per_stream = sql_rows(f"SELECT stream, count(*) FROM {table} GROUP BY stream ORDER BY 1")
    assert per_stream == [(f"orders:pod-{pod}:1", 40) for pod in range(4)]


# Connections ------------------------------------------------------------------------------


def test_next_write_succeeds_after_the_server_drops_every_connection(
    table: str, make: Records
) -> None:
    """Backends terminated under a live store (as a restart does): the pool notices on
    checkout, connects again, and neither the write nor the read after it fails."""
    name = f"asgi-audit-test-{uuid.uuid4().hex[:8]}"
    with contextlib.closing(open_sink(store_url(table, application_name=name))) as store:
        first = [make() for _ in range(3)]
        store.write_batch(first)
        killed = sql_rows(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name = %s",
            name,
        )
        assert killed and all(row == (True,) for row in killed)
        second = [make() for _ in range(3)]
        store.write_batch(second)
        assert store.count() == 6
        assert store.get(second[0].id) == second[0]
        killed_again = sql_rows(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            name,
        )
        assert killed_again
        assert [r.id for r in store.search(Query(limit=2))] == [second[2].id, second[1].id]


def test_commits_are_durable_even_if_the_session_default_is_not(table: str, make: Records) -> None:
    """synchronous_commit=off (a DBA's default, here from the URL) is set back to on: the
    shipper forgets a batch as soon as write_batch returns."""
    url = store_url(table, options="-c%20statement_timeout%3D61s%20-c%20synchronous_commit%3Doff")
    with contextlib.closing(open_sink(url)) as store:
        assert isinstance(store, PostgresSink)
        store.write_batch([make()])
        pool = store._pool
        assert pool is not None
        with pool.connection() as connection:
            assert connection.execute("SHOW synchronous_commit").fetchone() == ("on",)
            assert connection.execute("SHOW statement_timeout").fetchone() == ("61s",)


def test_unreachable_server_is_a_sink_error_soon(make: Records) -> None:
    """Nothing listening: write_batch raises SinkError with the cause within seconds, so
    the shipper backs off; the password never appears in messages."""
    url = "postgresql://audit:s3cret@127.0.0.1:1/audit?table=audit_records&connect_timeout=2"
    with contextlib.closing(open_sink(url)) as store:
        assert "s3cret" not in repr(store)
        started = time.monotonic()
        with pytest.raises(SinkError) as caught:
            store.write_batch([make()])
        assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "refused" in message.lower() or "connect" in message.lower()
    assert "s3cret" not in message and "***" in message
    assert not isinstance(caught.value, RecordRefused)  # an outage: retried


SECRET = "pw-Sekr1t-value"


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry warns once per process and kind: forget earlier tests' warnings."""
    monkeypatch.setattr(registry, "_warned", set())


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://asgi_audit_nobody:{SECRET}@127.0.0.1:5432/test?table=t",
        f"postgresql://asgi_audit_nobody@127.0.0.1:5432/test?password={SECRET}&table=t",
        f"postgresql://asgi_audit_nobody:{SECRET}@127.0.0.1:1/test?connect_timeout=2",
    ],
)
def test_no_password_in_errors_or_logs(
    url: str, make: Records, caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    """A refused login (no such role) or no server at all: the SinkError, its cause chain
    and every log line (the registry's, the pool's) show no password; opening warns once
    that the URL carries one, naming where else libpq finds it."""
    with caplog.at_level(logging.DEBUG):
        with contextlib.closing(open_sink(url)) as store, pytest.raises(SinkError) as caught:
            store.write_batch([make()])
        open_sink(url).close()
    assert not isinstance(caught.value, RecordRefused)
    texts = [str(caught.value), repr(caught.value), *(r.getMessage() for r in caplog.records)]
    assert all(SECRET not in text for text in texts), texts
    warnings = [r for r in caplog.records if r.name == "asgi_audit.sinks"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    for alternative in ("PGPASSWORD", "~/.pgpass", "PGPASSFILE", "service file"):
        assert alternative in warnings[0].getMessage()
    assert "***" in warnings[0].getMessage()


def test_a_url_without_a_password_warns_nothing(
    caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_audit.sinks"):
        open_sink("postgresql://audit@127.0.0.1:5432/test?sslmode=prefer").close()
    assert [r for r in caplog.records if r.name == "asgi_audit.sinks"] == []


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{SECRET}@db/audit?table=Bad",
        f"postgresql://db/audit?password={SECRET}&tabel=x",
        f"postgresql://db/audit?sslpassword={SECRET}&port=x",
        f"postgresql://db/audit?oauth_client_secret={SECRET}&table=1",
    ],
)
def test_no_password_when_the_url_is_refused(
    url: str, caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError) as caught:
        open_sink(url)
    assert SECRET not in str(caught.value)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


# Layout --------------------------------------------------------------------------------


def test_schema_version_table_records_the_layout(sink: PostgresSink, table: str) -> None:
    """One row, version 1, written at creation; reopening adds nothing."""
    sink.ready()
    with contextlib.closing(PostgresSink(store_url(table))) as again:
        again.ready()
    rows = sql_rows(f"SELECT version, applied_at FROM {table}_schema_version")
    assert [row[0] for row in rows] == [1]
    applied = rows[0][1]
    assert isinstance(applied, datetime)
    assert abs(applied.timestamp() - time.time()) < 600


def test_columns_indexes_and_stored_bytes(sink: PostgresSink, table: str, make: Records) -> None:
    """Indexed columns copy the record, bodies are bytea (zstd when it pays), JSON metadata
    is the whole record, and started_at is the start as a timestamp."""
    json_body = b'{"lines": [' + b'{"sku": "SKU-000001", "quantity": 3},' * 2000 + b"{}]}"
    record = make(request_body=body(json_body), response_body=body(b"\x00\xff"))
    empty = make(request_body=body(b""), response_body=None)
    sink.write_batch([record, empty])
    rows = {
        row[0]: row[1:]
        for row in sql_rows(
            "SELECT id, route, status, correlation_id, request_encoding,"
            " length(request_body), response_body, started_at,"
            f" (metadata::jsonb)->>'seq' FROM {table}"
        )
    }
    route, status, correlation, encoding, stored_length, response, started, seq = rows[record.id]
    assert (route, status, correlation) == (record.route, 201, record.correlation_id)
    assert encoding == "zstd" and isinstance(stored_length, int)
    assert stored_length * 20 < len(json_body)
    assert response == b"\x00\xff"
    assert started == datetime.fromtimestamp(record.started_at_ns // 1000 / 1e6, tz=UTC)
    assert seq == str(record.seq)
    assert rows[empty.id][4:6] == (0, None)
    indexes = {
        row[0]
        for row in sql_rows(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s::regclass",
            table,
        )
    }
    for columns in ("(id)", "(route, started_at_ns, id)", "(status, started_at_ns)"):
        assert any(definition.endswith(columns) for definition in map(str, indexes)), columns
    storage = sql_rows(
        "SELECT attname, attstorage FROM pg_attribute WHERE attrelid = %s::regclass"
        " AND attname LIKE '%%_body' ORDER BY 1",
        day_name(table, BASE_NS // DAY_NS),
    )
    assert storage == [("request_body", "e"), ("response_body", "e")]


def test_nul_characters_in_text_are_kept(sink: PostgresSink, make: Records) -> None:
    """PostgreSQL text cannot hold NUL; a path with one (%00) is still stored and found."""
    record = make(path="/files/a\x00b", route="/files/\x00{name}", correlation_id="c\x00")
    sink.write_batch([record])
    assert sink.get(record.id) == record
    assert [r.id for r in sink.search(Query(route="/files/\x00{name}"))] == [record.id]
    assert [r.id for r in sink.search(Query(correlation_id="c\x00"))] == [record.id]


def test_a_newer_layout_is_refused(sink: PostgresSink, table: str, make: Records) -> None:
    """A table migrated by a newer asgi-audit is not written with an older layout."""
    sink.ready()
    sql_rows(f"INSERT INTO {table}_schema_version (version) VALUES (2)")
    with (
        contextlib.closing(PostgresSink(store_url(table))) as older,
        pytest.raises(SinkError, match="newer than this asgi-audit"),
    ):
        older.write_batch([make()])
    with pytest.raises(ConfigError, match="newer than this asgi-audit"):
        open_sink(store_url(table), create=False)


def test_checkpoints_table_is_added_to_an_older_layout(
    sink: PostgresSink, table: str, make: Records
) -> None:
    """A layout 1 made before checkpoints existed reads as no checkpoints to a reader
    (which runs no DDL), and gets its table from the next writer, version unchanged."""
    sink.write_batch([make()])
    sql_rows(f"DROP TABLE {table}_checkpoints")
    with contextlib.closing(open_sink(store_url(table), create=False)) as reader:
        assert list(reader.checkpoints()) == []
    assert sql_rows("SELECT to_regclass(%s)::text", f"{table}_checkpoints") == [(None,)]
    with contextlib.closing(PostgresSink(store_url(table))) as writer:
        writer.write_checkpoints([checkpoint("s", 1)])
        assert list(writer.checkpoints("s")) == [checkpoint("s", 1)]
    assert sql_rows(f"SELECT version FROM {table}_schema_version") == [(1,)]
    columns = sql_rows(
        "SELECT column_name::text, data_type::text FROM information_schema.columns"
        " WHERE table_name = %s ORDER BY ordinal_position",
        f"{table}_checkpoints",
    )
    assert columns == [("stream", "text"), ("idx", "bigint"), ("at_ns", "bigint"), ("body", "text")]


def test_a_foreign_table_of_that_name_is_not_used(table: str, make: Records) -> None:
    """A table the store did not create is refused, not written into."""
    sql_rows(f"CREATE TABLE {table} (id text)")
    with (
        contextlib.closing(open_sink(store_url(table))) as store,
        pytest.raises(SinkError, match="not made by asgi-audit"),
    ):
        store.write_batch([make()])


def test_reader_does_not_create_a_missing_table(table: str) -> None:
    """open_sink(create=False), as the CLI opens, refuses a table that does not exist."""
    with pytest.raises(ConfigError, match="no asgi-audit table"):
        open_sink(store_url(table), create=False)
    assert sql_rows("SELECT to_regclass(%s)::text", f"{table}_schema_version") == [(None,)]


# URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://db/audit?table=Audit", "lower-case SQL identifier"),
        ("postgresql://db/audit?table=audit-records", "lower-case SQL identifier"),
        ("postgresql://db/audit?table=x;drop%20table%20y", "lower-case SQL identifier"),
        ("postgresql://db/audit?table=1st", "lower-case SQL identifier"),
        ("postgresql://db/audit?table=", "lower-case SQL identifier"),
        (f"postgresql://db/audit?table={'t' * 49}", "at most 48"),
        ("postgresql://db/audit?table=a&table=b", "'table' given 2 times"),
        ("postgresql://db/audit?tabel=audit", "not a PostgreSQL URL"),
        ("postgres://u:pw@db:notaport/audit", "not a PostgreSQL URL"),
    ],
)
def test_bad_urls_fail_before_connecting(url: str, message: str) -> None:
    """Mistakes in the URL are ConfigErrors at open, and at middleware start-up."""
    with pytest.raises(ConfigError, match=message) as caught:
        open_sink(url)
    assert caught.value.parameter == "sink"
    assert ":pw@" not in str(caught.value)
    with pytest.raises(ConfigError, match=message) as at_startup:
        load_settings({}, {"ASGI_AUDIT_SINK": url}, check_sink_url)
    assert at_startup.value.parameter == "ASGI_AUDIT_SINK"


@pytest.mark.parametrize(
    "url",
    ["postgresql://audit@db.internal:5432/audit?table=audit_records", "postgres://db/a"],
)
def test_good_urls_are_accepted_without_a_server(url: str) -> None:
    """Configuration accepts both spellings and connects to nothing."""
    assert load_settings({"sink": url}, {}, check_sink_url).sink == url
    store = open_sink(url)
    assert isinstance(store, PostgresSink)
    assert store.table == "audit_records"
    store.close()


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without psycopg installed, the error says which extra to install."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "asgi_audit.sinks.postgres")
    with pytest.raises(ConfigError, match=r"pip install 'asgi-audit\[postgres\]'"):
        open_sink("postgresql://db/audit")


def test_missing_pool_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg without psycopg_pool is not enough, and the check says so at start-up."""
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)
    with pytest.raises(ConfigError, match=r"pip install 'asgi-audit\[postgres\]'"):
        check_sink_url("postgresql://db/audit")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw%zz@db/audit",
        "postgresql://u:pw%ff@db/audit",
        "postgresql://u:pw%00@db/audit",
        "postgresql://db/audit?password=pw%zz",
        "postgresql://db/audit?password=pw&tabel=audit",
        "postgresql://u:pw@db/audit?table=Audit",
        "postgresql://u:pw@db/audit?table=audit#here",
        "postgresql://db/audit?sslpassword=pw&port=x",
    ],
)
def test_passwords_never_appear_in_url_errors(url: str) -> None:
    """Whatever is wrong with the URL, the message shows *** for its passwords."""
    with pytest.raises(ConfigError) as caught:
        check_sink_url(url)
    assert "pw" not in str(caught.value)
    assert "***" in str(caught.value) or "the password" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://",
        "postgres://db",
        "postgresql://u:p%40ss@db:5432/audit",
        "postgresql://u@",
        "postgresql://:secret@db",
        "postgresql://[::1]:5432,[fe80::1]/audit",
        "postgresql://h1:1,h2,h3:3/audit",
        "postgresql://db:,h:/audit",
        "postgresql:///audit?host=/var/run/postgresql",
        "postgresql://db/a/b%2Fc",
        "postgresql://db/audit?ssl=true",
        "postgresql://db/audit?requiressl=1&sslmode=verify-full",
        "postgresql://db/audit?connect_timeout=&user=a&",
        "postgresql://db/audit?options=-c%20statement_timeout%3D5s+x",
        "postgresql://db?user=a@b",
        "postgresql://d%C3%A9/%c3%a9",
        "postgresql://db:notaport/audit?port=5432",
    ],
)
def test_urls_libpq_accepts_are_read_as_libpq_reads_them(url: str) -> None:
    """The check without psycopg reads the same parameters libpq does."""
    assert libpq_options(url) == conninfo_to_dict(url)


@pytest.mark.parametrize(
    "url",
    [
        "POSTGRESQL://db/audit",
        "postgresql://db/audit?tabel=audit",
        "postgresql://db/audit?Host=db",
        "postgresql://db/audit?ssl=yes",
        "postgresql://db/audit?user",
        "postgresql://db/audit?user=a=b",
        "postgresql://db/audit?user=a&&",
        "postgresql://db/audit?%3D=1",
        "postgresql://[::1/audit",
        "postgresql://[]/audit",
        "postgresql://[::1]x/audit",
        "postgresql://u%zz@db/audit",
        "postgresql://db/audit%00",
    ],
)
def test_urls_libpq_refuses_are_refused(url: str) -> None:
    """The check without psycopg refuses what libpq refuses."""
    with pytest.raises(psycopg.Error):
        conninfo_to_dict(url)
    with pytest.raises(ValueError):  # noqa: PT011 (each case has its own message)
        libpq_options(url)


def test_every_parameter_of_the_installed_libpq_is_known() -> None:
    """A libpq newer than the list of keywords fails here, not in a user's URL check."""
    installed = {option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()}
    assert installed <= LIBPQ_KEYWORDS
