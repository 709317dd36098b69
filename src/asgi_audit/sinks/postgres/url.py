"""``postgresql://`` sink URLs, read and checked without psycopg.

The middleware checks its sink URL when it is built, in the application's process, which
must not import a database driver (only the shipper talks to the database): so the URL is
read here in plain Python, and psycopg and psycopg_pool are looked for
(:func:`importlib.util.find_spec`), not imported.

Reading follows libpq's own (``conninfo_uri_parse_options`` in ``fe-connect.c``) closely
enough to refuse at start-up what libpq would refuse at the first connection: the
userinfo, host list, port and database parts, percent-decoding, and query parameters that
are libpq connection keywords (``ssl=true`` being libpq's alias of ``sslmode=require``).
``table`` is this package's own option and is taken out before libpq sees the URL. The
sink still has libpq read the URL it is given (through :mod:`psycopg.conninfo`), so what
it connects with is exactly what libpq understands.

Passwords (``user:password@``, or a ``password``-like option) never appear in a message.
"""

from __future__ import annotations

import importlib.util
import re
import urllib.parse
from dataclasses import dataclass

from ..._urls import mask_url
from ...errors import ConfigError

DEFAULT_TABLE = "audit_records"

MISSING_DRIVER = (
    "postgresql:// sinks need psycopg and psycopg_pool: pip install 'asgi-audit[postgres]'"
)

LIBPQ_KEYWORDS = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "dbname",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "gsslib",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "max_protocol_version",
        "min_protocol_version",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_issuer",
        "oauth_scope",
        "options",
        "passfile",
        "password",
        "port",
        "replication",
        "require_auth",
        "requiressl",
        "requirepeer",
        "scram_client_key",
        "scram_server_key",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslkeylogfile",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)
"""The connection parameters libpq 18 accepts (``PQconndefaults``, and ``requiressl``,
which it still reads as ``sslmode``); a query parameter named otherwise is a mistake libpq
would refuse. An older libpq knows fewer: the sink's
own reading of the URL refuses those when it opens."""

_SECRET_KEYWORDS = frozenset({"password", "sslpassword", "oauth_client_secret"})
"""Query parameters whose values are never shown."""

_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
"""Lower case (what unquoted SQL means), and short enough for the longest derived name
(``<table>_schema_version``) to fit PostgreSQL's 63 bytes."""

_PREFIXES = ("postgresql://", "postgres://")
"""What libpq takes for a URI (case matters to libpq)."""

_USERINFO_PASSWORD = re.compile(r"^([^:/?#]*://[^:/@]*:)([^/@]*)@")
"""The password of ``scheme://user:password@``, where libpq looks for it: before the
first ``/`` of the URL."""

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class PostgresURL:
    """A parsed sink URL: the URL libpq is to read (without ``table``), the table, and a
    form safe to print."""

    libpq_url: str
    table: str
    display: str


def check_url(url: str) -> None:
    """The table name and libpq's reading of the URL; psycopg and psycopg_pool must be
    installed (they are found, not imported)."""
    parse_url(url)
    if not driver_installed():
        raise ConfigError("sink", MISSING_DRIVER)


