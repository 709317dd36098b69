"""Integration tests against a real uvicorn server on 127.0.0.1 (and one in-process
memory test). Each test builds its own FastAPI app; the server runs in a background
thread and is stopped (and joined) before the test ends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from asgi_audit import AuditMiddleware, Body, Exchange, MemoryRecorder
from harness import http_scope
from session import serving

pytestmark = pytest.mark.server

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

START_TIMEOUT = 10.0
"""Seconds a server may take to start or to stop before the test fails."""
RECORD_TIMEOUT = 5.0
"""Seconds to wait for a record that the test knows must come."""
POLL = 0.005
"""Sleep between two polls of a flag (polls are always bounded in count)."""


# -- the realistic order payload (models at module level: FastAPI resolves annotations
# -- through the endpoint's globals) ---------------------------------------------------


class Item(BaseModel):
    sku: str
    name: str
    quantity: int
    unit_price: Decimal
    tags: list[str]


class Customer(BaseModel):
    id: int
    name: str
    email: str
    address: dict[str, str]


class Order(BaseModel):
    customer: Customer
    currency: str
    items: list[Item]
    notes: str


class Receipt(BaseModel):
    order_id: int
    customer_id: int
    item_count: int
    total: Decimal
    items: list[Item]


def _order_json(target: int = 1_000_000, seed: int = 7) -> bytes:
    """A realistic order document of about ``target`` bytes (non-ASCII text included)."""
    rng = random.Random(seed)
    words = [
        "Kaffee",
        "thé",
        "café",
        "ümlaut",
        "widget",
        "gadget",
        "bolt",
        "naïve",
        "日本",
        "crème",
        "brûlée",
        "sprocket",
        "Ærø",
        "łódź",
    ]
    items: list[dict[str, Any]] = []
    order: dict[str, Any] = {
        "customer": {
            "id": 4711,
            "name": "Zoë Ångström",
            "email": "zoe@example.org",
            "address": {"street": "Große Straße 1", "city": "Köln", "zip": "50667"},
        },
        "currency": "EUR",
        "items": items,
        "notes": "Leave at the door — ring twice. " * 8,
    }
    size = 0
    while size < target:
        item = {
            "sku": f"SKU-{rng.randrange(10**8):08d}",
            "name": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))),
            "quantity": rng.randint(1, 50),
            "unit_price": f"{rng.randint(1, 99999) / 100:.2f}",
            "tags": [rng.choice(words) for _ in range(rng.randint(0, 4))],
        }
        items.append(item)
        size += len(json.dumps(item, ensure_ascii=False)) + 2
    return json.dumps(order, ensure_ascii=False).encode()


# -- server and client helpers ---------------------------------------------------------


def _client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=httpx.Timeout(30.0))


def _port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _take(recorder: MemoryRecorder, count: int) -> list[Exchange]:
    """Exactly ``count`` records (each waited for, bounded); fails on a missing one."""
    taken: list[Exchange] = []
    for _ in range(count):
        exchange = recorder.take(timeout=RECORD_TIMEOUT)
        assert exchange is not None, f"only {len(taken)} of {count} records arrived"
        taken.append(exchange)
    return taken


def _by_correlation(exchanges: list[Exchange]) -> dict[str, Exchange]:
    found: dict[str, Exchange] = {}
    for exchange in exchanges:
        assert exchange.correlation_id not in found, f"recorded twice: {exchange.correlation_id}"
        found[exchange.correlation_id] = exchange
    return found


async def _wait_for(flag: threading.Event, patience: float) -> bool:
    """Poll a flag set by another thread without blocking the server's event loop."""
    for _ in range(int(patience / POLL)):
        if flag.is_set():
            return True
        await asyncio.sleep(POLL)
    return flag.is_set()


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    for _ in range(int(timeout / POLL)):
        if check():
            return True
        time.sleep(POLL)
    return check()


def _spill_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("asgi-audit-*.body"))


def _stored_sha(body: Body) -> str:
    hasher = hashlib.sha256()
    for chunk in body.chunks():
        hasher.update(chunk)
    return hasher.hexdigest()


def _without_date(headers: httpx.Headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.multi_items() if k.lower() != "date"]


# -- 1. realistic JSON and raw bytes, with and without the middleware --------------------


