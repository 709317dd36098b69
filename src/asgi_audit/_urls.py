"""Sink URLs as they may be shown: passwords and secret-looking parameters masked.

A sink URL may carry a password (``postgresql://user:pw@host/db``, ``?password=``,
``?secret_key=``). Every message, log line and error that names a URL goes through
:func:`mask_url`, from every room, so that a secret never reaches a terminal, a log
collector or a bug report. The masking works on the text, without parsing it the way a
driver would: a URL that no driver accepts is masked all the same.
"""

from __future__ import annotations

import re

MASK = "***"

_SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|credential|signature|auth|session|api_?key|(?:^|[_-])(?:key|sig)$",
    re.IGNORECASE,
)
"""Query parameter names whose values are masked (``password``, ``aws_secret_access_key``,
``sslkey``, ``X-Amz-Signature``...): better one harmless value too many than a secret."""

_USERINFO = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^@/?#]*?):(?P<pw>[^@/?#]*)@"
)
_PARAMETER = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#]*)=(?P<value>[^&;#]*)")
_CONNINFO = re.compile(
    r"(?P<name>\b\w*(?:password|secret|token)\w*)\s*=\s*(?P<value>'(?:[^'\\]|\\.)*'|\S+)",
    re.IGNORECASE,
)


def mask_url(url: object) -> str:
    """``url`` with the password of its user info and the values of secret-looking query
    parameters replaced by ``***``; anything that is not a string is shown as its type."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    masked = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url, count=1)
    masked = _PARAMETER.sub(_mask_parameter, masked)
    if "://" not in masked:  # a libpq key=value string: "host=... password=..."
        masked = _CONNINFO.sub(lambda m: f"{m['name']}={MASK}", masked)
    return masked


def _mask_parameter(match: re.Match[str]) -> str:
    name = match["name"]
    if _SECRET_NAME.search(name) and match["value"]:
        return f"{match['lead']}{name}={MASK}"
    return match[0]


def inline_secret(url: str) -> bool:
    """True when ``url`` carries a secret in itself (a password in its user info, or a
    secret-looking query parameter with a value), which then lives in manifests, shell
    histories and process environments."""
    return mask_url(url) != url


def mask_in(text: str, url: str) -> str:
    """``text`` (an error message from a driver, say) with every copy of ``url`` masked."""
    return text.replace(url, mask_url(url)) if url and url in text else text
