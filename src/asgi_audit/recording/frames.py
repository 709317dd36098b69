"""Spool framing: records to bytes and back.

A spool segment is a sequence of *batch frames*. One frame holds every record the writer
took from its queue in one cycle, so the writer pays one checksum and one write per batch,
not per record or per chunk (each GIL-releasing call costs a GIL re-acquisition, which
waits behind a busy event loop; see docs/architecture.md).

    frame   = header | payload
    header  = magic "AAB2" | len(payload) u64 | header crc u32 | payload crc u32
              header crc  = crc32(magic | len)
              payload crc = crc32(len | payload)
    payload = record*
    record  = len(meta) u32 | len(request bytes) u64 | len(response bytes) u64
              | meta (JSON) | request bytes | response bytes

(little-endian). Version 1 frames (``magic "AAB1" | crc32(payload) u32 | len u64``) are
still read: a spool written before an upgrade. The writer only writes version 2.

A body may be kept zstd-packed (``packing.pack``): the meta's ``spool_packed`` lists
which, and the reader unpacks them, so what it yields is always the captured bytes.

Why two checksums: the header's own checksum tells a real header from stray bytes and
vouches for the length, so a frame whose payload was damaged is skipped by its length,
and after damage to a header the reader scans forward for the next header that checks
out instead of giving up on the rest of the segment (up to 64 MiB of good records). The
payload checksum starts with the length, so it covers every byte a reader trusts. A scan
never starts inside a frame whose header verifies, so a body that happens to carry spool
frames (an uploaded segment) is not taken for records when its own frame is damaged.
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

MAGIC = b"AAB2"
FRAME_HEADER = struct.Struct("<4sQII")
_HEAD = struct.Struct("<4sQ")
"""The part of a header its own checksum covers: magic and length."""
_CHECKSUMS = struct.Struct("<II")
_LENGTH = struct.Struct("<Q")
LEGACY_MAGIC = b"AAB1"
LEGACY_FRAME_HEADER = struct.Struct("<4sIQ")
RECORD_HEADER = struct.Struct("<IQQ")
_READ_BLOCK = 4 << 20
_SCAN_BLOCK = 1 << 20
_MAGIC_STEM = b"AAB"
"""What both magics start with: a scan looks for it, then checks the version byte."""
PACKED = "spool_packed"
"""Meta key: which of the record's bodies the spool holds zstd-packed ("request",
"response"); absent when both are as captured."""
KIND = "kind"
"""Meta key present on what is not an exchange: ``{"kind": "checkpoint", "checkpoint":
{...}}`` is a stream's checkpoint (:mod:`.chain`), written between its records."""
CHECKPOINT = "checkpoint"


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
    return frame_header(zlib.crc32(payload, frame_crc(len(payload))), len(payload)), payload


def record_header(meta: bytes, request_length: int, response_length: int) -> bytes:
    """The header of one record inside a payload."""
    return RECORD_HEADER.pack(len(meta), request_length, response_length)


def frame_crc(length: int) -> int:
    """Where the payload checksum of a frame of ``length`` bytes starts: continue it with
    ``zlib.crc32(part, crc)`` over the payload (a payload streamed in parts)."""
    return zlib.crc32(_LENGTH.pack(length))


def frame_header(crc: int, length: int) -> bytes:
    """The header of a frame whose payload of ``length`` bytes has checksum ``crc`` (begun
    with :func:`frame_crc`)."""
    head = _HEAD.pack(MAGIC, length)
    return head + _CHECKSUMS.pack(zlib.crc32(head), crc)


@dataclass(slots=True)
class Frame:
    """A complete, verified frame found at ``offset``; the next one starts at ``end``."""

    offset: int
    end: int
    payload: bytes


@dataclass(slots=True)
class Damage:
    """Bytes ``[offset, end)`` in the middle of a segment that hold no readable frame: a
    frame that fails its checksum, or bytes that are no frame at all. The reader skipped
    them and goes on with the frame at ``end``; the records they held are lost."""

    offset: int
    end: int
    reason: str


@dataclass(slots=True)
class Tail:
    """Where reading stopped: ``offset`` of the first byte not part of a good frame, and
    why (``"end"``: clean end of file; ``"torn"``: a frame cut short, which a live writer
    may still be writing; ``"corrupt"``: from here to the end of the file no frame
    verifies)."""

    offset: int
    reason: str


def read_frames(path: str | os.PathLike[str], offset: int = 0) -> Iterator[Frame | Damage | Tail]:
    """Frames of a segment from ``offset`` on, a :class:`Damage` for each damaged stretch
    skipped between them, then one :class:`Tail` saying where and why reading stopped.

    The file's size is taken once, at the start: what a live writer appends meanwhile is
    for the next read. Memory holds one frame at a time, and a scan past damage reads in
    blocks."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield from _Reader(fd).frames(offset)
    finally:
        os.close(fd)


class _Torn:
    """A probe's finding: a frame whose bytes run past the end of the file."""


_TORN = _Torn()


@dataclass(slots=True)
class _Bad:
    """A probe's finding: no good frame here. ``end`` is where the next frame starts when
    a verified header says so; ``torn_if_last`` marks a legacy frame whose unverified
    length runs past the end of the file: torn, unless a good frame follows it."""

    reason: str
    end: int | None = None
    torn_if_last: bool = False