def _add_order_route(app: FastAPI) -> None:
    """POST /orders/{order_id}: validates an Order with pydantic and answers a Receipt."""

    @app.post("/orders/{order_id}", response_model=Receipt)
    async def create_order(order_id: int, order: Order) -> Receipt:
        total = sum((i.unit_price * i.quantity for i in order.items), Decimal(0))
        return Receipt(
            order_id=order_id,
            customer_id=order.customer.id,
            item_count=len(order.items),
            total=total,
            items=order.items,
        )


def _orders_app() -> FastAPI:
    app = FastAPI()
    _add_order_route(app)

    raw = APIRouter()

    @raw.post("/echo/{name}")
    async def echo(name: str, request: Request) -> Response:
        body = await request.body()
        return Response(
            content=body, media_type="application/octet-stream", headers={"x-echo-name": name}
        )

    app.include_router(raw, prefix="/raw")
    return app


def test_json_and_raw_posts_are_recorded_byte_exact_without_changing_responses(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """Byte-identical responses with and without the middleware; records hold the exact bytes."""
    order = _order_json()
    assert 900_000 < len(order) < 1_300_000
    blob = random.Random(3).randbytes(1_000_003)
    parts = [blob[i : i + 100_000] for i in range(0, len(blob), 100_000)]

    def exchange_all(client: httpx.Client) -> dict[str, httpx.Response]:
        return {
            "order": client.post(
                "/orders/42?source=test",
                content=order,
                headers={"content-type": "application/json", "x-request-id": "order"},
            ),
            "raw": client.post(
                "/raw/echo/blob",
                content=blob,
                headers={"content-type": "application/octet-stream", "x-request-id": "raw"},
            ),
            "chunked": client.post(
                "/raw/echo/parts", content=iter(parts), headers={"x-request-id": "chunked"}
            ),
        }

    app = _orders_app()
    with serving(app, lifespan="off") as url, _client(url) as client:
        plain = exchange_all(client)
    with (
        serving(AuditMiddleware(app, recorder=recorder, spill_dir=tmp_path), lifespan="off") as url,
        _client(url) as client,
    ):
        audited = exchange_all(client)

    for key, response in plain.items():
        other = audited[key]
        assert response.status_code == other.status_code == 200, key
        assert response.content == other.content, key
        assert _without_date(response.headers) == _without_date(other.headers), key
        assert "date" in response.headers
        assert "date" in other.headers
    assert "chunked" in audited["chunked"].request.headers.get("transfer-encoding", "")
    assert audited["raw"].content == blob
    assert audited["chunked"].content == blob
    assert json.loads(audited["order"].content)["item_count"] == len(json.loads(order)["items"])

    records = _by_correlation(_take(recorder, 3))
    assert recorder.take_all() == []
    expected = {
        "order": ("/orders/42", "/orders/{order_id}", b"source=test", order),
        "raw": ("/raw/echo/blob", "/raw/echo/{name}", b"", blob),
        "chunked": ("/raw/echo/parts", "/raw/echo/{name}", b"", blob),
    }
    for key, (path, route, query, sent) in expected.items():
        exchange = records[key]
        got = audited[key].content
        assert exchange.method == "POST"
        assert exchange.path == path
        assert exchange.query == query
        assert exchange.route == route
        assert exchange.status == 200
        assert exchange.outcome == "complete"
        assert exchange.error is None
        assert exchange.request_body is not None
        assert exchange.response_body is not None
        assert exchange.request_body.read() == sent
        assert exchange.request_size == exchange.request_body.size == len(sent)
        assert exchange.request_body.sha256() == _sha(sent)
        assert exchange.request_body.complete
        assert not exchange.request_body.truncated
        assert exchange.response_body.read() == got
        assert exchange.response_size == exchange.response_body.size == len(got)
        assert exchange.response_body.sha256() == _sha(got)
        assert exchange.response_body.complete
        recorded_headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in exchange.response_headers
        ]
        assert all(pair in audited[key].headers.multi_items() for pair in recorded_headers)
        exchange.discard()
    assert _spill_files(tmp_path) == []


# -- 2. a 100 MB stream: passes through as it is produced, spilled whole to disk ----------


def _numbered_chunk(base: bytes, index: int) -> bytes:
    return index.to_bytes(8, "big") + base[8:]


