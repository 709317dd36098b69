"""Body redaction: the spool must never hold a password, a card number or a token.

Headers are easy to redact; bodies are where the secrets really are (login forms, payment
requests, OAuth token responses). A body is redacted by meaning, not by text search: a
JSON document is parsed and walked, so a secret is found at any depth, under any key
spelling (``new_password``, ``clientSecret``, ``X-Api-Key``), or by its shape (a card
number, a JWT) under an innocent key; a form body goes through the same pair logic as
query strings (:mod:`.redact_query`).

Only bodies we can read have rules. A JSON or form body that cannot be read (malformed,
truncated, compressed in a way we cannot undo, too big once decompressed) might hold
anything, so by default it is replaced whole (``[UNPARSEABLE]``) rather than stored in
clear; every other type (images, text, multipart) is stored as it is.

A redacted JSON body is stored re-encoded (compact, by orjson): the bytes stored are not
the bytes received, and cannot be. The record keeps the size and SHA-256 of the body as
received, so the exchange can still be matched to other logs; the caller handles that.
A compressed body stays compressed with the same Content-Encoding, so the stored bytes
still agree with the stored headers.

This runs on the spool writer thread for every audited body, up to megabytes, so the walk
is iterative (no depth limit, no recursion), caches its per-key decisions, and tests a
value's length and first character before any pattern.
"""

from __future__ import annotations

import gc
import json
import math
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import orjson

from .needles import FOLD, FOLD_DELETED, Prefilter, Shape
from .redact import MARKER
from .redact_query import (
    CARD_FIRST_DIGITS,
    form_marker,
    is_card_number,
    is_jwt,
    luhn,
    redact_pairs,
)

__all__ = [
    "DEFAULT_SECRET_FIELDS",
    "MAX_DECODED",
    "MAX_PATHS",
    "UNPARSEABLE",
    "BodyRedaction",
    "BodyRedactor",
    "body_kind",
]

DEFAULT_SECRET_FIELDS = (
    "password",
    "passwd",
    "secret",
    "token",
    "accesstoken",
    "refreshtoken",
    "clientsecret",
    "apikey",
    "authorization",
    "cvv",
    "cvc",
    "pin",
    "privatekey",
)
"""Secret key names, normalised (lower case, without ``_``, ``-`` and ``.``). A key
matches when it normalises to one of them or, for names of five letters or more, ends
with one (``new_password``, ``id_token``; ``pin`` matches ``pin`` only)."""

SUFFIX_MIN = 5
"""Names this long or longer also match as the end of a key."""

UNPARSEABLE = b"[UNPARSEABLE]"
"""What is stored instead of a body that had rules but could not be read."""

MAX_DECODED = 64 * 1024 * 1024
"""Default bound on a decompressed body; more than that is unparseable."""

MAX_PATHS = 100
"""At most this many paths are reported, then one ``"… N more"`` entry."""

ROOT = "$"
"""The path reported when the whole document is a secret scalar."""

Unparseable = Literal["redact", "keep"]
Kind = Literal["json", "form", "sniff"]

_Path: TypeAlias = "tuple[_Path, str | int] | None"
"""A path as the walk builds it: (parent path, key or index), formatted only if reported."""
_State: TypeAlias = "frozenset[tuple[int, int]] | None"
"""Where the ``fields`` patterns stand: (pattern, next segment) pairs; None when none can
match any more."""
_Frame: TypeAlias = "tuple[Any, Any, _Path, _State, bool]"
"""A container being walked: (its (key, value) iterator, it, its path, the patterns' state,
whether its keys are tested one by one)."""

_GZIP = 16 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_RAW = -zlib.MAX_WBITS
_CODINGS: dict[str, str] = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
_JSON_START = re.compile(rb"[ \t\r\n]*[\[{]")
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19
"""19 digits in a row: may be an integer beyond 64 bits, which orjson reads as a float."""
_INT_CARD_MIN = 2 * 10**12
_INT_CARD_END = 10**19
_CANDIDATE_FIRST = frozenset("0123456789e")
_VALUE_SHAPES = bytes.maketrans(
    bytes(range(256)),
    bytes(
        48
        if 48 <= c <= 57  # digits
        else 113
        if c in b'":,['  # what a whole value follows
        else 50
        for c in range(256)
    ),
)
_SEPARATORS = b" -\t\r\n"
"""Deleted before looking for digit runs: what may group a card's digits, or stand
between a value and what it follows."""
_CARD_RUN = b"0" * 13


