"""The record of one audited exchange (schema 1), and the bodies it carries.

An ``Exchange`` is built on the event loop from what the middleware saw, so building it
must stay cheap: it holds references, never copies or hashes. Work that costs CPU
(SHA-256 of in-memory bodies, joining chunks) happens when a consumer asks for it, off the
loop: in the recorder thread or the shipper.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from .._types import Headers
from .levels import Level
from .spill import SpillJob, executor

SCHEMA_VERSION = 1

Outcome = Literal["complete", "client_disconnected", "app_error"]

_READ_BLOCK = 1 << 20

_new = object.__new__


class Body:
    """A captured body: the stored bytes (in memory, in a spill file, or a file the app
    sent by path), the true size of the whole stream, and its SHA-256."""

    __slots__ = (
        "_chunks",
        "_digest",
        "_file",
        "_job",
        "_skipped",
        "_truncated",
        "complete",
        "memory_size",
        "size",
    )

    def __init__(
        self,
        *,
        size: int,
        complete: bool,
        truncated: bool = False,
        skipped: bool = False,
        chunks: list[bytes] | None = None,
        job: SpillJob | None = None,
        file: str | None = None,
        memory_size: int = 0,
    ) -> None:
        self.size = size
        self.memory_size = memory_size
        """Bytes this body holds in RAM (what a queue bounded in bytes counts)."""
        self.complete = complete
        self._truncated = truncated
        self._skipped = skipped
        self._chunks: list[bytes] | tuple[bytes, ...] = chunks if chunks is not None else []
        self._job = job
        self._file = file
        self._digest: str | None = None

    @classmethod
    def in_memory(
        cls, size: int, complete: bool, chunks: tuple[bytes, ...], memory_size: int
    ) -> Body:
        """A body whose bytes are all in ``chunks``: what an audited exchange's taps give
        for small bodies, twice per exchange, so it skips the keyword parsing of
        ``__init__``. A tuple rather than a list: the garbage collector stops tracking a
        tuple of bytes at its first pass, so records waiting in a recorder's queue do not
        make the older generations (and the full collections) grow."""
        body: Body = _new(cls)
        body.size = size
        body.memory_size = memory_size
        body.complete = complete
        body._truncated = body._skipped = False
        body._chunks = chunks
        body._job = None
        body._file = None
        body._digest = None
        return body

    @property
    def skipped(self) -> bool:
        """No bytes kept: over ``body_limit`` with ``skip_body``, or cut short by the spill
        worker (``spill_limit`` with ``skip_body``, a failed write); waits for the worker,
        which may still decide it, so call it off the loop for a spilled body."""
        if not self._skipped and self._job is not None:
            with contextlib.suppress(Exception):  # a failed job: reading the bytes says so
                self._wait()
        return self._skipped

    @skipped.setter
    def skipped(self, value: bool) -> None:
        self._skipped = value

    @property
    def truncated(self) -> bool:
        """Fewer bytes kept than the stream had; waits for the spill worker, as ``skipped``."""
        if not self._truncated and self._job is not None:
            with contextlib.suppress(Exception):
                self._wait()
        return self._truncated

    @truncated.setter
    def truncated(self, value: bool) -> None:
        self._truncated = value

    @classmethod
    def from_path(cls, path: str) -> Body:
        """A body the app sent with ``http.response.pathsend``: kept by reference."""
        return cls(size=-1, complete=True, file=path)

    @property
    def sent_path(self) -> str | None:
        """The file path of a ``pathsend`` response, else None."""
        return self._file

    @property
    def spill_path(self) -> str | None:
        """Where the stored bytes are, when they outgrew memory; waits for the worker."""
        self._wait()
        return None if self._job is None else self._job.path

    def _wait(self) -> None:
        if self._job is not None and self._job.last is not None:
            digest = self._job.last.result()
            if digest is not None:
                self._digest = digest

    def known_sha256(self) -> str | None:
        """The digest if it is already computed (spilled bodies), without hashing now;
        waits for the spill worker, so call it off the loop."""
        if self._job is not None:
            self._wait()
        return self._digest

    def sha256(self) -> str:
        """Lowercase hex SHA-256 of the whole stream (blocking: call it off the loop)."""
        if self._digest is None:
            if self._job is not None:
                self._wait()
            elif self._file is not None:
                self._digest = _hash_file(self._file)
            else:
                hasher = hashlib.sha256()
                for chunk in self._chunks:
                    hasher.update(chunk)
                self._digest = hasher.hexdigest()
        assert self._digest is not None
        return self._digest

    @property
    def stored_size(self) -> int:
        """Bytes actually kept (less than ``size`` when truncated or skipped)."""
        if self.skipped:
            return 0
        if self._file is not None:
            return self.file_size()
        if self._job is not None:
            self._wait()
            return self._job.stored
        return sum(len(c) for c in self._chunks)

    def file_size(self) -> int:
        """Size of a ``pathsend`` file, read from the file system when first asked."""
        if self._file is not None and self.size < 0:
            self.size = os.stat(self._file).st_size
        return self.size

    def chunks(self) -> Iterator[bytes]:
        """The stored bytes, in order, without joining them."""
        if self.skipped:
            return
        if self._job is not None:
            self._wait()
            if self._job.path is None:
                yield from self._job.prefix
                return
            yield from self._job.plain_blocks()  # spill files are encrypted
        elif self._file is not None:
            yield from _read_file(self._file)
        else:
            yield from self._chunks

    def read(self) -> bytes:
        """The stored bytes as one ``bytes`` object."""
        return b"".join(self.chunks())

    def discard(self) -> None:
        """Release the stored bytes and remove any spill file (never the app's own file)."""
        self._chunks = ()
        job = self._job
        if job is None:
            return
        if job.last is None or job.last.done():
            job.discard()
        else:
            executor().submit(job.discard)

    def __repr__(self) -> str:
        flags = "".join(
            f" {name}"
            for name, on in (
                ("truncated", self.truncated),
                ("skipped", self.skipped),
                ("incomplete", not self.complete),
            )
            if on
        )
        where = "file" if self._file else "spilled" if self._job and self._job.path else "memory"
        return f"<Body {self.size} bytes in {where}{flags}>"


def _hash_file(path: str) -> str:
    hasher = hashlib.sha256()
    for block in _read_file(path):
        hasher.update(block)
    return hasher.hexdigest()


def _read_file(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            yield block


@dataclass(slots=True)
class Exchange:
    """One audited HTTP exchange. Field names are the record schema (version 1)."""

    id: str
    stream: str
    level: Level
    method: str
    scheme: str
    host: str
    path: str
    query: bytes
    http_version: str
    client: tuple[str, int] | None
    request_headers: Headers
    started_at_ns: int
    started_mono_ns: int
    route: str | None = None
    status: int | None = None
    response_headers: Headers = field(default_factory=list)
    response_trailers: Headers = field(default_factory=list)
    response_started_mono_ns: int | None = None
    ended_mono_ns: int = 0
    request_body: Body | None = None
    response_body: Body | None = None
    request_size: int = 0
    response_size: int = 0
    outcome: Outcome = "complete"
    error: str | None = None
    correlation_id: str = ""
    trace_id: str | None = None
    service: str = ""
    pod: str | None = None
    namespace: str | None = None
    node: str | None = None
    schema: int = SCHEMA_VERSION
    on_written: Callable[[bool], None] | None = None
    """Not part of the record: called by the recorder, on its own thread, once the record
    is kept as durably as its policy promises (True) or cannot be (False); how the
    ``blocking`` modes hold a response's last message."""

    @property
    def duration_ns(self) -> int:
        """Nanoseconds from the request's arrival at the middleware to the exchange's end."""
        return self.ended_mono_ns - self.started_mono_ns

    @property
    def response_started_at_ns(self) -> int | None:
        """Wall-clock time of the response start, derived from the monotonic clock."""
        if self.response_started_mono_ns is None:
            return None
        return self.started_at_ns + self.response_started_mono_ns - self.started_mono_ns

    def discard(self) -> None:
        """Release both bodies (spill files included)."""
        for body in (self.request_body, self.response_body):
            if body is not None:
                body.discard()


class _UUID7:
    """Time-ordered ids (RFC 9562 UUIDv7), monotonic within a process.

    Made once per audited exchange on the event loop, so each step is the cheap one: the
    millisecond part (the first 14 characters) is formatted once per millisecond; the
    version and counter, then the variant and random bits, are written as bytes in hex
    (``bytes.hex`` puts the last group's dash in place), a third faster than formatting
    integers with format specs and than one 128-bit number formatted and sliced; and the
    lock is taken with ``acquire``/``release``, since ``with`` costs more than twice as
    much as those two calls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        self._prefix = _ms_prefix(0)
        """``_last_ms`` as the id's first two groups (``"0190a1b2-c3d4-"``)."""

    def __call__(self, now_ns: int | None = None) -> str:
        """A new id; ``now_ns`` is the wall-clock time when the caller knows it already
        (the capture derives it from the monotonic clock it reads anyway), else the
        clock is read."""
        ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
        lock = self._lock
        lock.acquire()
        try:
            if ms <= self._last_ms:
                counter = self._counter + 1
                if counter > 0xFFF:
                    self._last_ms += 1
                    self._prefix = _ms_prefix(self._last_ms)
                    counter = 0
                self._counter = counter
            else:
                self._last_ms = ms
                self._prefix = _ms_prefix(ms)
                self._counter = counter = _getrandbits(10)
            prefix = self._prefix
        finally:
            lock.release()
        version = (0x7000 | counter).to_bytes(2, "big").hex()  # "7" and the counter
        # The variant bits (0b10), then 62 random bits: "8a3f-0123456789ab".
        rest = (_VARIANT | _getrandbits(62)).to_bytes(8, "big").hex("-", 6)
        return f"{prefix}{version}-{rest}"


_LOW_48 = 0xFFFFFFFFFFFF
_VARIANT = 1 << 63


def _ms_prefix(ms: int) -> str:
    ms &= _LOW_48
    return f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-"


_getrandbits = random.getrandbits


new_record_id = _UUID7()

_streams = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who wrote a record: service, Kubernetes pod (downward API), and the stream id."""

    service: str
    pod: str | None
    namespace: str | None
    node: str | None
    stream: str

    @classmethod
    def current(cls, service: str) -> Identity:
        """Identity of one recorder in this process. The stream id names the service, the
        pod (or host), the pid and the start time, plus a counter so that two middlewares
        started in the same millisecond of one process never share a stream."""
        pod = os.environ.get("POD_NAME") or None
        namespace = os.environ.get("POD_NAMESPACE") or None
        node = os.environ.get("NODE_NAME") or None
        host = pod or os.uname().nodename
        started = time.time_ns() // 1_000_000
        stream = f"{service}.{host}.{os.getpid()}.{started}.{next(_streams)}"
        return cls(service, pod, namespace, node, stream)
