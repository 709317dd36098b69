"""The data object's format: records as self-contained frames, so any one can be read alone.

A data object is a plain concatenation of frames, with no object header: ``get`` fetches
one record with a ranged GET of its frame, at the offset and length its index gives. Since
frames carry their metadata too, indexes can be rebuilt from data objects (a re-delivery
does so when the stored copy differs from the new one)::

    frame  := header meta request response
    header := magic | meta_enc u8 | request_enc u8 | response_enc u8 | 0 u8
              | meta_len u32 | request_len u64 | response_len u64 | crc32 u32   (big-endian)
    magic  := "AAS1" ("asgi-audit S3"; objects written before it have the spool's "AAB1")
    meta   := JSON of StoredRecord.metadata()      request/response := stored body bytes

Each of the three parts is compressed on its own (encoding 1 = zstd, 0 = as is), by
:mod:`asgi_audit.recording.packing`: zstd where it saves a tenth, raw otherwise (images,
random bytes, tiny parts). Per-part rather than whole-object compression keeps frames
independently readable and still shrinks JSON bodies about ninefold. An absent body and a
body whose bytes were not kept have length 0, and the metadata tells them apart from an
empty body (``stored``). The CRC-32 covers meta, request and response as stored; readers
check it, so damaged bytes are an error (:class:`CorruptRecord`), never a wrong record.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import CorruptRecord, RecordRefused
from ...recording import packing
from ..record import StoredRecord, json_text, kept_bytes

FRAME_MAGIC = b"AAS1"
READ_MAGICS = (FRAME_MAGIC, b"AAB1")
"""Magics a reader accepts: the current one, and the spool's, which data objects carried
before they had their own (objects in buckets are kept for years)."""

Placed = tuple[int, int, dict[str, Any]]
"""Where a frame is in its data object, and what it holds: offset, length, metadata."""

_HEADER = struct.Struct(">4sBBBBIQQI")
_CODES: dict[str, int] = {"identity": 0, "zstd": 1}
_NAMES = {code: name for name, code in _CODES.items()}


@dataclass(slots=True)
class RecordFrame:
    """One decoded frame: the metadata and, when asked for, the body bytes."""

    meta: dict[str, Any]
    request: bytes | None
    response: bytes | None
    end: int
    """Where the frame ends in the buffer it was decoded from."""

    def record(self) -> StoredRecord:
        return StoredRecord.from_metadata(self.meta, self.request, self.response)


def encode_record_frame(record: StoredRecord, meta: dict[str, Any]) -> list[bytes]:
    """The frame of one record as a header and its three parts (joined by the caller)."""
    meta_bytes, meta_encoding = packing.encode(json_text(meta).encode("utf-8"))
    request, request_encoding = kept_bytes(record.request_body)
    response, response_encoding = kept_bytes(record.response_body)
    parts = [meta_bytes or b"", request or b"", response or b""]
    crc = zlib.crc32(parts[2], zlib.crc32(parts[1], zlib.crc32(parts[0])))
    header = _HEADER.pack(
        FRAME_MAGIC,
        _CODES[meta_encoding],
        _CODES[request_encoding],
        _CODES[response_encoding],
        0,
        len(parts[0]),
        len(parts[1]),
        len(parts[2]),
        crc,
    )
    return [header, *parts]


def encode_data_object(records: Sequence[StoredRecord]) -> tuple[bytes, list[Placed]]:
    """The data object of a batch, and where each record's frame is in it;
    :class:`RecordRefused` naming a record that cannot be encoded."""
    chunks: list[bytes] = []
    placed: list[Placed] = []
    offset = 0
    for record in records:
        try:
            meta = record.metadata()
            frame = encode_record_frame(record, meta)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise RecordRefused(
                f"record {record.id} cannot be encoded ({type(exc).__name__}: {exc})",
                ids=(record.id,),
            ) from exc
        length = sum(len(part) for part in frame)
        chunks.extend(frame)
        placed.append((offset, length, meta))
        offset += length
    return b"".join(chunks), placed


def decode_record_frame(
    buffer: bytes, offset: int = 0, *, bodies: bool = True, source: str = "", base: int = 0
) -> RecordFrame:
    """The frame starting at ``offset``; :class:`CorruptRecord` when it is cut short or
    corrupt, naming ``source`` (the object) and the frame's byte position in it (``buffer``
    starts at byte ``base`` of the object: a ranged GET)."""
    if len(buffer) - offset < _HEADER.size:
        raise _corrupt(source, base + offset, "is cut short")
    (
        magic,
        meta_code,
        request_code,
        response_code,
        _flags,
        meta_len,
        request_len,
        response_len,
        crc,
    ) = _HEADER.unpack_from(buffer, offset)
    if magic not in READ_MAGICS:
        raise CorruptRecord(f"{_where(source)}no frame at byte {base + offset} (magic {magic!r})")
    start = offset + _HEADER.size
    ends = (start + meta_len, start + meta_len + request_len)
    end = ends[1] + response_len
    if end > len(buffer):
        raise _corrupt(source, base + offset, "is cut short")
    view = memoryview(buffer)
    parts = (view[start : ends[0]], view[ends[0] : ends[1]], view[ends[1] : end])
    if zlib.crc32(parts[2], zlib.crc32(parts[1], zlib.crc32(parts[0]))) != crc:
        raise _corrupt(source, base + offset, "fails its checksum")
    try:
        meta = json.loads(packing.decode(bytes(parts[0]), _NAMES[meta_code]) or b"")
        request = packing.decode(bytes(parts[1]), _NAMES[request_code]) if bodies else None
        response = packing.decode(bytes(parts[2]), _NAMES[response_code]) if bodies else None
    except (KeyError, ValueError, CorruptRecord) as exc:  # JSON and UTF-8 errors are ValueError
        raise _corrupt(source, base + offset, f"cannot be decoded: {exc}") from exc
    if not isinstance(meta, dict):
        raise _corrupt(source, base + offset, "cannot be decoded: its metadata is no object")
    return RecordFrame(meta, request, response, end)


def placed_frames(data: bytes, *, source: str = "") -> Iterator[Placed]:
    """Where every frame of a whole data object is, and its metadata (bodies not decoded)."""
    offset = 0
    while offset < len(data):
        frame = decode_record_frame(data, offset, bodies=False, source=source)
        yield offset, frame.end - offset, frame.meta
        offset = frame.end


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _corrupt(source: str, position: int, problem: str) -> CorruptRecord:
    return CorruptRecord(f"{_where(source)}frame at byte {position} {problem}")
