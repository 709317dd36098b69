"""Every field of a record says what its exchange said, however cheaply it was built.

The capture builds records positionally, scans the request headers once, reuses the
scope's client tuple, takes the record id's time from the monotonic clock and gives body
taps limits worked out once per middleware. Each shortcut is pinned here against the
plain meaning it replaced: a field moved in ``Exchange``, a header that wins differently,
an id that is not a time-ordered UUIDv7, or a tap that keeps other bytes fails a test.
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from asgi_audit import Exchange, MemoryRecorder
from asgi_audit._types import Message
from asgi_audit.capture.levels import Level
from asgi_audit.capture.policy import Policy, make_rule
from asgi_audit.capture.record import _UUID7, new_record_id
from asgi_audit.capture.routes import TemplateResolver
from asgi_audit.capture.tap import BodyTap, TapLimits
from harness import Client, ReplayApp, check_body, drain_worker, http_scope, middleware, only, run

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_exchange_fields_are_in_the_order_the_capture_passes_them() -> None:
    """The capture passes a record's fields by position: this is the order it assumes."""
    assert [field.name for field in dataclasses.fields(Exchange)] == [
        "id",
        "stream",
        "level",
        "method",
        "scheme",
        "host",
        "path",
        "query",
        "http_version",
        "client",
        "request_headers",
        "started_at_ns",
        "started_mono_ns",
        "route",
        "status",
        "response_headers",
        "response_trailers",
        "response_started_mono_ns",
        "ended_mono_ns",
        "request_body",
        "response_body",
        "request_size",
        "response_size",
        "outcome",
        "error",
        "correlation_id",
        "trace_id",
        "service",
        "pod",
        "namespace",
        "node",
        "schema",
        "on_written",
    ]


