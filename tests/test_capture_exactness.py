"""What the client and the app see is untouched, and what is recorded is exact.

Whatever the chunking (empty chunks, one byte at a time, one 50 MB chunk), whether the
copy stays in memory, spills to disk, is truncated or skipped, the middleware passes the
very message objects through in both directions, and the record holds the true sizes, the
true digests and the exact bytes it was allowed to keep. Responses made of more than body
chunks (a file sent by path, early hints, extension messages) pass through just the same.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asgi_audit import MemoryRecorder
from asgi_audit._types import Message
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

MiB = 1 << 20


# --- transparency and exactness, for any chunking ---------------------------------------


@st.composite
def split_bodies(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """Arbitrary bytes, arbitrarily split into chunks (empty chunks included)."""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=400))
    else:
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(draw(st.integers(0, 200_000)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=30)))
    return data, [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _messages(kind: str, chunks: list[bytes], omit: bool) -> list[Message]:
    """Body messages; with ``omit``, empty bodies and a false ``more_body`` are left out."""
    out: list[Message] = []
    for i, chunk in enumerate(chunks):
        message: Message = {"type": kind}
        if chunk or not omit:
            message["body"] = chunk
        if i < len(chunks) - 1 or not omit:
            message["more_body"] = i < len(chunks) - 1
        out.append(message)
    return out


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(
    req=split_bodies(),
    resp=split_bodies(),
    memory_limit=st.sampled_from([0, 1, 100, 64 << 10, 1 << 30]),
    body_limit=st.one_of(st.none(), st.integers(0, 300), st.integers(0, 250_000)),
    over_limit=st.sampled_from(["truncate", "skip_body"]),
    omit=st.booleans(),
    trailers=st.booleans(),
)
def test_any_chunking_is_forwarded_untouched_and_recorded_exactly(
    req: tuple[bytes, list[bytes]],
    resp: tuple[bytes, list[bytes]],
    memory_limit: int,
    body_limit: int | None,
    over_limit: str,
    omit: bool,
    trailers: bool,
) -> None:
    """Both directions pass the very message objects through and the record is exact."""
    request_data, request_chunks = req
    response_data, response_chunks = resp
    incoming = _messages("http.request", request_chunks, omit)
    start: Message = {"type": "http.response.start", "status": 201, "headers": [(b"a", b"b")]}
    outgoing = [start, *_messages("http.response.body", response_chunks, omit)]
    if trailers:
        start["trailers"] = True
        outgoing.append({"type": "http.response.trailers", "headers": [(b"x-sum", b"1")]})

    plain_app, plain_client = ReplayApp(outgoing), Client(incoming)
    run(plain_app, http_scope(), plain_client)
    assert same_objects(plain_app.received, incoming)

    recorder = MemoryRecorder()
    with tempfile.TemporaryDirectory() as spill_dir:
        app, client = ReplayApp(outgoing), Client(incoming)
        audited = middleware(
            app,
            recorder,
            memory_limit=memory_limit,
            body_limit=body_limit,
            over_limit=over_limit,
            spill_dir=spill_dir,
        )
        run(audited, http_scope(), client)
        assert same_objects(app.received, plain_app.received)
        assert same_objects(client.sent, plain_client.sent)
        [exchange] = recorder.take_all()
        try:
            assert exchange.outcome == "complete" and exchange.error is None
            assert exchange.status == 201
            assert exchange.request_size == len(request_data)
            assert exchange.response_size == len(response_data)
            check_body(
                exchange.request_body, request_data, body_limit=body_limit, over_limit=over_limit
            )
            check_body(
                exchange.response_body, response_data, body_limit=body_limit, over_limit=over_limit
            )
            for body in (exchange.request_body, exchange.response_body):
                assert body is not None and body.memory_size <= memory_limit
                event("spilled" if body.spill_path else "in memory")
                event("skipped" if body.skipped else "truncated" if body.truncated else "whole")
        finally:
            exchange.discard()
        drain_worker()
        assert list(Path(spill_dir).rglob("*.body")) == []


# --- body shapes ----------------------------------------------------------------------------


def test_empty_bodies_are_recorded_as_empty(recorder: MemoryRecorder) -> None:
    """An exchange with no body bytes either way records two empty, complete bodies."""
    app, client = ReplayApp(response()), Client([{"type": "http.request"}])
    run(middleware(app, recorder), http_scope(method="GET"), client)
    exchange = only(recorder)
    check_body(exchange.request_body, b"")
    check_body(exchange.response_body, b"")
    assert (exchange.request_size, exchange.response_size) == (0, 0)
    assert exchange.outcome == "complete"


def test_one_byte_chunks_are_reassembled_exactly(recorder: MemoryRecorder, tmp_path: Path) -> None:
    """Thousands of 1-byte chunks each way, spilled in batches, come back byte for byte."""
    data = os.urandom(3000)
    chunks = [data[i : i + 1] for i in range(len(data))]
    app, client = ReplayApp(response(*chunks[::-1])), Client(request(*chunks))
    run(middleware(app, recorder, memory_limit=100, spill_dir=tmp_path), http_scope(), client)
    exchange = only(recorder)
    check_body(exchange.request_body, data)
    check_body(exchange.response_body, b"".join(chunks[::-1]))
    assert len(client.sent) == len(chunks) + 1


def test_one_50_mb_chunk_each_way_spills_and_is_exact(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """A single 50 MB chunk each way is spilled to disk, stored whole, and cleaned up."""
    data = os.urandom(50 * MiB)
    app, client = ReplayApp(response(data)), Client(request(data))
    audited = middleware(
        app, recorder, memory_limit=4 * MiB, body_limit=64 * MiB, spill_dir=tmp_path
    )
    run(audited, http_scope(), client)
    exchange = only(recorder)
    assert client.sent[1]["body"] is data
    for body in (exchange.request_body, exchange.response_body):
        check_body(body, data)
        assert body is not None and body.memory_size == 0
        assert body.spill_path is not None and Path(body.spill_path).parent.parent == tmp_path
    recorder.take_all()
    exchange.discard()
    drain_worker()
    assert list(tmp_path.rglob("*.body")) == []


def test_one_50_mb_chunk_is_truncated_at_the_body_limit(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """Over body_limit the stored copy is the prefix; size and digest cover all 50 MB."""
    data = os.urandom(50 * MiB)
    app, client = ReplayApp(response(b"ok")), Client(request(data))
    run(
        middleware(app, recorder, memory_limit=MiB, body_limit=3 * MiB, spill_dir=tmp_path),
        http_scope(),
        client,
    )
    check_body(only(recorder).request_body, data, body_limit=3 * MiB)


def test_stream_of_unknown_length(recorder: MemoryRecorder) -> None:
    """A chunked request and a streamed response of unannounced length are recorded whole."""
    rng = random.Random(7)
    request_chunks = [rng.randbytes(rng.randrange(0, 5000)) for _ in range(200)]
    response_chunks = [rng.randbytes(rng.randrange(0, 5000)) for _ in range(200)]
    streamed: list[Message] = [
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"transfer-encoding", b"chunked")],
        },
        *({"type": "http.response.body", "body": c, "more_body": True} for c in response_chunks),
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]
    app, client = ReplayApp(streamed), Client(request(*request_chunks))
    scope = http_scope(headers=[(b"transfer-encoding", b"chunked")])
    run(middleware(app, recorder, memory_limit=64 << 10), scope, client)
    exchange = only(recorder)
    check_body(exchange.request_body, b"".join(request_chunks))
    check_body(exchange.response_body, b"".join(response_chunks))


def test_non_utf8_and_non_json_bodies_are_stored_as_raw_bytes(recorder: MemoryRecorder) -> None:
    """Invalid UTF-8, broken JSON and compressed bodies are kept byte for byte, undecoded."""
    broken = b'{"amount": \xff\xfe\x00 not json'
    compressed = gzip.compress(b'{"ok": true}' * 100)
    app = ReplayApp(response(compressed, headers=[(b"content-encoding", b"gzip")]))
    client = Client(request(broken))
    scope = http_scope(headers=[(b"content-type", b"application/json")])
    run(middleware(app, recorder), scope, client)
    exchange = only(recorder)
    check_body(exchange.request_body, broken)
    check_body(exchange.response_body, compressed)
    assert client.sent[1]["body"] is compressed


# --- messages beyond body chunks: files by path, hints, extensions ----------------------


def test_pathsend_is_forwarded_and_recorded_by_path(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """http.response.pathsend passes through as is; the record names the file, unread."""
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.7 " + os.urandom(1000))
    messages: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.pathsend", "path": str(path)},
    ]
    app, client = ReplayApp(messages), Client(request(b""))
    scope = http_scope(method="GET", extensions={"http.response.pathsend": {}})
    run(middleware(app, recorder), scope, client)
    assert same_objects(client.sent, messages)
    exchange = only(recorder)
    assert exchange.outcome == "complete"
    body = exchange.response_body
    assert body is not None and body.sent_path == str(path)
    assert exchange.response_size == body.file_size() == len(b"%PDF-1.7 ") + 1000
    # Kept by reference: the bytes are read when the record is consumed, which shows the
    # middleware neither read nor hashed them during the exchange.
    with path.open("ab") as handle:
        handle.write(b"%%EOF")
    content = path.read_bytes()
    assert body.sha256() == hashlib.sha256(content).hexdigest()
    exchange.discard()
    assert path.read_bytes() == content


def test_early_hints_and_unknown_messages_pass_through(recorder: MemoryRecorder) -> None:
    """early_hint and other extension messages are forwarded untouched and not a start."""
    messages: list[Message] = [
        {"type": "http.response.early_hint", "links": ["</app.css>; rel=preload"]},
        {"type": "http.response.debug", "info": {"template": "x"}},
        *response(b"body", status=202),
    ]
    app, client = ReplayApp(messages), Client(request(b""))
    scope = http_scope(extensions={"http.response.early_hint": {}})
    run(middleware(app, recorder), scope, client)
    assert same_objects(client.sent, messages)
    exchange = only(recorder)
    assert (exchange.status, exchange.outcome) == (202, "complete")
    check_body(exchange.response_body, b"body")