def _may_hold_card(body: bytes) -> bool:
    """Whether a whole JSON value (a string, or an integer) could be a card number: 13
    digits or more once spaces and hyphens are taken out, right after a quote, a colon,
    a comma or a bracket. Digits inside a longer text, a float's fraction or a date
    (8 digits) are not. One translation and one search, so that the usual body (no such
    run) is never parsed for it."""
    shapes = body.translate(_VALUE_SHAPES, _SEPARATORS)
    return b"q" + _CARD_RUN in shapes or shapes.startswith(_CARD_RUN)


_NAME_NEEDLES: tuple[bytes, ...] = (
    *(b"passw", b"secret", b"token", b"apikey", b"authorization", b"privatekey"),
    *(b'"cv', b'"pin"'),
)
"""What every default secret name contains once folded (lower case, ``_-.`` removed):
``passw`` for password and passwd, ``token`` for access and refresh tokens, ``secret``
for client secrets; the short names only as whole keys."""


_ESCAPE_FOUND: tuple[Shape, ...] = ((rb"\\u", lambda body: b"\\u" in body),)
"""A ``\\u`` escape could spell any name or value (a name given with non-ASCII letters)."""
_ASCII_ESCAPE = re.compile(rb"\\u00[0-7][0-9A-Fa-f]")
_ASCII_ESCAPE_FOUND: tuple[Shape, ...] = (
    (_ASCII_ESCAPE.pattern, lambda body: _ASCII_ESCAPE.search(body) is not None),
)
"""An escape of an ASCII character (``\\u0070``): the only ones that can spell an ASCII
name, a digit or a JWT. Escaped accents and symbols (``\\u00eb``, ``\\u2713``, which
Python's ``json.dumps`` writes by default) cannot, so such a body is not parsed for them."""
_VALUE_SHAPES_FOUND: tuple[Shape, ...] = (
    (rb"eyJ", lambda body: b"eyJ" in body),  # how a JWT starts
    (rb"(?:^|[\":,\[])(?:[ \-\t\r\n]*[0-9]){13}", _may_hold_card),
)
"""What card numbers and JWTs look like, for :class:`Prefilter`: the card's expression is
:func:`_may_hold_card`'s test (13 digits with separators between, after a quote, colon,
comma, bracket or at the start)."""


def _fold(key: str) -> bytes:
    """A key as the prefilter compares it: UTF-8, ASCII lower case, without ``_-.``."""
    return key.encode("utf-8").translate(FOLD, FOLD_DELETED)


"""A string value is tested only if it starts with one of these (a card, ``eyJ``)."""


class _Unreadable(Exception):
    """The body could not be decoded; ``head`` is what was decoded before giving up."""

    def __init__(self, head: bytes = b"") -> None:
        super().__init__()
        self.head = head


@dataclass(frozen=True, slots=True)
class BodyRedaction:
    """What to store instead of a body: its redacted bytes, and where secrets were.

    ``paths`` names what was replaced (JSON paths such as ``card.number`` or
    ``items[0].token``, or form field names), never a value. ``unparseable`` means the
    body had rules, could not be read, and ``data`` is :data:`UNPARSEABLE` (not encoded
    with the body's Content-Encoding).
    """

    data: bytes
    paths: list[str]
    unparseable: bool = False


_ASCII_LOWER = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}


def _normalise(key: str) -> str:
    """A key as secret names are compared: ASCII lower case (as the byte prefilter folds
    it: a Kelvin sign does not make ``toKen`` a token, in either), without ``_``, ``-``
    and ``.``."""
    return key.translate(_ASCII_LOWER).replace("_", "").replace("-", "").replace(".", "")


class _SecretNames:
    """Decides whether a key names a secret (see :data:`DEFAULT_SECRET_FIELDS`)."""

    __slots__ = ("exact", "suffixes")

    def __init__(self, defaults: bool, extra: Iterable[str] = ()) -> None:
        names = set(DEFAULT_SECRET_FIELDS) if defaults else set()
        self.suffixes = tuple(sorted(name for name in names if len(name) >= SUFFIX_MIN))
        names.update(_normalise(name) for name in extra)
        names.discard("")
        self.exact = frozenset(names)

    def __bool__(self) -> bool:
        return bool(self.exact)

    def __call__(self, key: str) -> bool:
        key = _normalise(key)
        return key in self.exact or key.endswith(self.suffixes)


