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
from operator import attrgetter, itemgetter
from typing import Any

import orjson

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
        meta = _EMPTY_METADATA.copy()  # of its final size: filled without resizing
        meta.update(zip(_FIELD_NAMES, _field_values(self), strict=True))
        # Only the two body fields can hold a StoredBody: checking just those (rather than
        # every field) is what keeps this cheap enough to run once per record shipped.
        for name in _BODY_FIELDS:
            value = meta[name]
            if isinstance(value, StoredBody):
                meta[name] = body_metadata(value)
        return meta

    @classmethod
    def from_metadata(
        cls,
        meta: dict[str, Any],
        request_data: bytes | None = None,
        response_data: bytes | None = None,
    ) -> StoredRecord:
        """Rebuild a record from :meth:`metadata` output and the body bytes."""
        try:
            # Every field present (what the spool and :meth:`metadata` give): the values
            # are taken in C and passed by position. By keyword, with keys that came from
            # a JSON parser (not interned), matching 38 names cost more than the rest.
            values = list(_field_items(meta))
        except (KeyError, TypeError):
            return cls._from_partial_metadata(meta, request_data, response_data)
        for at in _HEADER_AT:
            values[at] = [(str(k), str(v)) for k, v in values[at] or []]
        values[_REQUEST_BODY_AT] = _stored_body(values[_REQUEST_BODY_AT], request_data)
        values[_RESPONSE_BODY_AT] = _stored_body(values[_RESPONSE_BODY_AT], response_data)
        return cls(*values)

    @classmethod
    def _from_partial_metadata(
        cls,
        meta: dict[str, Any],
        request_data: bytes | None = None,
        response_data: bytes | None = None,
    ) -> StoredRecord:
        """:meth:`from_metadata` of metadata without some fields (written before they
        were added: they take their defaults; a required one missing is a TypeError)."""
        values = dict(meta)
        for name in _HEADER_FIELDS:
            values[name] = [(str(k), str(v)) for k, v in values.get(name) or []]
        for name, data in (("request_body", request_data), ("response_body", response_data)):
            values[name] = _stored_body(values.get(name), data)
        # Keyed by the field names themselves (interned), not the JSON's keys: see above.
        return cls(**{name: values[name] for name in _FIELD_NAMES if name in values})


def _stored_body(body: dict[str, Any] | None, data: bytes | None) -> StoredBody | None:
    """A body from its :func:`body_metadata` and bytes."""
    if body is None:
        return None
    # By position (half the cost of by keyword, for two bodies a record shipped), in
    # the order of StoredBody's fields.
    return StoredBody(
        body["size"],
        body["sha256"],
        data if body["stored"] else None,
        body["truncated"],
        body["complete"],
        body.get("sent_path"),
        body.get("stored_sha256"),
        list(body.get("redacted") or []),
        bool(body.get("unparseable", False)),
    )


_FIELD_NAMES = tuple(item.name for item in dataclasses.fields(StoredRecord))
"""The record's field names in schema order (that of its ``__init__``), taken once:
``dataclasses.fields`` per call was a good part of what shipping a small record cost."""
_EMPTY_METADATA: dict[str, Any] = dict.fromkeys(_FIELD_NAMES)
_field_values = attrgetter(*_FIELD_NAMES)
"""A record's values of :data:`_FIELD_NAMES`, as one tuple fetched in C."""
_field_items = itemgetter(*_FIELD_NAMES)
"""A metadata dict's values of :data:`_FIELD_NAMES`, as one tuple fetched in C."""
_HEADER_FIELDS = ("request_headers", "response_headers", "response_trailers")
_BODY_FIELDS = ("request_body", "response_body")
_HEADER_AT = tuple(_FIELD_NAMES.index(name) for name in _HEADER_FIELDS)
_REQUEST_BODY_AT = _FIELD_NAMES.index("request_body")
_RESPONSE_BODY_AT = _FIELD_NAMES.index("response_body")


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


_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
"""What orjson would write but the standard library writes otherwise or refuses (a
dataclass, a datetime, a subclass of str, int, dict or list) is left to the latter."""


def json_text(value: object) -> str:
    """Compact JSON, readable non-ASCII, yet never failing on a lone surrogate.

    Text reaching a sink is latin-1 headers and server-decoded paths, so surrogates should
    not occur; if one does, the record is escaped to ASCII rather than refused, since a
    record the sink refuses would be retried forever and hold up its whole stream.

    Written by orjson (several times faster than :func:`json.dumps`, once per record
    shipped); what it refuses (a lone surrogate, an integer beyond 64 bits, a key that is
    not a string, a type it was told to pass through) is written by :func:`json.dumps` as
    before, which also raises the errors a caller reports for a value JSON cannot hold.
    """
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS).decode("utf-8")
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        pass
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value, separators=(",", ":"))
    return text
