"""What the file sinks leave on disk: private modes whatever the umask, and JSON Lines
files that a damaged line does not make unreadable."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from asgi_audit.errors import CorruptRecord
from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.jsonl import JsonlSink
from asgi_audit.sinks.sqlite.sink import SqliteSink
from factories import Records, body


@pytest.fixture
def make() -> Records:
    return Records()


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask for the test (process-wide: restored at once afterwards)."""
    previous = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(root: Path) -> dict[str, int]:
    """The mode of everything under ``root`` (itself included), by relative path."""
    found = {".": mode(root)}
    for folder, names, files in os.walk(root):
        for name in [*names, *files]:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = mode(path)
    return found


# Modes --------------------------------------------------------------------------------


def test_sqlite_file_its_companions_and_new_directories_are_private(
    tmp_path: Path, umask: int, make: Records
) -> None:
    """The database, its -wal and -shm (SQLite gives them the database's mode) and every
    directory the sink made: 0600 and 0700. The directory that was there is untouched."""
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "a" / "b" / "audit.db"
    with contextlib.closing(open_sink(f"sqlite:///{path}")) as store:
        store.write_batch([make() for _ in range(3)])
        reader = open_sink(f"sqlite:///{path}", create=False)  # a second connection
        with contextlib.closing(reader):
            assert reader.count() == 3
            found = modes(tmp_path / "a")
    assert found == {
        ".": 0o700,
        "b": 0o700,
        "b/audit.db": 0o600,
        "b/audit.db-wal": 0o600,
        "b/audit.db-shm": 0o600,
    }
    assert mode(tmp_path) == 0o755


def test_sqlite_rollback_journal_is_private_too(tmp_path: Path, umask: int) -> None:
    """A -journal (another program using the file in rollback mode) gets the database's
    mode as well: SQLite copies it to every file it makes beside the database."""
    path = tmp_path / "audit.db"
    open_sink(f"sqlite:///{path}").close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("PRAGMA journal_mode = DELETE")
        other.execute("PRAGMA locking_mode = EXCLUSIVE")  # the journal stays between writes
        other.execute("BEGIN IMMEDIATE")
        other.execute("CREATE TABLE scratch (x)")
        other.execute("INSERT INTO scratch VALUES (randomblob(100000))")
        other.execute("COMMIT")
        other.execute("BEGIN IMMEDIATE")
        other.execute("DELETE FROM scratch")
        journal = tmp_path / "audit.db-journal"
        assert journal.exists()
        assert mode(journal) == 0o600
        other.execute("ROLLBACK")


def test_an_existing_database_keeps_its_mode(tmp_path: Path, umask: int, make: Records) -> None:
    """A file its owner made (or chmodded) is not changed by opening it."""
    path = tmp_path / "audit.db"
    open_sink(f"sqlite:///{path}").close()
    os.chmod(path, 0o640)
    with contextlib.closing(open_sink(f"sqlite:///{path}")) as store:
        store.write_batch([make()])
    assert mode(path) == 0o640


def test_jsonl_files_lock_and_directories_are_private(
    tmp_path: Path, umask: int, make: Records
) -> None:
    root = tmp_path / "x" / "jsonl"
    with contextlib.closing(open_sink(f"jsonl:///{root}")) as store:
        store.write_batch([make(), make(started_at_ns=make().started_at_ns + 86_400 * 10**9)])
    assert modes(tmp_path / "x") == {
        ".": 0o700,
        "jsonl": 0o700,
        "jsonl/.writer.lock": 0o600,
        "jsonl/records-2024-05-01.jsonl": 0o600,
        "jsonl/records-2024-05-02.jsonl": 0o600,
    }


# JSON Lines: damaged lines ------------------------------------------------------------


def jsonl_file(root: Path) -> Path:
    (path,) = root.glob("records-*.jsonl")
    return path


