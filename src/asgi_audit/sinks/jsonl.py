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

Damaged lines. A complete line that is not a record (not JSON, cut short and followed by
others, or JSON of the wrong shape: a person's edit, a disk error, another program
appending) must not hide the rest of the file: listings and counts skip it and log a
warning naming the file and line (once per line and sink); only ``get`` of that very
record (its id read from the start of the line, where the writer puts it) raises
:class:`CorruptRecord` naming them, and only when no intact copy of it exists. The writer
counts such a record as not stored, so a re-delivery appends an intact copy.

Checkpoints: ``checkpoints.jsonl`` in the same directory, one line per checkpoint, its
JSON text as given (see :mod:`asgi_audit.sinks.checkpoint_rows`), appended and fsynced
like records, under the same writer lock; the writer keeps the set of ``(stream, index)``
pairs stored, built by scanning the file (repairing a torn last line) at its first
checkpoint, and skips those. A damaged line is skipped with the same warning as a damaged
record line, and its checkpoint counts as not stored, so a re-delivery appends it. Record
readers only open ``records-YYYY-MM-DD.jsonl``, so they never read this file.

Refusals: a record whose line cannot be encoded (metadata that is not JSON-able, a packed
body that does not unpack) is refused (:class:`RecordRefused`, naming it) before anything
is appended. A full disk or an I/O error stays a :class:`SinkError`, retried.

Modes: the directory (and any parent the sink makes) is 0700, the files and the lock
0600, whatever the umask (see :mod:`asgi_audit.sinks.files`).

Reads scan the files: fine for the volumes this sink is meant for; use SQLite to query.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import heapq
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from ..errors import CorruptRecord, SinkError
from ..recording import packing
from ..recording.spool import fsync_directory
from . import checkpoint_rows
from .files import FILE_MODE, create_private_file, ensure_directory, existing, file_path
from .protocols import Query
from .query import matches
from .record import StoredBody, StoredRecord, json_text
from .refusal import refused

logger = logging.getLogger("asgi_audit.sinks.jsonl")

NS_PER_DAY = 86_400 * 1_000_000_000
_EPOCH = date(1970, 1, 1)
_FILE_NAME = re.compile(r"records-(\d{4}-\d{2}-\d{2})\.jsonl")
_LOCK_NAME = ".writer.lock"
CHECKPOINTS_NAME = "checkpoints.jsonl"
_BODIES = ("request_body", "response_body")
_LEADING_ID = re.compile(rb'\{"id":("(?:[^"\\]|\\.)*")')
"""The id at the start of a line as the writer makes it (metadata's first field), found
even when the rest of the line is damaged."""

# One candidate of a search: order key, the record without bodies, and where its line is.
_Candidate = tuple[tuple[int, str], StoredRecord, Path, int]


class _Line:
    """Where a line is, for messages: the file, its line number and byte offset."""

    __slots__ = ("number", "offset", "path")

    def __init__(self, path: Path, number: int, offset: int) -> None:
        self.path = path
        self.number = number
        self.offset = offset

    def __str__(self) -> str:
        if not self.number:  # read at an offset, without counting lines
            return f"{self.path} at byte {self.offset}"
        return f"{self.path}, line {self.number} (byte {self.offset})"


