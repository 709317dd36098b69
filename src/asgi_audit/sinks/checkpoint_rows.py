"""A stream checkpoint as every sink keeps it: checked, as JSON text, and read back.

The sinks treat a checkpoint as opaque (its format, signing and verification belong to
the chain's own modules): what they need is the key it is stored and ordered by,
``(stream, index)``, its time ``at_ns`` (a column the SQL sinks keep for people writing
SQL), and its exact JSON text. The text is the source of truth: every sink stores it as
:func:`~asgi_audit.sinks.record.json_text` wrote it and parses it back, so ``verify`` gets
a dict equal to what the shipper handed over, and can check a signature over it.

Checked before anything is stored (:func:`checked`), so that a refusal leaves the sink as
it was: the three keys with their types and ranges (``index`` and ``at_ns`` go into 64-bit
columns), at most :data:`MAX_BYTES` of JSON, and a value that JSON gives back equal
(a tuple would come back a list, a key that is not a string a string, NaN ``NaN`` or
``null``; each would make a signed checkpoint fail verification later, for no fault of the
trail, so it is refused now, where the writer can see why).

Reads order by ``(stream, index)`` on the exact stream name taken from the JSON, in
Python (:func:`ordered`): what the SQL columns and the S3 keys hold is a bounded form of
the stream (:func:`asgi_audit.sinks.sql.bounded`, :func:`.s3.keys.stream_segment`),
whose order is not the names' order. A read therefore holds what it selected in memory:
checkpoints are small (a few hundred bytes) and few (one a stream now and then).

The rest is what the SQL sinks share for their ``checkpoints`` tables: the row, the WHERE
clause of a stream, and the rows read back (:func:`sql_rows`, :func:`stream_where`,
:func:`from_sql_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptRecord, RecordRefused
from .record import json_text
from .refusal import short
from .sql import INT64, Dialect, utf8_size

REQUIRED = ("stream", "index", "at_ns")
"""The keys every checkpoint has; the rest is the checkpoint format's own."""
MAX_BYTES = 1 << 20
"""The most UTF-8 bytes a checkpoint's JSON may take (they are a few hundred): a read
holds every checkpoint it selects, so one value must not be able to fill the memory."""
SHOWN = 3
"""Checkpoints named in a refusal's message."""

SQL_COLUMNS = ("stream", "idx", "at_ns", "body")
"""The columns of a ``checkpoints`` table, in the order of :func:`sql_rows`."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint: its key, its time, and its JSON text (the source of truth)."""

    stream: str
    index: int
    at_ns: int
    text: str

    @property
    def key(self) -> tuple[str, int]:
        """What a checkpoint is stored, de-duplicated and ordered by."""
        return (self.stream, self.index)

    def value(self) -> dict[str, Any]:
        """A fresh dict of the checkpoint (the caller may change it)."""
        value: dict[str, Any] = json.loads(self.text)
        return value


def problem(checkpoint: object) -> str | None:
    """Why ``checkpoint`` is not one a sink can keep (see the module docstring), or None."""
    if not isinstance(checkpoint, Mapping):
        return f"it is a {type(checkpoint).__name__}, not a JSON object"
    for name in REQUIRED:
        if name not in checkpoint:
            return f"it has no {name!r}"
    stream, index, at_ns = (checkpoint[name] for name in REQUIRED)
    if not isinstance(stream, str) or not stream:
        return f"'stream' is {_kind(stream)}, not a non-empty string"
    for name, number, low in (("index", index, 1), ("at_ns", at_ns, INT64[0])):
        if not isinstance(number, int) or isinstance(number, bool):
            return f"{name!r} is {_kind(number)}, not an integer"
        if not low <= number <= INT64[1]:
            return f"{name!r} {number} is outside [{low}, {INT64[1]}]"
    return None


def _kind(value: object) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def encoded(checkpoint: Mapping[str, Any]) -> Checkpoint | str:
    """The :class:`Checkpoint` of a mapping, or why it cannot be kept."""
    reason = problem(checkpoint)
    if reason is not None:
        return reason
    value = dict(checkpoint)
    try:
        text = json_text(value)
        back = json.loads(text)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        return f"it cannot be written as JSON ({type(exc).__name__}: {exc})"
    if back != value:
        return "JSON does not give it back equal (a tuple, a key that is not a string, NaN?)"
    if utf8_size(text) > MAX_BYTES:
        return f"its JSON takes {utf8_size(text)} bytes, over the {MAX_BYTES} a checkpoint may"
    return Checkpoint(value["stream"], value["index"], value["at_ns"], text)


