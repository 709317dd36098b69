"""The viewer's ASGI app: :func:`create_app` puts the pieces together.

From the outside in: :class:`~.headers.SecurityHeaders` (every response, errors
included), :class:`~.auth.Gate` (the token and the cookie), then Starlette's routes. The
sink is opened when the app is made, so a wrong URL fails before anything listens, and
closed at the lifespan's end. Sink failures while serving become a 503 page whose text
has the URL's secrets masked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..._types import ASGIApp
from ...errors import SinkError
from ...sinks import open_sink
from ..terminal import printable_error
from .auth import Access, Gate, Login
from .downloads import Downloads
from .headers import SecurityHeaders
from .live import Live
from .pages import Pages
from .rendering import STATIC, Templates
from .state import Viewer


def create_app(
    sink_url: str,
    token: str,
    *,
    poll_seconds: float = 1.0,
    tail_seconds: float = 3600.0,
    har_limit: int = 1000,
) -> ASGIApp:
    """The viewer of the sink at ``sink_url``, open to whoever has ``token``.

    Opens the sink for reading (``create=False``): raises what
    :func:`~asgi_audit.sinks.open_sink` raises (:class:`~asgi_audit.errors.AuditError`,
    :class:`OSError`) for a sink that is not there. Run its lifespan (uvicorn does;
    Starlette's ``TestClient`` does as a context manager) to close the sink at the end."""
    sink = open_sink(sink_url, create=False)
    try:
        templates = Templates(sink_url)
        viewer = Viewer(sink, sink_url, templates, poll_seconds, tail_seconds, har_limit)
        access = Access(token)
        pages, downloads, live = Pages(viewer), Downloads(viewer), Live(viewer)
        login = Login(access, templates)

        async def sink_failed(request: Request, exc: Exception) -> Response:
            return templates.page(
                "error.html",
                status=503,
                title="The sink failed",
                message=printable_error(str(exc), sink_url),
            )

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            try:
                yield
            finally:
                sink.close()

        routes = [
            Route("/", pages.records, methods=["GET"]),
            Route("/records/{record_id:path}", pages.record, methods=["GET"]),
            Route("/diff", pages.diff, methods=["GET"]),
            Route("/tail", pages.tail, methods=["GET"]),
            Route("/tail/events", live.events, methods=["GET"]),
            Route("/raw/{side}/{record_id:path}", downloads.raw, methods=["GET"]),
            Route("/export.har", downloads.har, methods=["GET"]),
            Route("/login", login.form, methods=["GET"]),
            Route("/login", login.submit, methods=["POST"]),
            Route("/logout", login.logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC)),
        ]
        app = Starlette(
            routes=routes,
            lifespan=lifespan,
            exception_handlers={SinkError: sink_failed, OSError: sink_failed},
        )
        return SecurityHeaders(Gate(app, access))
    except BaseException:
        sink.close()
        raise