def test_every_field_of_a_record_holds_its_own_value(
    recorder: MemoryRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each field gets a value no other field could hold, so a swap shows."""
    monkeypatch.setenv("POD_NAME", "pod-a")
    monkeypatch.setenv("POD_NAMESPACE", "space-b")
    monkeypatch.setenv("NODE_NAME", "node-c")
    request_headers = [
        (b"host", b"first.example"),
        (b"x-request-id", b"req-1"),
        (b"traceparent", f"00-{TRACE}-00f067aa0ba902b7-01".encode()),
        (b"host", b"second.example"),
        (b"x-request-id", b"req-2"),
        (b"traceparent", b"not-a-trace"),
        (b"content-length", b"7"),
    ]
    response_headers = [(b"content-type", b"text/plain")]
    messages: list[Message] = [
        {"type": "http.response.start", "status": 201, "headers": response_headers},
        {"type": "http.response.body", "body": b"answer-body", "more_body": False},
    ]
    scope = http_scope(
        "/things",
        method="PUT",
        scheme="https",
        query_string=b"a=1",
        http_version="1.0",
        client=["10.0.0.9", 4321],
    )
    scope["headers"] = request_headers
    audited = middleware(ReplayApp(messages), recorder, service="fields")
    wall_before, mono_before = time.time_ns(), time.monotonic_ns()
    run(audited, scope, Client([{"type": "http.request", "body": b"payload", "more_body": False}]))
    wall_after, mono_after = time.time_ns(), time.monotonic_ns()
    exchange = only(recorder)

    parsed = uuid.UUID(exchange.id)
    assert (parsed.version, str(parsed)) == (7, exchange.id)
    assert wall_before // 1_000_000 <= parsed.int >> 80 <= wall_after // 1_000_000
    identity = audited.identity()
    assert exchange.stream == identity.stream and exchange.stream.startswith("fields.pod-a.")
    assert exchange.level is Level.REQUEST_RESPONSE
    assert (exchange.method, exchange.scheme, exchange.path) == ("PUT", "https", "/things")
    assert exchange.host == "first.example"  # the first Host header
    assert (exchange.query, exchange.http_version) == (b"a=1", "1.0")
    assert exchange.client == ("10.0.0.9", 4321)
    assert exchange.request_headers == request_headers
    assert exchange.request_headers is not request_headers  # a copy: the scope's may change
    assert wall_before <= exchange.started_at_ns <= wall_after
    assert mono_before <= exchange.started_mono_ns <= mono_after
    assert exchange.route is None
    assert exchange.status == 201
    assert exchange.response_headers == response_headers
    assert exchange.response_headers is not response_headers
    assert exchange.response_trailers == []
    assert exchange.response_started_mono_ns is not None
    assert (
        exchange.started_mono_ns
        <= exchange.response_started_mono_ns
        <= exchange.ended_mono_ns
        <= mono_after
    )
    check_body(exchange.request_body, b"payload")
    check_body(exchange.response_body, b"answer-body")
    assert (exchange.request_size, exchange.response_size) == (7, 11)
    assert (exchange.outcome, exchange.error) == ("complete", None)
    assert exchange.correlation_id == "req-2"  # the last X-Request-Id
    assert exchange.trace_id == TRACE  # the last valid traceparent
    assert (exchange.service, exchange.pod, exchange.namespace, exchange.node) == (
        "fields",
        "pod-a",
        "space-b",
        "node-c",
    )
    assert (exchange.schema, exchange.on_written) == (1, None)


def test_a_record_without_host_or_request_id_falls_back(recorder: MemoryRecorder) -> None:
    """No Host: the server's address; no X-Request-Id: the record's own id; no client:
    None."""
    for server, client, host in (
        (("10.1.1.1", 8080), ("10.0.0.1", 1), "10.1.1.1:8080"),
        (("/run/app.sock", None), None, "/run/app.sock"),
    ):
        scope = http_scope(server=server, client=client)
        scope["headers"] = []
        audited = middleware(ReplayApp([]), recorder)
        run(audited, scope, Client([{"type": "http.request", "body": b"", "more_body": False}]))
        exchange = only(recorder)
        recorder.take_all()
        assert exchange.host == host
        assert exchange.client == client
        assert exchange.correlation_id == exchange.id
        assert exchange.trace_id is None


def test_record_ids_are_time_ordered_uuid7() -> None:
    """Ids are canonical UUIDv7 text, strictly increasing, even past 4096 in one ms."""
    make = _UUID7()
    now = time.time_ns()
    ids = [make(now) for _ in range(10_000)]  # one millisecond: the counter overflows
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for text in ids[:50] + ids[-50:]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    first_ms = uuid.UUID(ids[0]).int >> 80
    assert first_ms == now // 1_000_000
    assert uuid.UUID(ids[-1]).int >> 80 > first_ms  # borrowed from the next milliseconds
    later = make(now + 10**9)
    assert later > ids[-1] and uuid.UUID(later).int >> 80 == (now + 10**9) // 1_000_000
    earlier = make(now - 10**9)  # the clock went back: still after every id so far
    assert earlier > later
    before, fresh, after = time.time_ns(), new_record_id(), time.time_ns()
    assert before // 1_000_000 <= uuid.UUID(fresh).int >> 80 <= after // 1_000_000


def test_record_id_text_is_the_formatted_128_bit_value() -> None:
    """The groups are formatted one by one; they spell the value the fields make."""
    make = _UUID7()
    for ms in (0, 1, 0x0123456789AB, (1 << 48) - 1, 1 << 48):
        text = make(ms * 1_000_000 + 999_999)
        value = uuid.UUID(text).int
        assert value >> 80 == ms & ((1 << 48) - 1)
        assert (value >> 76) & 0xF == 7 and (value >> 62) & 0b11 == 0b10
        assert f"{value:032x}" == text.replace("-", "")


CASES = [
    # memory_limit, body_limit, over_limit, chunks
    (1024, None, "truncate", [b"a" * 100, b"", b"b" * 200]),
    (300, None, "truncate", [b"a" * 100, b"b" * 100, b"c" * 100]),
    (100, None, "truncate", [b"a" * 60, b"b" * 60, b"c" * 60]),
    (1000, 150, "truncate", [b"a" * 100, b"b" * 100]),
    (1000, 150, "skip_body", [b"a" * 100, b"b" * 100]),
    (0, 0, "truncate", [b"", b""]),
    (0, None, "truncate", [b"x" * 70_000, b"y" * 10]),
]


@pytest.mark.parametrize(("memory_limit", "body_limit", "over_limit", "chunks"), CASES)
@pytest.mark.parametrize("keep", [True, False])
def test_a_tap_under_shared_limits_keeps_what_a_tap_of_its_own_keeps(
    tmp_path: Path,
    memory_limit: int,
    body_limit: int | None,
    over_limit: Any,
    chunks: list[bytes],
    keep: bool,
) -> None:
    """``with_limits`` (what the middleware uses) and the keyword constructor agree."""
    limits = TapLimits(memory_limit, body_limit, over_limit, str(tmp_path), None)
    taps = [
        BodyTap.with_limits(limits, keep),
        BodyTap(
            memory_limit=memory_limit,
            body_limit=body_limit,
            over_limit=over_limit,
            spill_dir=str(tmp_path),
            keep=keep,
        ),
    ]
    bodies = []
    for tap in taps:
        for chunk in chunks:
            tap.feed(chunk)
        assert tap.size == sum(map(len, chunks))
        bodies.append(tap.close(complete=True))
    if not keep:
        assert bodies == [None, None]
        return
    data = b"".join(chunks)
    for body in bodies:
        check_body(body, data, body_limit=body_limit, over_limit=over_limit)
    first, second = bodies
    assert first is not None and second is not None
    assert (first.memory_size, first.spill_path is None) == (
        second.memory_size,
        second.spill_path is None,
    )
    for body in bodies:
        assert body is not None
        body.discard()
    drain_worker()


def test_a_tap_that_stops_keeping_keeps_nothing_more(tmp_path: Path) -> None:
    """After ``stop_keeping`` (in memory or spilling) a tap counts and keeps nothing."""
    for memory_limit in (1000, 10):
        tap = BodyTap.with_limits(TapLimits(memory_limit, None, "truncate", str(tmp_path)), True)
        tap.feed(b"a" * 50)
        tap.stop_keeping()
        assert not tap.spilling and not tap.backlogged
        tap.feed(b"b" * 50)
        assert tap.size == 100
        assert tap.close(complete=True) is None
    drain_worker()


def test_sampling_is_drawn_only_for_rules_that_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unsampled rule matches without a draw; a sampled one draws once per decision."""
    draws: list[float] = []

    def draw() -> float:
        draws.append(0.9)
        return 0.9

    monkeypatch.setattr(random, "random", draw)
    every = Policy([make_rule("RequestResponse")])
    assert every.decide_early("GET", "/x") is every.rules[0]
    excluded = Policy([make_rule("None", routes=["/x"], sample=0.5), make_rule("Metadata")])
    assert excluded.decide_early("GET", "/x") is excluded.rules[0]
    assert draws == []
    sampled = Policy([make_rule("Request", sample=0.5)])
    decision = sampled.decide_early("GET", "/x")
    assert draws == [0.9]
    assert decision is not sampled.rules[0] and decision.level is Level.NONE  # type: ignore[union-attr]
    assert sampled.rules[0].ceiling is Level.REQUEST


def test_a_rules_ceiling_is_the_most_it_can_keep() -> None:
    """With a status filter the ceiling is the higher of the level and ``otherwise``."""
    assert make_rule("Metadata").ceiling is Level.METADATA
    assert make_rule("Metadata", statuses=["5xx"]).ceiling is Level.METADATA
    rule = make_rule("Metadata", statuses=["5xx"], otherwise="RequestResponse")
    assert rule.ceiling is Level.REQUEST_RESPONSE
    assert dataclasses.replace(rule, otherwise=Level.NONE).ceiling is Level.METADATA


class _Route:
    """A route as Starlette describes one: a template and the regex it compiles to."""

    def __init__(self, path_format: str, pattern: str) -> None:
        import re

        self.path_format = path_format
        self.path_regex = re.compile(pattern)


def test_template_resolver_reads_each_route_by_identity() -> None:
    """What the resolver remembers of a route belongs to that route object only."""
    resolver = TemplateResolver()
    orders = _Route("/orders/{order_id}", r"^/orders/(?P<order_id>[^/]+)$")
    users = _Route("/users/{user_id}", r"^/users/(?P<user_id>[^/]+)$")
    for _ in range(2):  # the second time from what it remembered
        assert resolver.template({"route": orders, "path": "/orders/7"}, "") == (
            "/orders/{order_id}"
        )
        assert resolver.template({"route": users, "path": "/users/3"}, "") == "/users/{user_id}"
    mounted = {"route": orders, "path": "/api/orders/7", "root_path": "/api"}
    assert resolver.template(mounted, "") == "/api/orders/{order_id}"
    assert resolver.template({"route": object(), "path": "/x"}, "") is None
    assert resolver.template({"path": "/x"}, "") is None
