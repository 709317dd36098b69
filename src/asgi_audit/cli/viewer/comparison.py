"""Two exchanges side by side: what differs in their metadata, headers and bodies.

Bodies are compared as replay compares them: JSON structurally
(:func:`~asgi_audit.cli.jsondiff.compare`: members by name, numbers by value), other text
line by line (:mod:`difflib`, shown in two columns with a few lines of context), binary by
digest; a gzip or deflate encoding is undone first. The work is bounded: the first
:data:`MAX_TEXT_BYTES` of a text body and :data:`MAX_LINES` lines are diffed, and at most
:data:`MAX_ROWS` rows or :data:`MAX_DIFFERENCES` JSON differences are shown.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

import orjson

from ...sinks.record import HeaderList, StoredBody, StoredRecord
from ..exports import iso
from ..jsondiff import Difference, compare
from ..terminal import printable, printable_block, printable_json
from .bodies import decoded_text

MAX_TEXT_BYTES = 256 << 10
MAX_LINES = 2000
MAX_ROWS = 2000
MAX_DIFFERENCES = 500
MAX_VALUE_CHARS = 300
CONTEXT_LINES = 3


@dataclass(frozen=True)
class Row:
    """One compared value: ``a`` and ``b`` as shown."""

    name: str
    a: str
    b: str

    @property
    def differs(self) -> bool:
        return self.a != self.b


@dataclass(frozen=True)
class LineRow:
    """One row of a two-column text diff; ``tag`` is ``equal``, ``replace``, ``delete``,
    ``insert`` or ``skip`` (equal lines left out)."""

    tag: str
    left: str | None = None
    right: str | None = None
    left_number: int | None = None
    right_number: int | None = None


@dataclass
class BodyComparison:
    """One side's bodies compared: ``kind`` is ``same``, ``json``, ``text``, ``binary``
    or ``absent``."""

    side: str
    kind: str
    summary: str
    differences: list[Row] = field(default_factory=list)
    lines: list[LineRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    a: StoredRecord
    b: StoredRecord
    fields: list[Row]
    request_headers: list[Row]
    response_headers: list[Row]
    bodies: list[BodyComparison]

    @property
    def differing_fields(self) -> int:
        return sum(row.differs for row in self.fields)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return printable(", ".join(str(item) for item in value)) or "-"
    return printable(str(value)) or "-"


def _client(record: StoredRecord) -> str | None:
    if record.client_host is None:
        return None
    port = "" if record.client_port is None else f":{record.client_port}"
    return f"{record.client_host}{port}"


def _digest(body: StoredBody | None) -> str | None:
    return None if body is None else body.sha256


FIELDS: tuple[tuple[str, Any], ...] = (
    ("method", lambda r: r.method),
    ("scheme", lambda r: r.scheme),
    ("host", lambda r: r.host),
    ("path", lambda r: r.path),
    ("query", lambda r: r.query),
    ("route", lambda r: r.route),
    ("status", lambda r: r.status),
    ("outcome", lambda r: r.outcome),
    ("error", lambda r: r.error),
    ("started at", lambda r: iso(r.started_at_ns)),
    ("duration (ms)", lambda r: f"{r.duration_ns / 1e6:,.3f}"),
    ("HTTP version", lambda r: r.http_version),
    ("level", lambda r: r.level),
    ("client", _client),
    ("correlation id", lambda r: r.correlation_id),
    ("trace id", lambda r: r.trace_id),
    ("service", lambda r: r.service),
    ("pod", lambda r: r.pod),
    ("namespace", lambda r: r.namespace),
    ("node", lambda r: r.node),
    ("stream", lambda r: r.stream),
    ("seq", lambda r: r.seq),
    ("request size", lambda r: r.request_size),
    ("response size", lambda r: r.response_size),
    ("request sha256", lambda r: _digest(r.request_body)),
    ("response sha256", lambda r: _digest(r.response_body)),
    ("redacted headers", lambda r: r.redacted_headers),
    ("redacted query", lambda r: r.redacted_query),
)
"""What the metadata table compares, in the order shown (ids and chain links are not
compared: they always differ)."""


def compare_records(a: StoredRecord, b: StoredRecord) -> Comparison:
    """Everything the diff page shows (CPU-bound: run it in a thread)."""
    return Comparison(
        a,
        b,
        [Row(name, _text(get(a)), _text(get(b))) for name, get in FIELDS],
        header_rows(a.request_headers, b.request_headers),
        header_rows(a.response_headers, b.response_headers),
        [
            compare_bodies(
                "request", a.request_body, b.request_body, a.request_headers, b.request_headers
            ),
            compare_bodies(
                "response",
                a.response_body,
                b.response_body,
                a.response_headers,
                b.response_headers,
            ),
        ],
    )


def header_rows(a: HeaderList, b: HeaderList) -> list[Row]:
    """One row per header name (case-insensitive, in order of first appearance), the
    values of a repeated header on lines of their own."""
    names: dict[str, None] = {}
    for name, _ in (*a, *b):
        names.setdefault(name.lower(), None)

    def values(headers: HeaderList, name: str) -> str:
        found = [printable(value) for key, value in headers if key.lower() == name]
        return "\n".join(found) if found else "-"

    return [Row(printable(name), values(a, name), values(b, name)) for name in names]


def compare_bodies(
    side: str,
    a: StoredBody | None,
    b: StoredBody | None,
    a_headers: HeaderList,
    b_headers: HeaderList,
) -> BodyComparison:
    left, right = decoded_text(a, a_headers), decoded_text(b, b_headers)
    if left is None or right is None:
        which = "neither" if left is None and right is None else ("A" if left is None else "B")
        return BodyComparison(side, "absent", f"no stored {side} body in {which}")
    if left == right:
        return BodyComparison(side, "same", f"the same {len(left):,} bytes")
    left_json, right_json = _json(left), _json(right)
    if left_json is not _NOT_JSON and right_json is not _NOT_JSON:
        return _json_comparison(side, compare(left_json, right_json))
    left_text, right_text = _utf8(left), _utf8(right)
    if left_text is None or right_text is None:
        summary = (
            f"binary bodies differ ({len(left):,} bytes, sha256 "
            f"{hashlib.sha256(left).hexdigest()[:16]}… and {len(right):,} bytes, sha256 "
            f"{hashlib.sha256(right).hexdigest()[:16]}…)"
        )
        return BodyComparison(side, "binary", summary)
    return _text_comparison(side, left, right, left_text, right_text)


_NOT_JSON = object()


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _utf8(data: bytes) -> str | None:
    try:
        return data[:MAX_TEXT_BYTES].decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(data) > MAX_TEXT_BYTES and exc.start >= MAX_TEXT_BYTES - 3:
            return data[: exc.start].decode("utf-8")  # the cut fell inside a character
        return None


def _json_value(value: Any) -> str:
    """A JSON value as compact JSON (``null`` included), cut at :data:`MAX_VALUE_CHARS`."""
    text = printable_json(orjson.dumps(value).decode("utf-8"))
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "…"


def _json_comparison(side: str, differences: list[Difference]) -> BodyComparison:
    rows = [
        Row(
            f"{printable(found.path)} ({found.kind})",
            _json_value(found.expected) if found.kind != "added" else "(absent)",
            _json_value(found.actual) if found.kind != "missing" else "(absent)",
        )
        for found in differences[:MAX_DIFFERENCES]
    ]
    summary = (
        f"{len(differences):,} JSON differences"
        if differences
        else "the same JSON (written differently)"
    )
    notes = []
    if len(differences) > MAX_DIFFERENCES:
        notes.append(f"the first {MAX_DIFFERENCES} are shown")
    return BodyComparison(side, "json", summary, differences=rows, notes=notes)


def _text_comparison(
    side: str, left: bytes, right: bytes, left_text: str, right_text: str
) -> BodyComparison:
    notes = []
    if max(len(left), len(right)) > MAX_TEXT_BYTES:
        notes.append(f"only the first {MAX_TEXT_BYTES // 1024} KiB of each body are compared")
    left_lines = left_text.splitlines()
    right_lines = right_text.splitlines()
    if max(len(left_lines), len(right_lines)) > MAX_LINES:
        notes.append(f"only the first {MAX_LINES:,} lines of each body are compared")
    rows = line_rows(left_lines[:MAX_LINES], right_lines[:MAX_LINES])
    if not rows:
        notes.append("the lines compared are the same: the texts differ in line ends or further on")
    if len(rows) > MAX_ROWS:
        rows = rows[:MAX_ROWS]
        notes.append(f"the first {MAX_ROWS:,} rows of the diff are shown")
    return BodyComparison(side, "text", "the texts differ", lines=rows, notes=notes)


def line_rows(left: list[str], right: list[str]) -> list[LineRow]:
    """A two-column diff of two lists of lines: changed hunks with
    :data:`CONTEXT_LINES` of context, the equal lines between them as ``skip`` rows."""
    matcher = difflib.SequenceMatcher(None, left, right, autojunk=False)
    rows: list[LineRow] = []
    end = (0, 0)
    for group in matcher.get_grouped_opcodes(CONTEXT_LINES):
        _, i1, _, j1, _ = group[0]
        if (i1, j1) != end:
            rows.append(LineRow("skip"))
        for tag, i1, i2, j1, j2 in group:
            for i, j in zip_longest(range(i1, i2), range(j1, j2)):
                rows.append(
                    LineRow(
                        tag,
                        None if i is None else printable_block(left[i]),
                        None if j is None else printable_block(right[j]),
                        None if i is None else i + 1,
                        None if j is None else j + 1,
                    )
                )
        end = (group[-1][2], group[-1][4])
    if rows and end != (len(left), len(right)):
        rows.append(LineRow("skip"))
    return rows
