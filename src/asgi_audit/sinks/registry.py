"""Sinks by URL scheme: checked when the middleware is built, opened where records ship.

Each kind of sink is a module (or package) of this room offering two functions:

* ``check_url(url)``: the URL's form, and that the client library is installed (found,
  not imported), raising :class:`ConfigError`. The middleware calls it when it is built,
  so a mistake fails at start-up in the app, and the app never imports a database driver.
* ``open_url(url, *, create)``: the sink itself, in the shipper (or the CLI). ``create``
  False is for readers: a sink that does not exist yet is an error rather than a new,
  empty one at a mistyped path.

The modules are named here as strings and imported on first use (as SQLAlchemy finds its
dialects), so asking for one kind never imports another's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

from ..capture.settings import DEFAULT_SINK_URL
from ..errors import ConfigError
from .protocols import Sink

_KINDS = {
    "sqlite": "asgi_audit.sinks.sqlite",
    "jsonl": "asgi_audit.sinks.jsonl",
    "memory": "asgi_audit.sinks.memory",
    "postgresql": "asgi_audit.sinks.postgres",
    "postgres": "asgi_audit.sinks.postgres",
    "s3": "asgi_audit.sinks.s3",
}

KNOWN_SCHEMES = ("sqlite", "jsonl", "memory", "postgresql", "s3")
"""Schemes :func:`open_sink` recognises (``postgres`` is accepted as ``postgresql``)."""


class _Kind(Protocol):
    """What the module of one kind of sink offers (see the module docstring)."""

    def check_url(self, url: str) -> None: ...

    def open_url(self, url: str, *, create: bool = True) -> Sink: ...


def _kind(url: object) -> _Kind:
    if not isinstance(url, str) or not url.partition("://")[0] or "://" not in url:
        raise ConfigError("sink", f"expected a URL such as {DEFAULT_SINK_URL!r} (got {url!r})")
    scheme = url.partition("://")[0]
    module = _KINDS.get(scheme.lower())
    if module is None:
        known = ", ".join(f"{name}://" for name in KNOWN_SCHEMES)
        raise ConfigError("sink", f"unknown kind of sink {scheme!r}; known: {known}")
    return cast(_Kind, importlib.import_module(module))


def check_sink_url(url: object, parameter: str = "sink") -> str:
    """``url`` when its form is right for its kind of sink, without opening it or importing
    the sink's client library; :class:`ConfigError` naming ``parameter`` otherwise."""
    try:
        _kind(url).check_url(cast(str, url))
    except ConfigError as exc:
        if exc.parameter == parameter:
            raise
        raise ConfigError(parameter, exc.problem) from None
    return cast(str, url)


def open_sink(url: str, *, create: bool = True) -> Sink:
    """Open the sink ``url`` names; configuration mistakes raise :class:`ConfigError` now.

    ``create=False`` is for readers (the CLI): a sink that does not exist yet is an error
    rather than a new, empty one at a mistyped path."""
    kind = _kind(url)
    kind.check_url(url)
    return kind.open_url(url, create=create)
