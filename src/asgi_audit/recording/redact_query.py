"""Query-string redaction: secrets travel in URLs more often than anyone likes.

Signed links (``X-Amz-Signature``), OAuth callbacks (``code``, ``access_token``) and
hand-made APIs (``?api_key=``) put credentials in the query string, and an audit record
that keeps the URL would keep them too. Form bodies (``a=1&b=2``) are the same encoding,
so the pair logic lives here once and :mod:`.redact_body` uses it.

The redacted text keeps every byte of the original except the replaced values: an auditor
comparing a record with a proxy log sees the same pairs, in the same order, with the same
separators and the same percent-encoding. Values are also checked on their own, so a card
number or a JWT under an innocent name (``?ref=eyJ...``) is hidden as well.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import quote, unquote_plus

from .redact import MARKER

__all__ = [
    "DEFAULT_SECRET_QUERY",
    "FORM_MARKER",
    "QueryRedactor",
    "form_marker",
    "is_card_number",
    "is_jwt",
    "is_secret_value",
    "luhn",
    "redact_pairs",
]

DEFAULT_SECRET_QUERY = (
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "secret",
    "signature",
    "sig",
    "x-amz-signature",
    "x-amz-credential",
    "code",
)
"""Query parameter names whose values are replaced (compared exactly, in any case)."""


def form_marker(marker: str = MARKER) -> str:
    """``marker`` percent-encoded, so a redacted form body is still valid form encoding."""
    return quote(marker, safe="")


FORM_MARKER = form_marker()
"""The marker as it appears in a redacted ``application/x-www-form-urlencoded`` body."""

NameTest = Callable[[str], bool]
"""Decides from a decoded pair name (as sent, any case) whether its value is secret."""

_CARD = re.compile(r"[0-9](?:[ -]?[0-9]){12,18}", re.ASCII)
_CARD_MAX = 19 + 18  # 19 digits and a separator between each
_JWT_SEGMENT = r"[A-Za-z0-9_=-]*"
_JWT = re.compile(rf"eyJ{_JWT_SEGMENT}(?:\.{_JWT_SEGMENT}){{2}}(?:(?:\.{_JWT_SEGMENT}){{2}})?")
_DIGITS = frozenset("0123456789")
CARD_FIRST_DIGITS = frozenset("23456")
"""What a payment card number starts with (ISO/IEC 7812's major industry identifier of
the card networks: 2 and 5 Mastercard, 3 Amex, JCB and Diners, 4 Visa, 6 Discover,
UnionPay and Maestro). Epoch timestamps in ms or µs and snowflake ids start with 1: one
in ten of them passes Luhn, and they are not secrets."""


def luhn(digits: str) -> bool:
    """Whether the ASCII digit string ``digits`` passes the Luhn check."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position & 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def is_card_number(text: str) -> bool:
    """A whole value of 13 to 19 digits starting with 2 to 6 (:data:`CARD_FIRST_DIGITS`),
    optionally grouped by single spaces or hyphens, that passes the Luhn check
    (``"4111 1111 1111 1111"``)."""
    if not 13 <= len(text) <= _CARD_MAX or text[0] not in CARD_FIRST_DIGITS:
        return False
    if _CARD.fullmatch(text) is None:
        return False
    return luhn(text.replace(" ", "").replace("-", ""))


def is_jwt(text: str) -> bool:
    """Three base64url segments joined by dots, the first a JSON header (``eyJ``); the
    last may be empty (an unsigned token). Five segments (an encrypted JWE) count too."""
    return text.startswith("eyJ") and _JWT.fullmatch(text) is not None


def is_secret_value(text: str) -> bool:
    """Whether ``text`` as a whole looks like a secret whatever its name: a card number
    or a JWT."""
    return is_card_number(text) or is_jwt(text)


def redact_pairs(
    text: str,
    names: frozenset[str] | NameTest,
    *,
    values: bool = True,
    marker: str = MARKER,
) -> tuple[str, list[str]]:
    """Replace the secret values in the ``name=value&...`` string ``text``.

    ``text`` is a raw query string or form body decoded as latin-1, so that every byte
    maps to one character and back. A pair's value is replaced by ``marker`` when its
    decoded name, lower-cased, is in ``names`` (or ``names(decoded)`` is true, when
    ``names`` is a test), or, with ``values``, when its decoded value is a card number or
    a JWT. Empty values and pairs without ``=`` are left alone: nothing to hide.

    Returns the new text and the decoded names of the replaced values (first occurrence
    order, each once). When nothing is replaced the text returned is ``text`` itself.
    """
    is_secret_name: NameTest
    if isinstance(names, frozenset):
        if not names and not values:
            return text, []
        lowered = names

        def is_secret_name(name: str) -> bool:
            return name.lower() in lowered

    else:
        is_secret_name = names
    if "=" not in text:
        return text, []
    pairs = text.split("&")
    found: dict[str, None] = {}
    for index, pair in enumerate(pairs):
        raw_name, equals, raw_value = pair.partition("=")
        if not equals or not raw_value:
            continue
        name = unquote_plus(raw_name)
        if is_secret_name(name) or (values and is_secret_value(unquote_plus(raw_value))):
            pairs[index] = f"{raw_name}={marker}"
            found[name] = None
    if not found:
        return text, []
    return "&".join(pairs), list(found)


class QueryRedactor:
    """Replaces secret query parameter values: the default names (unless ``defaults`` is
    false), ``extra_names``, and, with ``values``, card numbers and JWTs under any name.

    ``redactor(query)`` returns the query with ``[REDACTED]`` values and the decoded names
    that were replaced; an untouched query comes back as the same object.
    """

    __slots__ = ("_names", "_values")

    def __init__(
        self, extra_names: Iterable[str] = (), *, defaults: bool = True, values: bool = True
    ) -> None:
        if isinstance(extra_names, str):
            raise ValueError(
                f"extra_names must be a list of parameter names, not the string {extra_names!r}"
            )
        extra = list(extra_names)
        for name in extra:
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"extra_names: each name must be a non-empty string (got {name!r})"
                )
        chosen = set(DEFAULT_SECRET_QUERY) if defaults else set()
        chosen.update(name.lower() for name in extra)
        self._names = frozenset(chosen)
        self._values = values

    def __call__(self, query: str) -> tuple[str, list[str]]:
        return redact_pairs(query, self._names, values=self._values)

    def __repr__(self) -> str:
        return f"QueryRedactor(names={sorted(self._names)!r}, values={self._values!r})"
