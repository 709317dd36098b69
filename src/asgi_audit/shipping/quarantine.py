"""Quarantine: records a sink refuses for what they hold, kept aside so delivery goes on.

A record the sink refuses for good (a value it cannot index, a body larger than it can
hold: :class:`~asgi_audit.errors.RecordRefused`) would otherwise stop its whole stream,
since the checkpoint cannot move past it. The shipper moves it here instead, then goes
on. Nothing here is ever deleted except by a successful ``asgi-audit spool retry``::

    <spool>/quarantine/<record id>.rec     the record, as one spool frame
    <spool>/quarantine/<record id>.json    why: the sink's reason, when, which stream

Both are written to a temporary name, synced and renamed before the stream's checkpoint
moves past the record, so a crash in between quarantines it twice at worst.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..recording.frames import (
    PACKED,
    Frame,
    SpooledRecord,
    checkpoint_of,
    decode_payload,
    encode_frame,
)
from ..recording.frames import read_frames as _read_frames
from ..recording.spool import fsync_directory, private_directory

logger = logging.getLogger("asgi_audit.shipper")

FOLDER = "quarantine"
REASON_LIMIT = 2000
"""Characters of a sink's reason kept (a driver's message can quote a whole row)."""
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass(frozen=True, slots=True)
class Quarantined:
    """One record in quarantine, as ``spool status`` lists it."""

    id: str
    reason: str
    stream: str
    at_ns: int
    attempts: int
    path: Path


class Quarantine:
    """The quarantine folder of one spool."""

    def __init__(self, spool: str | os.PathLike[str]) -> None:
        self.directory = Path(spool) / FOLDER

    def put(self, spooled: SpooledRecord, reason: str, stream: str) -> Path:
        """Keep ``spooled`` (durably) with the sink's ``reason``."""
        private_directory(self.directory)
        record_id = _file_id(spooled)
        _write_durably(self.directory / f"{record_id}.rec", _frame_of(spooled))
        self._note(record_id, reason, stream, attempts=1)
        fsync_directory(self.directory)
        logger.warning(
            "asgi-audit: the sink refused record %s for good (%s); kept in %s",
            record_id,
            reason[:200],
            self.directory,
        )
        return self.directory / f"{record_id}.rec"

    def _note(self, record_id: str, reason: str, stream: str, *, attempts: int) -> None:
        note = {
            "id": record_id,
            "reason": reason[:REASON_LIMIT],
            "stream": stream,
            "at_ns": time.time_ns(),
            "attempts": attempts,
        }
        _write_durably(self.directory / f"{record_id}.json", orjson.dumps(note))

    def entries(self) -> list[Quarantined]:
        """Every quarantined record, oldest first."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found: list[Quarantined] = []
        for name in names:
            if not name.endswith(".rec"):
                continue
            record_id = name.removesuffix(".rec")
            note = self._read_note(record_id)
            found.append(
                Quarantined(
                    id=record_id,
                    reason=str(note.get("reason", "(reason not recorded)")),
                    stream=str(note.get("stream", "")),
                    at_ns=_int(note.get("at_ns")),
                    attempts=_int(note.get("attempts")),
                    path=self.directory / name,
                )
            )
        found.sort(key=lambda entry: entry.at_ns)
        return found

    def _read_note(self, record_id: str) -> dict[str, object]:
        try:
            note = orjson.loads((self.directory / f"{record_id}.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        return note if isinstance(note, dict) else {}

    def read(self, entry: Quarantined) -> list[SpooledRecord]:
        """The record kept for ``entry`` (bodies as the spool kept them)."""
        records: list[SpooledRecord] = []
        for item in _read_frames(entry.path):
            if isinstance(item, Frame):
                records.extend(decode_payload(item.payload, unpack=True))
        return records

    def refused_again(self, entry: Quarantined, reason: str) -> None:
        self._note(entry.id, reason, entry.stream, attempts=entry.attempts + 1)

    def release(self, entry: Quarantined) -> None:
        """Forget ``entry``: the sink holds it now."""
        for suffix in (".rec", ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / f"{entry.id}{suffix}")
        fsync_directory(self.directory)

    def __iter__(self) -> Iterator[Quarantined]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.entries())


def _file_id(spooled: SpooledRecord) -> str:
    """The record id as a file name: ids come from our own writer, but a damaged or
    hand-made spool must not name a path outside the folder."""
    checkpoint = checkpoint_of(spooled.meta)
    if checkpoint is not None:
        stream = hashlib.sha256(str(checkpoint.get("stream")).encode()).hexdigest()[:16]
        return f"checkpoint-{stream}-{int(checkpoint.get('index') or 0)}"
    record_id = str(spooled.meta.get("id", ""))
    if _SAFE_ID.fullmatch(record_id):
        return record_id
    return f"unnamed-{time.time_ns()}"


def _frame_of(spooled: SpooledRecord) -> bytes:
    meta = dict(spooled.meta)
    packed = [
        name
        for name, data in (
            ("request", spooled.request_packed),
            ("response", spooled.response_packed),
        )
        if data is not None
    ]
    if packed:
        meta[PACKED] = packed
    request = spooled.request_packed if spooled.request_packed is not None else spooled.request
    response = spooled.response_packed if spooled.response_packed is not None else spooled.response
    header, payload = encode_frame([(meta, [request], [response])])
    return header + payload


def _write_durably(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0
