"""Stores for audit records, chosen by URL (see :func:`open_sink`).

Each store lives in its own module, imported only when its scheme is asked for, so an
optional backend's dependencies are needed only by those who use it.

File stores take SQLAlchemy-style paths: three slashes then a relative path
(``sqlite:///asgi-audit.db``), four for an absolute one (``sqlite:////var/lib/audit.db``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import ConfigError
from .protocols import Query, Reader, Sink, SinkError

__all__ = [
    "DEFAULT_SINK_URL",
    "KNOWN_SCHEMES",
    "Query",
    "Reader",
    "Sink",
    "SinkError",
    "Store",
    "open_sink",
]

DEFAULT_SINK_URL = "sqlite:///asgi-audit.db"


@runtime_checkable
class Store(Sink, Reader, Protocol):
    """What :func:`open_sink` gives: every store both takes records and answers queries."""


def open_sink(url: str, *, create: bool = True) -> Store:
    """Open the store ``url`` names; configuration mistakes raise :class:`ConfigError` now.

    ``create=False`` is for readers (the CLI): a store that does not exist yet is an
    error rather than a new, empty one at a mistyped path."""
    scheme, separator, rest = url.partition("://")
    if not separator or not scheme:
        raise ConfigError("sink", f"expected a URL such as {DEFAULT_SINK_URL!r} (got {url!r})")
    opener = _OPENERS.get(scheme.lower())
    if opener is None:
        raise ConfigError(
            "sink",
            f"unknown scheme {scheme!r} in {url!r}; known: {', '.join(KNOWN_SCHEMES)}",
        )
    if not create and scheme.lower() in ("sqlite", "jsonl"):
        path = _file_path(url, rest)
        if not path.exists():
            raise ConfigError("sink", f"no store at {path} (from {url!r})")
    if not create and opener is _open_postgres:
        return _open_postgres(url, rest, create=False)
    return opener(url, rest)


def _file_path(url: str, rest: str) -> Path:
    scheme = url.partition("://")[0]
    example = f"{scheme}:///relative/path or {scheme}:////absolute/path"
    if "?" in rest or "#" in rest:
        raise ConfigError("sink", f"URL options are not supported (got {url!r}); use {example}")
    if rest in ("", "/"):
        raise ConfigError("sink", f"{url!r} names no path; use {example}")
    if not rest.startswith("/"):
        raise ConfigError("sink", f"expected {example} (got {url!r}: a host, not a path)")
    return Path(rest[1:])


def _open_memory(url: str, rest: str) -> Store:
    from .memory import MemorySink

    return MemorySink(rest or None)


def _open_jsonl(url: str, rest: str) -> Store:
    from .jsonl import JsonlSink

    return JsonlSink(_file_path(url, rest))


def _open_sqlite(url: str, rest: str) -> Store:
    from .sqlite import SqliteSink

    path = _file_path(url, rest)
    if path.is_dir():
        raise ConfigError("sink", f"{url!r} names a directory; expected a database file")
    return SqliteSink(path)


def _open_postgres(url: str, rest: str, *, create: bool = True) -> Store:
    """Lazy: psycopg is an optional extra. Readers (``create=False``) connect now, so a
    missing table or an unreachable server is one clear error before any work starts."""
    try:
        from .postgres import PostgresSink
    except ImportError as exc:
        raise ConfigError(
            "sink",
            f"postgresql:// needs psycopg 3 and psycopg-pool ({exc}): "
            "pip install 'asgi-audit[postgres]'",
        ) from None
    sink = PostgresSink(url, create=create)
    if not create:
        try:
            sink.ready()
        except SinkError as exc:
            sink.close()
            raise ConfigError("sink", str(exc)) from None
    return sink


def _open_s3(url: str, rest: str) -> Store:
    """Lazy: boto3 is an optional extra, imported only when a client is made (the URL is
    checked first, so a mistyped option is reported even without boto3)."""
    from .s3 import S3Sink, parse_url

    return S3Sink(parse_url(url))


_OPENERS: dict[str, Callable[[str, str], Store]] = {
    "memory": _open_memory,
    "jsonl": _open_jsonl,
    "sqlite": _open_sqlite,
    "postgresql": _open_postgres,
    "postgres": _open_postgres,
    "s3": _open_s3,
}

KNOWN_SCHEMES = ("sqlite", "jsonl", "memory", "postgresql", "s3")
"""Schemes :func:`open_sink` recognises (``postgres`` is accepted as ``postgresql``)."""
