"""How a sink says "never": :class:`RecordRefused` for records it will not take.

The shipper retries every other exception, so a sink must raise ``RecordRefused`` only
for what sending the same records again cannot fix (a value too large for a column, text
the database cannot hold, a body over the store's size limit), and must leave outages,
timeouts, lock waits and full disks to :class:`SinkError`: a refusal takes the records at
fault out of delivery for good (the shipper quarantines them), so a refusal by mistake
costs records, while a retry by mistake costs only time.

When the sink knows which records are at fault (its own checks run record by record, or
the batch held one record), it names them in ``ids`` and the shipper quarantines those
without splitting the batch. A refusal by the database of a whole batch names no ids:
the shipper splits the batch to find them. Either way the message names the records (a
few of them) and the reason, never a password.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import RecordRefused

SHOWN_IDS = 3
"""Ids named in a message; a batch of 500 would otherwise make a 20 KB log line."""
REASON_CHARS = 500
"""A driver's message is cut to this: it may quote the value it refused."""


def which(ids: Sequence[str]) -> str:
    """``record a`` or ``records a, b, c and 12 more``, for messages."""
    if len(ids) == 1:
        return f"record {ids[0]}"
    shown = ", ".join(ids[:SHOWN_IDS])
    more = len(ids) - SHOWN_IDS
    return f"records {shown}" + (f" and {more} more" if more > 0 else "")


def short(reason: str) -> str:
    """``reason`` on one line, cut to :data:`REASON_CHARS` characters."""
    text = " ".join(reason.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "\u2026"


def refused(label: str, reasons: dict[str, str]) -> RecordRefused:
    """The refusal of the records a sink's own checks found at fault, by id: it knows
    them, so they are the refusal's ``ids``."""
    ids = tuple(reasons)
    if len(ids) == 1:
        ((record_id, reason),) = reasons.items()
        return RecordRefused(f"{label}: record {record_id} refused: {reason}", ids=ids)
    details = "; ".join(f"{record_id}: {reason}" for record_id, reason in reasons.items())
    return RecordRefused(
        f"{label}: {len(ids)} records refused ({short(details)})",
        ids=ids,
    )


def all_refused(label: str, ids: Sequence[str], reason: str) -> RecordRefused:
    """The refusal of every record of ``ids`` for one reason they share (the stream that
    names their object, say)."""
    return RecordRefused(f"{label}: {which(ids)} refused: {short(reason)}", ids=tuple(ids))


def batch_refused(label: str, ids: Sequence[str], reason: str) -> RecordRefused:
    """The refusal of a whole batch by the store, which did not say which record it was;
    a batch of one names its record (it can only be that one)."""
    text = short(reason)
    if len(ids) == 1:
        return RecordRefused(f"{label}: record {ids[0]} refused: {text}", ids=tuple(ids))
    return RecordRefused(
        f"{label}: batch of {len(ids)} ({which(ids)}) refused, record not known: {text}"
    )
