"""Text as it may reach an operator's terminal: control characters made visible, URLs masked.

Nearly everything a record holds was chosen by a client: the path (``/admin/%1b%5d0%3b``
arrives decoded as ESC ] 0 ;), the query, header names and values, bodies. Printed as it
is, such text is obeyed by the terminal instead of shown: it retitles the window, moves
the cursor to paint fake lines over real ones, hides text, and on some terminals answers
back into the shell's input. Bidi overrides (U+202E...) are quieter but as misleading:
they reorder what is displayed, so ``/admin/gpj.exe`` can read as something else.

So every command that prints record text passes each value through one of these
functions, always (not only when standard output is a terminal: output piped into
``less -R`` or a file later ``cat``-ed reaches a terminal all the same); so does any
command printing text it did not write itself (a spool's stream names, a partition's
name, a path or URL from the command line or the environment). Each unsafe code point
becomes a visible escape, as coreutils ``ls`` and ``journalctl`` do:

* :func:`printable` for one-line values (paths, header values, ids, errors): every unsafe
  character, newline and tab included, becomes ``\\n``, ``\\t``, ``\\x1b``, ``\\u202e``...
* :func:`printable_block` for multi-line text (a body): the same, but newline and tab
  are kept, so the text keeps its shape.
* :func:`printable_json` for JSON text written by orjson or :mod:`json`: the unsafe
  characters that JSON leaves raw (DEL, C1, bidi controls, U+2028/U+2029) become
  ``\\uXXXX`` escapes, so the text is still JSON and decodes to the very same values.
* :func:`printable_url` and :func:`printable_error` for the sink URL and for error
  texts that may quote it: the password and secret-looking parameters masked
  (:func:`asgi_audit._urls.mask_url`), then made printable.
* :func:`unsafe_for_terminal` tells whether raw bytes (``show --raw``) would put control
  characters on a terminal; :func:`is_terminal` whether a stream is one.

A backslash is not escaped: text without control characters comes back unchanged, so a
literal ``\\x1b`` typed into a URL and an escaped ESC look alike. The escapes are for
eyes; where the exact value matters, ``show --raw`` and ``export`` give it.
"""

from __future__ import annotations

import re
from typing import IO, Any

from .._urls import mask_in, mask_url

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
"""Arabic letter mark, LRM, RLM, the embeddings and overrides (LRE, RLE, PDF, LRO, RLO)
and the isolates (LRI, RLI, FSI, PDI): invisible, and they reorder what is displayed."""
_LINE_SEPARATORS = "\u2028\u2029"
"""Line and paragraph separators: line breaks to ``str.splitlines`` and to some terminals
and viewers, which would split one printed record into two lines."""
_SURROGATES = "\ud800-\udfff"
"""Lone surrogates (a record written through ``surrogateescape``): not encodable, so
printing one would fail with UnicodeEncodeError instead of showing the rest."""

_OTHERS = f"\x7f-\x9f{_BIDI}{_LINE_SEPARATORS}{_SURROGATES}"
"""DEL, the C1 controls (0x80-0x9f: 0x9b is CSI to some terminals) and the above."""

_UNSAFE = re.compile(f"[\x00-\x1f{_OTHERS}]")
"""Everything :func:`printable` escapes: the C0 controls and the others."""
_UNSAFE_IN_BLOCK = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHERS}]")
"""What :func:`printable_block` escapes: the same but for tab (0x09) and newline (0x0a)."""
_UNSAFE_IN_JSON = re.compile(f"[\x00-\x09\x0b-\x1f{_OTHERS}]")
"""What :func:`printable_json` escapes: all but newline, which indented JSON is made of."""

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match[0]):04x}"


def printable(text: str) -> str:
    """``text`` on one line with every control character visible (``\\x1b``, ``\\n``,
    ``\\u202e``): for any single value from a record, a URL or an error. Text without
    control characters is returned unchanged (the very same object)."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)


def printable_block(text: str) -> str:
    """Like :func:`printable`, but newlines and tabs are kept: for multi-line text such as
    a body, which should keep its layout. A carriage return is escaped (``\\r``), since it
    can send the cursor back to overwrite what a line said."""
    if _UNSAFE_IN_BLOCK.search(text) is None:
        return text
    return _UNSAFE_IN_BLOCK.sub(_escape, text)


def printable_json(text: str) -> str:
    """JSON text (as orjson or :mod:`json` write it, one line or indented) with the
    characters JSON leaves raw in strings (DEL, C1, bidi controls, U+2028, U+2029, lone
    surrogates) written as ``\\uXXXX`` escapes: still JSON, and decoding to the same values,
    so ``show`` output can be pasted into ``jq`` and exports stay exact.

    Newlines are kept: indentation is made of them, and inside strings JSON has escaped
    them already. The other C0 characters never appear raw in such text, and would be
    escaped all the same if they did."""
    if _UNSAFE_IN_JSON.search(text) is None:
        return text
    return _UNSAFE_IN_JSON.sub(_json_escape, text)


_URL_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
"""A URL quoted inside a longer text (a driver's message), to be masked on its own."""
_LINE_BREAKS = re.compile(r"[ \t]*[\r\n]+[ \t]*")


def printable_url(url: str) -> str:
    """``url`` as the CLI may show it: password and secret parameters masked, then
    :func:`printable` (a URL from an environment variable can hold anything)."""
    return printable(mask_url(url))


def printable_error(text: str, url: str | None = None) -> str:
    """An error text (often a driver's, which may quote the URL it was given) as one
    printable line: every copy of ``url`` masked, as quoted by ``repr`` too, any other
    URL in the text masked as well, line breaks folded into spaces (CLI errors are one
    line), then :func:`printable`."""
    if url:
        text = mask_in(text, url)
        quoted = repr(url)[1:-1]
        if quoted != url:
            text = text.replace(quoted, repr(mask_url(url))[1:-1])
    text = _URL_TOKEN.sub(lambda match: mask_url(match[0]), text)
    return printable(_LINE_BREAKS.sub(" ", text).strip())


def unsafe_for_terminal(data: bytes) -> bool:
    """Whether writing ``data`` as it is would put control characters on a terminal: it
    is not UTF-8 (a raw 0x9b byte is CSI to some terminals), or it holds a character
    :func:`printable_block` would escape. Tab and newline are fine."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return _UNSAFE_IN_BLOCK.search(text) is not None


def is_terminal(stream: IO[Any]) -> bool:
    """Whether ``stream`` is a terminal (False for a closed or detached stream)."""
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


__all__ = [
    "is_terminal",
    "printable",
    "printable_block",
    "printable_error",
    "printable_json",
    "printable_url",
    "unsafe_for_terminal",
]