def _compile_field(pattern: object) -> tuple[str, ...]:
    if not isinstance(pattern, str):
        raise ValueError(f"fields: each pattern must be a string (got {pattern!r})")
    if not pattern:
        raise ValueError("fields: empty pattern (expected dot-separated keys like 'card.number')")
    segments = tuple(pattern.split("."))
    for segment in segments:
        if not segment:
            raise ValueError(
                f"fields: {pattern!r} has an empty segment "
                "(expected dot-separated keys like 'card.number' or '**.ssn')"
            )
        if "*" in segment and segment not in ("*", "**"):
            raise ValueError(
                f"fields: {pattern!r}: '*' and '**' must be whole segments (got {segment!r})"
            )
    return segments


class _Fields:
    """The user's ``fields`` patterns as a small automaton over object keys: ``*`` is one
    key, ``**`` zero or more, anything else one key spelled exactly; arrays are
    transparent. Transitions are cached per body by the walk."""

    __slots__ = ("patterns", "start")

    def __init__(self, patterns: tuple[tuple[str, ...], ...]) -> None:
        self.patterns = patterns
        self.start: _State = self._closure({(index, 0) for index in range(len(patterns))})

    def _closure(self, state: set[tuple[int, int]]) -> _State:
        todo = list(state)
        while todo:
            index, position = todo.pop()
            pattern = self.patterns[index]
            if position < len(pattern) and pattern[position] == "**":
                following = (index, position + 1)
                if following not in state:
                    state.add(following)
                    todo.append(following)
        return frozenset(state) if state else None

    def step(self, state: frozenset[tuple[int, int]], key: str) -> tuple[_State, bool]:
        """The state below ``key``, and whether ``key``'s value is matched."""
        following: set[tuple[int, int]] = set()
        for index, position in state:
            pattern = self.patterns[index]
            if position == len(pattern):
                continue
            segment = pattern[position]
            if segment == "**":
                following.add((index, position))
            elif segment == "*" or segment == key:
                following.add((index, position + 1))
        result = self._closure(following)
        matched = result is not None and any(
            position == len(self.patterns[index]) for index, position in result
        )
        return result, matched


def body_kind(content_type: str | None) -> Kind | None:
    """Which rules a body sent with ``content_type`` has: ``json``, ``form``, ``sniff``
    (no type: JSON if it starts like JSON) or None (none: stored as it is)."""
    if content_type is None:
        return "sniff"
    media = content_type.split(";", 1)[0].strip().lower()
    if not media:
        return "sniff"
    if media in ("application/json", "text/json") or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return "json"
    if media == "application/x-www-form-urlencoded":
        return "form"
    return None


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """Decompress ``data`` (gzip members one after another when ``wbits`` is gzip's),
    never producing more than ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    rest = data
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            chunk = inflater.decompress(rest, limit - size + 1)
        except zlib.error:
            raise _Unreadable(b"".join(parts)[:64]) from None
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _Unreadable(b"".join(parts[:2])[:64])
        if not inflater.eof:  # truncated
            raise _Unreadable(b"".join(parts)[:64])
        rest = inflater.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if wbits != _GZIP:
            raise _Unreadable(b"".join(parts)[:64])


def _decode(data: bytes, coding: str | None, limit: int) -> tuple[bytes, int | None]:
    """The decoded body, and the wbits to compress a replacement with (None: identity)."""
    if coding is None:
        return data, None
    if coding == "gzip":
        return _inflate(data, _GZIP, limit), _GZIP
    if coding == "deflate":  # zlib-wrapped as RFC 9110 says, or raw as some servers send
        wbits = _ZLIB if _zlib_header(data) else _RAW
        return _inflate(data, wbits, limit), wbits
    raise _Unreadable()


def decode_content(data: bytes, content_encoding: str | None, limit: int) -> bytes | None:
    """``data`` with its ``Content-Encoding`` (gzip, deflate) undone, at most ``limit``
    bytes; None when there is none to undo, an unknown one, or it does not decode whole
    (exports and replay show such a body as it was stored)."""
    coding = _coding(content_encoding)
    if coding is None or not data:
        return None
    try:
        return _decode(data, coding, limit)[0]
    except _Unreadable:
        return None


def _zlib_header(data: bytes) -> bool:
    """Whether ``data`` starts with a zlib header (RFC 1950: deflate, header check)."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0


