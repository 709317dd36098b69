"""Bytes written by a thread, read by an async response, through a bounded queue.

The HAR export (:func:`~asgi_audit.cli.har.write_har`) writes to a file object as it
reads records from the sink, which blocks. So it runs in a thread of its own, writing
into a :class:`ThreadPipe`, and the streaming response takes the chunks as they come: a
download of a thousand 1 MB exchanges holds a few chunks in memory, not the document.
When the reader goes (the browser cancels the download), the writer's next write raises
:class:`Abandoned` and the thread ends. No wait is unbounded: a reader's take returns
empty after ``poll`` seconds so the response can notice its own cancellation, and a
writer that finds nobody reading for ``stall_seconds`` gives up.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass

CHUNK_BYTES = 256 << 10
"""What one take gathers, at most, from the writer's many small writes."""


class Abandoned(Exception):
    """The reader left, or stopped reading for too long: the writer stops."""


@dataclass(frozen=True)
class _End:
    error: BaseException | None


class ThreadPipe:
    """A write-only binary file for one writer thread, read by :meth:`take`."""

    def __init__(self, depth: int = 16, stall_seconds: float = 300.0) -> None:
        self._chunks: queue.Queue[bytes | _End] = queue.Queue(depth)
        self._abandoned = threading.Event()
        self._end: _End | None = None
        """The writer's end, once taken from the queue."""
        self.stall_seconds = stall_seconds

    # The writer's side: what write_har needs of a binary file.

    def write(self, data: bytes) -> int:
        self._put(bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: every write is queued at once."""

    def finish(self, error: BaseException | None = None) -> None:
        """The writer is done (``error``: it failed, and the reader raises it)."""
        with contextlib.suppress(Abandoned):
            self._put(_End(error))

    def _put(self, item: bytes | _End) -> None:
        deadline = time.monotonic() + self.stall_seconds
        while not self._abandoned.is_set():
            try:
                self._chunks.put(item, timeout=0.2)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    self._abandoned.set()
        raise Abandoned

    # The reader's side.

    def take(self, poll: float = 1.0) -> bytes | None:
        """The next bytes written (up to about :data:`CHUNK_BYTES`), ``b""`` when none
        came within ``poll`` seconds, None once the writer is done; raises the writer's
        error (after the bytes it wrote before it). Blocking: call it in a thread."""
        if self._end is not None:
            end, self._end = self._end, _End(None)
            if end.error is not None:
                raise end.error
            return None
        try:
            item = self._chunks.get(timeout=poll)
        except queue.Empty:
            return b""
        gathered = bytearray()
        while not isinstance(item, _End):
            gathered += item
            if len(gathered) >= CHUNK_BYTES:
                return bytes(gathered)
            try:
                item = self._chunks.get_nowait()
            except queue.Empty:
                return bytes(gathered)
        self._end = item
        return bytes(gathered) if gathered else self.take(poll)

    def abandon(self) -> None:
        """The reader leaves: the writer's next write raises :class:`Abandoned`."""
        self._abandoned.set()
        while True:
            try:
                self._chunks.get_nowait()
            except queue.Empty:
                return
