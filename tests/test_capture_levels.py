"""What is kept depends on the level, and a route's level is decided as late as needed.

At ``Metadata`` the record has sizes but no bodies; a status filter keeps bodies only for
the listed statuses. A route-template rule waits for the router to fill ``scope["route"]``
(at the app's first receive, or as late as the response start) without losing the request
body, and an exchange that routes elsewhere, or nowhere, is not recorded.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from asgi_audit import Level, MemoryRecorder
from asgi_audit._types import Receive, Scope, Send
from harness import (
    Client,
    ReplayApp,
    check_body,
    drain_worker,
    http_scope,
    middleware,
    only,
    request,
    response,
    run,
    same_objects,
)


def test_metadata_level_records_sizes_without_bodies(recorder: MemoryRecorder) -> None:
    """At Metadata the record has sizes, status and outcome, but no body bytes."""
    app, client = ReplayApp(response(b"12345678")), Client(request(b"abc", b"de"))
    run(middleware(app, recorder, level="Metadata"), http_scope(), client)
    exchange = only(recorder)
    assert exchange.level is Level.METADATA
    assert (exchange.request_body, exchange.response_body) == (None, None)
    assert (exchange.request_size, exchange.response_size) == (5, 8)
    assert exchange.outcome == "complete"


@pytest.mark.parametrize(("status", "keeps"), [(200, False), (404, False), (503, True)])
def test_status_filter_keeps_bodies_only_for_listed_statuses(
    status: int, keeps: bool, recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """statuses=['5xx'] with otherwise='Metadata' keeps bodies only for server errors."""
    app = ReplayApp(response(b"resp" * 100, status=status))
    audited = middleware(
        app, recorder, statuses=["5xx"], otherwise="Metadata", memory_limit=10, spill_dir=tmp_path
    )
    run(audited, http_scope(), Client(request(b"req" * 100)))
    exchange = only(recorder)
    assert (exchange.request_size, exchange.response_size) == (300, 400)
    if keeps:
        assert exchange.level is Level.REQUEST_RESPONSE
        check_body(exchange.request_body, b"req" * 100)
        check_body(exchange.response_body, b"resp" * 100)
    else:
        assert exchange.level is Level.METADATA
        assert (exchange.request_body, exchange.response_body) == (None, None)
        drain_worker()
        assert list(tmp_path.rglob("*.body")) == []


def _route(template: str) -> SimpleNamespace:
    """A routed-route stand-in: what Starlette puts in scope['route']."""
    pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
    return SimpleNamespace(path_format=template, path_regex=re.compile(f"^{pattern}$"))


def _routing_app(template: str | None) -> ReplayApp:
    """A raw app that plays router: fills scope['route'] and scope['endpoint'] before its
    first receive (None: no route matched)."""

    async def endpoint() -> None:
        """The matched endpoint."""

    class Routed(ReplayApp):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if template is not None:
                scope["route"], scope["endpoint"] = _route(template), endpoint
            await super().__call__(scope, receive, send)

    return Routed(response(b"order 7"))


def test_route_template_rule_decided_at_first_receive(recorder: MemoryRecorder) -> None:
    """A template rule is decided from scope['route'] once routing ran; the match is audited."""
    app, incoming = _routing_app("/orders/{oid}"), request(b'{"qty":', b" 1}")
    run(
        middleware(app, recorder, routes=["/orders/{oid}"]),
        http_scope("/orders/7"),
        Client(incoming),
    )
    assert same_objects(app.received, incoming)
    exchange = only(recorder)
    assert exchange.route == "/orders/{oid}"
    check_body(exchange.request_body, b'{"qty": 1}')
    check_body(exchange.response_body, b"order 7")


def test_route_template_rule_rejects_other_routes_with_the_same_prefix(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """A path sharing the template's prefix but routed elsewhere is not recorded, nor kept."""
    app = _routing_app("/orders/{oid}/items")
    client = Client(request(b"x" * 1000))
    audited = middleware(
        app, recorder, routes=["/orders/{oid}"], memory_limit=10, spill_dir=tmp_path
    )
    run(audited, http_scope("/orders/7/items"), client)
    assert len(recorder) == 0
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    drain_worker()
    assert list(tmp_path.rglob("*.body")) == []


def test_route_known_only_at_response_start_still_keeps_the_request_body(
    recorder: MemoryRecorder,
) -> None:
    """When the route appears only after the body was read, the decision waits and keeps it."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        scope["route"] = _route("/orders/{oid}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    run(
        middleware(app, recorder, routes=["/orders/{oid}"]),
        http_scope("/orders/9"),
        Client(request(b"ab", b"cd")),
    )
    exchange = only(recorder)
    assert exchange.route == "/orders/{oid}"
    check_body(exchange.request_body, b"abcd")


def test_unrouted_request_under_a_template_prefix_is_not_recorded(
    recorder: MemoryRecorder,
) -> None:
    """A deferred exchange whose app never sets a route (a 404) is not recorded."""
    app = _routing_app(None)
    run(
        middleware(app, recorder, routes=["/orders/{oid}"]),
        http_scope("/orders/"),
        Client(request(b"x")),
    )
    assert len(recorder) == 0
