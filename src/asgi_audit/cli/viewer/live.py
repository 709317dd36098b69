"""The live tail: new records as server-sent events, polled from the sink.

A sink has no notifications, so each stream asks it every :attr:`Viewer.poll_seconds`
(in a thread) for the newest :data:`BATCH` records the filters select, and sends those it
has not sent. Records reach the sink late (the shipper delivers in batches, after
retries), so what was seen is remembered for :data:`LATE_NS` behind the newest, and no
more than :data:`MAX_SEEN` ids. Every event's ``id`` is the record's start time: when the
stream ends (after :attr:`Viewer.tail_seconds`) or breaks, the browser reconnects with
``Last-Event-ID`` and the stream resumes there (the script drops what it already shows).
A poll that finds nothing sends a comment line, so a client that left is noticed.

Bounded everywhere: one query per poll, :data:`BATCH` rows at most, a stream lasts
:attr:`Viewer.tail_seconds`. More than :data:`BATCH` new records between two polls are
not all shown: the tail is for watching, ``ls`` and the list are for reading everything.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from ...errors import SinkError
from ...sinks import Sink
from ...sinks.record import StoredRecord
from ..exports import printable_json_bytes
from ..main import size_text
from ..terminal import printable, printable_error
from .filters import FilterError, Filters, parse_filters
from .rendering import milliseconds, record_href, utc
from .state import Viewer

BATCH = 200
LATE_NS = 120 * 1_000_000_000
MAX_SEEN = 10_000


class Follower:
    """What is new in a sink since the last poll, for one stream (blocking methods)."""

    def __init__(self, sink: Sink, filters: Filters) -> None:
        self.sink = sink
        self.filters = filters
        self.seen: dict[str, int] = {}
        self.floor = 0
        """Records that started before this are not looked for again."""

    def start(self, resume_ns: int | None) -> list[StoredRecord]:
        """From ``resume_ns`` (a reconnection: what started since), else from now: the
        records there already count as seen."""
        if resume_ns is not None:
            self.floor = resume_ns
            return self.poll()
        newest = next(iter(self.sink.search(self.filters.query(limit=1))), None)
        self.floor = 0 if newest is None else max(0, newest.started_at_ns - LATE_NS)
        self.poll()
        return []

    def poll(self) -> list[StoredRecord]:
        """The records not sent yet, oldest first."""
        since = self.floor
        if self.filters.since_ns is not None:
            since = max(since, self.filters.since_ns)
        found = list(self.sink.search(self.filters.query(since_ns=since, limit=BATCH)))
        fresh = [record for record in reversed(found) if record.id not in self.seen]
        for record in fresh:
            self.seen[record.id] = record.started_at_ns
        self._forget()
        return fresh

    def _forget(self) -> None:
        if not self.seen:
            return
        times = sorted(self.seen.values())
        floor = times[-1] - LATE_NS
        if len(times) > MAX_SEEN:
            floor = max(floor, times[-MAX_SEEN])
        if floor > self.floor:
            self.floor = floor
            self.seen = {key: at for key, at in self.seen.items() if at >= floor}


def event(record: StoredRecord) -> bytes:
    """One record as an SSE ``record`` event: display texts made printable, one JSON line."""
    data = {
        "id": record.id,
        "href": record_href(record.id),
        "started_at": utc(record.started_at_ns),
        "method": printable(record.method),
        "status": record.status,
        "path": printable(record.path),
        "route": printable(record.route or "-"),
        "duration": milliseconds(record.duration_ns),
        "request_size": size_text(record.request_size),
        "response_size": size_text(record.response_size),
        "outcome": printable(record.outcome),
    }
    head = f"id: {record.started_at_ns}\nevent: record\ndata: ".encode("ascii")
    return head + printable_json_bytes(data) + b"\n\n"


def resume_point(header: str | None) -> int | None:
    """The ``Last-Event-ID`` a reconnecting browser sends back, if it is one of ours."""
    if header is None or not header.isdigit() or len(header) > 19:
        return None
    return int(header)


class Live:
    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer

    async def events(self, request: Request) -> Response:
        """``/tail/events?<filters>``: ``text/event-stream`` of new records."""
        try:
            filters = parse_filters(request.query_params)
        except FilterError as exc:
            return PlainTextResponse(f"400 {exc}\n", 400)
        resume = resume_point(request.headers.get("last-event-id"))
        return StreamingResponse(
            self.stream(Follower(self.viewer.sink, filters), resume),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    async def stream(self, follower: Follower, resume: int | None) -> AsyncIterator[bytes]:
        """One chunk per poll: the new records' events, or a comment. The first chunk
        (the reconnection delay and a ``ready`` event) comes once the records already
        there are known: anything stored after it is sent."""
        deadline = time.monotonic() + self.viewer.tail_seconds
        opening = b"retry: 2000\n\nevent: ready\ndata: {}\n\n"
        started = False
        while True:
            try:
                if started:
                    fresh = await run_in_threadpool(follower.poll)
                else:
                    fresh = await run_in_threadpool(follower.start, resume)
                    started = True
            except (SinkError, OSError) as exc:  # said, and tried again at the next poll
                chunk = problem(printable_error(str(exc), self.viewer.sink_url))
            else:
                chunk = b"".join(event(record) for record in fresh) or b": nothing new\n\n"
            yield opening + chunk
            opening = b""
            if time.monotonic() >= deadline:
                return
            await anyio.sleep(self.viewer.poll_seconds)


def problem(message: str) -> bytes:
    """A ``problem`` event: the sink failed (its URL masked in the message)."""
    return b"event: problem\ndata: " + printable_json_bytes({"message": message}) + b"\n\n"