def _encode(data: bytes, wbits: int | None) -> bytes:
    if wbits is None:
        return data
    deflater = zlib.compressobj(wbits=wbits)
    return deflater.compress(data) + deflater.flush()


def _coding(content_encoding: str | None) -> str | None:
    """``gzip``, ``deflate``, None for identity, or the unknown coding as given."""
    if content_encoding is None:
        return None
    token = content_encoding.strip().lower()
    if token in ("", "identity"):
        return None
    return _CODINGS.get(token, token)


def _has_content(value: Any) -> bool:
    """False for null, an empty string and empty containers: nothing to hide."""
    if value is None:
        return False
    kind = type(value)
    return not (kind is str or kind is dict or kind is list) or bool(value)


def _secret_string(value: str) -> bool:
    return is_card_number(value) if value[0] != "e" else is_jwt(value)


def _secret_scalar(value: Any) -> bool:
    kind = type(value)
    if kind is str:
        return is_card_number(value) or is_jwt(value)
    if kind is int:
        return _INT_CARD_MIN <= value < _INT_CARD_END and _card_int(value)
    return False


def _card_int(value: int) -> bool:
    """An integer (13 to 19 digits) that is a card number: a card network's first digit
    and the Luhn check."""
    digits = str(value)
    return digits[0] in CARD_FIRST_DIGITS and luhn(digits)


def _format_path(path: _Path) -> str:
    """``items[0].token`` from the walk's linked path."""
    keys: list[str | int] = []
    while path is not None:
        path, key = path
        keys.append(key)
    out: list[str] = []
    for key in reversed(keys):
        if isinstance(key, int):
            out.append(f"[{key}]")
        else:
            out.append(f".{key}" if out else key)
    return "".join(out) or ROOT


def _report(paths: list[str]) -> list[str]:
    if len(paths) <= MAX_PATHS:
        return paths
    return [*paths[:MAX_PATHS], f"… {len(paths) - MAX_PATHS} more"]


