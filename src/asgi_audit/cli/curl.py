"""curl export: one shell command line per exchange that sends its request again.

Each line is for bash (or zsh, ksh): values are single-quoted, and a value holding a byte
a terminal or the shell would act on (control characters, non-ASCII) is ANSI-C quoted
(``$'\\x1b...'``), so the line prints safely and sends the exact bytes. The body goes
through standard input (``printf %s ... | curl --data-binary @-``): ``printf`` is a shell
built-in, so a 1 MB body is not bounded by the kernel's argument size, and a body with
NUL bytes is sent as ``base64 -d`` output.

Secrets are never written: a header the record names as redacted becomes
``-H "Authorization: $AUTHORIZATION"`` and a redacted query value ``$TOKEN``, which the
shell takes from the environment when the line runs; a body with redacted fields is sent
with the marker, and the line ends with a comment naming them. A request body that was
not stored whole (truncated, or not kept at the record's level) is said in a comment too.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import BinaryIO
from urllib.parse import unquote_plus

from ..sinks.record import StoredRecord
from .har import record_url

SKIPPED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Headers curl writes itself (from the URL and the body) or that belong to one connection."""

_PLAIN = re.compile(r"[\x20-\x7e]*")
_NOT_NAME = re.compile(r"[^A-Za-z0-9]+")

__all__ = ["curl_line", "shell_quote", "variable_name", "write_curl"]


def write_curl(records: Iterable[StoredRecord], out: BinaryIO) -> int:
    """Write one command line per record to ``out``; returns how many."""
    written = 0
    for record in records:
        out.write(curl_line(record).encode("ascii") + b"\n")
        written += 1
    return written


def curl_line(record: StoredRecord) -> str:
    """The command line that re-sends ``record``'s request (pure ASCII, one line)."""
    notes: list[str] = []
    # curl -X HEAD would wait for a body that never comes: -I is how curl sends HEAD
    method = ["-I"] if record.method == "HEAD" else ["-X", shell_quote(record.method)]
    parts = ["curl", "-sS", *method, "--url", _url(record)]
    redacted = set(record.redacted_headers)
    for name, value in record.request_headers:
        if name.lower() in SKIPPED_HEADERS:
            continue
        if name.lower() in redacted:
            parts += ["-H", shell_quote(f"{name}: ") + f'"${variable_name(name)}"']
        else:
            parts += ["-H", shell_quote(f"{name}: {value}")]
    body = record.request_body
    feed = ""
    if body is not None and body.data is not None and (body.data or body.size):
        feed = _feed(body.data)
        parts += ["--data-binary", "@-"]
        if body.truncated:
            notes.append(f"request body truncated: {len(body.data)} of {body.size} bytes sent")
        if body.redacted:
            notes.append("redacted in the body: " + ", ".join(body.redacted))
        if body.unparseable:
            notes.append("the body was not kept (redaction rules, unparseable)")
    elif record.request_size:
        notes.append(f"request body of {record.request_size} bytes not kept: none sent")
    line = " ".join(parts)
    if feed:
        line = f"{feed} | {line}"
    if notes:
        line += "  # " + _comment("; ".join(notes))
    return line


def variable_name(name: str) -> str:
    """The environment variable a secret ``name`` (header or query parameter) is read
    from: upper case, every run of other characters one underscore (``X-Api-Key`` →
    ``X_API_KEY``); a leading digit is prefixed with an underscore."""
    text = _NOT_NAME.sub("_", name).strip("_").upper() or "SECRET"
    return f"_{text}" if text[0].isdigit() else text


def shell_quote(text: str) -> str:
    """``text`` as one bash word giving its exact bytes (latin-1 for code points up to
    U+00FF, which is how records hold header bytes; UTF-8 beyond): single quotes when it
    is printable ASCII, else ANSI-C quoting with every other byte as ``\\xNN``."""
    if _PLAIN.fullmatch(text):
        return "'" + text.replace("'", "'\\''") + "'"
    return _ansi_c(_bytes_of(text))


def _bytes_of(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _ansi_c(data: bytes) -> str:
    out = []
    for byte in data:
        if byte in (0x27, 0x5C):  # ' and \
            out.append("\\" + chr(byte))
        elif 0x20 <= byte <= 0x7E:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


def _feed(data: bytes) -> str:
    """The pipeline head that writes ``data`` exactly to curl's standard input."""
    if b"\x00" in data:  # a shell word cannot hold NUL
        return f"printf %s '{base64.b64encode(data).decode('ascii')}' | base64 -d"
    if data.isascii() and _PLAIN.fullmatch(data.decode("ascii")):
        return "printf %s " + shell_quote(data.decode("ascii"))
    return "printf %s " + _ansi_c(data)


def _url(record: StoredRecord) -> str:
    """The URL as shell words: redacted query values become ``$NAME`` (double-quoted, so
    the shell expands them; the rest single-quoted, so it does not)."""
    url = record_url(record)
    if not record.redacted_query or "?" not in url:
        return shell_quote(url)
    base, _, query = url.partition("?")
    words = [shell_quote(base + "?")]
    secret = {name.lower() for name in record.redacted_query}
    for index, pair in enumerate(query.split("&")):
        name, equals, value = pair.partition("=")
        prefix = "&" if index else ""
        if equals and value and unquote_plus(name).lower() in secret:
            words.append(
                shell_quote(f"{prefix}{name}=") + f'"${variable_name(unquote_plus(name))}"'
            )
        else:
            words.append(shell_quote(prefix + pair))
    return "".join(words)


def _comment(text: str) -> str:
    """``text`` safe after ``#``: one line of printable ASCII."""
    return "".join(char if " " <= char <= "~" else f"\\x{ord(char):02x}" for char in text)
