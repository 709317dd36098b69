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

Records hold request and response bodies, so everything here is private to the user the
app runs as: directories 0700, files 0600, whatever the umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..errors import SpoolError
from .frames import Frame, SpooledRecord, decode_payload, read_frames

logger = logging.getLogger("asgi_audit.spool")

SEGMENT_SUFFIX = ".seg"
STREAMS = "streams"
PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600
_SEGMENT_NAME = re.compile(r"[0-9]+" + re.escape(SEGMENT_SUFFIX))
_warned: set[tuple[str, str]] = set()
"""(stream, problem) pairs already warned about: a shipper looks every 0.2 s."""


def segment_name(index: int) -> str:
    return f"{index:012d}{SEGMENT_SUFFIX}"


def segment_index(name: str) -> int:
    return int(name.removesuffix(SEGMENT_SUFFIX))


def private_directory(path: Path) -> None:
    """``mkdir -p`` whose directories only their owner may enter: those it creates, and
    ``path`` itself when it was there already (made 0755 by an earlier version or by a
    lenient umask). Parents that were there already are left alone (``/var/lib``)."""
    missing: list[Path] = []
    ancestor = path
    while not ancestor.exists():
        missing.append(ancestor)
        ancestor = ancestor.parent
    made = False
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIRECTORY)
        except FileExistsError:
            continue  # made meanwhile by another process; only the leaf is fixed below
        os.chmod(directory, PRIVATE_DIRECTORY)  # the umask may have taken bits away
        made = directory == path
    if not made:
        _make_private_directory(path)


def _make_private_directory(path: Path) -> None:
    """Take group and other access away from a directory that already existed, unless it
    is not ours or is a shared sticky directory: a spool at ``/tmp`` must not lock the
    rest of the system out of ``/tmp``."""
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if stat.S_IMODE(info.st_mode) == PRIVATE_DIRECTORY:
        return
    if info.st_uid != os.geteuid() or info.st_mode & stat.S_ISVTX:
        _warn_once(str(path), "shared", "asgi-audit: spool directory %s is not private", path)
        return
    try:
        os.chmod(path, PRIVATE_DIRECTORY)
    except OSError as exc:  # a read-only mount, say: usable, just not narrowed
        _warn_once(str(path), "chmod", "asgi-audit: cannot make %s private (%s)", path, exc)


def _make_private_file(fd: int) -> None:
    """A file opened with mode 0600 keeps the mode it had when it existed already (an
    earlier version made them 0644): take group and other access away."""
    if os.fstat(fd).st_mode & 0o077:
        with contextlib.suppress(PermissionError):  # not ours: nothing we can do
            os.fchmod(fd, PRIVATE_FILE)


def _warn_once(stream: str, problem: str, message: str, *args: object) -> None:
    if (stream, problem) not in _warned:
        _warned.add((stream, problem))
        logger.warning(message, *args)