class _Reader:
    """Frames of one open segment, read with ``pread`` (no shared file position, so a
    scan can look ahead and a probe come back)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def frames(self, offset: int) -> Iterator[Frame | Damage | Tail]:
        position = offset
        damage: Damage | None = None  # the damaged stretch being skipped, if any
        while True:
            found = self._probe(position)
            if isinstance(found, _Bad):
                after = found.end if found.end is not None else self._scan(position + 1)
                if after is None and found.torn_if_last:
                    found = _TORN  # a legacy frame cut short, nothing good after it
                else:
                    damage = damage or Damage(position, position, found.reason)
                    if after is None:
                        yield Tail(damage.offset, "corrupt")
                        return
                    position = after
                    continue
            if found is None and damage is not None:  # damage reaches the end
                yield Tail(damage.offset, "corrupt")
                return
            if damage is not None:
                yield Damage(damage.offset, position, damage.reason)
                damage = None
            if not isinstance(found, Frame):
                yield Tail(position, "end" if found is None else "torn")
                return
            yield found
            position = found.end

    def _probe(self, position: int) -> Frame | _Torn | _Bad | None:
        """What starts at ``position``: a verified frame, a torn one, damage, or nothing
        (the end of the file)."""
        remaining = self._size - position
        if remaining <= 0:
            return None
        head = self._read(position, min(remaining, FRAME_HEADER.size))
        magic = head[: len(MAGIC)]
        if magic == LEGACY_MAGIC:
            return self._probe_legacy(position, head)
        if magic != MAGIC:
            cut_short = len(head) < len(MAGIC) and (
                MAGIC.startswith(head) or LEGACY_MAGIC.startswith(head)
            )
            return _TORN if cut_short else _Bad("no frame header")
        if len(head) < FRAME_HEADER.size:
            return _TORN
        _, length, head_crc, crc = FRAME_HEADER.unpack(head)
        if zlib.crc32(head[: _HEAD.size]) != head_crc:
            return _Bad("frame header fails its checksum")
        start = position + FRAME_HEADER.size
        if length > self._size - start:
            return _TORN
        payload = self._read(start, length)
        if len(payload) < length:  # the file shrank: a writer took a failed write back
            return _TORN
        if zlib.crc32(payload, frame_crc(length)) != crc:
            return _Bad("frame payload fails its checksum", start + length)
        return Frame(position, start + length, payload)

    def _probe_legacy(self, position: int, head: bytes) -> Frame | _Torn | _Bad:
        """A version 1 frame. Its length is not checked by anything, so a frame that fails
        is damage of unknown extent (scanned past), and one that runs past the end of the
        file is torn only if no good frame follows."""
        if len(head) < LEGACY_FRAME_HEADER.size:
            return _TORN
        _, crc, length = LEGACY_FRAME_HEADER.unpack(head[: LEGACY_FRAME_HEADER.size])
        start = position + LEGACY_FRAME_HEADER.size
        if length > self._size - start:
            return _Bad("legacy frame runs past the end of the file", torn_if_last=True)
        if length > _READ_BLOCK and self._crc(start, length) != crc:
            return _Bad("legacy frame fails its checksum")  # checked before it is held whole
        payload = self._read(start, length)
        if len(payload) < length:
            return _TORN
        if zlib.crc32(payload) != crc:
            return _Bad("legacy frame fails its checksum")
        return Frame(position, start + length, payload)

    def _scan(self, start: int) -> int | None:
        """The offset of the next plausible frame at or after ``start``, looked for block
        by block; None when there is none before the end of the file."""
        overlap = len(MAGIC) - 1  # a magic across two blocks is found in the first
        block_start = start
        while block_start < self._size:
            block = self._read(block_start, _SCAN_BLOCK + overlap)
            index = block.find(_MAGIC_STEM)
            while 0 <= index < _SCAN_BLOCK:
                if self._plausible(block_start + index):
                    return block_start + index
                index = block.find(_MAGIC_STEM, index + 1)
            block_start += _SCAN_BLOCK
        return None

    def _plausible(self, position: int) -> bool:
        """Whether a scan stops at ``position``: a version 2 header that verifies
        (whatever its payload holds), a whole verified legacy frame (a legacy header alone
        proves nothing), or a header cut short by the end of the file."""
        head = self._read(position, FRAME_HEADER.size)
        magic = head[: len(MAGIC)]
        if magic == MAGIC:
            if len(head) < FRAME_HEADER.size:
                return True
            head_crc: int = _CHECKSUMS.unpack(head[_HEAD.size :])[0]
            return zlib.crc32(head[: _HEAD.size]) == head_crc
        if magic != LEGACY_MAGIC:
            return False
        if len(head) < LEGACY_FRAME_HEADER.size:
            return True
        crc: int
        length: int
        _, crc, length = LEGACY_FRAME_HEADER.unpack(head[: LEGACY_FRAME_HEADER.size])
        start = position + LEGACY_FRAME_HEADER.size
        return length <= self._size - start and self._crc(start, length) == crc

    def _crc(self, offset: int, length: int) -> int:
        """The CRC-32 of ``length`` bytes from ``offset``, read in blocks."""
        crc = 0
        end = offset + length
        while offset < end:
            block = self._read(offset, min(_READ_BLOCK, end - offset))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            offset += len(block)
        return crc

    def _read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at the end of the file)."""
        parts: list[bytes] = []
        while length > 0:
            block = os.pread(self._fd, min(length, _READ_BLOCK), offset)
            if not block:
                break
            parts.append(block)
            offset += len(block)
            length -= len(block)
        return parts[0] if len(parts) == 1 else b"".join(parts)


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


def checkpoint_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint a spool record carries, or None for an exchange's record."""
    if meta.get(KIND) != CHECKPOINT:
        return None
    found = meta.get(CHECKPOINT)
    return found if isinstance(found, dict) else None
