"""What the detail page can say about one record's integrity, cheaply.

``asgi-audit verify`` walks whole streams; a page has one record. It can still check two
things at the cost of one bounded query:

* each stored body against ``stored_sha256``, the digest the writer chained (and, when
  nothing was cut or redacted, against the digest of the body as received);
* the chain link: the record's digest is recomputed from what the sink holds
  (:func:`~asgi_audit.recording.verification.summarize`) and compared with the
  ``chain_prev`` of the stream's next record (``seq + 1``), when that record is among the
  first :data:`NEXT_SEARCH_LIMIT` of its stream from :data:`NEXT_WINDOW_NS` before this
  one started (records are numbered as they finish, so the next may have started
  earlier). When it is not found the page says so; it proves nothing either way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...recording.verification import summarize
from ...sinks import Query, Sink
from ...sinks.record import StoredBody, StoredRecord

NEXT_WINDOW_NS = 60 * 1_000_000_000
NEXT_SEARCH_LIMIT = 200


@dataclass(frozen=True)
class Check:
    """One line of the integrity section: ``state`` is ``ok``, ``bad`` or ``unknown``."""

    subject: str
    state: str
    text: str


def stored_bytes(body: StoredBody | None) -> bytes | None:
    """The stored bytes of a body (None where none are stored), as verification reads them."""
    return None if body is None or not body.stored else body.data


def body_checks(record: StoredRecord) -> list[Check]:
    checks = []
    for side, body in (("request", record.request_body), ("response", record.response_body)):
        data = stored_bytes(body)
        if body is None or data is None:
            continue
        actual = hashlib.sha256(data).hexdigest()
        subject = f"{side} body"
        if body.stored_sha256 is None:
            checks.append(Check(subject, "unknown", "no digest of the stored bytes recorded"))
        elif actual == body.stored_sha256:
            checks.append(Check(subject, "ok", "stored bytes match their recorded digest"))
        else:
            checks.append(Check(subject, "bad", "stored bytes do NOT match their recorded digest"))
        cut = body.truncated or body.redacted or body.unparseable or not body.complete
        if not cut and body.size == len(data):
            state = "ok" if actual == body.sha256 else "bad"
            verb = "match" if state == "ok" else "do NOT match"
            checks.append(Check(subject, state, f"stored bytes {verb} the digest as received"))
    return checks


def chain_check(sink: Sink, record: StoredRecord) -> Check:
    """The chain link from this record to the next of its stream (blocking)."""
    if record.chain is None:
        return Check("chain", "unknown", "not chained (written before hash chains)")
    digest = summarize(
        record.metadata(), stored_bytes(record.request_body), stored_bytes(record.response_body)
    ).digest
    following = next_record(sink, record)
    if following is None:
        return Check("chain", "unknown", "not checked (next record not found)")
    if following.chain_prev == digest:
        return Check(
            "chain", "ok", f"record #{following.seq} links to this record's digest {digest[:16]}…"
        )
    return Check(
        "chain",
        "bad",
        f"record #{following.seq} links to another digest than this record's "
        f"({digest[:16]}…): this record, or that link, changed",
    )


def next_record(sink: Sink, record: StoredRecord) -> StoredRecord | None:
    """The record numbered ``seq + 1`` in the same stream, if the bounded search finds it."""
    query = Query(
        stream=record.stream,
        since_ns=max(0, record.started_at_ns - NEXT_WINDOW_NS),
        newest_first=False,
        limit=NEXT_SEARCH_LIMIT,
    )
    for candidate in sink.search(query):
        if candidate.seq == record.seq + 1 and candidate.id != record.id:
            return candidate
    return None


def integrity(sink: Sink, record: StoredRecord) -> list[Check]:
    """Every check the page shows (blocking: one sink query)."""
    return [*body_checks(record), chain_check(sink, record)]
