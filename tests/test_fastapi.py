"""FastAPI integration: route templates after routing, markers, routers, mounts."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_audit import AuditMiddleware, ConfigError, Exchange, Level, MemoryRecorder, audited
from asgi_audit.fastapi import AuditedRoute, audited_route


def _call(app: Any, method: str, path: str, body: bytes = b"") -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, content=body)

    return asyncio.run(go())


def _records(recorder: MemoryRecorder) -> list[Exchange]:
    """Everything recorded so far (small bodies: kept in memory, nothing to discard)."""
    return recorder.take_all()


def _echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/orders/{order_id}")
    async def create(order_id: int, request: Request) -> dict[str, Any]:
        return {"order_id": order_id, "size": len(await request.body())}

    @app.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"user_id": user_id}

    @app.get("/health")
    async def health() -> str:
        return "ok"

    return app


def test_route_rule_records_only_that_template(recorder: MemoryRecorder) -> None:
    """routes=[template] records the matching route with its template, and nothing else."""
    app = _echo_app()
    app.add_middleware(
        AuditMiddleware, routes=["/orders/{order_id}"], recorder=recorder, environ={}
    )
    assert _call(app, "POST", "/orders/7", b'{"a": 1}').json() == {"order_id": 7, "size": 8}
    _call(app, "GET", "/users/7")
    _call(app, "GET", "/health")
    (record,) = _records(recorder)
    assert (record.route, record.path, record.status) == ("/orders/{order_id}", "/orders/7", 200)
    assert record.request_body is not None and record.request_body.read() == b'{"a": 1}'
    assert record.response_body is not None
    assert record.response_body.read() == b'{"order_id":7,"size":8}'


def test_audited_marker_opts_an_endpoint_in(recorder: MemoryRecorder) -> None:
    """With routes=[] only endpoints marked @audited are recorded, at the marker's level."""
    app = FastAPI()

    @app.post("/payments")
    @audited
    async def pay(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @audited(level="Metadata")
    @app.get("/balance")
    async def balance() -> dict[str, int]:
        return {"cents": 5}

    @app.get("/other")
    async def other() -> str:
        return "x"

    app.add_middleware(AuditMiddleware, routes=[], recorder=recorder, environ={})
    _call(app, "POST", "/payments", b"12345")
    _call(app, "GET", "/balance")
    _call(app, "GET", "/other")
    pay_record, balance_record = _records(recorder)
    assert pay_record.level is Level.REQUEST_RESPONSE
    assert pay_record.request_body is not None and pay_record.request_body.read() == b"12345"
    assert balance_record.level is Level.METADATA
    assert balance_record.response_body is None and balance_record.response_size == len(
        b'{"cents":5}'
    )


def test_router_route_class_opts_a_whole_router_in(recorder: MemoryRecorder) -> None:
    """APIRouter(route_class=AuditedRoute) audits every route of that router."""
    app = FastAPI()
    audited_router = APIRouter(prefix="/billing", route_class=AuditedRoute)
    quiet_router = APIRouter(prefix="/catalog")

    @audited_router.post("/invoices/{invoice_id}")
    async def invoice(invoice_id: int, request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @quiet_router.get("/items")
    async def items() -> list[int]:
        return [1, 2]

    app.include_router(audited_router)
    app.include_router(quiet_router)
    app.add_middleware(AuditMiddleware, routes=[], recorder=recorder, environ={})
    _call(app, "POST", "/billing/invoices/3", b"abc")
    _call(app, "GET", "/catalog/items")
    (record,) = _records(recorder)
    assert record.route == "/billing/invoices/{invoice_id}"
    assert record.request_body is not None and record.request_body.read() == b"abc"


def test_audited_route_factory_sets_the_level(recorder: MemoryRecorder) -> None:
    """audited_route('Metadata') marks a router's routes without bodies."""
    app = FastAPI()
    router = APIRouter(route_class=audited_route("Metadata"))

    @router.get("/ping")
    async def ping() -> str:
        return "pong"

    app.include_router(router)
    app.add_middleware(AuditMiddleware, routes=[], recorder=recorder, environ={})
    _call(app, "GET", "/ping")
    (record,) = _records(recorder)
    assert (record.level, record.response_body, record.response_size) == (Level.METADATA, None, 6)


def test_included_router_prefixes_are_part_of_the_template(recorder: MemoryRecorder) -> None:
    """Nested include_router prefixes appear in the template, on old and new FastAPI."""
    app = FastAPI()
    inner = APIRouter(prefix="/v2")

    @inner.post("/orders/{oid}")
    async def create(oid: int, request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    app.include_router(inner, prefix="/api")
    app.add_middleware(
        AuditMiddleware, routes=["/api/v2/orders/{oid}"], recorder=recorder, environ={}
    )
    assert _call(app, "POST", "/api/v2/orders/7", b"xy").status_code == 200
    (record,) = _records(recorder)
    assert record.route == "/api/v2/orders/{oid}"


def test_one_router_under_two_prefixes(recorder: MemoryRecorder) -> None:
    """A router included twice gives each request the template it was served under."""
    app = FastAPI()
    router = APIRouter()

    @router.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    app.include_router(router, prefix="/v1")
    app.include_router(router, prefix="/v2")
    app.add_middleware(
        AuditMiddleware, routes=["/v2/items/{item_id}"], recorder=recorder, environ={}
    )
    _call(app, "GET", "/v1/items/1")
    _call(app, "GET", "/v2/items/2")
    (record,) = _records(recorder)
    assert (record.route, record.path) == ("/v2/items/{item_id}", "/v2/items/2")


def test_mounted_app_routes_carry_the_mount_prefix(recorder: MemoryRecorder) -> None:
    """A route inside a mounted Starlette app is named mount prefix + its own template."""

    async def thing(request: Any) -> PlainTextResponse:
        return PlainTextResponse(request.path_params["name"])

    app = FastAPI()
    app.mount("/legacy", Starlette(routes=[Route("/things/{name}", thing)]))
    app.add_middleware(
        AuditMiddleware, routes=["/legacy/things/{name}"], recorder=recorder, environ={}
    )
    assert _call(app, "GET", "/legacy/things/cup").text == "cup"
    (record,) = _records(recorder)
    assert record.route == "/legacy/things/{name}"


def test_unknown_route_fails_when_the_stack_is_built() -> None:
    """A template the app does not declare is a ConfigError with a suggestion."""
    app = _echo_app()
    app.add_middleware(AuditMiddleware, routes=["/order/{order_id}"], environ={})
    with pytest.raises(
        ConfigError,
        match=r"routes: '/order/\{order_id\}' is not a route.*"
        r"did you mean '/orders/\{order_id\}'",
    ):
        app.build_middleware_stack()


def test_unknown_exclusion_names_exclude() -> None:
    """An exclusion naming a missing route is reported under `exclude`."""
    app = _echo_app()
    with pytest.raises(ConfigError) as caught:
        AuditMiddleware(app, exclude=["/healthz"], environ={})
    assert caught.value.parameter == "exclude"


def test_wrapping_the_whole_app_sees_the_500(recorder: MemoryRecorder) -> None:
    """Outside ServerErrorMiddleware the record has the 500 the client got, and the error."""
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    wrapped = AuditMiddleware(app, recorder=recorder, environ={})
    assert _call(wrapped, "GET", "/boom").status_code == 500
    (record,) = _records(recorder)
    assert (record.status, record.outcome, record.error) == (500, "app_error", "RuntimeError")
    assert record.response_body is not None
    assert record.response_body.read() == b"Internal Server Error"


def test_added_middleware_sees_the_exception(recorder: MemoryRecorder) -> None:
    """Inside ServerErrorMiddleware the record says app_error with the exception type."""
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.add_middleware(AuditMiddleware, recorder=recorder, environ={})
    assert _call(app, "GET", "/boom").status_code == 500
    (record,) = _records(recorder)
    assert (record.status, record.outcome, record.error) == (None, "app_error", "RuntimeError")


def test_plain_starlette_routes_are_matched_by_template(recorder: MemoryRecorder) -> None:
    """A Starlette app (no FastAPI) gets route templates too, on old and new Starlette."""

    async def order(request: Any) -> PlainTextResponse:
        return PlainTextResponse(request.path_params["order_id"])

    async def other(request: Any) -> PlainTextResponse:
        return PlainTextResponse("other")

    app = Starlette(routes=[Route("/orders/{order_id}", order), Route("/other", other)])
    app.add_middleware(
        AuditMiddleware, routes=["/orders/{order_id}"], recorder=recorder, environ={}
    )
    assert _call(app, "GET", "/orders/12").text == "12"
    _call(app, "GET", "/other")
    (record,) = _records(recorder)
    assert (record.route, record.path) == ("/orders/{order_id}", "/orders/12")


def test_compressed_bodies_are_kept_as_wire_bytes(recorder: MemoryRecorder) -> None:
    """A gzip request body and a gzip response (compressed inside) are stored compressed."""
    import gzip

    from starlette.middleware.gzip import GZipMiddleware

    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse((await request.body()).hex() * 100)

    wrapped = AuditMiddleware(GZipMiddleware(app, minimum_size=10), recorder=recorder, environ={})
    compressed = gzip.compress(b'{"order": 1}')

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=wrapped)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(
                "/echo",
                content=compressed,
                headers={"content-encoding": "gzip", "accept-encoding": "gzip"},
            )

    response = asyncio.run(go())
    assert response.headers["content-encoding"] == "gzip"
    (record,) = _records(recorder)
    assert record.request_body is not None and record.request_body.read() == compressed
    assert record.response_body is not None
    stored = record.response_body.read()
    assert stored[:2] == b"\x1f\x8b"
    assert gzip.decompress(stored) == response.content
