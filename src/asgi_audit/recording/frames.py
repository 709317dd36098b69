"""Spool framing: records to bytes and back.

A spool segment is a sequence of *batch frames*. One frame holds every record the writer
took from its queue in one cycle, so the writer pays one checksum and one write per batch,
not per record or per chunk (each GIL-releasing call costs a GIL re-acquisition, which
waits behind a busy event loop; see docs/architecture.md).

    frame   = magic "AAB1" | crc32(payload) u32 | len(payload) u64 | payload
    payload = record*
    record  = len(meta) u32 | len(request bytes) u64 | len(response bytes) u64
              | meta (JSON) | request bytes | response bytes

A body may be kept zstd-packed (``packing.pack``): the meta's ``spool_packed`` lists
which, and the reader unpacks them, so what it yields is always the captured bytes.

The length lets a reader tell a frame cut short by a crash (the file ends inside it) from
a complete one; the checksum catches bytes that changed on disk.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from . import packing

MAGIC = b"AAB1"
FRAME_HEADER = struct.Struct("<4sIQ")
RECORD_HEADER = struct.Struct("<IQQ")
_READ_BLOCK = 4 << 20
PACKED = "spool_packed"
"""Meta key: which of the record's bodies the spool holds zstd-packed ("request",
"response"); absent when both are as captured."""


@dataclass(slots=True)
class SpooledRecord:
    """One record read back from the spool: metadata and the stored body bytes."""

    meta: dict[str, Any]
    request: bytes
    """The captured bytes; empty when they were left packed (a packed body never is)."""
    response: bytes
    request_packed: bytes | None = None
    response_packed: bytes | None = None


def encode_frame(
    records: Sequence[tuple[dict[str, Any] | bytes, list[bytes], list[bytes]]],
) -> tuple[bytes, bytes]:
    """Frame header and payload for ``records`` (meta, request chunks, response chunks);
    the meta may come already encoded as JSON bytes.

    The payload is joined into one buffer: copying is cheap and holds the GIL only
    briefly, while one contiguous buffer needs a single checksum call and a single write.
    """
    parts: list[bytes] = []
    for meta, request, response in records:
        encoded = meta if isinstance(meta, bytes) else orjson.dumps(meta)
        parts.append(
            record_header(encoded, sum(len(c) for c in request), sum(len(c) for c in response))
        )
        parts.append(encoded)
        parts.extend(request)
        parts.extend(response)
    payload = b"".join(parts)
    return frame_header(zlib.crc32(payload), len(payload)), payload


def record_header(meta: bytes, request_length: int, response_length: int) -> bytes:
    """The header of one record inside a payload."""
    return RECORD_HEADER.pack(len(meta), request_length, response_length)


def frame_header(crc: int, length: int) -> bytes:
    """The header of a frame whose payload of ``length`` bytes has checksum ``crc``."""
    return FRAME_HEADER.pack(MAGIC, crc, length)


@dataclass(slots=True)
class Frame:
    """A complete, verified frame found at ``offset``; the next one starts at ``end``."""

    offset: int
    end: int
    payload: bytes


@dataclass(slots=True)
class Tail:
    """Where reading stopped: ``offset`` of the first byte not part of a good frame, and
    why (``"end"``: clean end of file, ``"torn"``: a frame cut short, ``"corrupt"``)."""

    offset: int
    reason: str


def read_frames(path: str | os.PathLike[str], offset: int = 0) -> Iterator[Frame | Tail]:
    """Frames of a segment from ``offset`` on, then one :class:`Tail` saying where and why
    reading stopped."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        while True:
            header = handle.read(FRAME_HEADER.size)
            if not header:
                yield Tail(offset, "end")
                return
            if len(header) < FRAME_HEADER.size:
                yield Tail(offset, "torn")
                return
            magic, crc, length = FRAME_HEADER.unpack(header)
            if magic != MAGIC:
                yield Tail(offset, "corrupt")
                return
            payload = _read_exactly(handle, length)
            if payload is None:
                yield Tail(offset, "torn")
                return
            if zlib.crc32(payload) != crc:
                yield Tail(offset, "corrupt")
                return
            end = offset + FRAME_HEADER.size + length
            yield Frame(offset, end, payload)
            offset = end


def _read_exactly(handle: Any, length: int) -> bytes | None:
    if length <= _READ_BLOCK:
        data: bytes = handle.read(length)
        return data if len(data) == length else None
    parts = []
    remaining = length
    while remaining:
        block = handle.read(min(remaining, _READ_BLOCK))
        if not block:
            return None
        parts.append(block)
        remaining -= len(block)
    return b"".join(parts)


def decode_payload(payload: bytes, unpack: bool = True) -> Iterator[SpooledRecord]:
    """The records of one verified frame; with ``unpack`` False, packed bodies are given
    packed only (for a sink that keeps them so)."""
    view = memoryview(payload)
    position = 0
    while position < len(view):
        meta_length, request_length, response_length = RECORD_HEADER.unpack_from(view, position)
        position += RECORD_HEADER.size
        meta = orjson.loads(view[position : position + meta_length])
        position += meta_length
        request = bytes(view[position : position + request_length])
        position += request_length
        response = bytes(view[position : position + response_length])
        position += response_length
        packed = meta.pop(PACKED, ())
        if not packed:
            yield SpooledRecord(meta, request, response)
            continue
        request_packed = request if "request" in packed else None
        response_packed = response if "response" in packed else None
        yield SpooledRecord(
            meta,
            request if request_packed is None else _unpack(request_packed, unpack),
            response if response_packed is None else _unpack(response_packed, unpack),
            request_packed,
            response_packed,
        )


def _unpack(packed: bytes, unpack: bool) -> bytes:
    return (packing.decode(packed, "zstd") or b"") if unpack else b""
