"""The worker that hashes and spills large bodies off the event loop, and where they go.

SHA-256 of 1 MiB costs ~0.6 ms, too much for the event loop, and a thread that is handed
work chunk by chunk pays a GIL re-acquisition per call while the loop is busy (the GIL
convoy). So taps hand over *batches* of chunks, in order, to one process-wide worker thread;
each batch is hashed and written to the spill file with one ``os.writev``. The thread starts
with the first body that outgrows its memory limit, and is replaced after ``fork``.

Every file operation happens on that thread (the event loop never touches the disk), except
removing a finished body's file, which the thread that consumed the body may do itself.

Spill files may hold a copy of anyone's request, so they are private (folders 0700, files
0600, whatever the umask) and never outlive their process for long: each process keeps its
files in a folder of its own, ``<spill_dir>/<pid>.<ns>/``, whose ``lock`` it holds with
``flock`` while it lives. A process killed with SIGKILL cannot clean up, so the first
process to spill into the same ``spill_dir`` afterwards removes every folder whose lock it
can take. Their total size is capped by ``spill_limit``: a body that would pass it stops
being stored (its ``over_limit`` policy says what remains) while its hash goes on. A write
that fails (a full disk) costs only that body its stored bytes, never the exchange.

Spill files are encrypted (AES-256-CTR, a key made per process and kept only in its
memory, a random nonce per file): they hold bodies before the spool writer has redacted
them, and secrets must reach no disk in clear. Nothing is lost by it: a spill file is
only ever read by the process that wrote it (after a crash its folder is swept unread).
AES with the CPU's instructions costs ~0.3 ms per MB.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .._forks import after_fork

logger = logging.getLogger("asgi_audit")

_IOV_MAX = 512

FILE_PREFIX = "asgi-audit-"
FILE_SUFFIX = ".body"
LOCK_NAME = "lock"
"""The file in a process's spill folder that the process holds with ``flock``."""
SPILL_LIMIT_REACHED = "spill_limit reached"
""":attr:`SpillJob.error` of a body that stopped being stored at ``spill_limit``."""
AUTO_SHARE = 4
"""``spill_limit=None`` ("auto") allows 1/AUTO_SHARE of the spill folder's free space."""

_FOLDER_NAME = re.compile(r"[0-9]+\.[0-9]+")
_STAGING_PREFIX = ".asgi-audit-"
_STALE_STAGING_SECONDS = 3600.0
"""A folder being set up is renamed within microseconds; one this old was left by a kill."""
_MEASURE_EVERY_SECONDS = 10.0
"""How long an automatic limit holds before the free space is measured again: the spool
usually shares the file system and grows, and a statvfs per body would be wasted."""
_KEEP_FOLDERS = 8
"""Folders (one per spill directory) held at once; past this, idle ones are given up, so a
process that spills into many directories (a test suite) does not hold a lock for each."""

OverLimit = Literal["truncate", "skip_body"]

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def executor() -> ThreadPoolExecutor:
    """The shared single-thread worker, created on first use."""
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asgi-audit-spill")
    return _executor


@dataclass
class SpillCounts:
    """What the spill worker had to give up, since the process started (or forked)."""

    over_limit: int = 0
    """Bodies that stopped being stored because ``spill_limit`` was reached."""
    failed: int = 0
    """Bodies whose spill file could not be made or written (a full disk, no descriptor)."""
    swept: int = 0
    """Folders and stray files of dead processes removed from spill directories."""


counts = SpillCounts()


class _Account:
    """Bytes held in this process's spill files, across all its spill directories.

    Added by the worker as it writes, given back by whichever thread discards a body, hence
    the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held = 0

    def reserve(self, size: int, limit: int) -> bool:
        with self.lock:
            if self.held + size > limit:
                return False
            self.held += size
            return True


_account = _Account()
_warned: set[str] = set()


def held_bytes() -> int:
    """Bytes currently held in this process's spill files (what ``spill_limit`` caps)."""
    return _account.held


