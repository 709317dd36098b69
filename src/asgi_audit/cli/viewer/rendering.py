"""The pages' one Jinja2 environment: templates from the package, every value escaped.

Autoescape is on for every template, and the filters below make record text visible
rather than active: :func:`~asgi_audit.cli.terminal.printable` (as ``|p``) turns control
characters and bidi overrides, which would reorder or hide what the page shows, into
``\\x1b`` and ``\\u202e``, as the CLI prints them. Links to records are built here, with
the id percent-encoded, so a template never pastes an id into a URL itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.responses import HTMLResponse

from ..exports import iso
from ..main import size_text
from ..terminal import printable, printable_url

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def record_href(record_id: str) -> str:
    """The detail page of a record (any id: ``/`` and ``?`` are escaped)."""
    return "/records/" + quote(record_id, safe="")


def raw_href(side: str, record_id: str) -> str:
    """The raw download of one body (``request`` or ``response``)."""
    return f"/raw/{side}/" + quote(record_id, safe="")


def milliseconds(duration_ns: int | None) -> str:
    return "-" if duration_ns is None else f"{duration_ns / 1e6:,.1f} ms"


def utc(ns: int | None) -> str:
    """A time as the list shows it: ISO 8601 in UTC, to the millisecond."""
    text = iso(ns)
    if text is None:
        return "-"
    head, dot, rest = text.partition(".")
    return f"{head.replace('T', ' ')}.{rest[:3]}" if dot else text.replace("T", " ")


class Templates:
    """Renders the package's templates into HTML responses."""

    def __init__(self, sink_url: str) -> None:
        self.environment = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.environment.filters["p"] = printable
        self.environment.globals.update(
            sink_label=printable_url(sink_url),
            record_href=record_href,
            raw_href=raw_href,
            size=size_text,
            ms=milliseconds,
            utc=utc,
            iso=iso,
        )

    def render(self, name: str, **context: Any) -> str:
        return self.environment.get_template(name).render(**context)

    def page(self, name: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        """``templates/name`` as a response; ``signed_in`` (default True) shows the
        logout button."""
        context.setdefault("signed_in", True)
        return HTMLResponse(self.render(name, **context), status_code=status)
