"""The one FastAPI app every variant of the HTTP benchmark serves, and the variants.

Every variant must serve the same endpoints with the same code, so that the only difference
a client can measure is the auditing. uvicorn imports ``bench.http.apps:app``; the variant
comes from the environment, because a server started as a subprocess can only be told by
its environment or its command line:

* ``BENCH_HTTP_VARIANT``: ``baseline`` (default), ``recipe-middleware``, ``recipe-route``,
  ``asgi-audit``, ``asgi-audit-drop`` (``overflow="drop"``), ``asgi-audit-blocking``
  (``mode="blocking"``), ``asgi-audit-postgres`` (the
  SQLite and PostgreSQL ones differ only in their sink URL);
* ``BENCH_HTTP_LOG``: the file the recipes log bodies to (required by the recipes);
* ``BENCH_HTTP_SINK`` / ``BENCH_HTTP_SPOOL``: asgi-audit's store URL and spool directory.

The recipes are written from their usual published form, faithfully, failures included:
they stand for what users do today, so they are not fixed here where they are slow or
broken; the benchmark reports what happens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.background import BackgroundTask

from asgi_audit import AuditMiddleware
from asgi_audit._types import Message

VARIANTS = (
    "baseline",
    "recipe-middleware",
    "recipe-route",
    "asgi-audit",
    "asgi-audit-drop",
    "asgi-audit-blocking",
    "asgi-audit-postgres",
)
STREAM_CHUNK = 64 << 10
_CHUNK = b"x" * STREAM_CHUNK

bodies_logger = logging.getLogger("bench.http.bodies")


class Line(BaseModel):
    """One order line of ``bench.recording.order_json``."""

    sku: str
    quantity: int
    price: int


class Order(BaseModel):
    """The ~1 MB order document: parsing it is the realistic app work the JSON route does."""

    customer: str
    lines: list[Line]


def log_bodies(request_body: bytes, response_body: bytes) -> None:
    """The recipes' background task: both bodies through ``logging`` into a file."""
    bodies_logger.info(request_body)
    bodies_logger.info(response_body)


def configure_logging(path: str) -> None:
    """A file handler as the recipes set one up (``logging.basicConfig(filename=...)``)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    bodies_logger.addHandler(handler)
    bodies_logger.setLevel(logging.INFO)
    bodies_logger.propagate = False


class LoggingRoute(APIRoute):
    """The ``APIRoute`` recipe (FastAPI's "custom request and APIRoute class" docs, as
    extended on Stack Overflow to log both bodies): read the request body in the route
    handler, drain a streaming response into bytes, log both in a ``BackgroundTask``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original_route_handler = super().get_route_handler()

        async def custom_route_handler(request: Request) -> Response:
            req_body = await request.body()
            response = await original_route_handler(request)
            if isinstance(response, StreamingResponse):
                res_body = b""
                async for item in response.body_iterator:
                    res_body += item  # type: ignore[operator]
                task = BackgroundTask(log_bodies, req_body, res_body)
                return Response(
                    content=res_body,
                    status_code=response.status_code,
                    headers=dict(response.headers),
                    media_type=response.media_type,
                    background=task,
                )
            response.background = BackgroundTask(log_bodies, req_body, bytes(response.body))
            return response

        return custom_route_handler


def add_recipe_middleware(app: FastAPI) -> None:
    """The ``@app.middleware("http")`` recipe: await the body, re-inject it, drain the
    response's ``body_iterator`` with ``+=`` and answer with a new ``Response`` whose
    ``BackgroundTask`` logs both bodies."""

    async def set_body(request: Request, body: bytes) -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": body}

        request._receive = receive

    @app.middleware("http")
    async def log_request_and_response(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path == "/unaudited":
            return await call_next(request)
        req_body = await request.body()
        await set_body(request, req_body)
        response = await call_next(request)
        res_body = b""
        async for chunk in response.body_iterator:  # type: ignore[attr-defined]
            res_body += chunk
        task = BackgroundTask(log_bodies, req_body, res_body)
        return Response(
            content=res_body,
            status_code=response.status_code,
            headers=dict(response.headers),
            media_type=response.media_type,
            background=task,
        )


def add_endpoints(app: FastAPI, route_class: type[APIRoute] = APIRoute) -> None:
    """The endpoints every variant shares; ``route_class`` applies to the audited ones (an
    ``APIRouter(route_class=...)``, as the recipe's documentation does it)."""
    router = APIRouter(route_class=route_class)

    @router.post("/json/echo")
    async def json_echo(order: Order) -> Order:
        return order

    @router.post("/raw/echo")
    async def raw_echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    @router.post("/small")
    async def small(request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    @app.get("/unaudited")
    async def unaudited() -> Response:
        return Response(b"ok", media_type="text/plain")

    @app.get("/bench/dropped")
    async def dropped() -> dict[str, int]:
        """Exchanges the middleware dropped (``overflow="drop"``), for the runner."""
        audit = find_audit_middleware(app)
        return {"dropped": audit.dropped if audit is not None else 0}

    @router.get("/stream/{mb}")
    async def stream(mb: int) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(mb * (1 << 20) // STREAM_CHUNK):
                yield _CHUNK

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    app.include_router(router)


def find_audit_middleware(app: FastAPI) -> AuditMiddleware | None:
    """The ``AuditMiddleware`` in ``app``'s built middleware stack, if any."""
    layer: Any = app.middleware_stack
    while layer is not None:
        if isinstance(layer, AuditMiddleware):
            return layer
        layer = getattr(layer, "app", None)
    return None


def create_app(
    variant: str,
    *,
    log_path: str | None = None,
    sink: str | None = None,
    spool: str | None = None,
) -> FastAPI:
    """The app for ``variant``; asgi-audit runs with its default settings except the store,
    the spool and the one excluded route."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    app = FastAPI()
    if variant.startswith("recipe-"):
        if log_path is None:
            raise ValueError(f"{variant} needs a log file (BENCH_HTTP_LOG)")
        configure_logging(log_path)
    add_endpoints(app, LoggingRoute if variant == "recipe-route" else APIRoute)
    if variant == "recipe-middleware":
        add_recipe_middleware(app)
    elif variant.startswith("asgi-audit"):
        if sink is None or spool is None:
            raise ValueError(f"{variant} needs BENCH_HTTP_SINK and BENCH_HTTP_SPOOL")
        overflow = "drop" if variant == "asgi-audit-drop" else "block"
        app.add_middleware(
            AuditMiddleware,
            sink=sink,
            spool=spool,
            overflow=overflow,
            mode="blocking" if variant == "asgi-audit-blocking" else "batch",
            exclude=["/unaudited", "/bench/*"],
        )
    return app


def app_from_environment(environ: Mapping[str, str]) -> FastAPI:
    """The app the ``BENCH_HTTP_*`` variables describe (``baseline`` without them)."""
    options: dict[str, Any] = {
        "log_path": environ.get("BENCH_HTTP_LOG"),
        "sink": environ.get("BENCH_HTTP_SINK"),
        "spool": environ.get("BENCH_HTTP_SPOOL"),
    }
    return create_app(environ.get("BENCH_HTTP_VARIANT", "baseline"), **options)


app = app_from_environment(os.environ)
