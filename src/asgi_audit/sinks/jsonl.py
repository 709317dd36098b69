"""``jsonl:///dir``: records as JSON Lines, one file per UTC day of exchange start.

Meant to be read by other tools (``jq``, log shippers), so each line is the record's
:meth:`~asgi_audit.sinks.record.StoredRecord.metadata` with the body bytes added in base64 under
``data``, next to an explicit ``"encoding": "base64"`` so a later encoding can be told
apart. Files are named ``records-YYYY-MM-DD.jsonl`` after the exchange's start (not the
delivery time), so a time-bounded search opens only the days it covers.

Writes: whole lines are appended and each touched file is fsynced before ``write_batch``
returns. A batch that fails part-way is cut back off the files, so a retry never lands
after a torn line. One writer per directory, held by an ``flock`` taken at the first write
(readers take no lock and skip a last line that is still being written). Idempotency: the
writer keeps the set of ids in the directory, built by scanning the files when it takes the
lock; that scan also repairs a torn last line and fsyncs what it counted, so an id is only
ever treated as stored once it is on disk.

Reads scan the files: fine for the volumes this sink is meant for; use SQLite to query.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import heapq
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from ..errors import SinkError
from ..recording.spool import fsync_directory
from .files import ensure_directory, existing, file_path
from .protocols import Query
from .query import matches
from .record import StoredRecord, json_text

NS_PER_DAY = 86_400 * 1_000_000_000
_EPOCH = date(1970, 1, 1)
_FILE_NAME = re.compile(r"records-(\d{4}-\d{2}-\d{2})\.jsonl")
_LOCK_NAME = ".writer.lock"
_BODIES = ("request_body", "response_body")

# One candidate of a search: order key, the record without bodies, and where its line is.
_Candidate = tuple[tuple[int, str], StoredRecord, Path, int]


class JsonlSink:
    """A sink over a directory of daily JSON Lines files."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        ensure_directory(self.directory)
        self._lock = threading.Lock()
        self._closed = False
        self._lock_fd: int | None = None
        self._ids: set[str] | None = None

    def __repr__(self) -> str:
        return f"JsonlSink({os.fspath(self.directory)!r})"

    def file_for(self, started_at_ns: int) -> Path:
        """The file that holds exchanges started at ``started_at_ns``."""
        day = _EPOCH + timedelta(days=started_at_ns // NS_PER_DAY)
        return self.directory / f"records-{day.isoformat()}.jsonl"

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        with self._lock:
            self._check_open()
            ids = self._writer_ids()
            fresh: set[str] = set()
            lines: dict[Path, list[bytes]] = {}
            for record in records:
                if record.id in ids or record.id in fresh:
                    continue
                fresh.add(record.id)
                lines.setdefault(self.file_for(record.started_at_ns), []).append(_encode(record))
            if not lines:
                return
            try:
                self._append(lines)
            except OSError as exc:
                self._ids = None  # scan (and repair) again before the next write
                raise SinkError(f"{self!r}: batch of {len(fresh)} not stored: {exc}") from exc
            ids.update(fresh)

    def search(self, query: Query) -> Iterator[StoredRecord]:
        self._check_open()
        return self._search(query)

    def get(self, record_id: str) -> StoredRecord | None:
        self._check_open()
        if self._ids is not None and record_id not in self._ids:
            return None  # this instance is the only writer, and its index is complete
        for path in self._files(Query()):
            for offset, line in _complete_lines(path):
                if _parse(path, offset, line)["id"] == record_id:
                    return _decode(path, offset, line)
        return None

    def count(self) -> int:
        self._check_open()
        return len({record.id for _, record, _, _ in self._candidates(Query())})

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._ids = None
            fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _check_open(self) -> None:
        if self._closed:
            raise SinkError(f"{self!r} is closed")

    def _writer_ids(self) -> set[str]:
        if self._ids is None:
            self._take_writer_lock()
            self._ids = self._scan_and_repair()
        return self._ids

    def _take_writer_lock(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SinkError(f"{self!r}: cannot create the writer lock: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SinkError(f"{self!r}: another writer holds {_LOCK_NAME}: {exc}") from exc
        self._lock_fd = fd

    def _scan_and_repair(self) -> set[str]:
        ids: set[str] = set()
        try:
            for path in self._files(Query()):
                end = 0
                for offset, line in _complete_lines(path):
                    ids.add(_parse(path, offset, line)["id"])
                    end = offset + len(line)
                with open(path, "r+b") as file:
                    if file.seek(0, os.SEEK_END) != end:
                        file.truncate(end)  # a line torn by a crash was never acknowledged
                    os.fsync(file.fileno())
        except OSError as exc:
            raise SinkError(f"{self!r}: cannot scan: {exc}") from exc
        return ids

    def _append(self, lines: dict[Path, list[bytes]]) -> None:
        sizes: dict[Path, int] = {}
        created = False
        try:
            for path, chunk in lines.items():
                created = created or not path.exists()
                with open(path, "ab") as file:
                    sizes[path] = file.tell()
                    file.write(b"".join(chunk))
                    file.flush()
                    os.fsync(file.fileno())
            if created:
                fsync_directory(self.directory)
        except OSError:
            for path, size in sizes.items():
                with contextlib.suppress(OSError):
                    os.truncate(path, size)
            raise

    def _files(self, query: Query) -> list[Path]:
        """The day files that can hold matches of ``query``'s time range, oldest first."""
        found: list[Path] = []
        for path in sorted(self.directory.glob("records-*.jsonl")):
            name = _FILE_NAME.fullmatch(path.name)
            if name is None:
                continue
            start = (date.fromisoformat(name[1]) - _EPOCH).days * NS_PER_DAY
            if query.since_ns is not None and start + NS_PER_DAY <= query.since_ns:
                continue
            if query.until_ns is not None and start >= query.until_ns:
                continue
            found.append(path)
        return found

    def _candidates(self, query: Query) -> Iterator[_Candidate]:
        seen: set[str] = set()
        for path in self._files(query):
            for offset, line in _complete_lines(path):
                record = StoredRecord.from_metadata(_parse(path, offset, line))
                if record.id not in seen and matches(query, record):
                    seen.add(record.id)
                    yield (record.started_at_ns, record.id), record, path, offset

    def _search(self, query: Query) -> Iterator[StoredRecord]:
        candidates = self._candidates(query)
        if query.limit is None:
            chosen = sorted(candidates, key=_key, reverse=query.newest_first)
        else:
            pick = heapq.nlargest if query.newest_first else heapq.nsmallest
            chosen = pick(max(query.limit, 0), candidates, key=_key)
        for _, record, path, offset in chosen:
            yield _read_at(path, offset) if query.with_bodies else record


def _key(candidate: _Candidate) -> tuple[int, str]:
    return candidate[0]


def _encode(record: StoredRecord) -> bytes:
    line = record.metadata()
    for name in _BODIES:
        body = getattr(record, name)
        if body is not None:
            data = None if body.data is None else base64.b64encode(body.data).decode("ascii")
            line[name] = {**line[name], "encoding": "base64", "data": data}
    return json_text(line).encode("utf-8") + b"\n"


def _complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of each newline-terminated line; a last line without one is skipped."""
    try:
        with open(path, "rb") as file:
            offset = 0
            for line in file:
                if not line.endswith(b"\n"):
                    return
                yield offset, line
                offset += len(line)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SinkError(f"cannot read {path}: {exc}") from exc


def _parse(path: Path, offset: int, line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise SinkError(f"{path} at byte {offset}: not a JSON record ({exc})") from exc
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise SinkError(f"{path} at byte {offset}: not a record (no string 'id')")
    return value


def _decode(path: Path, offset: int, line: bytes) -> StoredRecord:
    meta = _parse(path, offset, line)
    data: dict[str, bytes | None] = {}
    for name in _BODIES:
        body = meta.get(name)
        data[name] = None
        if body is None or body.get("data") is None:
            continue
        if body.get("encoding") != "base64":
            raise SinkError(f"{path} at byte {offset}: {name} has unknown encoding")
        try:
            data[name] = base64.b64decode(body["data"], validate=True)
        except (binascii.Error, TypeError) as exc:
            raise SinkError(f"{path} at byte {offset}: {name} is not base64 ({exc})") from exc
    return StoredRecord.from_metadata(meta, data["request_body"], data["response_body"])


def _read_at(path: Path, offset: int) -> StoredRecord:
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            line = file.readline()
    except OSError as exc:
        raise SinkError(f"cannot read {path}: {exc}") from exc
    return _decode(path, offset, line)


def check_url(url: str) -> None:
    """``jsonl:///relative/dir`` or ``jsonl:////absolute/dir``."""
    file_path(url)


def open_url(url: str, *, create: bool = True) -> JsonlSink:
    path = file_path(url)
    return JsonlSink(path if create else existing(url, path))
