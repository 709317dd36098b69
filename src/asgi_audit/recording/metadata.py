"""The spool's metadata of one exchange: the one place an :class:`Exchange` becomes a dict.

The writer thread builds it (redaction steps then rewrite it) and the shipper turns it into
a :class:`~asgi_audit.sinks.record.StoredRecord`, whose fields these keys are: headers as
latin-1 strings, times as integers of nanoseconds, bodies described without their bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..capture.record import Body, Exchange


def body_metadata(body: Body | None) -> dict[str, Any] | None:
    """A body's description: exactly the chain's body fields, so that the record's
    metadata is its own canonical form (see :func:`~.chain.record_digest`)."""
    if body is None:
        return None
    sent_path = body.sent_path
    return {
        "size": body.file_size() if sent_path is not None else body.size,
        "sha256": body.known_sha256(),
        "stored": not body.skipped and sent_path is None,
        "truncated": body.truncated,
        "complete": body.complete,
        "sent_path": sent_path,
        "stored_sha256": None,
        "redacted": [],
        "unparseable": False,
    }


def _headers(pairs: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in pairs]


def exchange_metadata(exchange: Exchange) -> dict[str, Any]:
    """The spool's metadata for one exchange (latin-1 header strings, ns integers)."""
    client = exchange.client
    return {
        "schema": exchange.schema,
        "id": exchange.id,
        "stream": exchange.stream,
        "level": exchange.level.word,
        "method": exchange.method,
        "scheme": exchange.scheme,
        "host": exchange.host,
        "path": exchange.path,
        "query": exchange.query.decode("latin-1"),
        "http_version": exchange.http_version,
        "route": exchange.route,
        "client_host": client[0] if client else None,
        "client_port": client[1] if client else None,
        "started_at_ns": exchange.started_at_ns,
        "response_started_at_ns": exchange.response_started_at_ns,
        "duration_ns": exchange.duration_ns,
        "status": exchange.status,
        "outcome": exchange.outcome,
        "error": exchange.error,
        "correlation_id": exchange.correlation_id,
        "trace_id": exchange.trace_id,
        "service": exchange.service,
        "pod": exchange.pod,
        "namespace": exchange.namespace,
        "node": exchange.node,
        "request_headers": _headers(exchange.request_headers),
        "response_headers": _headers(exchange.response_headers),
        "response_trailers": _headers(exchange.response_trailers),
        "redacted_headers": [],
        "redacted_query": [],
        "request_size": exchange.request_size,
        "response_size": exchange.response_size,
        "request_body": body_metadata(exchange.request_body),
        "response_body": body_metadata(exchange.response_body),
    }
