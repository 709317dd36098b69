"""Builders of complete stored records for the store and CLI tests."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from typing import Any

from asgi_audit.sinks.record import StoredBody, StoredRecord

BASE_NS = 1_714_564_800 * 1_000_000_000
"""2024-05-01T12:00:00Z."""
SECOND_NS = 1_000_000_000
DAY_NS = 86_400 * SECOND_NS
LATIN1_HIGH = "".join(chr(code) for code in range(0x80, 0x100))


def body(data: bytes | None, **changes: Any) -> StoredBody:
    """A body whose size and digest are those of ``data`` unless overridden."""
    raw = data or b""
    stored = StoredBody(size=len(raw), sha256=hashlib.sha256(raw).hexdigest(), data=data)
    return dataclasses.replace(stored, **changes)


class Records:
    """Builds complete records: UUID ids, start times one second apart, realistic fields."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self, **changes: Any) -> StoredRecord:
        n = self.made
        self.made += 1
        started = BASE_NS + n * SECOND_NS
        request = f'{{"order": {n}}}'.encode()
        response = f'{{"id": {n}, "state": "created"}}'.encode()
        record = StoredRecord(
            id=str(uuid.uuid4()),
            stream="orders:orders-7f9c:1714564000",
            seq=n,
            level="RequestResponse",
            method="POST",
            scheme="https",
            host="api.example.test",
            path=f"/orders/{n}",
            query="verbose=1",
            http_version="1.1",
            route="/orders/{order_id}",
            client_host="10.0.0.7",
            client_port=51234,
            started_at_ns=started,
            response_started_at_ns=started + 2_000_000,
            duration_ns=3_000_000,
            status=201,
            outcome="complete",
            error=None,
            correlation_id=f"corr-{n}",
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
            service="orders",
            pod="orders-7f9c",
            namespace="shop",
            node="node-1",
            request_headers=[("content-type", "application/json"), ("authorization", "***")],
            response_headers=[("content-type", "application/json")],
            response_trailers=[],
            redacted_headers=["authorization"],
            request_size=len(request),
            response_size=len(response),
            request_body=body(request),
            response_body=body(response),
        )
        return dataclasses.replace(record, **changes)
