"""How bodies are kept: zstd-compressed when that pays, always given back exactly.

Audited bodies are mostly JSON, which zstd at level 1 shrinks about ninefold for about
1.3 ms per MB; a sink that writes a ninth of the bytes keeps up with far more exchanges
(SQLite wrote ~68 MB/s of raw 1 MB bodies here). Bodies that do not shrink by a tenth
(already compressed, random) are kept as they are. The encoding is stored beside the
bytes, and the reader decompresses: what comes back is exactly what was captured.

The spool writer packs bodies once (and hashes them: both run without the GIL), before
they are copied, checksummed, written, synced and read back; the sinks keep that same
packed form, so a body is compressed once on its way from the app to the sink and is
not unpacked on the way (:func:`asgi_audit.sinks.record.kept_bytes`).
"""

from __future__ import annotations

import threading
from typing import Literal

import zstandard

from ..errors import CorruptRecord

Encoding = Literal["identity", "zstd"]

LEVEL = 1
MIN_SIZE = 256
"""Bodies smaller than this are not worth a zstd frame."""

_local = threading.local()


def compressor(level: int = LEVEL) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor at ``level``: zstandard's objects are not safe to
    share between threads, and making one per call would cost more than small inputs."""
    by_level: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if by_level is None:
        by_level = _local.compressors = {}
    found = by_level.get(level)
    if found is None:
        found = by_level[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return found


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor (see :func:`compressor`)."""
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def encode(data: bytes | None) -> tuple[bytes | None, Encoding]:
    """The bytes to store and their encoding."""
    if data is None or len(data) < MIN_SIZE:
        return data, "identity"
    packed = compressor().compress(data)
    if len(packed) * 10 > len(data) * 9:
        return data, "identity"
    return packed, "zstd"


def pack(data: bytes) -> bytes | None:
    """``data`` as one zstd frame, or None when that does not pay: the bytes
    :func:`encode` would store for it."""
    if len(data) < MIN_SIZE:
        return None
    packed = compressor().compress(data)
    return None if len(packed) * 10 > len(data) * 9 else packed


def packed_size(packed: bytes) -> int:
    """How many bytes a packed body unpacks to (its zstd frame header says)."""
    return int(zstandard.frame_content_size(packed))


def decode(stored: bytes | None, encoding: str | None) -> bytes | None:
    """The captured bytes back from what a sink kept; :class:`CorruptRecord` when they
    cannot be (damaged bytes, or an encoding this version does not know)."""
    if stored is None or encoding in (None, "identity"):
        return stored
    if encoding != "zstd":
        raise CorruptRecord(f"unknown body encoding {encoding!r}")
    try:
        return decompressor().decompress(stored)
    except zstandard.ZstdError as exc:
        raise CorruptRecord(f"a zstd body cannot be unpacked ({exc})") from exc