class JsonlSink:
    """A sink over a directory of daily JSON Lines files."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        ensure_directory(self.directory)
        self._lock = threading.Lock()
        self._closed = False
        self._lock_fd: int | None = None
        self._ids: set[str] | None = None
        self._damaged: set[str] = set()
        """Ids read from damaged lines by the writer's scan (``get`` looks for them)."""
        self._reported: set[tuple[Path, int]] = set()
        self._checkpoint_keys: set[tuple[str, int]] | None = None
        """The (stream, index) pairs in the checkpoints file, once the writer scanned it."""

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
            reasons: dict[str, str] = {}
            for record in records:
                if record.id in ids or record.id in fresh:
                    continue
                fresh.add(record.id)
                try:
                    line = _encode(record)
                    path = self.file_for(record.started_at_ns)
                except (TypeError, ValueError, OverflowError, RecursionError, CorruptRecord) as exc:
                    reasons[record.id] = f"cannot be encoded ({type(exc).__name__}: {exc})"
                    continue
                lines.setdefault(path, []).append(line)
            if reasons:
                raise refused(repr(self), reasons)
            if not lines:
                return
            try:
                self._append(lines)
            except OSError as exc:
                self._ids = None  # scan (and repair) again before the next write
                raise SinkError(f"{self!r}: batch of {len(fresh)} not stored: {exc}") from exc
            ids.update(fresh)

    def write_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self._check_open()
            found = checkpoint_rows.checked(checkpoints, repr(self))
            if not found:
                return
            stored = self._writer_checkpoint_keys()
            fresh = [checkpoint for checkpoint in found if checkpoint.key not in stored]
            if not fresh:
                return
            lines = [checkpoint.text.encode("utf-8") + b"\n" for checkpoint in fresh]
            try:
                self._append({self.directory / CHECKPOINTS_NAME: lines})
            except OSError as exc:
                self._checkpoint_keys = None  # scan (and repair) again before the next write
                raise SinkError(f"{self!r}: {len(fresh)} checkpoints not stored: {exc}") from exc
            stored.update(checkpoint.key for checkpoint in fresh)

    def checkpoints(self, stream: str | None = None) -> Iterator[dict[str, Any]]:
        self._check_open()
        return iter(checkpoint_rows.ordered(self._stored_checkpoints(), stream))

    def search(self, query: Query) -> Iterator[StoredRecord]:
        self._check_open()
        return self._search(query)

    def get(self, record_id: str) -> StoredRecord | None:
        """The first intact copy of the record; :class:`CorruptRecord` naming the file and
        line when there is none but a damaged line holds that id."""
        self._check_open()
        ids = self._ids
        if ids is not None and record_id not in ids and record_id not in self._damaged:
            return None  # this instance is the only writer, and its index is complete
        damage: CorruptRecord | None = None
        for path in self._files(Query()):
            for where, line in _complete_lines(path):
                try:
                    found = _parse(where, line)["id"]
                except CorruptRecord as exc:  # not JSON: its id, if any, is where we put it
                    if damage is None and _leading_id(line) == record_id:
                        damage = exc
                    continue
                if found != record_id:
                    continue
                try:
                    return _decode(where, line)
                except CorruptRecord as exc:  # a later copy may be intact
                    damage = damage or exc
        if damage is not None:
            raise damage
        return None

    def count(self) -> int:
        self._check_open()
        return len({record.id for _, record, _, _ in self._candidates(Query())})

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._ids = None
            self._checkpoint_keys = None
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
        path = self.directory / _LOCK_NAME
        try:
            create_private_file(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
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
        damaged: set[str] = set()
        try:
            for path in self._files(Query()):
                end = 0
                for where, line in _complete_lines(path):
                    end = where.offset + len(line)
                    try:
                        ids.add(_record(_parse(where, line), where).id)
                    except CorruptRecord as exc:
                        # Not counted as stored: a re-delivery appends an intact copy.
                        self._report(where, exc)
                        found = _leading_id(line)
                        if found is not None:
                            damaged.add(found)
                with open(path, "r+b") as file:
                    if file.seek(0, os.SEEK_END) != end:
                        file.truncate(end)  # a line torn by a crash was never acknowledged
                    os.fsync(file.fileno())
        except OSError as exc:
            raise SinkError(f"{self!r}: cannot scan: {exc}") from exc
        self._damaged = damaged - ids
        return ids

    def _writer_checkpoint_keys(self) -> set[tuple[str, int]]:
        """The checkpoints stored, scanned once per writer; a torn last line (a crash
        mid-append, never acknowledged) is cut off, and what was counted is fsynced."""
        if self._checkpoint_keys is None:
            self._take_writer_lock()
            path = self.directory / CHECKPOINTS_NAME
            keys: set[tuple[str, int]] = set()
            end = 0
            for where, line in _complete_lines(path):
                end = where.offset + len(line)
                found = self._checkpoint(where, line)
                if found is not None:
                    keys.add(found.key)
            try:
                with open(path, "r+b") as file:
                    if file.seek(0, os.SEEK_END) != end:
                        file.truncate(end)
                    os.fsync(file.fileno())
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SinkError(f"{self!r}: cannot scan {CHECKPOINTS_NAME}: {exc}") from exc
            self._checkpoint_keys = keys
        return self._checkpoint_keys

    def _stored_checkpoints(self) -> Iterator[checkpoint_rows.Checkpoint]:
        """Every intact checkpoint line, in file order (damaged ones skipped, reported)."""
        for where, line in _complete_lines(self.directory / CHECKPOINTS_NAME):
            found = self._checkpoint(where, line)
            if found is not None:
                yield found

    def _checkpoint(self, where: _Line, line: bytes) -> checkpoint_rows.Checkpoint | None:
        try:
            return checkpoint_rows.parse(line, str(where))
        except CorruptRecord as exc:
            self._report(where, exc)
            return None

    def _report(self, where: _Line, exc: CorruptRecord) -> None:
        """Log a damaged line once per sink: every search passes it again."""
        key = (where.path, where.offset)
        if key not in self._reported:
            self._reported.add(key)
            logger.warning("%r: skipped a damaged line: %s", self, exc)

    def _append(self, lines: dict[Path, list[bytes]]) -> None:
        sizes: dict[Path, int] = {}
        created = False
        try:
            for path, chunk in lines.items():
                created = create_private_file(path) or created
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
        """Intact records matching ``query``, the first copy of each id (damaged lines
        are skipped and reported)."""
        seen: set[str] = set()
        for path in self._files(query):
            for where, line in _complete_lines(path):
                try:
                    record = _record(_parse(where, line), where)
                except CorruptRecord as exc:
                    self._report(where, exc)
                    continue
                if record.id not in seen and matches(query, record):
                    seen.add(record.id)
                    yield (record.started_at_ns, record.id), record, path, where.offset

    def _search(self, query: Query) -> Iterator[StoredRecord]:
        candidates = self._candidates(query)
        if query.limit is None:
            chosen = sorted(candidates, key=_key, reverse=query.newest_first)
        else:
            pick = heapq.nlargest if query.newest_first else heapq.nsmallest
            chosen = pick(max(query.limit, 0), candidates, key=_key)
        for _, record, path, offset in chosen:
            if not query.with_bodies:
                yield record
                continue
            try:
                yield _read_at(path, offset)
            except CorruptRecord as exc:  # its bodies are damaged: skipped, like its line
                self._report(_Line(path, 0, offset), exc)


def _key(candidate: _Candidate) -> tuple[int, str]:
    return candidate[0]


def _encode(record: StoredRecord) -> bytes:
    line = record.metadata()
    for name in _BODIES:
        body = getattr(record, name)
        if body is not None:
            data = _plain(body)
            text = None if data is None else base64.b64encode(data).decode("ascii")
            line[name] = {**line[name], "encoding": "base64", "data": text}
    return json_text(line).encode("utf-8") + b"\n"


def _plain(body: StoredBody) -> bytes | None:
    """The body's bytes, unpacked if it came packed only (this sink keeps plain bytes)."""
    if body.data is not None or body.packed is None:
        return body.data
    return packing.decode(body.packed, "zstd")


def _complete_lines(path: Path) -> Iterator[tuple[_Line, bytes]]:
    """(where, line) of each newline-terminated line; a last line without one is skipped."""
    try:
        with open(path, "rb") as file:
            offset = 0
            for number, line in enumerate(file, start=1):
                if not line.endswith(b"\n"):
                    return
                yield _Line(path, number, offset), line
                offset += len(line)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SinkError(f"cannot read {path}: {exc}") from exc


def _leading_id(line: bytes) -> str | None:
    """The id a line starts with, read without parsing the rest (which may be damaged)."""
    match = _LEADING_ID.match(line)
    if match is None:
        return None
    try:
        found = json.loads(match.group(1))
    except ValueError:
        return None
    return found if isinstance(found, str) else None


def _parse(where: _Line, line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise CorruptRecord(f"{where}: not a JSON record ({exc})") from exc
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise CorruptRecord(f"{where}: not a record (no string 'id')")
    return value


def _record(
    meta: dict[str, Any],
    where: _Line,
    request: bytes | None = None,
    response: bytes | None = None,
) -> StoredRecord:
    """The record of a parsed line; :class:`CorruptRecord` when the JSON has the wrong
    shape (a field missing or of the wrong type)."""
    try:
        return StoredRecord.from_metadata(meta, request, response)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptRecord(f"{where}: not a record ({type(exc).__name__}: {exc})") from exc


def _decode(where: _Line, line: bytes) -> StoredRecord:
    meta = _parse(where, line)
    data: dict[str, bytes | None] = {}
    for name in _BODIES:
        body = meta.get(name)
        data[name] = None
        if not isinstance(body, dict) or body.get("data") is None:
            continue
        if body.get("encoding") != "base64":
            raise CorruptRecord(f"{where}: {name} has unknown encoding")
        try:
            data[name] = base64.b64decode(body["data"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise CorruptRecord(f"{where}: {name} is not base64 ({exc})") from exc
    return _record(meta, where, data["request_body"], data["response_body"])


def _read_at(path: Path, offset: int) -> StoredRecord:
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            line = file.readline()
    except OSError as exc:
        raise SinkError(f"cannot read {path}: {exc}") from exc
    return _decode(_Line(path, 0, offset), line)


def check_url(url: str) -> None:
    """``jsonl:///relative/dir`` or ``jsonl:////absolute/dir``."""
    file_path(url)


def open_url(url: str, *, create: bool = True) -> JsonlSink:
    path = file_path(url)
    return JsonlSink(path if create else existing(url, path))
