"""Exports of stored records: JSON Lines (one object per record and line).

The field names of the JSON Lines export are part of the public interface (other tools
read them): ``id``, ``method``, ``path``, ``route``, ``status``, ``started_at`` (ISO 8601,
UTC), ``request_body_size``, ``request_body_sha256``, ``response_body_size``,
``response_body_sha256`` (lowercase hex), ``outcome``, and more; bodies only on request,
as UTF-8 text when they decode, else base64, with an explicit ``*_encoding`` field.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from ..sinks.record import StoredBody, StoredRecord


def iso(ns: int | None) -> str | None:
    """An epoch-nanosecond time as ISO 8601 in UTC with microseconds."""
    if ns is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat().replace("+00:00", "Z")


def public_dict(record: StoredRecord, *, bodies: bool = False) -> dict[str, Any]:
    """A record as the public, documented JSON object (JSON Lines export; the viewer and
    other exports build on it). Sinks keep :meth:`StoredRecord.metadata` instead, whose
    shape is theirs to version."""
    out: dict[str, Any] = {
        "id": record.id,
        "stream": record.stream,
        "seq": record.seq,
        "method": record.method,
        "scheme": record.scheme,
        "host": record.host,
        "path": record.path,
        "query": record.query,
        "route": record.route,
        "status": record.status,
        "outcome": record.outcome,
        "error": record.error,
        "level": record.level,
        "started_at": iso(record.started_at_ns),
        "duration_ms": round(record.duration_ns / 1e6, 3),
        "client": record.client_host,
        "correlation_id": record.correlation_id,
        "trace_id": record.trace_id,
        "service": record.service,
        "pod": record.pod,
        "namespace": record.namespace,
        "node": record.node,
        "request_headers": record.request_headers,
        "response_headers": record.response_headers,
        "redacted_headers": record.redacted_headers,
    }
    for side, body, size in (
        ("request", record.request_body, record.request_size),
        ("response", record.response_body, record.response_size),
    ):
        out[f"{side}_body_size"] = body.size if body is not None else size
        out[f"{side}_body_sha256"] = body.sha256 if body is not None else None
        out[f"{side}_body_truncated"] = body.truncated if body is not None else False
        out[f"{side}_body_complete"] = body.complete if body is not None else None
        if bodies:
            text, encoding = body_text(body)
            out[f"{side}_body"] = text
            out[f"{side}_body_encoding"] = encoding
    return out


def body_text(body: StoredBody | None) -> tuple[str | None, str | None]:
    """A body as JSON text: UTF-8 when it decodes, else base64; (None, None) when not kept."""
    if body is None or body.data is None:
        return None, None
    try:
        return body.data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(body.data).decode("ascii"), "base64"


def jsonl_line(record: StoredRecord, *, bodies: bool = False) -> bytes:
    return orjson.dumps(public_dict(record, bodies=bodies)) + b"\n"