class BodyRedactor:
    """Replaces secrets in JSON and form bodies (see the module docstring for the rules).

    ``fields`` are user paths such as ``"card.number"`` or ``"**.ssn"`` (JSON, exact
    keys); their last plain segment is also a secret name for form bodies. ``defaults``
    adds :data:`DEFAULT_SECRET_FIELDS`; ``values`` hides card numbers and JWTs wherever
    they are. ``unparseable`` says what happens to a body with rules that cannot be read:
    ``"redact"`` stores :data:`UNPARSEABLE`, ``"keep"`` stores it as it is.
    ``max_decoded`` bounds a decompressed body.

    Thread-safe, holds no per-body state; call :meth:`redact` off the event loop.
    """

    __slots__ = (
        "_always_walk",
        "_defaults",
        "_fields",
        "_form_marker",
        "_form_names",
        "_json_marker",
        "_max_decoded",
        "_names",
        "_needles",
        "_patterns",
        "_scan",
        "_unparseable",
        "_values",
    )

    def __init__(
        self,
        *,
        fields: Iterable[str] = (),
        defaults: bool = True,
        values: bool = True,
        unparseable: Unparseable = "redact",
        marker: str = MARKER,
        max_decoded: int = MAX_DECODED,
    ) -> None:
        if isinstance(fields, str):
            raise ValueError(f"fields must be a list of patterns, not the string {fields!r}")
        patterns = tuple(_compile_field(pattern) for pattern in fields)
        if unparseable not in ("redact", "keep"):
            raise ValueError(f"unparseable must be 'redact' or 'keep' (got {unparseable!r})")
        if not isinstance(marker, str) or not marker:
            raise ValueError(f"marker must be a non-empty string (got {marker!r})")
        if isinstance(max_decoded, bool) or not isinstance(max_decoded, int) or max_decoded < 1:
            raise ValueError(
                f"max_decoded must be a positive number of bytes (got {max_decoded!r})"
            )
        self._patterns = patterns
        self._fields = _Fields(patterns) if patterns else None
        self._always_walk = any(pattern[-1] in ("*", "**") for pattern in patterns)
        self._needles = tuple(
            {_fold(pattern[-1]) for pattern in patterns if pattern[-1] not in ("*", "**")}
            | (set(_NAME_NEEDLES) if defaults else set())
        )
        self._defaults = defaults
        self._values = values
        escapes = _ASCII_ESCAPE_FOUND if all(n.isascii() for n in self._needles) else _ESCAPE_FOUND
        self._scan = Prefilter(
            self._needles, (*escapes, *_VALUE_SHAPES_FOUND) if values else escapes
        )
        self._names = _SecretNames(defaults)
        plain = (pattern[-1] for pattern in patterns if pattern[-1] not in ("*", "**"))
        self._form_names = _SecretNames(defaults, plain)
        self._unparseable = unparseable
        self._json_marker = marker
        self._form_marker = form_marker(marker)
        self._max_decoded = max_decoded

    def __repr__(self) -> str:
        fields = [".".join(pattern) for pattern in self._patterns]
        return (
            f"BodyRedactor(fields={fields!r}, defaults={self._defaults!r}, "
            f"values={self._values!r}, unparseable={self._unparseable!r}, "
            f"marker={self._json_marker!r}, max_decoded={self._max_decoded!r})"
        )

    def redact(
        self, data: bytes, content_type: str | None, content_encoding: str | None = None
    ) -> BodyRedaction | None:
        """What to store instead of ``data``, or None to store ``data`` exactly as it is
        (nothing secret found, or a body type without rules)."""
        if not data:
            return None
        kind = body_kind(content_type)
        if kind is None or not (self._names or self._fields or self._values):
            return None
        try:
            body, wbits = _decode(data, _coding(content_encoding), self._max_decoded)
        except _Unreadable as error:
            if kind == "sniff" and _JSON_START.match(error.head) is None:
                return None  # unknown type, and nothing says it is JSON
            return self._unreadable()
        if kind == "sniff":
            if _JSON_START.match(body) is None:
                return None
            kind = "json"
        if kind == "form":
            return self._redact_form(body, wbits)
        if not self._may_hold_secrets(body):
            return None
        return self._redact_json(body, wbits)

    @property
    def unparseable(self) -> Unparseable:
        """What happens to a body with rules that cannot be read."""
        return self._unparseable

    def _may_hold_secrets(self, body: bytes) -> bool:
        """Whether any rule could match in ``body``, from its bytes alone: no secret name
        (spelt any way the walk would take it), no run of 13 digits with single spaces
        or hyphens, no ``eyJ``, no ``fields`` key, and no ``\\u`` escape that could
        spell any of them (of an ASCII character, unless a name has other letters).
        Most bodies hold none, and this costs one Hyperscan pass over the bytes (~3-4 ms
        per MB, without the GIL; eleven plain passes, ~11 ms, without the wheel) where
        parsing and walking costs ~40: a JSON body is parsed only when one of them is
        there. A malformed body without any of them is stored as it is: by these rules
        it holds no secret."""
        return self._always_walk or self._scan.found_in(body)

    def _unreadable(self) -> BodyRedaction | None:
        if self._unparseable == "keep":
            return None
        return BodyRedaction(data=UNPARSEABLE, paths=[], unparseable=True)

    def _redact_form(self, body: bytes, wbits: int | None) -> BodyRedaction | None:
        text = body.decode("latin-1")
        names = self._form_names
        redacted, found = redact_pairs(
            text, names if names else _nothing, values=self._values, marker=self._form_marker
        )
        if redacted is text:
            return None
        return BodyRedaction(data=_encode(redacted.encode("latin-1"), wbits), paths=_report(found))

    def _redact_json(self, body: bytes, wbits: int | None) -> BodyRedaction | None:
        """:meth:`_parse_and_walk` with the cyclic garbage collector paused: a parsed
        megabyte is thousands of new containers, enough to start full collections that
        walk the app's whole heap with the GIL held (~50 ms each with FastAPI loaded),
        and the document has no cycles (reference counting frees it)."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._parse_and_walk(body, wbits)
        finally:
            if enabled:
                gc.enable()

    def _parse_and_walk(self, body: bytes, wbits: int | None) -> BodyRedaction | None:
        stdlib = False
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            try:  # orjson refuses lone surrogates, a BOM, numbers beyond a double...
                document = _stdlib_loads(body)
            except (ValueError, RecursionError):
                return self._unreadable()
            stdlib = True
        document, hits = self._walk(document)
        if not hits:
            return None
        if not stdlib and _LONG_NUMBER in body.translate(_DIGITS_AS_ZERO):
            # orjson reads integers beyond 64 bits as floats, which would be written back
            # rounded: read it again exactly (the walk gives the same answers).
            try:
                document, hits = self._walk(_stdlib_loads(body))
            except (ValueError, RecursionError):
                return self._unreadable()
            stdlib = True
        try:
            encoded = _dumps(document, stdlib)
        except RecursionError:
            return self._unreadable()
        paths = [_format_path(path) for path in hits[:MAX_PATHS]]
        if len(hits) > MAX_PATHS:
            paths.append(f"… {len(hits) - MAX_PATHS} more")
        return BodyRedaction(data=_encode(encoded, wbits), paths=paths)

    def _walk(self, document: Any) -> tuple[Any, list[_Path]]:
        """Replace secrets in ``document`` in place; the paths replaced, in document order.

        Hot loop, written for speed: a frame's keys need looking at one by one only when
        ``fields`` are active or the object has a key not already known to be harmless
        (one set comparison per object); otherwise only values are tested, by type, then
        length and first character, before any pattern."""
        marker = self._json_marker
        values = self._values
        fields = self._fields
        names = self._names if self._names else None
        hits: list[_Path] = []
        start = fields.start if fields is not None else None
        kind = type(document)
        if kind is not dict and kind is not list:
            if values and _secret_scalar(document):
                return marker, [None]
            return document, hits
        harmless: set[str] = set()
        steps: dict[_State, dict[str, tuple[_State, bool]]] = {}
        first_chars = _CANDIDATE_FIRST
        stack = [_open(document, None, start, names, harmless)]
        while stack:
            items, node, path, state, keyed = stack[-1]
            for key, value in items:
                below = state
                if keyed:
                    hit = False
                    if names is not None and key not in harmless:
                        hit = names(key)
                        if not hit:
                            harmless.add(key)
                    if state is not None and fields is not None:
                        table = steps.get(state)
                        if table is None:
                            table = steps[state] = {}
                        step = table.get(key)
                        if step is None:
                            step = table[key] = fields.step(state, key)
                        below, matched = step
                        hit = hit or matched
                    if hit:
                        if _has_content(value):
                            node[key] = marker
                            hits.append((path, key))
                        continue
                kind = type(value)
                if kind is str:
                    if (
                        values
                        and len(value) > 4
                        and value[0] in first_chars
                        and _secret_string(value)
                    ):
                        node[key] = marker
                        hits.append((path, key))
                elif kind is dict or kind is list:
                    if value:  # walk it now, come back to this one after
                        stack.append(_open(value, (path, key), below, names, harmless))
                        break
                elif (
                    kind is int
                    and values
                    and _INT_CARD_MIN <= value < _INT_CARD_END
                    and _card_int(value)
                ):
                    node[key] = marker
                    hits.append((path, key))
            else:
                stack.pop()
        return document, hits


def _open(
    node: Any, path: _Path, state: _State, names: _SecretNames | None, harmless: set[str]
) -> _Frame:
    """A frame to walk ``node`` with: an object's keys are looked at one by one only if
    one of them may be secret (learning harmless keys as it goes) or ``fields`` apply."""
    if type(node) is list:
        return (enumerate(node), node, path, state, False)
    keyed = state is not None
    if not keyed and names is not None and not node.keys() <= harmless:
        for key in node.keys() - harmless:
            if names(key):
                keyed = True
            else:
                harmless.add(key)
    return (iter(node.items()), node, path, state, keyed)


def _finite(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):  # would be written back as Infinity, which is not JSON
        raise ValueError(f"number out of range: {literal[:20]}")
    return number


def _stdlib_loads(body: bytes) -> Any:
    return json.loads(body, parse_float=_finite)


def _nothing(name: str) -> bool:
    return False


def _dumps(document: Any, stdlib: bool) -> bytes:
    if not stdlib:
        try:
            return orjson.dumps(document)
        except orjson.JSONEncodeError:
            pass  # nested deeper than orjson writes; the stdlib may manage
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate: escape it, as it came
        return json.dumps(document, separators=(",", ":")).encode()
