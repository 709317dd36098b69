"""Hash chains and checkpoints: what makes a stream's records tamper-evident.

Every record of a stream carries its sequence number (``seq``, from 1) and the digest of
the record before it (``chain_prev``; None for the first). A record's digest is the
SHA-256 of its *canonical form*: the record's fields as a sink stores them, each body
described by its size, the digest of the body as received and the digest of the bytes
actually stored, serialised as JSON with sorted keys and no whitespace. So editing any
field or one byte of a stored body changes that record's digest, which no longer matches
the next record's ``chain_prev``; deleting, inserting or swapping records breaks the
sequence or the links.

A chain alone proves nothing against someone who rewrites it from the edit onwards. So
the writer also writes *checkpoints*: at the stream's start (so that a stream without one
is not ours), every ``checkpoint_interval`` (also when nothing happened: silence is then
provable) and at shutdown (``final``). Each names the range of sequence numbers it covers,
the chain's head, the digest of the previous checkpoint, and is signed with the
operator's Ed25519 key (:mod:`.signing`) when one is configured. An edit that rewrites the
chain must then forge a signature.

The canonical form is specified here and in docs/architecture.md so that a tool of one's
own can check a store; :data:`RECORD_FIELDS` and :data:`BODY_FIELDS` are the whole of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .signing import Signer

CHAIN_VERSION = 1
CHECKPOINT_TYPE = "asgi-audit.checkpoint"

RECORD_FIELDS = (
    "schema",
    "id",
    "stream",
    "seq",
    "chain",
    "chain_prev",
    "level",
    "method",
    "scheme",
    "host",
    "path",
    "query",
    "http_version",
    "route",
    "client_host",
    "client_port",
    "started_at_ns",
    "response_started_at_ns",
    "duration_ns",
    "status",
    "outcome",
    "error",
    "correlation_id",
    "trace_id",
    "service",
    "pod",
    "namespace",
    "node",
    "request_headers",
    "response_headers",
    "response_trailers",
    "redacted_headers",
    "redacted_query",
    "request_size",
    "response_size",
    "request_body",
    "response_body",
)
"""The record's part of its canonical form: each is taken as stored (absent: null)."""

BODY_FIELDS = (
    "size",
    "sha256",
    "stored",
    "stored_sha256",
    "truncated",
    "complete",
    "sent_path",
    "redacted",
    "unparseable",
)
"""A body's part: ``stored_sha256`` is the SHA-256 of the stored bytes (after redaction and
truncation), which a verifier computes from the bytes, never reads from the record."""

_LIST_FIELDS = ("redacted_headers", "redacted_query")
_BODY_NAMES = ("request_body", "response_body")
_RECORD_KEYS = frozenset(RECORD_FIELDS)
_BODY_KEYS = frozenset(BODY_FIELDS)


def canonical(value: object) -> bytes:
    """JSON with sorted keys, no whitespace, UTF-8 (what digests and signatures cover)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def record_form(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical fields of a record given as its metadata (the spool's, or a sink's
    ``StoredRecord.metadata()`` with each body's ``stored_sha256`` computed). The writer
    builds one per record, on the thread beside the event loop: few Python steps."""
    get = meta.get
    form = {name: get(name) for name in RECORD_FIELDS}
    for name in _LIST_FIELDS:
        form[name] = list(form[name] or [])
    for name in _BODY_NAMES:
        value = form[name]
        if value is not None:
            body = {key: value.get(key) for key in BODY_FIELDS}
            body["redacted"] = list(body["redacted"] or [])
            body["unparseable"] = bool(body["unparseable"])
            form[name] = body
    return form


