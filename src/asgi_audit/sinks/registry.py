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

A URL that carries its own secret (``postgresql://user:password@...``, ``?password=``,
``?secret_key=``) lives in manifests, shell histories and process environments; opening
one logs a warning (once per process and kind, on the ``asgi_audit.sinks`` logger) naming
where that kind of sink can find the secret instead, with the URL masked. Every message
here shows a URL through :func:`asgi_audit._urls.mask_url`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Protocol, cast

from .._urls import inline_secret, mask_url
from ..capture.settings import DEFAULT_SINK_URL
from ..errors import ConfigError
from .protocols import Sink

logger = logging.getLogger("asgi_audit.sinks")

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

SECRET_ALTERNATIVES = {
    "asgi_audit.sinks.postgres": (
        "leave the password out of the URL and let libpq find it: the PGPASSWORD "
        "environment variable, a password file (~/.pgpass, or the file PGPASSFILE names) "
        "or a PostgreSQL service file (?service=name, PGSERVICEFILE)"
    ),
    "asgi_audit.sinks.s3": (
        "leave credentials out of the URL: set the AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY environment variables, or use a shared credentials file "
        "(~/.aws/credentials, AWS_SHARED_CREDENTIALS_FILE, ?profile=)"
    ),
}
"""Where each kind of sink can find a secret instead of in its URL."""

_warned: set[str] = set()
_warned_lock = threading.Lock()


class _Kind(Protocol):
    """What the module of one kind of sink offers (see the module docstring)."""

    def check_url(self, url: str) -> None: ...

    def open_url(self, url: str, *, create: bool = True) -> Sink: ...


def _module(url: object) -> str:
    """The module of the kind of sink ``url`` names; ConfigError when there is none."""
    if not isinstance(url, str) or not url.partition("://")[0] or "://" not in url:
        shown = mask_url(url) if isinstance(url, str) else repr(url)
        raise ConfigError("sink", f"expected a URL such as {DEFAULT_SINK_URL!r} (got {shown!r})")
    scheme = url.partition("://")[0]
    module = _KINDS.get(scheme.lower())
    if module is None:
        known = ", ".join(f"{name}://" for name in KNOWN_SCHEMES)
        raise ConfigError("sink", f"unknown kind of sink {scheme!r}; known: {known}")
    return module


def _kind(url: object) -> _Kind:
    return cast(_Kind, importlib.import_module(_module(url)))


def warn_inline_secret(url: str) -> None:
    """Log, once per process and kind of sink, that ``url`` carries a secret, and where
    that kind can find it instead (never the secret: the URL is masked)."""
    if not inline_secret(url):
        return
    module = _module(url)
    with _warned_lock:
        if module in _warned:
            return
        _warned.add(module)
    advice = SECRET_ALTERNATIVES.get(module, "leave secrets out of the URL")
    logger.warning(
        "the sink URL %s carries a password or other secret, which ends up in manifests, "
        "shell histories and process listings; %s",
        mask_url(url),
        advice,
    )


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
    warn_inline_secret(url)
    kind.check_url(url)
    return kind.open_url(url, create=create)
