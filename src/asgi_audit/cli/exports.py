"""Exports of stored records: JSON Lines (one object per record and line).

The field names of the JSON Lines export are part of the public interface (other tools
read them): ``id``, ``method``, ``path``, ``route``, ``status``, ``started_at`` (ISO 8601,
UTC), ``request_body_size``, ``request_body_sha256``, ``response_body_size``,
``response_body_sha256`` (lowercase hex), ``outcome``, and more; bodies only on request,
as UTF-8 text when they decode, else base64, with an explicit ``*_encoding`` field.

Each line is plain JSON, and safe to print: the characters JSON leaves raw but a terminal
obeys or a line splitter breaks at (DEL, C1, bidi controls, U+2028, U+2029) are written
as ``\\u`` escapes, which every JSON reader decodes to the very same string. A file
written with ``-o`` is readable by its owner only: it holds whole exchanges.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterable
from typing import Any, BinaryIO

import orjson

from ..sinks.record import StoredBody, StoredRecord
from .terminal import printable_json


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
        "redacted_query": record.redacted_query,
        "chain_prev": record.chain_prev,
    }
    for side, body, size in (
        ("request", record.request_body, record.request_size),
        ("response", record.response_body, record.response_size),
    ):
        out[f"{side}_body_size"] = body.size if body is not None else size
        out[f"{side}_body_sha256"] = body.sha256 if body is not None else None
        out[f"{side}_body_truncated"] = body.truncated if body is not None else False
        out[f"{side}_body_complete"] = body.complete if body is not None else None
        out[f"{side}_body_redacted"] = body.redacted if body is not None else []
        out[f"{side}_body_unparseable"] = body.unparseable if body is not None else False
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
    """One record as one line of JSON, with the characters JSON would leave raw but a
    terminal or ``str.splitlines`` would act on escaped (see the module docstring): an
    export is as often ``cat``-ed or split into lines as it is parsed, and the escapes cost
    no JSON reader anything.

    A lone surrogate (which a sink may hand back, and orjson refuses) is escaped by
    :mod:`json` instead, rather than failing the whole export at that record."""
    return printable_json_bytes(public_dict(record, bodies=bodies)) + b"\n"


def write_jsonl(records: Iterable[StoredRecord], out: BinaryIO, *, bodies: bool) -> int:
    """Write one :func:`jsonl_line` per record to ``out``; returns how many."""
    written = 0
    for record in records:
        out.write(jsonl_line(record, bodies=bodies))
        written += 1
    return written


def printable_json_bytes(document: Any) -> bytes:
    """``document`` as compact JSON (UTF-8), safe to print: what :func:`jsonl_line` and the
    HAR export write. A lone surrogate, which orjson refuses, is escaped by :mod:`json`."""
    try:
        text = orjson.dumps(document)
    except orjson.JSONEncodeError:
        text = json.dumps(document, separators=(",", ":")).encode("ascii")
    if text.isascii() and b"\x7f" not in text:  # the usual case, with nothing to escape
        return text
    return printable_json(text.decode("utf-8")).encode("utf-8")


def open_private(path: str) -> BinaryIO:
    """``path`` opened for writing and emptied, with mode 0600 whatever the umask: an
    export holds whole exchanges (personal data, tokens in bodies), which a umask of 022
    would leave readable by every local user. An existing file is narrowed to 0600
    before anything is written to it; a device or a pipe (``-o /dev/stdout``) is left as
    it is."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY
    descriptor = os.open(path, flags, 0o600)
    try:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.fchmod(descriptor, 0o600)  # first: a file we may not narrow is left intact
            os.ftruncate(descriptor, 0)
        return os.fdopen(descriptor, "wb")
    except BaseException:
        os.close(descriptor)
        raise
