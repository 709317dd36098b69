"""The hand-off from the request path to whatever keeps the records.

The middleware calls :meth:`Recorder.try_submit` once per finished exchange: it must
return at once. When it answers False (full), the middleware applies the overflow policy:
``drop`` counts the exchange as lost and warns once; ``block`` awaits
:meth:`Recorder.room` (suspending only that exchange's coroutine, never the event loop)
and tries again. Any exception a recorder raises is caught, counted and logged by the
middleware: a failing recorder never turns a good response into an error.

At lifespan shutdown (or from a test) the middleware calls :meth:`Recorder.shutdown`,
off the event loop, with what is left of its ``shutdown_timeout``: a recorder passed in
by the user is drained like the durable one. Every wait here takes a ``timeout`` in
seconds (None: no limit) and says with its result whether it finished in time, as
OpenTelemetry's ``BatchProcessor`` does.

This module is the documented hand-off between the capture room and the recording room:
the middleware imports it, and nothing else of this room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from typing import Protocol, runtime_checkable

from ..capture.record import Exchange

logger = logging.getLogger("asgi_audit.recorder")


@runtime_checkable
class Recorder(Protocol):
    """Where finished exchanges go. Implementations must make ``try_submit`` non-blocking.

    A recorder calls ``exchange.on_written`` (when set) exactly once for every exchange
    ``try_submit`` accepted: ``True`` once the record is kept as durably as the recorder
    promises, ``False`` when it is lost (dropped, not encodable, not written by shutdown).
    It may call it from any thread, never under a lock of its own, and must survive a
    callback that raises. The ``blocking`` modes hold a response's last message on it;
    an exchange that was refused (False, or an exception) gets no call.
    """

    def try_submit(self, exchange: Exchange, *, force: bool = False) -> bool:
        """Enqueue ``exchange``; False when full. ``force`` accepts past the bounds (used
        for exchanges that were cancelled and can no longer wait)."""
        ...

    async def room(self) -> None:
        """Return once ``try_submit`` may succeed again."""
        ...

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is kept; False if ``timeout`` passed."""
        ...

    def shutdown(self, timeout: float | None = None) -> bool:
        """Keep what was submitted, release threads and files; False if ``timeout`` passed
        first. Called off the event loop; later submissions may be refused."""
        ...


class RoomSignal:
    """Wakes coroutines waiting for queue room; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    async def wait(self) -> None:
        await self.register(asyncio.get_running_loop())

    def register(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future of ``loop`` that the next :meth:`notify_all` resolves."""
        waiter: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.append((loop, waiter))
        return waiter

    def notify_all(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed; nobody waits any more
                loop.call_soon_threadsafe(_resolve, waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class MemoryRecorder:
    """Keeps exchanges in a bounded in-process queue, for tests and examples. An exchange
    it accepts is kept (in memory: that is all it promises), so ``on_written(True)`` is
    called at once, on the submitting thread.

    Bounded by count and by stored body bytes. Consumers call :meth:`take` or
    :meth:`take_all` (from any thread); each frees room for blocked producers. It runs
    nothing in the background, so flushing and shutting down have nothing to wait for:
    what it holds stays there for ``take`` after a shutdown, and it keeps accepting.
    """

    def __init__(self, max_records: int = 1000, max_bytes: int = 256 << 20) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1 (got {max_records})")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative (got {max_bytes})")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._queue: deque[tuple[Exchange, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._room = RoomSignal()
        self._arrived = threading.Condition(self._lock)
        self._refused = False
        self.callback_errors = 0
        """``on_written`` callbacks that raised."""

    def try_submit(self, exchange: Exchange, *, force: bool = False) -> bool:
        weight = memory_weight(exchange)
        with self._lock:
            full = len(self._queue) >= self.max_records or (
                self._queue and self._bytes + weight > self.max_bytes
            )
            if full and not force:
                self._refused = True
                return False
            self._queue.append((exchange, weight))
            self._bytes += weight
            self._arrived.notify_all()
        self._written(exchange)
        return True

    def _written(self, exchange: Exchange) -> None:
        """Held in memory is all this recorder promises: the exchange is kept."""
        if exchange.on_written is None:
            return
        try:
            exchange.on_written(True)
        except Exception:
            self.callback_errors += 1
            logger.warning("asgi-audit: an on_written callback failed", exc_info=True)

    async def room(self) -> None:
        # Whether an exchange fits depends on its weight, which room() does not know: wait
        # for a take whenever a submission was refused since the last one. Checked and
        # registered under the queue's lock, so a take from another thread is never missed.
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._refused:
                return
            waiter = self._room.register(loop)
        await waiter

    def flush(self, timeout: float | None = None) -> bool:
        """Everything submitted is in the queue already."""
        return True

    def shutdown(self, timeout: float | None = None) -> bool:
        """Nothing to stop (see the class docstring)."""
        return True

    def take(self, timeout: float | None = None) -> Exchange | None:
        """Remove and return the oldest exchange, waiting up to ``timeout`` seconds."""
        with self._lock:
            if not self._queue and not self._arrived.wait_for(lambda: bool(self._queue), timeout):
                return None
            exchange, weight = self._queue.popleft()
            self._bytes -= weight
            self._refused = False
        self._room.notify_all()
        return exchange

    def take_all(self) -> list[Exchange]:
        """Remove and return every queued exchange, oldest first."""
        with self._lock:
            taken = [exchange for exchange, _ in self._queue]
            self._queue.clear()
            self._bytes = 0
            self._refused = False
        self._room.notify_all()
        return taken

    def __len__(self) -> int:
        return len(self._queue)


def memory_weight(exchange: Exchange) -> int:
    """Bytes an exchange holds in memory: its in-memory bodies (spilled ones count 0)."""
    total = 0
    for body in (exchange.request_body, exchange.response_body):
        if body is not None:
            total += body.memory_size
    return total