def driver_installed() -> bool:
    """Whether psycopg and psycopg_pool can be imported (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("psycopg", "psycopg_pool"))


def parse_url(url: str) -> PostgresURL:
    """Split ``table`` from the options libpq understands; check both now.

    Raises :class:`ConfigError` for a table that is not a plain identifier (it becomes
    part of SQL statements and of derived names) or a URL libpq would refuse."""
    base, _, query = url.partition("?")
    query, _, fragment = query.partition("#")
    if fragment:
        raise ConfigError("sink", f"unexpected '#' in {masked(url)!r}")
    # The other options go to libpq as written: decoding and re-encoding them would change
    # what libpq reads ('+' is not a space to libpq, '%20' is).
    pieces = [piece for piece in query.split("&") if piece]
    names = [urllib.parse.unquote(piece.partition("=")[0]) for piece in pieces]
    tables = [
        urllib.parse.unquote(piece.partition("=")[2])
        for piece, name in zip(pieces, names, strict=True)
        if name == "table"
    ]
    if len(tables) > 1:
        raise ConfigError("sink", f"'table' given {len(tables)} times in {masked(url)!r}")
    table = tables[0] if tables else DEFAULT_TABLE
    if not _TABLE_NAME.fullmatch(table):
        raise ConfigError(
            "sink",
            f"table must be a lower-case SQL identifier of at most 48 characters "
            f"([a-z_][a-z0-9_]*), got {table!r} in {masked(url)!r}",
        )
    rest = [piece for piece, name in zip(pieces, names, strict=True) if name != "table"]
    libpq_url = base + ("?" + "&".join(rest) if rest else "")
    try:
        port = libpq_options(libpq_url).get("port", "")
    except ValueError as exc:
        raise not_a_url(url, str(exc)) from None
    if not all(part.isdigit() or not part for part in port.split(",")):
        raise not_a_url(url, f"port {port!r}")
    return PostgresURL(libpq_url, table, masked(base) + f"?table={table}")


def not_a_url(url: str, reason: str) -> ConfigError:
    """The error for a URL libpq would not read (``reason`` says why, without secrets)."""
    return ConfigError("sink", f"not a PostgreSQL URL: {masked(url)!r} ({reason})")


def masked(url: str) -> str:
    """``url`` with its passwords replaced, for messages and logs: where libpq reads
    them, and whatever else :func:`asgi_audit._urls.mask_url` finds secret-looking."""
    url = _USERINFO_PASSWORD.sub(r"\1***@", url)
    base, mark, query = url.partition("?")
    return mask_url(base + mark + "&".join(_masked_option(piece) for piece in query.split("&")))


def _masked_option(piece: str) -> str:
    name = piece.partition("=")[0]
    return f"{name}=***" if urllib.parse.unquote(name) in _SECRET_KEYWORDS else piece


def without_secrets(text: str, url: str) -> str:
    """``text`` (a message about ``url``, such as libpq's) with the URL's passwords, as
    written and percent-decoded, replaced."""
    match = _USERINFO_PASSWORD.match(url)
    written = {match.group(2)} if match else set()
    for piece in url.partition("?")[2].split("&"):
        name, _, value = piece.partition("=")
        if urllib.parse.unquote(name) in _SECRET_KEYWORDS:
            written.add(value)
    secrets = written | {urllib.parse.unquote(value) for value in written}
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def libpq_options(url: str) -> dict[str, str]:
    """The connection parameters libpq reads from ``url`` (a URI, not ``key=value``
    text), a later value replacing an earlier one as in ``PQconninfoParse``; ValueError
    saying why libpq would refuse it, never showing a password."""
    prefix = next((prefix for prefix in _PREFIXES if url.startswith(prefix)), None)
    if prefix is None:
        raise ValueError(f"it must start with {' or '.join(_PREFIXES)}")
    rest = url[len(prefix) :]
    options: dict[str, bytes] = {}
    # user[:password]@ is looked for before the first '/' only, as libpq does.
    userinfo, at, after = rest.partition("@")
    if at and "/" not in userinfo:
        user, _, password = userinfo.partition(":")
        _store(options, "user", user)
        _store(options, "password", password)
        rest = after
    # host[:port] or [ipv6][:port], comma-separated; then /dbname, then ?parameters.
    hosts: list[str] = []
    ports: list[str] = []
    pos = 0
    while True:
        if rest.startswith("[", pos):
            end = rest.find("]", pos)
            if end < 0:
                raise ValueError('no "]" closing the IPv6 host address')
            if end == pos + 1:
                raise ValueError("IPv6 host address may not be empty")
            hosts.append(rest[pos + 1 : end])
            pos = end + 1
            if rest[pos : pos + 1] not in ("", ":", "/", "?", ","):
                raise ValueError(
                    f'unexpected character "{rest[pos]}" at position {len(prefix) + pos}'
                    ' after an IPv6 host address (expected ":" or "/")'
                )
        else:
            end = _until(rest, ":/?,", pos)
            hosts.append(rest[pos:end])
            pos = end
        stop, pos = rest[pos : pos + 1], pos + 1
        if stop == ":":
            end = _until(rest, "/?,", pos)
            ports.append(rest[pos:end])
            stop, pos = rest[end : end + 1], end + 1
        else:
            ports.append("")
        if stop != ",":
            break
    _store(options, "host", ",".join(hosts))
    _store(options, "port", ",".join(ports))
    if stop == "/":
        end = _until(rest, "?", pos)
        _store(options, "dbname", rest[pos:end])
        stop, pos = rest[end : end + 1], end + 1
    if stop == "?":
        _query_options(options, rest[pos:])
    # psycopg reads the values libpq kept as UTF-8 (an earlier value replaced is not read).
    try:
        return {name: value.decode("utf-8") for name, value in options.items()}
    except UnicodeDecodeError:
        bad = next(name for name, value in options.items() if not _is_utf8(value))
        raise ValueError(f"the {bad} is not UTF-8 once percent-decoded") from None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _until(text: str, stops: str, start: int) -> int:
    """The index of the first of ``stops`` in ``text`` from ``start``, or its length."""
    return next((index for index in range(start, len(text)) if text[index] in stops), len(text))


def _query_options(options: dict[str, bytes], query: str) -> None:
    """libpq's reading of ``name=value&...`` (a trailing ``&`` is allowed, nothing else
    empty)."""
    pieces = query.split("&")
    if pieces[-1] == "":
        pieces.pop()
    for piece in pieces:
        if "=" not in piece:
            raise ValueError(f'missing key/value separator "=" in URI query parameter: "{piece}"')
        raw_name, _, raw_value = piece.partition("=")
        if "=" in raw_value:
            raise ValueError(f'extra key/value separator "=" in URI query parameter: "{raw_name}"')
        name = _decoded(raw_name, "a query parameter's name").decode("utf-8", "replace")
        value = _decoded(raw_value, f"the value of {name!r}", secret=name in _SECRET_KEYWORDS)
        # libpq's aliases: ssl=true (JDBC's spelling) and requiressl (its own, old).
        if name == "ssl" and value == b"true":
            name, value = "sslmode", b"require"
        elif name == "requiressl":
            name, value = "sslmode", b"require" if value.startswith(b"1") else b"prefer"
        if name not in LIBPQ_KEYWORDS:
            raise ValueError(f'invalid URI query parameter: "{name}"')
        options[name] = value


def _store(options: dict[str, bytes], name: str, raw: str) -> None:
    """Keep a percent-encoded part of the URL, as libpq does when it is not empty."""
    if raw:
        options[name] = _decoded(raw, f"the {name}", secret=name == "password")


def _decoded(raw: str, what: str, *, secret: bool = False) -> bytes:
    """``raw`` percent-decoded as libpq does (``%00`` is refused)."""
    shown = what if secret else f'{what} "{raw}"'
    if _BAD_ESCAPE.search(raw):
        raise ValueError(f"invalid percent-encoded token in {shown}")
    data = urllib.parse.unquote_to_bytes(raw)
    if b"\x00" in data:
        raise ValueError(f"forbidden value %00 in {shown}")
    return data
