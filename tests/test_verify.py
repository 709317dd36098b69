"""``asgi-audit verify`` on real stores: a trail written by the spool writer (chained,
checkpointed, signed), shipped by the shipper, then tampered with in the store itself."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from asgi_audit.cli import main
from asgi_audit.recording.chain import retention_marker
from asgi_audit.recording.signing import generate, load_signer
from asgi_audit.recording.writer import SpoolRecorder
from asgi_audit.shipping.shipper import Shipper, ShipReport
from asgi_audit.sinks import open_sink
from postgres_server import admin_connection, fresh_table
from postgres_server import store_url as postgres_store_url
from seaweed import SeaweedServer
from spooling import exchange, spooled

STREAM = "billing.4242.1764556800000000000"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    """A private key (PEM) and the path of its public key."""
    private, public = generate()
    path = tmp_path_factory.mktemp("keys") / "audit.pub"
    path.write_bytes(public)
    return private, path


def record_trail(
    spool: Path, url: str, private: bytes | None, *, count: int = 9, final: bool = True
) -> None:
    """``count`` exchanges through a real SpoolRecorder (a checkpoint at the start, some on
    the way, a final one at shutdown unless ``final`` is False: a crash), then shipped."""
    recorder = trail_recorder(spool, private)
    for n in range(count):
        request = f"invoice {n:03} ".encode() * 6  # not JSON, under 256 bytes: kept as is
        assert recorder.try_submit(exchange(request, f"ok {n}".encode()))
        if n % 3 == 2:
            assert recorder.flush(10)
            time.sleep(0.05)  # a checkpoint falls due between these records
    if final:
        assert recorder.shutdown(10)
    else:
        assert recorder.flush(10)
    report = ship(spool, url)
    assert report.delivered == count
    assert report.checkpoints >= 3
    if not final:
        recorder.shutdown(10)  # after shipping: the final checkpoint never reaches the store


def trail_recorder(
    spool: Path, private: bytes | None, *, checkpoint_interval: float = 0.02
) -> SpoolRecorder:
    """A writer of the stream STREAM that checkpoints often (signed with ``private``)."""
    return SpoolRecorder(
        spool,
        service="billing",
        stream=lambda: STREAM,
        fsync="off",
        interval=0.005,
        signer=None if private is None else load_signer(private),
        checkpoint_interval=checkpoint_interval,
    )


def ship(spool: Path, url: str) -> ShipReport:
    """Deliver the spool to the store at ``url`` once."""
    sink = open_sink(url)
    try:
        return Shipper(spool, sink).ship_once(timeout=30)
    finally:
        sink.close()


def verify(url: str, public: Path | None, *extra: str) -> Result:
    arguments = ["verify", "--sink", url, *extra]
    if public is not None:
        arguments += ["--public-key", str(public)]
    return CliRunner().invoke(main, arguments)


# -- SQLite: every tampering of the acceptance list ------------------------------------


@pytest.fixture
def sqlite_trail(tmp_path: Path, keys: tuple[bytes, Path]) -> tuple[str, Path]:
    path = tmp_path / "audit.db"
    record_trail(tmp_path / "spool", f"sqlite:///{path}", keys[0])
    return f"sqlite:///{path}", path


def ids_by_seq(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as connection:
        return dict(connection.execute("SELECT seq, id FROM records"))


def in_sqlite(db: Path, statement: str, *params: Any) -> None:
    with sqlite3.connect(db) as connection:
        assert connection.execute(statement, params).rowcount >= 1


def flip_request_byte(db: Path) -> None:
    record_id = ids_by_seq(db)[4]
    with sqlite3.connect(db) as connection:
        data, encoding = connection.execute(
            "SELECT request_body, request_encoding FROM records WHERE id = ?", (record_id,)
        ).fetchone()
        assert encoding == "identity"
        changed = bytes([data[0] ^ 0x20]) + data[1:]
        connection.execute("UPDATE records SET request_body = ? WHERE id = ?", (changed, record_id))


def change_field(db: Path) -> None:
    record_id = ids_by_seq(db)[4]
    in_sqlite(
        db,
        "UPDATE records SET metadata = json_set(metadata, '$.status', 500) WHERE id = ?",
        record_id,
    )


def delete_record(db: Path) -> None:
    in_sqlite(db, "DELETE FROM records WHERE id = ?", ids_by_seq(db)[4])


def swap_records(db: Path) -> None:
    found = ids_by_seq(db)
    for record_id, seq in ((found[4], 5), (found[5], 4)):
        in_sqlite(
            db,
            "UPDATE records SET seq = ?, metadata = json_set(metadata, '$.seq', ?) WHERE id = ?",
            seq,
            seq,
            record_id,
        )


def insert_with_fresh_id(db: Path) -> None:
    sink = open_sink(f"sqlite:///{db}")
    try:
        record = sink.get(ids_by_seq(db)[4])
        assert record is not None
        record.id = "0190f0f0-0000-7000-8000-000000000001"
        record.status = 204
        sink.write_batch([record])
    finally:
        sink.close()


def delete_checkpoint(db: Path) -> None:
    in_sqlite(db, "DELETE FROM checkpoints WHERE idx = 2")


def alter_signature(db: Path) -> None:
    in_sqlite(
        db,
        "UPDATE checkpoints SET body = json_set(body, '$.signature', ?) WHERE idx = 2",
        "A" * 88,
    )


SQLITE_TAMPERINGS: dict[str, tuple[Callable[[Path], None], str]] = {
    "body byte": (flip_request_byte, "modified: records changed since they were written: seq 4"),
    "metadata field": (change_field, "seq 4"),
    "deleted record": (delete_record, "removed: records missing from the chain: seq 4"),
    "swapped records": (swap_records, "modified: records changed since they were written: seq 4-5"),
    "inserted record": (insert_with_fresh_id, "inserted: record 0190f0f0"),
    "deleted checkpoint": (delete_checkpoint, "checkpoint-missing: checkpoints 2 are missing"),
    "altered signature": (alter_signature, "checkpoint-bad-signature: checkpoint 2"),
}


def test_untouched_sqlite_trail_verifies(
    sqlite_trail: tuple[str, Path], keys: tuple[bytes, Path]
) -> None:
    url, _ = sqlite_trail
    result = verify(url, keys[1])
    assert result.exit_code == 0, result.output
    assert f"OK   {STREAM}: 9 records" in result.output
    assert "final checkpoint" in result.output and "1 streams, 0 failed" in result.output


@pytest.mark.parametrize("tampering", list(SQLITE_TAMPERINGS))
def test_each_tampering_fails_naming_stream_and_seq(
    sqlite_trail: tuple[str, Path], keys: tuple[bytes, Path], tampering: str
) -> None:
    url, db = sqlite_trail
    change, expected = SQLITE_TAMPERINGS[tampering]
    change(db)
    result = verify(url, keys[1])
    assert result.exit_code == 1, result.output
    assert f"FAIL {STREAM}" in result.output
    assert expected in result.output


def test_json_report_lists_the_problems(
    sqlite_trail: tuple[str, Path], keys: tuple[bytes, Path]
) -> None:
    url, db = sqlite_trail
    delete_record(db)
    result = verify(url, keys[1], "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    [stream] = report["streams"]
    assert (report["ok"], stream["stream"], stream["ok"]) == (False, STREAM, False)
    assert stream["problems"][0]["kind"] == "removed"
    assert stream["problems"][0]["seqs"] == [4]


def test_without_the_public_key_signatures_are_not_checked(
    sqlite_trail: tuple[str, Path],
) -> None:
    url, _ = sqlite_trail
    result = verify(url, None)
    assert result.exit_code == 0, result.output
    assert "signatures not checked" in result.output


def test_a_crash_is_reported_without_failing_unless_strict(
    tmp_path: Path, keys: tuple[bytes, Path]
) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    record_trail(tmp_path / "spool", url, keys[0], final=False)
    result = verify(url, keys[1])
    assert result.exit_code == 0, result.output
    assert "ended without a final checkpoint" in result.output
    assert verify(url, keys[1], "--strict").exit_code == 1


def test_restarts_make_streams_that_each_verify(tmp_path: Path, keys: tuple[bytes, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    for run in range(2):
        recorder = SpoolRecorder(
            tmp_path / "spool", service="billing", fsync="off", signer=load_signer(keys[0])
        )
        for n in range(3):
            assert recorder.try_submit(exchange(f"run {run} n {n}".encode(), b"ok"))
        assert recorder.shutdown(10)
    ship(tmp_path / "spool", url)
    result = verify(url, keys[1])
    assert result.exit_code == 0, result.output
    assert "2 streams, 0 failed" in result.output


def test_unsigned_trail_verifies_but_not_against_a_key(
    tmp_path: Path, keys: tuple[bytes, Path]
) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    record_trail(tmp_path / "spool", url, None)
    plain = verify(url, None)
    assert plain.exit_code == 0 and "are not signed" in plain.output
    assert verify(url, keys[1]).exit_code == 1


def test_a_bad_public_key_is_a_usage_error(sqlite_trail: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = sqlite_trail
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    result = verify(url, junk)
    assert result.exit_code == 2
    assert "Ed25519 public key" in result.output


# -- the other stores: untouched, then tampered with their own means -----------------------


def jsonl_lines(directory: Path) -> list[tuple[Path, int, dict[str, Any]]]:
    found = []
    for path in sorted(directory.glob("*.jsonl")):
        if path.name == "checkpoints.jsonl":
            continue
        for number, line in enumerate(path.read_text().splitlines()):
            found.append((path, number, json.loads(line)))
    return found


def rewrite_line(path: Path, number: int, value: dict[str, Any] | None) -> None:
    lines = path.read_text().splitlines()
    if value is None:
        del lines[number]
    else:
        lines[number] = json.dumps(value)
    path.write_text("".join(line + "\n" for line in lines))


def test_jsonl_trail_verifies_and_catches_edits(tmp_path: Path, keys: tuple[bytes, Path]) -> None:
    directory = tmp_path / "jsonl"
    url = f"jsonl:///{directory}"
    record_trail(tmp_path / "spool", url, keys[0])
    assert verify(url, keys[1]).exit_code == 0
    path, number, line = next(item for item in jsonl_lines(directory) if item[2]["seq"] == 3)
    line["path"] = "/elsewhere"
    rewrite_line(path, number, line)
    edited = verify(url, keys[1])
    assert edited.exit_code == 1 and "seq 3" in edited.output
    path, number, _ = next(item for item in jsonl_lines(directory) if item[2]["seq"] == 6)
    rewrite_line(path, number, None)
    assert "removed: records missing from the chain: seq 6" in verify(url, keys[1]).output
    rewrite_line(directory / "checkpoints.jsonl", 1, None)
    assert "checkpoint-missing" in verify(url, keys[1]).output


@pytest.mark.postgres
def test_postgres_trail_verifies_and_catches_edits(
    tmp_path: Path, keys: tuple[bytes, Path]
) -> None:
    with fresh_table() as table:
        url = postgres_store_url(table)
        record_trail(tmp_path / "spool", url, keys[0])
        assert verify(url, keys[1]).exit_code == 0
        with admin_connection() as server:  # metadata is JSON text
            server.execute(
                f'UPDATE "{table}" SET metadata = '
                "jsonb_set(metadata::jsonb, '{status}', '418')::text WHERE seq = 2"
            )
        modified = verify(url, keys[1])
        assert modified.exit_code == 1 and "seq 2" in modified.output
        with admin_connection() as server:
            server.execute(f'DELETE FROM "{table}" WHERE seq = 7')
            server.execute(f'DELETE FROM "{table}_checkpoints" WHERE idx = 2')
        output = verify(url, keys[1]).output
        assert "seq 7" in output and "checkpoint-missing" in output


@pytest.mark.s3
def test_s3_trail_verifies_and_catches_an_insert(
    tmp_path: Path, keys: tuple[bytes, Path], s3_server: SeaweedServer
) -> None:
    url = s3_server.url(s3_server.make_bucket("verify"), "trail")
    record_trail(tmp_path / "spool", url, keys[0])
    result = verify(url, keys[1])
    assert result.exit_code == 0, result.output
    sink = open_sink(url)
    try:
        [record] = [r for r in sink.search(_everything()) if r.seq == 2]
        full = sink.get(record.id)
        assert full is not None
        full.id = "0190f0f0-0000-7000-8000-0000000000aa"
        sink.write_batch([full])
    finally:
        sink.close()
    inserted = verify(url, keys[1])
    assert inserted.exit_code == 1 and "repeats seq 2" in inserted.output


def _everything() -> Any:
    from asgi_audit.sinks import Query

    return Query(limit=None)


@pytest.mark.postgres
def test_verify_passes_after_retention_apply_and_a_forged_marker_fails(
    tmp_path: Path, keys: tuple[bytes, Path]
) -> None:
    private = tmp_path / "signing.pem"
    private.write_bytes(keys[0])
    spool = tmp_path / "spool"
    with fresh_table() as table:
        url = postgres_store_url(table)
        recorder = trail_recorder(spool, keys[0])
        ten_days_ago = time.time_ns() - 10 * 86_400 * 10**9
        for n in range(8):
            made = exchange(f"order {n}".encode(), b"ok")
            if n < 5:  # the first five started ten days ago: their day goes
                made.started_at_ns = ten_days_ago + n
            assert recorder.try_submit(made)
            if n % 3 == 2:
                assert recorder.flush(10)
                time.sleep(0.05)
        assert recorder.shutdown(10)
        ship(spool, url)
        assert verify(url, keys[1]).exit_code == 0

        applied = CliRunner().invoke(
            main,
            ["retention", "apply", "--sink", url, "--keep-days", "3"],
            env={"ASGI_AUDIT_SIGNING_KEY": str(private)},
        )
        assert applied.exit_code == 0, applied.output
        assert "retention marker 1: 5 records of 1 stream(s)" in applied.output
        after = verify(url, keys[1])
        assert after.exit_code == 0, after.output
        assert "removed by retention: seq 1-5" in after.output

        # Deleting a record and excusing it with an unsigned marker does not pass.
        with admin_connection() as server:
            server.execute(f'DELETE FROM "{table}" WHERE seq = 7')
        forged = retention_marker(
            index=2,
            previous=None,
            at_ns=time.time_ns(),
            until_ns=time.time_ns(),
            removed={STREAM: [7]},
            dropped=[],
            signer=None,
        )
        sink = open_sink(url)
        try:
            sink.write_checkpoints([forged])
        finally:
            sink.close()
        caught = verify(url, keys[1])
        assert caught.exit_code == 1
        assert "retention-unsigned" in caught.output
        assert "removed: records missing from the chain: seq 7" in caught.output


def test_keys_generate_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    private, public = tmp_path / "signing.pem", tmp_path / "audit.pub"
    arguments = ["keys", "generate", "--private", str(private), "--public", str(public)]
    made = CliRunner().invoke(main, arguments)
    assert made.exit_code == 0, made.output
    assert private.stat().st_mode & 0o777 == 0o600
    signer = load_signer(str(private))
    assert f"key id {signer.key_id}" in made.output
    assert signer.public_pem() == public.read_bytes()
    again = CliRunner().invoke(main, arguments)
    assert again.exit_code == 1 and "exists; not overwritten" in again.output
    assert load_signer(str(private)).key_id == signer.key_id


def test_an_idle_stream_keeps_checkpointing(tmp_path: Path, keys: tuple[bytes, Path]) -> None:
    """Silence is provable: an idle stream still writes (empty) checkpoints."""
    recorder = trail_recorder(tmp_path / "spool", keys[0], checkpoint_interval=0.03)
    assert recorder.try_submit(exchange(b"only one", b"ok"))
    assert recorder.flush(10)
    time.sleep(0.3)
    assert recorder.shutdown(10)
    found = [r.meta["checkpoint"] for r in spooled(tmp_path / "spool", checkpoints=True)]
    assert len(found) >= 5
    assert [c["index"] for c in found] == list(range(1, len(found) + 1))
    assert sum(c["count"] for c in found) == 1 and found[-1]["final"]
    assert [c["count"] for c in found[2:-1]] == [0] * (len(found) - 3)


def test_stream_and_window_choose_what_is_verified(
    sqlite_trail: tuple[str, Path], keys: tuple[bytes, Path]
) -> None:
    url, _ = sqlite_trail
    chosen = verify(url, keys[1], "--stream", STREAM)
    assert chosen.exit_code == 0 and "1 streams, 0 failed" in chosen.output
    other = verify(url, keys[1], "--stream", "nobody.1.2")
    assert other.exit_code == 0 and "no records and no checkpoints" in other.output
    later = verify(url, keys[1], "--since", "2200-01-01")
    assert later.exit_code == 0 and "no records and no checkpoints" in later.output
    beyond = verify(url, keys[1], "--since", "2999-01-01")
    assert beyond.exit_code == 2 and "between 1970 and 2262" in beyond.output
    assert verify(url, keys[1], "--since", "1h").exit_code == 0