@pytest.fixture
def damaged(tmp_path: Path, make: Records) -> tuple[Path, list[str]]:
    """A file of five records whose lines 2 to 5 are damaged four ways (not JSON, cut
    short before later lines, the wrong shape, a body that is not base64); line 1 and
    line 6 are intact. Returns the directory and the ids in line order."""
    root = tmp_path / "jsonl"
    records = [make() for _ in range(6)]
    with contextlib.closing(open_sink(f"jsonl:///{root}")) as store:
        store.write_batch(records)
    path = jsonl_file(root)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"id":"' + records[1].id.encode() + b'", this is not JSON\n'
    lines[2] = lines[2][:80] + b"\n"  # cut short, then the file goes on
    shape = json.loads(lines[3])
    del shape["stream"]
    lines[3] = json.dumps(shape, separators=(",", ":")).encode() + b"\n"
    bad_body = json.loads(lines[4])
    bad_body["request_body"]["data"] = "*** not base64 ***"
    lines[4] = json.dumps(bad_body, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    return root, [record.id for record in records]


def test_damaged_lines_hide_nothing_else(
    damaged: tuple[Path, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    """Listings and counts skip damaged lines (each warned about once, by file and line)
    and return every intact record; a listing with bodies skips a damaged body too."""
    root, ids = damaged
    with contextlib.closing(JsonlSink(root)) as store, caplog.at_level(logging.WARNING):
        assert store.count() == 3  # lines 1, 5 (metadata intact) and 6
        listed = [r.id for r in store.search(Query(limit=None, newest_first=False))]
        assert listed == [ids[0], ids[4], ids[5]]
        with_bodies = store.search(Query(limit=None, newest_first=False, with_bodies=True))
        assert [r.id for r in with_bodies] == [ids[0], ids[5]]
        assert store.count() == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "asgi_audit.sinks.jsonl"]
    assert len(warnings) == 4  # once per damaged line, however often it is passed
    for number in (2, 3, 4):
        assert sum(f"records-2024-05-01.jsonl, line {number} (byte" in w for w in warnings) == 1
    assert sum("request_body is not base64" in w for w in warnings) == 1


@pytest.mark.parametrize(("line", "problem"), [(2, "not a JSON record"), (4, "not a record")])
def test_get_of_a_damaged_record_names_file_and_line(
    damaged: tuple[Path, list[str]], line: int, problem: str
) -> None:
    """get of exactly that record raises CorruptRecord naming the file and line; the
    intact records around it are returned."""
    root, ids = damaged
    with contextlib.closing(JsonlSink(root)) as store:
        with pytest.raises(CorruptRecord, match=rf"records-2024-05-01\.jsonl, line {line} ") as e:
            store.get(ids[line - 1])
        assert problem in str(e.value)
        with pytest.raises(CorruptRecord, match="request_body is not base64"):
            store.get(ids[4])
        assert store.get(ids[0]) is not None
        assert store.get(ids[5]) is not None


def test_a_line_cut_short_is_reported_by_the_id_it_starts_with(
    damaged: tuple[Path, list[str]],
) -> None:
    """Line 3 was cut after its id (the writer puts it first): asked for, it is reported."""
    root, ids = damaged
    with (
        contextlib.closing(JsonlSink(root)) as store,
        pytest.raises(CorruptRecord, match=r"line 3 \(byte \d+\): not a JSON record"),
    ):
        store.get(ids[2])


def test_a_damaged_record_delivered_again_is_written_whole_and_read(
    damaged: tuple[Path, list[str]], make: Records
) -> None:
    """The writer's scan does not count a damaged line as stored: a re-delivery appends an
    intact copy, which get, search and count then return."""
    root, ids = damaged
    again = make(id=ids[1], request_body=body(b"again"))
    with contextlib.closing(JsonlSink(root)) as store:
        store.write_batch([again])
        assert store.get(ids[1]) == again
        assert store.count() == 4
        assert ids[1] in [r.id for r in store.search(Query(limit=None))]
        store.write_batch([again])  # now stored: not appended twice
    assert jsonl_file(root).read_bytes().count(ids[1].encode()) == 2


def test_writer_scan_of_damaged_lines_warns_and_keeps_writing(
    damaged: tuple[Path, list[str]], make: Records, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer opening a directory with damaged lines takes it (no error), says which
    lines it skipped, and writes."""
    root, _ = damaged
    with contextlib.closing(JsonlSink(root)) as store, caplog.at_level(logging.WARNING):
        store.write_batch([make()])
        assert store.count() == 4
    assert any("line 2 (byte" in r.getMessage() for r in caplog.records)


def test_an_unknown_id_is_none_even_beside_damage(damaged: tuple[Path, list[str]]) -> None:
    root, _ = damaged
    with contextlib.closing(JsonlSink(root)) as store:
        assert store.get("no-such-id") is None


def test_sqlite_sink_is_still_a_file_sink(tmp_path: Path) -> None:
    """(Sanity) the SQLite file made empty with its mode is a database SQLite accepts."""
    path = tmp_path / "fresh.db"
    with contextlib.closing(open_sink(f"sqlite:///{path}")) as store:
        assert isinstance(store, SqliteSink)
        assert store.count() == 0
