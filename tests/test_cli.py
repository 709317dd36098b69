"""The asgi-audit command: listing, showing, exporting, statistics, the spool, the demo."""

from __future__ import annotations

import base64
import hashlib
import json
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from asgi_audit import __version__
from asgi_audit.cli import main
from asgi_audit.sinks import open_sink
from asgi_audit.sinks.record import StoredRecord
from factories import BASE_NS, SECOND_NS, Records, body


@pytest.fixture
def populated(tmp_path: Path) -> tuple[str, list[StoredRecord]]:
    """A SQLite store with five records: orders (JSON), one 404, one binary upload."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    make = Records()
    records = [make() for _ in range(3)]
    records.append(make(status=404, path="/orders/999", method="GET", correlation_id="miss"))
    binary = bytes(range(256))
    records.append(
        make(route="/uploads", path="/uploads", request_body=body(binary), request_size=256)
    )
    with closing(open_sink(url)) as store:
        store.write_batch(records)
    return url, records


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_version() -> None:
    """--version prints the package version."""
    code, output = run("--version")
    assert code == 0 and __version__ in output


def test_unknown_command_fails_with_a_clear_error() -> None:
    """An unknown subcommand exits non-zero and says so."""
    code, output = run("frobnicate")
    assert code == 2 and "No such command 'frobnicate'" in output


def test_ls_lists_newest_first_with_filters(populated: tuple[str, list[StoredRecord]]) -> None:
    """ls shows the newest first and narrows by status, method, route and time."""
    url, records = populated
    code, output = run("ls", "--sink", url)
    assert code == 0
    lines = output.splitlines()
    assert [line.split()[1] for line in lines] == [r.id for r in reversed(records)]
    code, output = run("ls", "--sink", url, "--status", "4xx")
    assert [line.split()[1] for line in output.splitlines()] == [records[3].id]
    code, output = run("ls", "--sink", url, "--method", "get")
    assert len(output.splitlines()) == 1
    code, output = run("ls", "--sink", url, "--route", "/uploads", "--limit", "5")
    assert [line.split()[1] for line in output.splitlines()] == [records[4].id]
    since = "2024-05-01T12:00:02Z"
    code, output = run("ls", "--sink", url, "--since", since, "--oldest-first")
    assert [line.split()[1] for line in output.splitlines()] == [r.id for r in records[2:]]
    code, output = run("ls", "--sink", url, "--correlation-id", "miss")
    assert len(output.splitlines()) == 1


def test_show_pretty_prints_and_raw_writes_exact_bytes(
    populated: tuple[str, list[StoredRecord]],
) -> None:
    """show prints where the exchange came from, headers and indented JSON; --raw writes
    exactly the stored bytes."""
    url, records = populated
    code, output = run("show", records[0].id, "--sink", url)
    assert code == 0
    assert "host api.example.test  query verbose=1  https HTTP/1.1" in output
    assert "client 10.0.0.7:51234" in output
    assert "service orders  pod orders-7f9c  namespace shop  node node-1" in output
    assert "content-type: application/json" in output
    assert '"order": 0' in output
    result = CliRunner().invoke(main, ["show", records[4].id, "--sink", url, "--raw", "request"])
    assert result.exit_code == 0
    assert result.stdout_bytes == bytes(range(256))
    code, output = run("show", records[4].id, "--sink", url)
    assert "bytes of binary; use --raw" in output


def test_a_damaged_record_is_one_line_not_a_traceback(
    populated: tuple[str, list[StoredRecord]], tmp_path: Path
) -> None:
    """Bytes in the sink that no longer decode (a damaged zstd body) make show and export
    fail in one line naming the record, with exit status 1 and no traceback."""
    import sqlite3

    url, records = populated
    damaged = records[0].id
    with closing(sqlite3.connect(tmp_path / "audit.db")) as database, database:
        database.execute(
            "UPDATE records SET request_body = ?, request_encoding = 'zstd' WHERE id = ?",
            (b"\x28\xb5\x2f\xfd not zstd at all", damaged),
        )
    for args in (["show", damaged], ["export", "--bodies"]):
        code, output = run(*args, "--sink", url)
        assert code == 1, output
        assert len(output.strip().splitlines()) == 1 and output.startswith("Error: ")
        assert damaged in output and "Traceback" not in output


def test_show_unknown_id_and_missing_body_fail_in_one_line(
    populated: tuple[str, list[StoredRecord]],
) -> None:
    """An unknown id, or a store that does not exist, is a one-line error (and no empty
    store is created at a mistyped path)."""
    url, _ = populated
    code, output = run("show", "nope", "--sink", url)
    assert code == 1 and output.strip() == f"Error: no record 'nope' in {url}"
    code, output = run("ls", "--sink", "sqlite:///does/not/exist.db")
    assert code == 1 and "no sink at does/not/exist.db" in output
    assert not Path("does/not/exist.db").exists()


def test_export_jsonl_has_the_public_fields(populated: tuple[str, list[StoredRecord]]) -> None:
    """export --format jsonl: one object per line with the documented fields, oldest first."""
    url, records = populated
    code, output = run("export", "--sink", url, "--format", "jsonl")
    assert code == 0
    rows = [json.loads(line) for line in output.splitlines()]
    assert [row["id"] for row in rows] == [r.id for r in records]
    first, record = rows[0], records[0]
    assert record.request_body is not None and record.response_body is not None
    assert first["started_at"] == "2024-05-01T12:00:00Z"
    assert first["route"] == "/orders/{order_id}"
    assert first["status"] == 201 and first["outcome"] == "complete"
    assert first["request_body_size"] == record.request_body.size
    assert first["request_body_sha256"] == record.request_body.sha256
    assert (
        first["response_body_sha256"]
        == hashlib.sha256(record.response_body.data or b"").hexdigest()
    )
    assert "request_body" not in first


def test_export_with_bodies_names_their_encoding(
    populated: tuple[str, list[StoredRecord]], tmp_path: Path
) -> None:
    """--bodies adds UTF-8 text or base64 with an explicit encoding; -o writes a file."""
    url, _ = populated
    target = tmp_path / "out.jsonl"
    code, _ = run("export", "--sink", url, "--bodies", "-o", str(target))
    assert code == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows[0]["request_body"] == '{"order": 0}'
    assert rows[0]["request_body_encoding"] == "utf-8"
    assert rows[4]["request_body_encoding"] == "base64"
    assert base64.b64decode(rows[4]["request_body"]) == bytes(range(256))


def test_stats_counts_by_route(populated: tuple[str, list[StoredRecord]]) -> None:
    """stats gives counts and p50/p99 per route."""
    url, _ = populated
    code, output = run("stats", "--sink", url)
    assert code == 0
    orders = next(line for line in output.splitlines() if line.startswith("/orders/{order_id}"))
    assert orders.split()[1] == "4"
    assert "p99 ms" in output


def test_tail_prints_the_last_records_oldest_first(
    populated: tuple[str, list[StoredRecord]],
) -> None:
    """tail -n 2 prints the two newest, in time order."""
    url, records = populated
    code, output = run("tail", "--sink", url, "-n", "2")
    assert code == 0
    assert [line.split()[1] for line in output.splitlines()] == [r.id for r in records[3:]]


def test_tail_follow_sees_new_records(tmp_path: Path) -> None:
    """tail -f prints records written while it follows (bounded by --max-seconds)."""
    import threading
    import time

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    make = Records()
    with closing(open_sink(url)) as store:
        store.write_batch([make()])
    late = make(started_at_ns=BASE_NS + 60 * SECOND_NS)

    def write_later() -> None:
        time.sleep(0.5)
        with closing(open_sink(url)) as store:
            store.write_batch([late])

    writer = threading.Thread(target=write_later)
    writer.start()
    code, output = run("tail", "--sink", url, "-f", "--interval", "0.1", "--max-seconds", "3")
    writer.join()
    assert code == 0
    assert late.id in output


def test_bad_filter_values_are_usage_errors(populated: tuple[str, list[StoredRecord]]) -> None:
    """--since and --status reject what they cannot read, naming the option."""
    url, _ = populated
    code, output = run("ls", "--sink", url, "--since", "yesterday")
    assert code == 2 and "--since" in output
    code, output = run("ls", "--sink", url, "--status", "9xx")
    assert code == 2 and "--status" in output


def test_spool_status_and_missing_spool(tmp_path: Path) -> None:
    """spool status describes streams; a missing spool is a one-line error."""
    code, output = run("spool", "status", "--spool", str(tmp_path / "none"))
    assert code == 1 and "no spool at" in output
    (tmp_path / "empty").mkdir()
    code, output = run("spool", "status", "--spool", str(tmp_path / "empty"))
    assert code == 0 and "no streams" in output and "shipper: not running" in output


@pytest.mark.server
def test_demo_serves_records_and_verifies_the_order(tmp_path: Path) -> None:
    """The demo runs uvicorn, stores five exchanges in SQLite, the order byte for byte."""
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    code, output = run("demo", "--sink", url)
    assert code == 0, output
    assert "recorded 5 exchanges" in output
    assert "POST /orders/7 route=/orders/{order_id} status=200 complete" in output
    assert "redacted headers: authorization" in output
    assert "stored byte for byte: True" in output
    assert "GET /health route" not in output


def test_ship_refuses_a_malformed_store_url_at_once(tmp_path: Path) -> None:
    """`ship` checks the URL's form before anything else: one line, exit 1."""
    code, output = run("ship", "--spool", str(tmp_path), "--sink", "ftp://somewhere", "--once")
    assert code == 1 and "unknown kind of sink 'ftp'" in output


def test_retention_needs_a_store_that_has_it(populated: tuple[str, list[StoredRecord]]) -> None:
    """retention apply on a store without partitions is a one-line error."""
    url, _ = populated
    code, output = run("retention", "apply", "--sink", url, "--keep-days", "30")
    assert code == 1 and output.startswith("Error:")
