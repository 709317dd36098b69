"""BodyTap: a bounded copy of one body stream, taken as the chunks pass by.

On the event loop the tap only keeps references and counts bytes. While the body fits in
``memory_limit`` (and in ``body_limit``) the chunks stay in a list. Past that, the kept
chunks and every later one go in batches to the spill worker, which hashes them, writes
what may be stored to a spill file, and drops the rest after hashing. The record always
gets the true size and the SHA-256 of the whole stream, even when the worker stores less
than the limits allow (``spill_limit`` reached, or a failed write): it then marks the
body truncated or skipped itself, before the final batch resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from .record import Body
from .spill import OverLimit, SpillJob, executor

__all__ = ["MAX_BACKLOG", "BodyTap", "OverLimit", "TapLimits"]

MAX_BACKLOG = 4
"""Batches a tap may have queued at the worker before its producer is made to wait."""


@dataclass(frozen=True, slots=True)
class TapLimits:
    """The limits every tap of one middleware shares, with what follows from them.

    Worked out once per middleware rather than per tap: an audited exchange makes two
    taps, and deriving the thresholds for each was a measurable share of its cost."""

    memory_limit: int
    body_limit: int | None
    over_limit: OverLimit = "truncate"
    spill_dir: str | None = None
    spill_limit: int | None = None
    """Bytes this process's spill files may hold at once; None: a quarter of the free
    space where they go (see :mod:`.spill`)."""
    store_limit: int = field(init=False)
    threshold: int = field(init=False)
    """Bytes kept in memory before the stream goes to the spill worker."""
    batch_size: int = field(init=False)
    to_file: bool = field(init=False)

    def __post_init__(self) -> None:
        store = sys.maxsize if self.body_limit is None else self.body_limit
        object.__setattr__(self, "store_limit", store)
        object.__setattr__(self, "threshold", min(self.memory_limit, store))
        object.__setattr__(self, "batch_size", min(max(self.memory_limit, 64 << 10), 4 << 20))
        object.__setattr__(self, "to_file", self.memory_limit < store)


_new = object.__new__

_NO_ROOM = -1
"""``BodyTap._room`` when no chunk may go to memory: every non-empty chunk is too big."""


class BodyTap:
    """Copy of one body stream; one per direction of an audited exchange.

    Only what a body that fits in memory needs is set up front; the spill state
    (``_batch``, ``_batch_bytes``, ``_outstanding``) appears with the spill job. A chunk
    that still fits in memory costs one comparison: ``_room`` counts the bytes memory may
    still take, and is negative whenever a chunk must take the slow path (nothing kept,
    or the stream already goes to the spill worker).

    ``spilling`` says whether the stream goes to the spill worker (a plain attribute, read
    before every message: :attr:`backlogged` matters only then, and a property call on
    every message would cost more than the rest of the check).
    """

    __slots__ = (
        "_batch",
        "_batch_bytes",
        "_chunks",
        "_job",
        "_keep",
        "_limits",
        "_outstanding",
        "_room",
        "size",
        "spilling",
    )

    def __init__(
        self,
        *,
        memory_limit: int,
        body_limit: int | None,
        over_limit: OverLimit = "truncate",
        spill_dir: str | None = None,
        spill_limit: int | None = None,
        keep: bool = True,
    ) -> None:
        self.size = 0
        self._keep = keep
        self._chunks: list[bytes] = []
        self._limits = TapLimits(memory_limit, body_limit, over_limit, spill_dir, spill_limit)
        self._room = self._limits.threshold if keep else _NO_ROOM
        self._job: SpillJob | None = None
        self.spilling = False
        self._batch: list[bytes]
        self._batch_bytes: int
        self._outstanding: deque[Future[str | None]]

    @classmethod
    def with_limits(cls, limits: TapLimits, keep: bool) -> BodyTap:
        """A tap under limits worked out beforehand (what the middleware makes per body)."""
        tap: BodyTap = _new(cls)
        tap.size = 0
        tap._keep = keep
        tap._chunks = []
        tap._limits = limits
        tap._room = limits.threshold if keep else _NO_ROOM
        tap._job = None
        tap.spilling = False
        return tap

    def feed(self, chunk: bytes) -> None:
        """Take one chunk (already ``bytes``: the caller copies reusable buffers)."""
        size = len(chunk)
        self.size += size
        room = self._room - size
        if room >= 0:  # kept in memory, and it fits
            self._room = room
            if size:
                self._chunks.append(chunk)
            return
        if not size or not self._keep:
            return
        if self._job is None:
            self._start_worker()
        self._batch.append(chunk)
        self._batch_bytes += size
        if self._batch_bytes >= self._limits.batch_size:
            self._submit(final=False)

    @property
    def _kept(self) -> int:
        """Bytes kept in memory (while the stream has not gone to the spill worker)."""
        return self._limits.threshold - self._room

    def _start_worker(self) -> None:
        limits = self._limits
        self._job = SpillJob(
            limits.store_limit,
            limits.to_file,
            limits.spill_dir,
            limits.over_limit,
            limits.spill_limit,
        )
        self._batch, self._chunks = self._chunks, []
        self._batch_bytes = self._kept
        self._room = _NO_ROOM
        self._outstanding = deque()
        self.spilling = True

    def _submit(self, final: bool) -> None:
        assert self._job is not None
        self._submit_to(self._job, final)

    def _submit_to(self, job: SpillJob, final: bool) -> None:
        future = job.submit(self._batch, final)
        self._batch, self._batch_bytes = [], 0
        outstanding = self._outstanding
        while outstanding and outstanding[0].done():
            outstanding.popleft()
        outstanding.append(future)

    @property
    def backlogged(self) -> bool:
        """True when the worker lags this stream by more than ``MAX_BACKLOG`` batches."""
        if self._job is None:  # nothing was ever spilled, or the job was handed back
            return False
        outstanding = self._outstanding
        while outstanding and outstanding[0].done():
            outstanding.popleft()
        return len(outstanding) > MAX_BACKLOG

    async def catch_up(self) -> None:
        """Wait (without blocking the loop) until the worker's backlog is bounded again.

        Never cancels a batch (``asyncio.wrap_future`` would, when the waiting task is
        cancelled) and never raises a batch's error: the body reports that when read.
        """
        loop = asyncio.get_running_loop()
        while self.backlogged:
            waiter: asyncio.Future[None] = loop.create_future()

            def wake(_: Future[str | None], waiter: asyncio.Future[None] = waiter) -> None:
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                    loop.call_soon_threadsafe(_resolve, waiter)

            self._outstanding[0].add_done_callback(wake)
            await waiter

    def close(self, complete: bool) -> Body | None:
        """End the stream (``complete`` when its last chunk arrived) and return the body,
        or None for a tap that only counted bytes."""
        if not self._keep:
            return None
        job = self._job
        if job is None:  # everything kept fits both limits: nothing truncated or skipped
            kept = self._limits.threshold - self._room
            return Body.in_memory(self.size, complete, tuple(self._chunks), kept)
        limits = self._limits
        store_limit = limits.store_limit
        skipped = limits.over_limit == "skip_body" and self.size > store_limit
        truncated = not skipped and self.size > store_limit
        in_memory = 0 if limits.to_file else min(self.size, store_limit)
        body = Body(
            size=self.size,
            complete=complete,
            truncated=truncated,
            skipped=skipped,
            job=job,
            memory_size=in_memory,
        )
        job.attach(body)  # before the final batch, which may cut the body short
        self._submit(final=True)
        self._outstanding.clear()
        return body

    def stop_keeping(self) -> None:
        """Count from now on, keep nothing (the exchange turned out not to need this body)."""
        self._keep = False
        self._chunks, self._room = [], _NO_ROOM
        job, self._job = self._job, None
        self.spilling = False
        if job is not None:
            self._submit_to(job, final=True)
            self._outstanding.clear()
            executor().submit(job.discard)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
