"""``trace_events``: each audited exchange adds an event to the current OpenTelemetry span
(the server span an outer instrumentation opened), naming its audit record."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asgi_audit import AuditMiddleware, ConfigError, MemoryRecorder
from asgi_audit._types import ASGIApp, Receive, Scope, Send
from harness import EchoApp, call


class Traced:
    """What OpenTelemetry's ASGI instrumentation does, in short: a span around the app."""

    def __init__(self, app: ASGIApp, provider: TracerProvider) -> None:
        self.app = app
        self.tracer = provider.get_tracer("test")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.tracer.start_as_current_span("POST /orders"):
            await self.app(scope, receive, send)


def test_each_audited_exchange_names_its_record_in_the_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = MemoryRecorder()
    audited = AuditMiddleware(EchoApp(), recorder=recorder, trace_events=True, environ={})
    asyncio.run(call(Traced(audited, provider), b'{"n": 1}'))
    asyncio.run(call(Traced(audited, provider), b'{"n": 2}', path="/health"))
    recorded = recorder.take_all()
    [first, second] = exporter.get_finished_spans()
    events: list[Any] = [span.events for span in (first, second)]
    assert [len(e) for e in events] == [1, 1]
    ids = [e[0].attributes["asgi_audit.record_id"] for e in events]
    assert ids == [exchange.id for exchange in recorded]
    attributes = events[0][0].attributes
    assert events[0][0].name == "asgi_audit.exchange"
    assert attributes["asgi_audit.level"] == "RequestResponse"
    assert attributes["asgi_audit.outcome"] == "complete"
    assert attributes["asgi_audit.request_body.size"] == 8
    for exchange in recorded:
        exchange.discard()


def test_off_by_default_and_from_the_environment() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = MemoryRecorder()
    quiet = AuditMiddleware(EchoApp(), recorder=recorder, environ={})
    asyncio.run(call(Traced(quiet, provider), b"{}"))
    [span] = exporter.get_finished_spans()
    assert not span.events
    on = AuditMiddleware(EchoApp(), recorder=recorder, environ={"ASGI_AUDIT_TRACE_EVENTS": "true"})
    assert on.settings.trace_events
    for exchange in recorder.take_all():
        exchange.discard()


def test_without_opentelemetry_it_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigError, match="trace_events: needs opentelemetry-api"):
        AuditMiddleware(EchoApp(), recorder=MemoryRecorder(), trace_events=True, environ={})