class _Folder:
    """This process's folder in one spill directory, locked while the process uses it.

    Touched by the worker thread only, but for ``files``, which a discarding thread lowers
    (under the account's lock)."""

    __slots__ = ("auto_limit", "files", "lock_fd", "measured", "path", "root")

    def __init__(self, root: str, path: str, lock_fd: int) -> None:
        self.root = root
        self.path = path
        self.lock_fd = lock_fd
        self.files = 0
        self.auto_limit = 0
        self.measured = -_MEASURE_EVERY_SECONDS

    def limit(self, configured: int | None) -> int:
        if configured is not None:
            return configured
        now = time.monotonic()
        if now - self.measured >= _MEASURE_EVERY_SECONDS:
            fs = os.statvfs(self.path)
            # What is free plus what this process holds already: the limit does not shrink
            # as our own files fill the disk.
            self.auto_limit = (fs.f_bavail * fs.f_frsize + _account.held) // AUTO_SHARE
            self.measured = now
        return self.auto_limit

    def retire(self) -> None:
        """Give the folder up: removed while still locked, so no sweeper races us."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)
        self.lock_fd = -1


_folders: dict[str, _Folder] = {}
_swept: set[str] = set()


def default_spill_dir() -> str:
    """Where a tap without ``spill_dir`` spills: a folder of this user's in the temp dir."""
    return os.path.join(tempfile.gettempdir(), f"asgi-audit-spill-{os.geteuid()}")


def _folder_for(directory: str | None) -> _Folder:
    """This process's folder in ``directory``, made (and the directory swept) on first use."""
    root = os.path.abspath(directory if directory is not None else default_spill_dir())
    folder = _folders.get(root)
    if folder is not None:
        return folder
    _private_directory(root, shared_ok=directory is not None)
    if root not in _swept:
        _swept.add(root)
        sweep(root)
    folder = _folders[root] = _make_folder(root)
    if len(_folders) > _KEEP_FOLDERS:
        for other in list(_folders.values()):
            with _account.lock:
                idle = other is not folder and other.files == 0
            if idle:
                del _folders[other.root]
                other.retire()
    return folder


def _forget_folder(folder: _Folder) -> None:
    """The folder was removed under us (a test's temporary directory): make a new one."""
    if _folders.get(folder.root) is folder:
        del _folders[folder.root]
        with contextlib.suppress(OSError):
            os.close(folder.lock_fd)


def _private_directory(path: str, *, shared_ok: bool) -> None:
    """Make ``path`` (and missing parents) 0700; an existing one is narrowed to 0700 unless
    it is a shared temp directory (sticky, like /tmp) or not ours to change. ``shared_ok``
    False: the path is our default under the temp dir, so it must be ours, not a symlink."""
    missing: list[str] = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for created in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(created, 0o700)
            os.chmod(created, 0o700)  # mkdir's mode went through the umask
    info = os.lstat(path) if not shared_ok else os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "spill directory is not a directory", path)
    if not shared_ok and info.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, "spill directory belongs to another user", path)
    loose = info.st_mode & 0o077
    if loose and not info.st_mode & stat.S_ISVTX and info.st_uid == os.geteuid():
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)


def _make_folder(root: str) -> _Folder:
    """A new folder, locked before it gets the name sweepers look at: set up under a
    staging name, then renamed, so that no sweeper ever sees it unlocked."""
    staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root)
    fd = -1
    try:
        os.chmod(staging, 0o700)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(os.path.join(staging, LOCK_NAME), flags, 0o600)
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = os.path.join(root, f"{os.getpid()}.{time.time_ns()}")
        os.rename(staging, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _Folder(root, path, fd)


def sweep(root: str) -> int:
    """Remove what dead processes left in the spill directory ``root``: folders whose lock
    nobody holds, and stray spill files of versions that kept them there directly. Returns
    how many entries were removed. Folders of live processes (locked) are left alone."""
    removed = 0
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                if _FOLDER_NAME.fullmatch(name):
                    removed += _remove_if_dead(entry.path)
                elif name.startswith(_STAGING_PREFIX):
                    age = time.time() - entry.stat(follow_symlinks=False).st_mtime
                    if age > _STALE_STAGING_SECONDS:
                        removed += _remove_if_dead(entry.path)
            elif _is_spill_file(name):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    if removed:
        counts.swept += removed
        logger.info("asgi-audit: removed %d spill leftovers of dead processes in %s", removed, root)
    return removed


def _remove_if_dead(path: str) -> int:
    """Remove the folder at ``path`` if its owner is dead (its lock can be taken, or it has
    none: a folder gets its name only once locked, so only a remover that died midway, or
    a kill while setting one up, leaves it without) and it holds nothing but spill files: a
    look-alike folder of someone else's stays."""
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _remove_ours(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its process lives (or locks do not work here: keep it)
            return 0
        return _remove_ours(path)  # still locked while removing
    finally:
        os.close(fd)


def _remove_ours(path: str) -> int:
    names = os.listdir(path)
    if not all(name == LOCK_NAME or _is_spill_file(name) for name in names):
        return 0
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)
    return 1


def _is_spill_file(name: str) -> bool:
    return name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX)


