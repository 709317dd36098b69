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

from .record import Body
from .spill import OverLimit, SpillJob, executor

__all__ = ["MAX_BACKLOG", "BodyTap", "OverLimit"]

MAX_BACKLOG = 4
"""Batches a tap may have queued at the worker before its producer is made to wait."""


class BodyTap:
    """Copy of one body stream; one per direction of an audited exchange."""

    __slots__ = (
        "_batch",
        "_batch_bytes",
        "_batch_size",
        "_chunks",
        "_job",
        "_keep",
        "_kept",
        "_memory_limit",
        "_outstanding",
        "_over_limit",
        "_spill_dir",
        "_spill_limit",
        "_store_limit",
        "_threshold",
        "size",
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
        self._kept = 0
        self._store_limit = sys.maxsize if body_limit is None else body_limit
        self._memory_limit = memory_limit
        self._threshold = min(memory_limit, self._store_limit)
        self._over_limit = over_limit
        self._spill_dir = spill_dir
        self._spill_limit = spill_limit
        """Bytes this process's spill files may hold at once; None: a quarter of the free
        space where they go (see :mod:`.spill`)."""
        self._job: SpillJob | None = None
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batch_size = min(max(memory_limit, 64 << 10), 4 << 20)
        self._outstanding: deque[Future[str | None]] = deque()

    def feed(self, chunk: bytes) -> None:
        """Take one chunk (already ``bytes``: the caller copies reusable buffers)."""
        size = len(chunk)
        if not size:
            return
        self.size += size
        if not self._keep:
            return
        if self._job is None:
            if self._kept + size <= self._threshold:
                self._chunks.append(chunk)
                self._kept += size
                return
            self._start_worker()
        self._batch.append(chunk)
        self._batch_bytes += size
        if self._batch_bytes >= self._batch_size:
            self._submit(final=False)

    def _start_worker(self) -> None:
        to_file = self._memory_limit < self._store_limit
        self._job = SpillJob(
            self._store_limit, to_file, self._spill_dir, self._over_limit, self._spill_limit
        )
        self._batch, self._chunks = self._chunks, []
        self._batch_bytes, self._kept = self._kept, 0

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
        skipped = self._over_limit == "skip_body" and self.size > self._store_limit
        truncated = not skipped and self.size > self._store_limit
        if not self._keep:
            return None
        if self._job is None:
            return Body(
                size=self.size, complete=complete, chunks=self._chunks, memory_size=self._kept
            )
        in_memory = (
            0 if self._memory_limit < self._store_limit else min(self.size, self._store_limit)
        )
        body = Body(
            size=self.size,
            complete=complete,
            truncated=truncated,
            skipped=skipped,
            job=self._job,
            memory_size=in_memory,
        )
        self._job.attach(body)  # before the final batch, which may cut the body short
        self._submit(final=True)
        self._outstanding.clear()
        return body

    def stop_keeping(self) -> None:
        """Count from now on, keep nothing (the exchange turned out not to need this body)."""
        self._keep = False
        self._chunks, self._kept = [], 0
        job, self._job = self._job, None
        if job is not None:
            self._submit_to(job, final=True)
            self._outstanding.clear()
            executor().submit(job.discard)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