def checked(checkpoints: Sequence[Mapping[str, Any]], label: str) -> list[Checkpoint]:
    """The checkpoints to store, the first copy of each ``(stream, index)`` in the order
    given; :class:`~asgi_audit.errors.RecordRefused` (``label`` starts its message) naming
    every one that cannot be kept, before anything is stored."""
    kept: dict[tuple[str, int], Checkpoint] = {}
    reasons: list[tuple[str, str]] = []
    for position, checkpoint in enumerate(checkpoints, start=1):
        made = encoded(checkpoint)
        if isinstance(made, str):
            reasons.append((describe(checkpoint, position), made))
        else:
            kept.setdefault(made.key, made)
    if len(reasons) == 1:
        ((which, reason),) = reasons
        raise RecordRefused(f"{label}: {which} refused: {short(reason)}")
    if reasons:
        details = "; ".join(f"{which}: {reason}" for which, reason in reasons[:SHOWN])
        more = len(reasons) - SHOWN
        details += f"; and {more} more" if more > 0 else ""
        raise RecordRefused(f"{label}: {len(reasons)} checkpoints refused ({short(details)})")
    return list(kept.values())


def describe(checkpoint: object, position: int | None = None) -> str:
    """``checkpoint 2 (stream 'a', index 7)``: which one, as far as it can be told."""
    where = "checkpoint" if position is None else f"checkpoint {position}"
    if not isinstance(checkpoint, Mapping):
        return where
    shown = [
        f"{name} {short(repr(checkpoint[name]))[:80]}"
        for name in ("stream", "index")
        if name in checkpoint
    ]
    return f"{where} ({', '.join(shown)})" if shown else where


def parse(text: str | bytes, source: str) -> Checkpoint:
    """A stored checkpoint read back; :class:`CorruptRecord` naming ``source`` when the
    text is not one (damaged, or edited by hand)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueError
        raise CorruptRecord(f"{source}: not a JSON checkpoint ({exc})") from exc
    reason = problem(value)
    if reason is not None:
        raise CorruptRecord(f"{source}: not a checkpoint ({reason})")
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # json.loads has read it as UTF-8 already
    return Checkpoint(value["stream"], value["index"], value["at_ns"], text)


def ordered(found: Iterable[Checkpoint], stream: str | None) -> list[dict[str, Any]]:
    """The values of ``found`` of ``stream`` (exactly; all when None), the first copy of
    each key, ordered by ``(stream, index)``."""
    kept: dict[tuple[str, int], Checkpoint] = {}
    for checkpoint in found:
        if stream is None or checkpoint.stream == stream:
            kept.setdefault(checkpoint.key, checkpoint)
    return [kept[key].value() for key in sorted(kept)]


# The SQL sinks' table -------------------------------------------------------------------


def sql_rows(
    checkpoints: Sequence[Checkpoint], dialect: Dialect
) -> list[tuple[str, int, int, str]]:
    """The values of :data:`SQL_COLUMNS` for each checkpoint: the stream as the records'
    ``stream`` column holds it (made safe and bounded: :meth:`Dialect.index`), the JSON
    text as it is (JSON text is valid UTF-8 without NUL, which both databases hold)."""
    return [(dialect.index(c.stream), c.index, c.at_ns, c.text) for c in checkpoints]


def stream_where(stream: str | None, dialect: Dialect) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or nothing) selecting the rows that may be ``stream``'s, and its
    parameters. The table was bounded from its start, so only the bounded form is looked
    up; it may select another stream (a short name equal to a long one's bounded form),
    which :func:`from_sql_rows` drops."""
    if stream is None:
        return "", []
    return f" WHERE stream = {dialect.placeholder}", [dialect.index(stream)]


def from_sql_rows(
    rows: Iterable[Sequence[Any]], stream: str | None, dialect: Dialect, table: str
) -> list[dict[str, Any]]:
    """The checkpoints of rows ``(stream, idx, body)`` read from ``table``, of ``stream``
    exactly, ordered (:func:`ordered`). :class:`CorruptRecord` for a body that is not a
    checkpoint, or not the one its key columns say (edited behind the sink's back)."""
    found: list[Checkpoint] = []
    for column_stream, idx, body in rows:
        source = f"{table}: checkpoint {idx} of stream {short(str(column_stream))[:80]!r}"
        checkpoint = parse(body, source)
        if checkpoint.index != idx or dialect.index(checkpoint.stream) != column_stream:
            raise CorruptRecord(f"{source}: its JSON is of another stream or index")
        found.append(checkpoint)
    return ordered(found, stream)
