"""One reading of a :class:`~asgi_audit.sinks.protocols.Query` for sinks that filter in
Python (memory, JSON Lines, S3 indexes), so that they answer exactly as the SQL sinks do;
the contract suite holds them to it."""

from __future__ import annotations

import dataclasses

from .protocols import Query
from .record import StoredRecord


def matches(query: Query, record: StoredRecord) -> bool:
    """Whether ``record`` passes every filter of ``query`` (limit and order aside)."""
    if query.since_ns is not None and record.started_at_ns < query.since_ns:
        return False
    if query.until_ns is not None and record.started_at_ns >= query.until_ns:
        return False
    if query.route is not None and record.route != query.route:
        return False
    if query.method is not None and record.method != query.method:
        return False
    if query.correlation_id is not None and record.correlation_id != query.correlation_id:
        return False
    if query.stream is not None and record.stream != query.stream:
        return False
    if query.status_low is None and query.status_high is None:
        return True
    # A status filter never matches an exchange that has no status (no response started).
    if record.status is None:
        return False
    if query.status_low is not None and record.status < query.status_low:
        return False
    return query.status_high is None or record.status <= query.status_high


def order_key(record: StoredRecord) -> tuple[int, str]:
    """The one order every sink uses: start time, then id to break ties stably."""
    return (record.started_at_ns, record.id)


def without_bodies(record: StoredRecord) -> StoredRecord:
    """The record with body bytes left out, as listings return it (sizes and digests kept)."""
    changes = {
        name: dataclasses.replace(body, data=None)
        for name in ("request_body", "response_body")
        if (body := getattr(record, name)) is not None
    }
    return dataclasses.replace(record, **changes) if changes else record