def test_streamed_100mb_response_flows_through_and_spills_to_disk(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """A 100 MB stream reaches the client while still produced; recorded whole, spilled to disk."""
    chunk_count = 100
    base = random.Random(11).randbytes(MiB)
    expected = hashlib.sha256()
    for index in range(chunk_count):
        expected.update(_numbered_chunk(base, index))
    events: list[str] = []
    client_has_first = threading.Event()

    app = FastAPI()

    @app.get("/downloads/{name}")
    async def download(name: str) -> StreamingResponse:
        async def produce() -> AsyncIterator[bytes]:
            events.append("app: first chunk produced")
            yield _numbered_chunk(base, 0)
            released = await _wait_for(client_has_first, 10.0)
            events.append("app: released" if released else "app: gave up waiting")
            for index in range(1, chunk_count):
                yield _numbered_chunk(base, index)
            events.append("app: last chunk produced")

        return StreamingResponse(produce(), media_type="application/octet-stream")

    audited = AuditMiddleware(
        app, recorder=recorder, memory_limit=MiB, body_limit=None, spill_dir=tmp_path
    )
    received = hashlib.sha256()
    size = 0
    with (
        serving(audited, lifespan="off") as url,
        _client(url) as client,
        client.stream("GET", "/downloads/big", headers={"x-request-id": "big"}) as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            if not client_has_first.is_set():
                events.append("client: first bytes received")
                client_has_first.set()
            received.update(chunk)
            size += len(chunk)

    assert events == [
        "app: first chunk produced",
        "client: first bytes received",
        "app: released",
        "app: last chunk produced",
    ]
    assert size == chunk_count * MiB
    assert received.hexdigest() == expected.hexdigest()

    (exchange,) = _take(recorder, 1)
    body = exchange.response_body
    assert body is not None
    assert exchange.correlation_id == "big"
    assert exchange.route == "/downloads/{name}"
    assert exchange.outcome == "complete"
    assert exchange.status == 200
    assert exchange.response_size == body.size == chunk_count * MiB
    assert body.complete
    assert not body.truncated
    assert body.sha256() == expected.hexdigest()
    assert body.stored_size == chunk_count * MiB
    assert body.memory_size == 0
    spill = body.spill_path
    assert spill is not None
    assert Path(spill).parent.parent == tmp_path
    assert os.path.getsize(spill) == chunk_count * MiB
    assert _stored_sha(body) == expected.hexdigest()
    assert exchange.request_size == 0
    exchange.discard()
    assert not os.path.exists(spill)
    assert _spill_files(tmp_path) == []


# -- 3. concurrency: pipelined keep-alive requests and several connections ---------------


def _echo_app(in_flight_gate: int = 0) -> tuple[FastAPI, list[int]]:
    """An echo app; with ``in_flight_gate`` its handlers wait (bounded) until that many
    requests are in flight at once, so the connections provably overlap."""
    app = FastAPI()
    state = {"in_flight": 0, "open": in_flight_gate <= 1}
    peaks: list[int] = []

    @app.post("/echo/{key}")
    async def echo(key: str, request: Request) -> Response:
        state["in_flight"] += 1
        try:
            peaks.append(state["in_flight"])
            for _ in range(int(10.0 / POLL)):
                if state["open"] or state["in_flight"] >= in_flight_gate:
                    state["open"] = True
                    break
                await asyncio.sleep(POLL)
            chunks = []
            async for chunk in request.stream():
                chunks.append(chunk)
                await asyncio.sleep(0)
            return Response(
                content=b"".join(chunks),
                media_type="application/octet-stream",
                headers={"x-echo-key": key, "x-echo-id": request.headers.get("x-request-id", "")},
            )
        finally:
            state["in_flight"] -= 1

    return app, peaks


def _http_request(path: str, body: bytes, request_id: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream"
        f"\r\nContent-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n\r\n"
    )
    return head.encode() + body


def _read_response(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length framed HTTP/1.1 response from a binary file object."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def test_pipelined_and_concurrent_requests_are_each_recorded_once_with_their_own_bodies(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """Pipelined and concurrent requests are each recorded once, with their own bodies."""
    rng = random.Random(5)

    def body_for(key: str) -> bytes:
        return key.encode() + b":" + rng.randbytes(rng.choice([0, 1, 700, 70 * KiB, 300 * KiB]))

    # One connection, eight pipelined requests sent before any response is read.
    app, _ = _echo_app()
    pipelined = {f"pipe-{i}": body_for(f"pipe-{i}") for i in range(8)}
    audited = AuditMiddleware(app, recorder=recorder, spill_dir=tmp_path)
    with (
        serving(audited, lifespan="off") as url,
        socket.create_connection(("127.0.0.1", _port(url)), timeout=30) as sock,
    ):
        sock.sendall(
            b"".join(_http_request(f"/echo/{key}", body, key) for key, body in pipelined.items())
        )
        with sock.makefile("rb") as stream:
            for key, body in pipelined.items():
                status, headers, answer = _read_response(stream)
                assert (status, headers["x-echo-id"], answer) == (200, key, body)
    records = _by_correlation(recorder.take_all())
    assert set(records) == set(pipelined)
    assert len({exchange.client for exchange in records.values()}) == 1
    for key, body in pipelined.items():
        exchange = records[key]
        assert exchange.path == f"/echo/{key}"
        assert exchange.route == "/echo/{key}"
        assert exchange.outcome == "complete"
        assert exchange.request_body is not None
        assert exchange.response_body is not None
        assert exchange.request_body.read() == body
        assert exchange.response_body.read() == body
        assert exchange.request_size == exchange.response_size == len(body)
        exchange.discard()

    # Four keep-alive connections, six requests each, overlapping in the app.
    connections, per_connection = 4, 6
    app, peaks = _echo_app(in_flight_gate=connections)
    bodies = {
        f"c{c}-r{r}": body_for(f"c{c}-r{r}")
        for c in range(connections)
        for r in range(per_connection)
    }

    def run_connection(url: str, index: int) -> list[tuple[str, int, bytes, str]]:
        got = []
        with _client(url) as client:
            for r in range(per_connection):
                key = f"c{index}-r{r}"
                response = client.post(
                    f"/echo/{key}", content=bodies[key], headers={"x-request-id": key}
                )
                got.append(
                    (key, response.status_code, response.content, response.headers["x-echo-id"])
                )
        return got

    audited = AuditMiddleware(app, recorder=recorder, spill_dir=tmp_path)
    with (
        serving(audited, lifespan="off") as url,
        ThreadPoolExecutor(max_workers=connections) as pool,
    ):
        results = list(pool.map(run_connection, [url] * connections, range(connections)))
    assert max(peaks) == connections
    for got in results:
        for key, status, content, echoed in got:
            assert (status, content, echoed) == (200, bodies[key], key)

    records = _by_correlation(recorder.take_all())
    assert set(records) == set(bodies)
    for c in range(connections):
        clients = {records[f"c{c}-r{r}"].client for r in range(per_connection)}
        assert len(clients) == 1, f"connection {c} was not kept alive: {clients}"
    assert len({exchange.client for exchange in records.values()}) == connections
    for key, body in bodies.items():
        exchange = records[key]
        assert exchange.outcome == "complete"
        assert exchange.request_body is not None
        assert exchange.response_body is not None
        assert exchange.request_body.read() == body
        assert exchange.response_body.read() == body
        assert exchange.request_body.sha256() == exchange.response_body.sha256() == _sha(body)
        exchange.discard()
    assert _spill_files(tmp_path) == []


# -- 4. client disconnects mid-upload and mid-download -----------------------------------


def test_client_disconnects_mid_upload_and_mid_download_are_recorded_as_such(
    recorder: MemoryRecorder, tmp_path: Path
) -> None:
    """Hang-ups mid-upload and mid-download are recorded client_disconnected; serving goes on."""
    order = _order_json()
    received: list[int] = []
    produced: list[int] = []
    piece = random.Random(9).randbytes(64 * KiB)
    cap = 16 * KiB  # 1 GiB of 64 KiB chunks: the stream ends even if nobody stops it

    app = FastAPI()
    _add_order_route(app)

    @app.post("/uploads/{name}")
    async def upload(name: str, request: Request) -> dict[str, int]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            received.append(total)
        return {"size": total}

    @app.get("/feeds/{name}")
    async def feed(name: str) -> StreamingResponse:
        async def produce() -> AsyncIterator[bytes]:
            for index in range(cap):
                produced.append(index)
                yield piece
                await asyncio.sleep(0)

        return StreamingResponse(produce(), media_type="application/octet-stream")

    declared = 1_000_000
    audited = AuditMiddleware(app, recorder=recorder, spill_dir=tmp_path)
    with serving(audited, lifespan="off") as url, _client(url) as client:
        port = _port(url)
        # Upload cut short after the app has read part of it (streamed handler).
        sent = order[:300_000]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = (
                f"POST /uploads/cut HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                f"{declared}\r\nX-Request-ID: upload-stream\r\n\r\n"
            ).encode()
            sock.sendall(head + sent)
            assert _wait_until(lambda: bool(received), 10.0), "the app never read the upload"
        (cut,) = _take(recorder, 1)
        assert cut.correlation_id == "upload-stream"
        assert cut.route == "/uploads/{name}"
        assert cut.outcome == "client_disconnected"
        assert cut.request_body is not None
        assert not cut.request_body.complete
        assert 0 < cut.request_size == cut.request_body.size <= len(sent)
        assert cut.request_body.read() == sent[: cut.request_size]
        assert cut.request_body.sha256() == _sha(sent[: cut.request_size])
        cut.discard()

        # Upload cut short to a pydantic route (FastAPI turns the disconnect into a 400).
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = (
                f"POST /orders/9 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(order)}\r\n"
                f"X-Request-ID: upload-model\r\n\r\n"
            ).encode()
            sock.sendall(head + order[:200_000])
        (cut,) = _take(recorder, 1)
        assert cut.correlation_id == "upload-model"
        assert cut.route == "/orders/{order_id}"
        assert cut.outcome == "client_disconnected"
        assert cut.request_body is not None
        assert not cut.request_body.complete
        assert cut.request_size <= 200_000
        assert cut.request_body.read() == order[: cut.request_size]
        cut.discard()

        # Download closed by the client after its first chunks.
        got = 0
        with client.stream("GET", "/feeds/endless", headers={"x-request-id": "download"}) as r:
            assert r.status_code == 200
            for count, chunk in enumerate(r.iter_raw(), 1):
                got += len(chunk)
                if count == 3:
                    break
        (cut,) = _take(recorder, 1)
        assert cut.correlation_id == "download"
        assert cut.route == "/feeds/{name}"
        assert cut.status == 200
        assert cut.outcome == "client_disconnected"
        assert cut.response_body is not None
        assert not cut.response_body.complete
        # Back-pressure stopped the app soon after the client left: far below the body limit.
        assert got <= cut.response_size == cut.response_body.size < 64 * MiB
        assert len(produced) < cap
        stored = cut.response_body.read()
        assert len(stored) == cut.response_size
        assert stored == piece * (len(stored) // len(piece))
        cut.discard()

        # The server still serves, and records, complete exchanges.
        response = client.post(
            "/orders/10",
            content=order,
            headers={"content-type": "application/json", "x-request-id": "after"},
        )
        assert response.status_code == 200
        (after,) = _take(recorder, 1)
        assert after.correlation_id == "after"
        assert after.outcome == "complete"
        assert after.request_body is not None
        assert after.request_body.read() == order
        after.discard()
    assert recorder.take_all() == []
    assert _spill_files(tmp_path) == []


# -- 5. HEAD, 204 and 304 ----------------------------------------------------------------


def test_head_204_and_304_are_recorded_with_status_and_empty_response_body(
    recorder: MemoryRecorder,
) -> None:
    """HEAD, 204 and 304 are recorded complete with their status and an empty response body."""
    app = FastAPI()
    etag = '"v1"'

    @app.api_route("/items/{item_id}", methods=["GET", "HEAD"])
    async def read_item(item_id: int) -> JSONResponse:
        return JSONResponse({"id": item_id, "name": "widget"}, headers={"etag": etag})

    @app.delete("/items/{item_id}", status_code=204)
    async def delete_item(item_id: int) -> Response:
        return Response(status_code=204)

    @app.get("/cached/{item_id}")
    async def cached(item_id: int, request: Request) -> Response:
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"etag": etag})
        return JSONResponse({"id": item_id}, headers={"etag": etag})

    with (
        serving(AuditMiddleware(app, recorder=recorder), lifespan="off") as url,
        _client(url) as client,
    ):
        full = client.get("/items/1", headers={"x-request-id": "get"})
        head = client.head("/items/1", headers={"x-request-id": "head"})
        gone = client.delete("/items/1", headers={"x-request-id": "delete"})
        fresh = client.get("/cached/1", headers={"x-request-id": "304", "if-none-match": etag})
    assert (full.status_code, head.status_code, gone.status_code, fresh.status_code) == (
        200,
        200,
        204,
        304,
    )
    assert full.content
    assert head.content == gone.content == fresh.content == b""
    assert head.headers["content-length"] == str(len(full.content))

    records = _by_correlation(recorder.take_all())
    assert set(records) == {"get", "head", "delete", "304"}
    assert records["get"].response_body is not None
    assert records["get"].response_body.read() == full.content
    for key, method, status, route in [
        ("head", "HEAD", 200, "/items/{item_id}"),
        ("delete", "DELETE", 204, "/items/{item_id}"),
        ("304", "GET", 304, "/cached/{item_id}"),
    ]:
        exchange = records[key]
        assert exchange.method == method
        assert exchange.status == status
        assert exchange.route == route
        assert exchange.outcome == "complete", key
        assert exchange.response_body is not None
        assert exchange.response_body.read() == b"", key
        assert exchange.response_size == exchange.response_body.size == 0, key
        assert exchange.response_body.sha256() == _sha(b"")
        assert exchange.response_body.complete


# -- 6. peak memory of capturing a 1 GiB stream (in process) -----------------------------


def _blob_app(block: bytes, count: int) -> FastAPI:
    app = FastAPI()

    @app.get("/blobs/{name}")
    async def blob(name: str) -> StreamingResponse:
        async def produce() -> AsyncIterator[bytes]:
            for _ in range(count):
                # A fresh copy per chunk, as a real producer would make: a capture that
                # held on to chunks would show in the traced memory.
                yield bytes(memoryview(block))

        return StreamingResponse(produce(), media_type="application/octet-stream")

    return app


async def _drive(app: Callable[..., Any], path: str) -> tuple[int, str]:
    """Call ``app`` with a GET like uvicorn would; the client side hashes and drops every
    chunk. Returns (bytes received, their SHA-256)."""
    scope = http_scope(path, method="GET", headers=[(b"x-request-id", path.encode())])
    done = asyncio.Event()
    requested = False
    hasher = hashlib.sha256()
    size = 0

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        nonlocal size
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            hasher.update(body)
            size += len(body)
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    return size, hasher.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("body_limit", [None, "default"], ids=["whole", "default-limit"])
def test_capturing_1gib_stream_keeps_peak_memory_bounded(
    recorder: MemoryRecorder, tmp_path: Path, body_limit: str | None
) -> None:
    """Capturing a 1 GiB stream at memory_limit=1 MiB keeps peak traced memory under 64 MiB."""
    count = 1024
    block = random.Random(13).randbytes(MiB)
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(block)
    limits: dict[str, Any] = {} if body_limit == "default" else {"body_limit": body_limit}
    audited = AuditMiddleware(
        _blob_app(block, count), recorder=recorder, memory_limit=MiB, spill_dir=tmp_path, **limits
    )

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        size, client_sha = asyncio.run(_drive(audited, "/blobs/huge"))
        (exchange,) = _take(recorder, 1)
        body = exchange.response_body
        assert body is not None
        digest = body.sha256()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert size == count * MiB == GiB
    assert client_sha == expected.hexdigest()
    assert peak < 64 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    assert exchange.outcome == "complete"
    assert exchange.route == "/blobs/{name}"
    assert exchange.response_size == body.size == count * MiB
    assert digest == expected.hexdigest()
    assert body.complete
    assert body.memory_size == 0
    spill = body.spill_path
    assert spill is not None
    assert Path(spill).parent.parent == tmp_path
    if body_limit == "default":
        limit = 64 * MiB
        assert body.truncated
        assert body.stored_size == limit
        assert os.path.getsize(spill) == limit
        assert _stored_sha(body) == hashlib.sha256(block * (limit // MiB)).hexdigest()
    else:
        assert not body.truncated
        assert body.stored_size == count * MiB
        assert os.path.getsize(spill) == count * MiB
    exchange.discard()
    assert not os.path.exists(spill)
    assert _spill_files(tmp_path) == []