def record_digest(meta: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of the record's canonical form."""
    form = meta if _is_own_form(meta) else record_form(meta)
    return hashlib.sha256(canonical(form)).hexdigest()


def _is_own_form(meta: Mapping[str, Any]) -> bool:
    """Whether ``meta`` is already its canonical form (what :func:`record_form` would make
    of it is equal to it): exactly the fields, each body's too, with the lists and the
    flag as the form has them. The writer's metadata is, which spares it building a
    second dictionary per record on the thread beside the event loop."""
    if meta.keys() != _RECORD_KEYS:
        return False
    if any(type(meta[name]) is not list for name in _LIST_FIELDS):
        return False
    for name in _BODY_NAMES:
        body = meta[name]
        if body is not None and (
            type(body) is not dict
            or body.keys() != _BODY_KEYS
            or type(body["redacted"]) is not list
            or type(body["unparseable"]) is not bool
        ):
            return False
    return True


def checkpoint_digest(checkpoint: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's signed content (every field but ``signature``)."""
    return hashlib.sha256(signed_content(checkpoint)).hexdigest()


def signed_content(checkpoint: Mapping[str, Any]) -> bytes:
    return canonical({k: v for k, v in checkpoint.items() if k != "signature"})


MAX_LOST_RANGES = 64


@dataclass
class StreamChain:
    """One stream's chain as its writer keeps it: the head, the checkpoints so far, and
    the records it numbered but could not write (so that a checkpoint can say they were
    lost by the writer, not removed later). Writer thread only."""

    stream: str
    service: str
    pod: str | None = None
    signer: Signer | None = None
    head: str | None = None
    last_seq: int = 0
    _last_prev: str | None = None
    index: int = 0
    covered: int = 0
    """The last sequence number a checkpoint covers."""
    previous: str | None = None
    lost: list[list[int]] = field(default_factory=list)
    lost_more: int = 0

    def link(self, meta: dict[str, Any], seq: int) -> str:
        """Set ``meta``'s ``seq`` and ``chain_prev`` and make it the head; a record drafted
        again under the same number (one of its bodies turned out unreadable) takes the
        place of its first draft."""
        if seq == self.last_seq:
            prev = self._last_prev
        else:
            prev = self.head
            self._last_prev = prev
            self.last_seq = seq
        meta["seq"] = seq
        meta["chain"] = CHAIN_VERSION
        meta["chain_prev"] = prev
        self.head = record_digest(meta)
        return self.head

    def lose(self, seq: int) -> None:
        """Record ``seq`` was numbered and chained but never written."""
        if self.lost and self.lost[-1][1] + 1 == seq:
            self.lost[-1][1] = seq
        elif len(self.lost) < MAX_LOST_RANGES:
            self.lost.append([seq, seq])
        else:
            self.lost_more += 1

    def checkpoint(self, *, at_ns: int, final: bool = False) -> dict[str, Any]:
        """The next checkpoint, covering every record numbered since the previous one."""
        self.index += 1
        first = self.covered + 1
        checkpoint: dict[str, Any] = {
            "type": CHECKPOINT_TYPE,
            "version": CHAIN_VERSION,
            "stream": self.stream,
            "index": self.index,
            "at_ns": at_ns,
            "first_seq": first,
            "last_seq": self.last_seq,
            "count": self.last_seq - first + 1,
            "head": self.head,
            "previous": self.previous,
            "final": final,
            "service": self.service,
            "pod": self.pod,
            "lost": self.lost,
            "lost_more": self.lost_more,
            "key_id": None if self.signer is None else self.signer.key_id,
        }
        checkpoint["signature"] = (
            None if self.signer is None else self.signer.sign(signed_content(checkpoint))
        )
        self.covered = self.last_seq
        self.previous = checkpoint_digest(checkpoint)
        self.lost = []
        self.lost_more = 0
        return checkpoint


RETENTION_TYPE = "asgi-audit.retention"
RETENTION_STREAM = "asgi-audit.retention"
"""Retention markers are kept in the checkpoint store under this stream name, chained and
signed like a stream's checkpoints."""


def seq_ranges(seqs: Iterable[int]) -> list[list[int]]:
    """``[[1, 3], [7, 7]]`` for {1, 2, 3, 7}."""
    found: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if found and found[-1][1] + 1 == seq:
            found[-1][1] = seq
        else:
            found.append([seq, seq])
    return found


def retention_marker(
    *,
    index: int,
    previous: Mapping[str, Any] | None,
    at_ns: int,
    until_ns: int,
    removed: Mapping[str, Iterable[int]],
    dropped: list[str],
    signer: Signer | None,
) -> dict[str, Any]:
    """The record of what a retention run removes: every record that started before
    ``until_ns``, listed by stream and sequence number, so that ``verify`` can tell those
    gaps from deletions. Written before anything is removed."""
    marker: dict[str, Any] = {
        "type": RETENTION_TYPE,
        "version": CHAIN_VERSION,
        "stream": RETENTION_STREAM,
        "index": index,
        "at_ns": at_ns,
        "until_ns": until_ns,
        "removed": {stream: seq_ranges(seqs) for stream, seqs in sorted(removed.items())},
        "dropped": dropped,
        "previous": None if previous is None else checkpoint_digest(previous),
        "key_id": None if signer is None else signer.key_id,
    }
    marker["signature"] = None if signer is None else signer.sign(signed_content(marker))
    return marker
