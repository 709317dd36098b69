"""The spool: a crash-safe local write-ahead log, one directory per stream.

    <spool>/shipper.lock                 held by the one process shipping this spool
    <spool>/streams/<stream>/writer.lock held by the live writer of that stream
    <spool>/streams/<stream>/<n>.seg     segments, appended to in order
    <spool>/streams/<stream>/checkpoint  how far the shipper has delivered

Every process writes its own stream, so writers never share a file and need no lock
between them. The writer's ``flock`` on ``writer.lock`` tells the shipper whether the
stream is live: a stream whose lock can be taken belongs to a dead process (a restarted
pod, a crashed worker) and is adopted: its torn tail is cut off and reported, the rest is
shipped, and the directory is removed once delivered.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..errors import SpoolError

logger = logging.getLogger("asgi_audit.spool")

SEGMENT_SUFFIX = ".seg"
STREAMS = "streams"


def segment_name(index: int) -> str:
    return f"{index:012d}{SEGMENT_SUFFIX}"


def try_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` without waiting: the fd holding it, or None."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentWriter:
    """Appends frames to one stream's segments. Used by the recorder thread only."""

    def __init__(
        self,
        root: Path,
        stream: str,
        *,
        segment_bytes: int = 64 << 20,
        segment_age: float = 60.0,
    ) -> None:
        self.directory = root / STREAMS / stream
        self.segment_bytes = segment_bytes
        self.segment_age = segment_age
        self._lock_fd = -1
        self._fd = -1
        self._index = 0
        self._size = 0
        self._opened = 0.0
        self.bytes_written = 0

    def open(self) -> None:
        """Create the stream directory, take its writer lock, start the first segment."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = try_lock(self.directory / "writer.lock")
        if lock is None:
            raise SpoolError(f"spool stream {self.directory} is already being written")
        self._lock_fd = lock
        fsync_directory(self.directory.parent)
        # A reused stream name (a restarted process) may have left segments, maybe with a
        # torn tail: never append after those, start past them.
        existing = StreamDirectory(self.directory).segments()
        self._index = max((int(name.removesuffix(SEGMENT_SUFFIX)) for name in existing), default=0)
        self._start_segment()

    def _start_segment(self) -> None:
        if self._fd >= 0:
            os.fdatasync(self._fd)
            os.close(self._fd)
        self._index += 1
        path = self.directory / segment_name(self._index)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._size = 0
        self._opened = time.monotonic()
        fsync_directory(self.directory)

    def append(self, header: bytes, payload: bytes) -> None:
        """Append one frame (header and payload in one system call)."""
        self._rotate_if_due()
        expected = len(header) + len(payload)
        try:
            written = os.writev(self._fd, [header, payload])
            if written != expected:  # a short write: finish it plainly
                rest = memoryview(header + payload)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except OSError:
            # Take back a partly written frame (ENOSPC, EIO), so that a retry appends
            # after good frames, not after a fragment a reader would stop at for good.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += expected
        self.bytes_written += expected

    def append_stream(
        self, header: bytes, parts: Callable[[], Iterable[bytes]], length: int
    ) -> None:
        """Append one frame whose payload (``length`` bytes) is written piece by piece as
        ``parts()`` yields it: a record too large to join in memory (a spilled body)."""
        self._rotate_if_due()
        try:
            self._write_all(header)
            for part in parts():
                self._write_all(part)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(header) + length
        self.bytes_written += len(header) + length

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _rotate_if_due(self) -> None:
        if self._size and (
            self._size >= self.segment_bytes or time.monotonic() - self._opened >= self.segment_age
        ):
            self._start_segment()

    def sync(self) -> None:
        """Make everything appended so far durable."""
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def forget(self) -> None:
        """In a forked child: close the inherited descriptors without syncing or
        unlocking (``flock`` is shared with the parent, which still writes the stream)."""
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1

    def close(self) -> None:
        """Sync, close the segment and release the writer lock (the stream is then
        shipped as an orphan once the shipper finds it)."""
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            unlock(self._lock_fd)
            self._lock_fd = -1


@dataclass(slots=True)
class Checkpoint:
    """Everything before ``offset`` in ``segment`` (and in earlier segments) is delivered."""

    segment: str
    offset: int
    delivered: int = 0


class StreamDirectory:
    """The shipper's view of one stream: segments, checkpoint, liveness."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = directory.name

    def segments(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(SEGMENT_SUFFIX))

    def checkpoint(self) -> Checkpoint:
        try:
            data = orjson.loads((self.directory / "checkpoint").read_bytes())
            return Checkpoint(str(data["segment"]), int(data["offset"]), int(data["delivered"]))
        except FileNotFoundError:
            return Checkpoint("", 0, 0)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write the checkpoint durably (temporary file, fsync, rename, directory fsync)."""
        temporary = self.directory / "checkpoint.tmp"
        data = orjson.dumps(
            {
                "segment": checkpoint.segment,
                "offset": checkpoint.offset,
                "delivered": checkpoint.delivered,
            }
        )
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.directory / "checkpoint")
        fsync_directory(self.directory)

    def writer_alive(self) -> bool:
        """True while a live process holds this stream's writer lock."""
        path = self.directory / "writer.lock"
        if not path.exists():
            return False
        fd = try_lock(path)
        if fd is None:
            return True
        unlock(fd)
        return False

    def truncate(self, segment: str, offset: int, reason: str) -> int:
        """Cut a dead stream's segment at ``offset``; returns the bytes removed."""
        path = self.directory / segment
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(offset)
            os.fsync(handle.fileno())
        removed = size - offset
        logger.warning(
            "asgi-audit: spool segment %s was %s at byte %d; cut %d bytes",
            path,
            reason,
            offset,
            removed,
        )
        return removed

    def remove_segment(self, segment: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / segment)

    def remove(self) -> None:
        """Delete the whole (delivered, dead) stream directory."""
        shutil.rmtree(self.directory, ignore_errors=True)


def streams(root: Path) -> Iterator[StreamDirectory]:
    """Every stream directory in a spool, oldest name first."""
    base = root / STREAMS
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return
    for name in names:
        if (base / name).is_dir():
            yield StreamDirectory(base / name)


def spool_bytes(root: Path) -> int:
    """Bytes held in segments across every stream of a spool."""
    total = 0
    for stream in streams(root):
        for segment in stream.segments():
            with contextlib.suppress(FileNotFoundError):
                total += (stream.directory / segment).stat().st_size
    return total
