"""``memory://``: records in a dict, for tests and for trying the pipeline without files.

Named stores (``memory://name``) are process-global so that a shipper thread and a test,
each opening the same URL, see one store; ``memory://`` alone is private to its instance.
Records are copied in and out, so a caller that mutates a record it wrote or read cannot
change what the store holds (body bytes are immutable and are shared, not copied).
"""

from __future__ import annotations

import copy
import heapq
import threading
from collections.abc import Iterator, Sequence

from ._common import matches, order_key, without_bodies
from .protocols import Query, SinkError
from .record import StoredRecord


class _Store:
    """The data of one memory store, shared by every sink opened on its name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, StoredRecord] = {}


_named: dict[str, _Store] = {}
_named_lock = threading.Lock()


def _store_named(name: str) -> _Store:
    with _named_lock:
        return _named.setdefault(name, _Store())


class MemorySink:
    """Sink and Reader over a dict by id; named stores outlive their instances."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self._store: _Store | None = _Store() if name is None else _store_named(name)

    def __repr__(self) -> str:
        return f"MemorySink(memory://{self.name or ''})"

    def _open_store(self) -> _Store:
        if self._store is None:
            raise SinkError(f"{self!r} is closed")
        return self._store

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        store = self._open_store()
        with store.lock:
            for record in records:
                if record.id not in store.records:
                    store.records[record.id] = copy.deepcopy(record)

    def search(self, query: Query) -> Iterator[StoredRecord]:
        store = self._open_store()
        with store.lock:
            found = [record for record in store.records.values() if matches(query, record)]
        if query.limit is None:
            found.sort(key=order_key, reverse=query.newest_first)
        else:
            pick = heapq.nlargest if query.newest_first else heapq.nsmallest
            found = pick(max(query.limit, 0), found, key=order_key)
        copies = [copy.deepcopy(record) for record in found]
        return iter(copies if query.with_bodies else [without_bodies(r) for r in copies])

    def get(self, record_id: str) -> StoredRecord | None:
        store = self._open_store()
        with store.lock:
            record = store.records.get(record_id)
        return None if record is None else copy.deepcopy(record)

    def count(self) -> int:
        store = self._open_store()
        with store.lock:
            return len(store.records)

    def close(self) -> None:
        self._store = None