def try_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` without waiting: the fd holding it, or None."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        _make_private_file(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
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
    """Appends frames to one stream's segments. Used by the recorder thread only.

    A segment that was rotated away from stays open until :meth:`sync` has synced it: its
    last frames are durable only then, and only a descriptor that was open when a write
    failed is sure to hear of it. With ``durable=False`` (``fsync="off"``) nothing is
    synced before close and rotated segments are closed at once."""

    def __init__(
        self,
        root: Path,
        stream: str,
        *,
        segment_bytes: int = 64 << 20,
        segment_age: float = 60.0,
        durable: bool = True,
    ) -> None:
        self.root = root
        self.directory = root / STREAMS / stream
        self.segment_bytes = segment_bytes
        self.segment_age = segment_age
        self.durable = durable
        self._lock_fd = -1
        self._fd = -1
        self._rotated: list[int] = []
        """Descriptors of earlier segments whose last frames await a sync."""
        self._index = 0
        self._size = 0
        self._opened = 0.0
        self._rotation_failed = False
        self.bytes_written = 0

    def open(self) -> None:
        """Create the stream directory, take its writer lock, start the first segment."""
        for directory in (self.root, self.root / STREAMS, self.directory):
            private_directory(directory)
        lock = try_lock(self.directory / "writer.lock")
        if lock is None:
            raise SpoolError(f"spool stream {self.directory} is already being written")
        self._lock_fd = lock
        fsync_directory(self.directory.parent)
        # A reused stream name (a restarted process) may have left segments, maybe with a
        # torn tail: never append after those, start past them, and past the segment its
        # checkpoint names (a segment below it would never be shipped).
        stream = StreamDirectory(self.directory)
        indexes = [segment_index(name) for name in stream.segments()]
        stored = stream.stored_checkpoint()
        if stored is not None and stored.segment:
            indexes.append(segment_index(stored.segment))
        self._index = max(indexes, default=0)
        self._start_segment()

    def _start_segment(self) -> None:
        self._switch_to(self._create_next())

    def _create_next(self) -> int:
        """The next segment's file, opened before the current one is let go of: failing
        here (no descriptors left, no space) leaves the writer on its current segment."""
        path = self.directory / segment_name(self._index + 1)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, PRIVATE_FILE)

    def _switch_to(self, fd: int) -> None:
        """Make the new segment's name durable, then write to it. If that fails the new
        file is removed: a later segment tells the shipper that the current one is
        finished, so the writer must not go back to it once one was seen."""
        try:
            fsync_directory(self.directory)
        except BaseException:
            _close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.directory / segment_name(self._index + 1))
            raise
        previous, self._fd = self._fd, fd
        self._index += 1
        self._size = 0
        self._opened = time.monotonic()
        if previous < 0:
            return
        if self.durable:
            self._rotated.append(previous)
        else:
            _close(previous)

    def append(self, header: bytes, payload: bytes) -> None:
        """Append one frame (header and payload in one system call)."""
        self._ready()
        expected = len(header) + len(payload)
        try:
            written = os.writev(self._fd, [header, payload])
            if written != expected:  # a short write: finish it plainly
                rest = memoryview(header + payload)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except BaseException:
            self._take_back()
            raise
        self._size += expected
        self.bytes_written += expected

    def append_stream(
        self, header: bytes, parts: Callable[[], Iterable[bytes]], length: int
    ) -> None:
        """Append one frame whose payload (``length`` bytes) is written piece by piece as
        ``parts()`` yields it: a record too large to join in memory (a spilled body).
        Whatever fails, the writer's own write or reading a part, the partial frame is
        taken back."""
        self._ready()
        try:
            self._write_all(header)
            for part in parts():
                self._write_all(part)
        except BaseException:
            self._take_back()
            raise
        self._size += len(header) + length
        self.bytes_written += len(header) + length

    def _take_back(self) -> None:
        """Cut off a partly written frame (ENOSPC, EIO), so that a retry appends after
        good frames, not after a fragment a reader would have to skip as damage. When even
        that fails the segment is left, fragment and all, and the retry starts a new one:
        a frame written after a fragment could be skipped with it (the fragment's header
        may claim the frame's first bytes), while a fragment at the end of a segment is a
        torn tail the shipper cuts off. Its good frames are still synced by :meth:`sync`,
        like a rotated segment's."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            fd, self._fd = self._fd, -1
            if self.durable:
                self._rotated.append(fd)
            else:
                _close(fd)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _ready(self) -> None:
        """A segment to append to: a new one after :meth:`seal`, or when the current one
        is due for rotation. If the new one cannot be opened, the current one takes the
        frame: rotation bounds segment sizes, it keeps nothing safe."""
        if self._fd < 0:
            self._start_segment()
            return
        if not self._size or (
            self._size < self.segment_bytes and time.monotonic() - self._opened < self.segment_age
        ):
            return
        try:
            fd = self._create_next()
        except OSError as exc:
            if not self._rotation_failed:
                logger.warning(
                    "asgi-audit: cannot start a new spool segment in %s (%s); "
                    "appending to the current one",
                    self.directory,
                    exc,
                )
            self._rotation_failed = True
            return
        self._switch_to(fd)
        if self._rotation_failed:
            logger.warning("asgi-audit: spool segments in %s rotate again", self.directory)
            self._rotation_failed = False

    def sync(self) -> None:
        """Make everything appended so far durable: rotated segments first (each closed
        once synced), then the current one."""
        while self._rotated:
            os.fdatasync(self._rotated[0])
            _close(self._rotated.pop(0))
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def seal(self) -> None:
        """After a failed sync: close the segments written since the last good sync and
        never append to them again (the kernel may have dropped their unsynced pages, and
        a later sync of them can succeed without writing them). They stay for the shipper
        to read; the next frame starts a new segment."""
        for fd in (*self._rotated, self._fd):
            if fd >= 0:
                _close(fd)
        self._rotated = []
        self._fd = -1

    def forget(self) -> None:
        """In a forked child: close the inherited descriptors without syncing or
        unlocking (``flock`` is shared with the parent, which still writes the stream)."""
        for fd in (*self._rotated, self._fd, self._lock_fd):
            if fd >= 0:
                _close(fd)
        self._rotated = []
        self._fd = self._lock_fd = -1

    def close(self) -> None:
        """Sync, close the segment and release the writer lock (the stream is then
        shipped as an orphan once the shipper finds it). Everything is closed and the
        lock released even when the sync fails, which is then raised."""
        try:
            if self._fd >= 0 or self._rotated:
                self.sync()
        finally:
            self.seal()
            if self._lock_fd >= 0:
                unlock(self._lock_fd)
                self._lock_fd = -1


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):  # EIO from a close after a failed write: known
        os.close(fd)


@dataclass(slots=True)
class Checkpoint:
    """Everything before ``offset`` in ``segment`` (and in earlier segments) is delivered."""

    segment: str
    offset: int
    delivered: int = 0


def _parse_checkpoint(data: bytes) -> Checkpoint | None:
    """The checkpoint a file holds; None when it is not one (cut short by a disk that lied
    about a sync, overwritten, written by something else)."""
    try:
        fields = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    segment, offset, delivered = (fields.get(key) for key in ("segment", "offset", "delivered"))
    if not isinstance(segment, str) or (segment and not _SEGMENT_NAME.fullmatch(segment)):
        return None  # also keeps a path ("../x") out of what the shipper opens
    if not all(_count(value) for value in (offset, delivered)):
        return None
    assert isinstance(offset, int) and isinstance(delivered, int)
    return Checkpoint(segment, offset, delivered)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
        """How far the shipper has delivered. A checkpoint that cannot be trusted (a
        damaged file, one naming a segment that is gone with nothing after it) starts the
        stream over from its first segment: records delivered already are sent again, and
        sinks ignore an id they hold. An offset past the end of its segment is its end."""
        stored = self.stored_checkpoint()
        if stored is None:
            return Checkpoint("", 0, 0)
        return self._within_segments(stored)

    def stored_checkpoint(self) -> Checkpoint | None:
        """The checkpoint file as it is, None without one (or with a damaged one, warned
        about once)."""
        try:
            data = (self.directory / "checkpoint").read_bytes()
        except FileNotFoundError:
            return None
        checkpoint = _parse_checkpoint(data)
        if checkpoint is None:
            _warn_once(
                self.name,
                "unreadable",
                "asgi-audit: the checkpoint of spool stream %s is damaged; delivering the "
                "stream again from its first segment",
                self.name,
            )
        return checkpoint

    def _within_segments(self, checkpoint: Checkpoint) -> Checkpoint:
        if not checkpoint.segment:
            return checkpoint
        try:
            size = (self.directory / checkpoint.segment).stat().st_size
        except FileNotFoundError:
            segments = self.segments()
            if segments and segments[-1] > checkpoint.segment:
                return checkpoint  # the shipper goes on with the segments after it
            _warn_once(
                self.name,
                "missing",
                "asgi-audit: the checkpoint of spool stream %s names segment %s, which is "
                "gone; delivering the stream again from its first segment",
                self.name,
                checkpoint.segment,
            )
            return Checkpoint("", 0, checkpoint.delivered)
        if checkpoint.offset <= size:
            return checkpoint
        _warn_once(
            self.name,
            "past end",
            "asgi-audit: the checkpoint of spool stream %s points past the end of %s; "
            "taking its end",
            self.name,
            checkpoint.segment,
        )
        return Checkpoint(checkpoint.segment, size, checkpoint.delivered)

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
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
        try:
            _make_private_file(fd)  # a temporary left by an earlier version: 0644
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

    def pending(self) -> Iterator[SpooledRecord]:
        """The records (and checkpoints) not yet delivered, in order, their bodies left
        packed: what ``spool status`` counts and the metrics' shipping lag starts at."""
        checkpoint = self.checkpoint()
        for segment in self.segments():
            if checkpoint.segment and segment < checkpoint.segment:
                continue
            start = checkpoint.offset if segment == checkpoint.segment else 0
            for item in read_frames(self.directory / segment, start):
                if isinstance(item, Frame):
                    yield from decode_payload(item.payload, unpack=False)


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