def _forget_after_fork() -> None:
    global _executor, _lock, _account
    _executor = None
    _lock = threading.Lock()
    for folder in _folders.values():
        # The child's copy of the parent's lock: closed, never unlocked (flock belongs to
        # the open file, which the parent still holds); the child makes its own folder.
        with contextlib.suppress(OSError):
            os.close(folder.lock_fd)
    _folders.clear()
    _swept.clear()
    _account = _Account()
    _warned.clear()
    counts.over_limit = counts.failed = counts.swept = 0
    _keys.clear()  # the child makes its own


after_fork(_forget_after_fork)

_keys: list[bytes] = []
_key_lock = threading.Lock()
_READ_BLOCK = 4 << 20


def _cipher(nonce: bytes) -> Any:
    """AES-256-CTR under this process's spill key (made on first use, on the worker
    thread), starting at ``nonce``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    with _key_lock:
        if not _keys:
            _keys.append(os.urandom(32))
        key = _keys[0]
    return Cipher(algorithms.AES(key), modes.CTR(nonce))


@atexit.register
def _remove_folders() -> None:
    """A process that ends normally leaves no spill folder for the next one to sweep."""
    for folder in list(_folders.values()):
        folder.retire()
    _folders.clear()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key in _warned:
        logger.debug(message, *args)
        return
    _warned.add(key)
    logger.warning(message, *args)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name}: {exc.strerror or os.strerror(exc.errno)}"
    return f"{type(exc).__name__}: {exc}"


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Flags(Protocol):
    """What a job updates on its body when the worker, not the tap, cut it short."""

    truncated: bool
    skipped: bool


class SpillJob:
    """Running state of one body handed to the worker: digest, spill file, stored bytes.

    Every method but :meth:`submit`, :meth:`attach` and :meth:`discard` runs on the worker
    thread, in submission order. Once the final batch has run, ``stored``, ``path``,
    ``truncated``, ``skipped`` and ``error`` are final.
    """

    __slots__ = (
        "_body",
        "_cipher",
        "_dir",
        "_error",
        "_fd",
        "_folder",
        "_hasher",
        "_held",
        "_nonce",
        "_over_limit",
        "_spill_limit",
        "_stopped",
        "_store_limit",
        "_to_file",
        "error",
        "last",
        "path",
        "prefix",
        "skipped",
        "stored",
        "truncated",
    )

    def __init__(
        self,
        store_limit: int,
        to_file: bool,
        directory: str | None,
        over_limit: OverLimit = "truncate",
        spill_limit: int | None = None,
    ) -> None:
        self._hasher = hashlib.sha256()
        self._store_limit = store_limit
        self._to_file = to_file
        self._dir = directory
        self._over_limit = over_limit
        self._spill_limit = spill_limit
        self.path: str | None = None
        self._fd = -1
        self._nonce = b""
        self._cipher: Any = None
        self._folder: _Folder | None = None
        self._held = 0
        self._stopped = False
        self._body: Flags | None = None
        self.stored = 0
        self.prefix: list[bytes] = []
        self.last: Future[str | None] | None = None
        self._error: BaseException | None = None
        self.truncated = False
        """The worker stopped storing at ``spill_limit`` and kept what it had."""
        self.skipped = False
        """The worker keeps no bytes: ``spill_limit`` with ``skip_body``, or a failed write."""
        self.error: str | None = None
        """Why the worker stored less than the body limit allows (``SPILL_LIMIT_REACHED``,
        or the failed operation's errno and message), else None."""

    def submit(self, chunks: list[bytes], final: bool) -> Future[str | None]:
        """Queue ``chunks`` for hashing and storing; the final batch resolves to the digest."""
        self.last = executor().submit(self._run, chunks, final)
        return self.last

    def attach(self, body: Flags) -> None:
        """Let the final batch mark ``body`` truncated or skipped if the worker cut it short
        (call before submitting the final batch)."""
        self._body = body

    def _run(self, chunks: list[bytes], final: bool) -> str | None:
        if self._error is not None:  # hashing failed: a later digest would be wrong
            raise self._error
        try:
            self._consume(chunks)
        except BaseException as exc:
            self._error = exc
            self._close()
            raise
        if not final:
            return None
        self._close()
        self._settle()
        return self._hasher.hexdigest()

    def _consume(self, chunks: list[bytes]) -> None:
        update = self._hasher.update
        if self._stopped:
            for chunk in chunks:
                update(chunk)
            return
        keep: list[bytes] = []
        room = self._store_limit - self.stored
        for chunk in chunks:
            update(chunk)
            if room > 0:
                part = chunk if len(chunk) <= room else chunk[:room]
                keep.append(part)
                room -= len(part)
        size = self._store_limit - self.stored - room
        if not keep:
            return
        if self._to_file:
            if not self._spill(keep, size):
                return
        else:
            self.prefix.extend(keep)
        self.stored += size

    def _spill(self, parts: list[bytes], size: int) -> bool:
        """Write ``parts`` if ``spill_limit`` allows; False when the body stopped being
        stored instead (limit reached, or the file could not be made or written)."""
        try:
            folder = self._folder
            if folder is None:
                folder = _folder_for(self._dir)
            if not _account.reserve(size, folder.limit(self._spill_limit)):
                self._limit_reached()
                return False
            self._held += size
            if self._fd < 0:
                self._open(folder)
            self._writev(parts)
        except Exception as exc:
            self._failed(exc)
            return False
        return True

    def _open(self, folder: _Folder) -> None:
        try:
            fd, path = tempfile.mkstemp(prefix=FILE_PREFIX, suffix=FILE_SUFFIX, dir=folder.path)
        except FileNotFoundError:
            _forget_folder(folder)
            folder = _folder_for(self._dir)
            fd, path = tempfile.mkstemp(prefix=FILE_PREFIX, suffix=FILE_SUFFIX, dir=folder.path)
        self._fd, self.path, self._folder = fd, path, folder
        self._nonce = os.urandom(16)
        self._cipher = _cipher(self._nonce).encryptor()
        with _account.lock:
            folder.files += 1
        os.fchmod(fd, 0o600)  # mkstemp's 0600 went through the umask

    def plain_blocks(self) -> Iterator[bytes]:
        """The spill file's bytes as they were given (decrypted), in blocks."""
        assert self.path is not None
        decryptor = _cipher(self._nonce).decryptor()
        with open(self.path, "rb") as handle:
            while block := handle.read(_READ_BLOCK):
                yield decryptor.update(block)

    def _writev(self, parts: list[bytes]) -> None:
        update = self._cipher.update
        parts = [update(part) for part in parts]
        for start in range(0, len(parts), _IOV_MAX):
            batch = parts[start : start + _IOV_MAX]
            expected = sum(len(p) for p in batch)
            written = os.writev(self._fd, batch)
            if written != expected:  # short write: finish it plainly
                rest = b"".join(batch)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]

    def _limit_reached(self) -> None:
        self._stopped = True
        self.error = SPILL_LIMIT_REACHED
        counts.over_limit += 1
        _warn_once(
            "limit",
            "asgi-audit: spill files reached spill_limit (%d bytes held); bodies past it "
            "are recorded per over_limit=%r, with their full size and SHA-256",
            _account.held,
            self._over_limit,
        )
        if self._over_limit == "skip_body":
            self._drop_file()
            self.stored = 0
            self.skipped = True
        else:
            self.truncated = True

    def _failed(self, exc: Exception) -> None:
        self._stopped = True
        self.error = _describe(exc)
        counts.failed += 1
        _warn_once(
            "failed",
            "asgi-audit: a spill file could not be written (%s); such bodies are recorded "
            "without their bytes, with their full size and SHA-256",
            self.error,
        )
        self._drop_file()
        self.stored = 0
        self.skipped = True

    def _settle(self) -> None:
        body, self._body = self._body, None
        if body is None:
            return
        if self.skipped:
            body.skipped, body.truncated = True, False
        elif self.truncated:
            body.truncated = True

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def _drop_file(self) -> None:
        """Close and remove the spill file, and give its bytes back to ``spill_limit``."""
        self._close()
        path, self.path = self.path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        held, self._held = self._held, 0
        folder, self._folder = self._folder, None
        with _account.lock:
            _account.held -= held
            if path is not None and folder is not None:
                folder.files -= 1

    def discard(self) -> None:
        """Remove the spill file (after the body was delivered, or when it is dropped).

        Called on an event loop's thread (a dropped exchange), the removal goes to the
        worker: the loop never touches the disk."""
        if self.path is None and self._fd < 0 and not self._held:
            return
        if _on_event_loop():
            executor().submit(self._drop_file)
        else:
            self._drop_file()
