"""The record as stored: what sinks write and give back.

An :class:`Exchange` lives on the event loop and holds references; a ``StoredRecord`` is
its settled form: plain metadata (JSON-friendly: headers as latin-1 strings, times as
integers of nanoseconds), the digests, and the stored body bytes. The shipper builds it
from the spool; every sink stores it and every reader returns it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..recording import packing

SCHEMA_VERSION = 1

HeaderList = list[tuple[str, str]]


@dataclass(slots=True)
class StoredBody:
    """One body as stored: its true size and digest, and the bytes kept (maybe fewer)."""

    size: int
    sha256: str
    data: bytes | None
    truncated: bool = False
    complete: bool = True
    sent_path: str | None = None
    stored_sha256: str | None = None
    """SHA-256 of the stored bytes (after redaction and truncation), as the writer
    chained it; ``verify`` recomputes it from the bytes."""
    redacted: list[str] = field(default_factory=list)
    """What redaction replaced in the stored bytes: JSON paths or form fields, no values."""
    unparseable: bool = False
    """The body had redaction rules but did not parse: only a marker is stored."""
    packed: bytes | None = field(default=None, compare=False, repr=False)
    """The kept bytes as the spool packed them (zstd), which a sink keeps as they are.
    On the way to a sink that keeps packed bodies, ``data`` is None and only these are
    set: the shipper does not unpack what nobody reads."""

    @property
    def stored(self) -> bool:
        """Whether any bytes were kept (as ``data``, or packed only)."""
        return self.data is not None or self.packed is not None

    @property
    def stored_size(self) -> int:
        if self.data is not None:
            return len(self.data)
        return 0 if self.packed is None else packing.packed_size(self.packed)


@dataclass(slots=True)
class StoredRecord:
    """One audited exchange, as kept by a sink. Field names are the schema (version 1)."""

    id: str
    stream: str
    seq: int
    level: str
    method: str
    scheme: str
    host: str
    path: str
    query: str
    http_version: str
    route: str | None
    client_host: str | None
    client_port: int | None
    started_at_ns: int
    response_started_at_ns: int | None
    duration_ns: int
    status: int | None
    outcome: str
    error: str | None
    correlation_id: str
    trace_id: str | None
    service: str
    pod: str | None
    namespace: str | None
    node: str | None
    request_headers: HeaderList = field(default_factory=list)
    response_headers: HeaderList = field(default_factory=list)
    response_trailers: HeaderList = field(default_factory=list)
    redacted_headers: list[str] = field(default_factory=list)
    redacted_query: list[str] = field(default_factory=list)
    request_size: int = 0
    response_size: int = 0
    request_body: StoredBody | None = None
    response_body: StoredBody | None = None
    schema: int = SCHEMA_VERSION
    chain: int | None = None
    """The chain's version when the record is chained (None: written before chains)."""
    chain_prev: str | None = None
    """The digest of the stream's previous record (None for its first): see
    :mod:`asgi_audit.recording.chain`."""

    @property
    def started_at(self) -> datetime:
        """Wall-clock start of the exchange, as an aware UTC datetime."""
        return datetime.fromtimestamp(self.started_at_ns / 1e9, tz=UTC)

    def metadata(self) -> dict[str, Any]:
        """Every field but the body bytes, JSON-friendly (what indexes and listings use)."""
        meta: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, StoredBody):
                value = body_metadata(value)
            meta[item.name] = value
        return meta

    @classmethod
    def from_metadata(
        cls,
        meta: dict[str, Any],
        request_data: bytes | None = None,
        response_data: bytes | None = None,
    ) -> StoredRecord:
        """Rebuild a record from :meth:`metadata` output and the body bytes."""
        values = dict(meta)
        for name in ("request_headers", "response_headers", "response_trailers"):
            values[name] = [(str(k), str(v)) for k, v in values.get(name) or []]
        for name, data in (("request_body", request_data), ("response_body", response_data)):
            body = values.get(name)
            values[name] = (
                None
                if body is None
                else StoredBody(
                    size=body["size"],
                    sha256=body["sha256"],
                    data=data if body["stored"] else None,
                    truncated=body["truncated"],
                    complete=body["complete"],
                    sent_path=body.get("sent_path"),
                    stored_sha256=body.get("stored_sha256"),
                    redacted=list(body.get("redacted") or []),
                    unparseable=bool(body.get("unparseable", False)),
                )
            )
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def body_metadata(body: StoredBody) -> dict[str, Any]:
    """A body's description without its bytes."""
    return {
        "size": body.size,
        "sha256": body.sha256,
        "stored": body.stored,
        "stored_size": body.stored_size,
        "truncated": body.truncated,
        "complete": body.complete,
        "sent_path": body.sent_path,
        "stored_sha256": body.stored_sha256,
        "redacted": body.redacted,
        "unparseable": body.unparseable,
    }


def kept_bytes(body: StoredBody | None) -> tuple[bytes | None, packing.Encoding]:
    """What a sink keeps of ``body`` and its encoding: the spool's packed form when the
    writer made one (not unpacked and packed again), else :func:`packing.encode`."""
    if body is None:
        return None, "identity"
    if body.packed is not None:
        return body.packed, "zstd"
    return packing.encode(body.data)


def json_text(value: object) -> str:
    """Compact JSON, readable non-ASCII, yet never failing on a lone surrogate.

    Text reaching a sink is latin-1 headers and server-decoded paths, so surrogates should
    not occur; if one does, the record is escaped to ASCII rather than refused, since a
    record the sink refuses would be retried forever and hold up its whole stream.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value, separators=(",", ":"))
    return text
