"""What is not audited is not touched.

Exchanges the middleware will not record (lifespan and websocket scopes, excluded paths,
routes no rule can match) are not tapped at all: the app gets the server's own ``receive``
and ``send``, and nothing is recorded.
"""

from __future__ import annotations

import pytest

from asgi_audit import MemoryRecorder
from asgi_audit._types import Message, Scope
from asgi_audit.capture import markers
from harness import Client, ReplayApp, http_scope, middleware, request, response, run


def test_websocket_scopes_get_the_original_callables(recorder: MemoryRecorder) -> None:
    """websocket scopes reach the app with the server's own receive and send."""
    app, client = ReplayApp([{"type": "websocket.x"}], read=False), Client()
    scope: Scope = {"type": "websocket", "asgi": {"version": "3.0"}, "path": "/ws", "headers": []}
    run(middleware(app, recorder), scope, client)
    assert app.receive is client.receive and app.send is client.send
    assert len(recorder) == 0


def test_lifespan_keeps_receive_and_shuts_the_recorder_down_before_completing() -> None:
    """lifespan gets the server's receive; its send forwards every message, and a recorder
    passed in is shut down before the server hears that shutdown is complete."""
    events: list[str] = []

    class Recording(MemoryRecorder):
        def shutdown(self, timeout: float | None = None) -> bool:
            events.append(f"recorder shutdown within {timeout}")
            return True

    messages: list[Message] = [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]
    app, client = ReplayApp(messages, read=False), Client()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    run(middleware(app, Recording(), shutdown_timeout=5), scope, client)
    assert app.receive is client.receive and app.send is not client.send
    assert client.sent == messages
    assert len(events) == 1 and events[0].startswith("recorder shutdown within")


def test_excluded_path_gets_the_original_callables(recorder: MemoryRecorder) -> None:
    """An excluded exchange is not tapped: the app gets the server's receive and send."""
    app, client = ReplayApp(response(b"ok")), Client(request(b"x"))
    run(middleware(app, recorder, exclude=["/health"]), http_scope("/health"), client)
    assert app.receive is client.receive and app.send is client.send
    assert len(recorder) == 0


def test_unmatched_route_gets_the_original_callables(
    recorder: MemoryRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path no rule can match (and no marker in use) is decided at once and not tapped."""
    monkeypatch.setattr(markers, "_marked", 0)
    app, client = ReplayApp(response(b"ok")), Client(request(b"x"))
    run(middleware(app, recorder, routes=["/orders/{oid}"]), http_scope("/users/1"), client)
    assert app.receive is client.receive and app.send is client.send
    assert len(recorder) == 0
