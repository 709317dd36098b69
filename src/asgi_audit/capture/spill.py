"""The worker that hashes and spills large bodies off the event loop.

SHA-256 of 1 MiB costs ~0.6 ms, too much for the event loop, and a thread that is handed
work chunk by chunk pays a GIL re-acquisition per call while the loop is busy (the GIL
convoy). So taps hand over *batches* of chunks, in order, to one process-wide worker thread;
each batch is hashed and written to the spill file with one ``os.writev``. The thread starts
with the first body that outgrows its memory limit, and is replaced after ``fork``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from .._forks import after_fork

_IOV_MAX = 512

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


def _forget_after_fork() -> None:
    global _executor, _lock
    _executor = None
    _lock = threading.Lock()


after_fork(_forget_after_fork)


class SpillJob:
    """Running state of one body handed to the worker: digest, spill file, stored bytes.

    Every method but :meth:`submit` runs on the worker thread, in submission order.
    """

    __slots__ = (
        "_dir",
        "_error",
        "_fd",
        "_hasher",
        "_store_limit",
        "_to_file",
        "last",
        "path",
        "prefix",
        "stored",
    )

    def __init__(self, store_limit: int, to_file: bool, directory: str | None) -> None:
        self._hasher = hashlib.sha256()
        self._store_limit = store_limit
        self._to_file = to_file
        self._dir = directory
        self.path: str | None = None
        self._fd = -1
        self.stored = 0
        self.prefix: list[bytes] = []
        self.last: Future[str | None] | None = None
        self._error: BaseException | None = None

    def submit(self, chunks: list[bytes], final: bool) -> Future[str | None]:
        """Queue ``chunks`` for hashing and storing; the final batch resolves to the digest."""
        self.last = executor().submit(self._run, chunks, final)
        return self.last

    def _run(self, chunks: list[bytes], final: bool) -> str | None:
        if self._error is not None:  # a batch failed: later ones would store a gapped body
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
        return self._hasher.hexdigest()

    def _consume(self, chunks: list[bytes]) -> None:
        update = self._hasher.update
        keep: list[bytes] = []
        room = self._store_limit - self.stored
        for chunk in chunks:
            update(chunk)
            if room > 0:
                part = chunk if len(chunk) <= room else chunk[:room]
                keep.append(part)
                room -= len(part)
        self.stored = self._store_limit - room
        if not keep:
            return
        if self._to_file:
            self._write(keep)
        else:
            self.prefix.extend(keep)

    def _write(self, parts: list[bytes]) -> None:
        if self._fd < 0:
            if self._dir is not None:
                os.makedirs(self._dir, mode=0o700, exist_ok=True)
            self._fd, self.path = tempfile.mkstemp(
                prefix="asgi-audit-", suffix=".body", dir=self._dir
            )
        for start in range(0, len(parts), _IOV_MAX):
            batch = parts[start : start + _IOV_MAX]
            expected = sum(len(p) for p in batch)
            written = os.writev(self._fd, batch)
            if written != expected:  # short write: finish it plainly
                rest = b"".join(batch)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Remove the spill file (after the body was delivered, or when it is dropped)."""
        self._close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None
