"""``memory://``: records in a dict, for tests and for trying the pipeline without files.

Named sinks (``memory://name``) are process-global so that a shipper thread and a test,
each opening the same URL, see one sink; ``memory://`` alone is private to its instance.
Records are copied in and out, so a caller that mutates a record it wrote or read cannot
change what the sink holds (body bytes are immutable and are shared, not copied).
Checkpoints are kept as their JSON text, as the other sinks keep them, so what comes back
is what JSON gives back there too.
"""

from __future__ import annotations

import copy
import heapq
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import SinkError
from . import checkpoint_rows
from .protocols import Query
from .query import matches, order_key, without_bodies
from .record import StoredRecord


class _Records:
    """The data of one memory sink, shared by every sink opened on its name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, StoredRecord] = {}
        self.checkpoints: dict[tuple[str, int], checkpoint_rows.Checkpoint] = {}


_named: dict[str, _Records] = {}
_named_lock = threading.Lock()


def _records_named(name: str) -> _Records:
    with _named_lock:
        return _named.setdefault(name, _Records())


class MemorySink:
    """A sink over a dict by id; named sinks outlive their instances."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self._data: _Records | None = _Records() if name is None else _records_named(name)

    def __repr__(self) -> str:
        return f"MemorySink(memory://{self.name or ''})"

    def _records(self) -> _Records:
        if self._data is None:
            raise SinkError(f"{self!r} is closed")
        return self._data

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        data = self._records()
        with data.lock:
            for record in records:
                if record.id not in data.records:
                    data.records[record.id] = copy.deepcopy(record)

    def search(self, query: Query) -> Iterator[StoredRecord]:
        data = self._records()
        with data.lock:
            found = [record for record in data.records.values() if matches(query, record)]
        if query.limit is None:
            found.sort(key=order_key, reverse=query.newest_first)
        else:
            pick = heapq.nlargest if query.newest_first else heapq.nsmallest
            found = pick(max(query.limit, 0), found, key=order_key)
        copies = [copy.deepcopy(record) for record in found]
        return iter(copies if query.with_bodies else [without_bodies(r) for r in copies])

    def get(self, record_id: str) -> StoredRecord | None:
        data = self._records()
        with data.lock:
            record = data.records.get(record_id)
        return None if record is None else copy.deepcopy(record)

    def count(self) -> int:
        data = self._records()
        with data.lock:
            return len(data.records)

    def write_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> None:
        data = self._records()
        found = checkpoint_rows.checked(checkpoints, repr(self))
        with data.lock:
            for checkpoint in found:
                data.checkpoints.setdefault(checkpoint.key, checkpoint)

    def checkpoints(self, stream: str | None = None) -> Iterator[dict[str, Any]]:
        data = self._records()
        with data.lock:
            found = list(data.checkpoints.values())
        return iter(checkpoint_rows.ordered(found, stream))

    def close(self) -> None:
        self._data = None


def check_url(url: str) -> None:
    """Every ``memory://`` URL is good: the name, if any, is the sink's."""


def open_url(url: str, *, create: bool = True) -> MemorySink:
    """``memory://name``: the process-wide sink of that name; ``memory://``: a new one."""
    return MemorySink(url.partition("://")[2] or None)
