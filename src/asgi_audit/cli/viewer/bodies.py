"""How the detail page shows a body: JSON indented, other text as text, binary as hex.

Always as text, never as markup: the templates escape it, and control characters and
bidi overrides are made visible first (:mod:`..terminal`), as ``show`` prints them. A body
sent with ``Content-Encoding: gzip`` or ``deflate`` is shown decoded (and says so); the
raw download gives the stored bytes. What is shown is bounded: text up to
:data:`MAX_SHOWN_CHARS`, binary as a hex dump of its first :data:`HEX_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from ...sinks.record import HeaderList, StoredBody
from ..har import decoded_body, header_value
from ..terminal import printable, printable_block, printable_json

MAX_SHOWN_CHARS = 2 << 20
HEX_BYTES = 4096


@dataclass(frozen=True)
class BodyView:
    """One body as shown: ``kind`` is ``absent`` (not kept at this level), ``unstored``
    (size and digest only), ``empty``, ``json``, ``text`` or ``hex``."""

    kind: str
    text: str = ""
    notes: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    downloadable: bool = False


def body_facts(body: StoredBody) -> list[str]:
    """The body's size, digest and flags, one phrase each."""
    facts = [f"{body.size:,} bytes", f"sha256 {printable(body.sha256)}"]
    if body.data is not None and len(body.data) != body.size:
        facts.append(f"{len(body.data):,} bytes stored")
    if body.truncated:
        facts.append("truncated: only the first bytes were kept")
    if not body.complete:
        facts.append("incomplete: the stream ended early")
    if body.sent_path:
        facts.append(f"sent from file {printable(body.sent_path)}")
    return facts


def body_view(body: StoredBody | None, headers: HeaderList) -> BodyView:
    """The view of ``body``, sent with ``headers``."""
    if body is None:
        return BodyView("absent", notes=["body not kept at this record's level"])
    facts = body_facts(body)
    if body.data is None:
        return BodyView("unstored", notes=["no bytes stored"], facts=facts)
    notes: list[str] = []
    shown = body.data
    coding = header_value(headers, "content-encoding")
    if coding and not body.truncated:
        decoded = decoded_body(shown, coding)
        if decoded is not shown:
            shown = decoded
            notes.append(
                f"shown decoded from {printable(coding)} ({len(decoded):,} bytes); "
                "the raw download is the stored bytes"
            )
    if not shown:
        return BodyView("empty", notes=notes, facts=facts, downloadable=True)
    kind, text = _as_text(shown)
    if kind == "hex":
        notes.append(
            f"binary: the first {min(len(shown), HEX_BYTES):,} of {len(shown):,} bytes as hex; "
            "download the raw body for all of it"
        )
    elif len(text) > MAX_SHOWN_CHARS:
        text = text[:MAX_SHOWN_CHARS]
        notes.append(
            f"the first {MAX_SHOWN_CHARS:,} characters are shown; download the raw body "
            "for all of it"
        )
    return BodyView(kind, text, notes, facts, downloadable=True)


def _as_text(data: bytes) -> tuple[str, str]:
    try:
        pretty = orjson.dumps(orjson.loads(data), option=orjson.OPT_INDENT_2)
        return "json", printable_json(pretty.decode("utf-8"))
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        pass
    try:
        return "text", printable_block(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "hex", hex_dump(data[:HEX_BYTES])


def hex_dump(data: bytes) -> str:
    """``xxd``-like lines: offset, 16 bytes in hex, and those bytes as ASCII (``.`` for
    the rest)."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{byte:02x}" for byte in chunk)
        text = "".join(chr(byte) if 0x20 <= byte < 0x7F else "." for byte in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  {text}")
    return "\n".join(lines)


def decoded_text(body: StoredBody | None, headers: HeaderList) -> bytes | None:
    """The body's stored bytes, with a whole gzip or deflate encoding undone (what the
    diff compares), or None when none are stored."""
    if body is None or body.data is None:
        return None
    coding = header_value(headers, "content-encoding")
    if coding and not body.truncated:
        return decoded_body(body.data, coding)
    return body.data
