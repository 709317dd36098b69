"""``asgi-audit demo``: a small shop API under uvicorn, audited, exercised, and shown.

It runs on a free loopback port, sends the kind of traffic the product is for (a ~1 MB
JSON order, a streamed export, a few small calls, a health check that is excluded), shuts
the server down the way Kubernetes does (graceful exit), and prints what was recorded.
"""

from __future__ import annotations

import hashlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..capture.middleware import AuditMiddleware
from ..fastapi import audited
from ..sinks import DEFAULT_SINK_URL, Query, open_sink
from ..sinks.record import StoredRecord
from .terminal import printable, printable_url


class Line(BaseModel):
    sku: str
    quantity: int
    price_cents: int
    note: str


class Order(BaseModel):
    customer: str
    lines: list[Line]


def build_app(sink: str, spool: str) -> FastAPI:
    """The demo shop: FastAPI with ``AuditMiddleware`` on its order routes."""
    app = FastAPI(title="demo-shop")

    @app.post("/orders/{order_id}")
    async def put_order(order_id: int, order: Order) -> dict[str, Any]:
        total = sum(line.quantity * line.price_cents for line in order.lines)
        return {"order_id": order_id, "lines": len(order.lines), "total_cents": total}

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, Any]:
        return {"order_id": order_id, "status": "shipped"}

    @app.get("/exports/orders.ndjson")
    @audited(level="RequestResponse")
    async def export_orders() -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            for number in range(2000):
                yield json.dumps({"order_id": number, "status": "shipped"}).encode() + b"\n"

        return StreamingResponse(rows(), media_type="application/x-ndjson")

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/health")
    async def health() -> str:
        return "ok"

    app.add_middleware(
        AuditMiddleware,
        routes=["/orders/{order_id}", "/upload"],
        exclude=["/health"],
        sink=sink,
        spool=spool,
        service="demo-shop",
        environ={},
    )
    return app


def sample_order(target_bytes: int = 1_000_000) -> bytes:
    """A realistic order document of about ``target_bytes`` bytes of JSON."""
    lines = []
    number = 0
    size = 0
    while size < target_bytes:
        line = {
            "sku": f"SKU-{number:06d}",
            "quantity": number % 7 + 1,
            "price_cents": 199 + number % 5000,
            "note": f"gift wrap {number % 3} ünïcode ✓",
        }
        lines.append(line)
        size += len(json.dumps(line)) + 2
        number += 1
    return json.dumps({"customer": "c-0042", "lines": lines}).encode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_demo(echo: Callable[[str], None] = print, sink: str | None = None) -> list[StoredRecord]:
    """Serve, exercise, stop gracefully, then read back and print what the sink holds."""
    sink = sink or DEFAULT_SINK_URL
    shown_sink = printable_url(sink)
    started = time.time_ns()
    with tempfile.TemporaryDirectory(prefix="asgi-audit-demo-") as spool:
        port = _free_port()
        config = uvicorn.Config(
            build_app(sink, spool),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="demo-uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the demo server did not start")
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        echo(
            f"demo shop on {base}: uvicorn with AuditMiddleware on /orders/{{order_id}}, "
            f"/upload and the @audited export; sink {shown_sink}"
        )
        order = sample_order()
        try:
            _exercise(base, order, echo)
        finally:
            server.should_exit = True  # what SIGTERM does: lifespan shutdown drains the spool
            thread.join(timeout=60)
    with closing(open_sink(sink)) as opened:
        records = list(opened.search(Query(since_ns=started, newest_first=False, limit=None)))
        records = [r for r in records if r.service == "demo-shop"]
        full = [opened.get(r.id) for r in records]
    shown = [r for r in full if r is not None]
    echo("")
    echo(f"recorded {len(shown)} exchanges in {shown_sink} (GET /health is excluded):")
    for record in shown:
        echo(describe(record))
    sent = hashlib.sha256(order).hexdigest()
    stored = next(
        (r for r in shown if r.method == "POST" and r.route == "/orders/{order_id}"), None
    )
    if stored is not None and stored.request_body is not None:
        same = stored.request_body.sha256 == sent and stored.request_body.data == order
        echo(f"\nthe 1 MB order was stored byte for byte: {same} (sha256 {sent[:16]}…)")
    echo(f"look again with: asgi-audit ls --sink {shown_sink}")
    return shown


def _exercise(base: str, order: bytes, echo: Callable[[str], None]) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        calls = [
            client.post(
                "/orders/7",
                content=order,
                headers={
                    "content-type": "application/json",
                    "x-request-id": "demo-order-7",
                    "authorization": "Bearer demo-secret-token",
                },
            ),
            client.get("/orders/7"),
            client.post("/upload", content=bytes(range(256)) * 64),
            client.get("/health"),
            client.get("/orders/not-a-number"),
        ]
        with client.stream("GET", "/exports/orders.ndjson") as streamed:
            exported = sum(len(chunk) for chunk in streamed.iter_bytes())
    for response in calls:
        echo(
            f"  {response.request.method:5} {printable(response.request.url.path):28} -> "
            f"{response.status_code} ({len(response.content):,} bytes)"
        )
    echo(f"  GET   /exports/orders.ndjson         -> 200 ({exported:,} bytes, streamed)")


def describe(record: StoredRecord) -> str:
    """One line per record, then one per body: size, digest, and a preview; record text
    made printable, since the demo's records could be anyone's (``--sink`` is any sink)."""
    lines = [
        f"- {printable(record.id)}  {printable(record.method)} {printable(record.path)} "
        f"route={printable(str(record.route))} status={record.status} "
        f"{printable(record.outcome)} level={printable(record.level)} "
        f"{record.duration_ns / 1e6:.1f} ms correlation={printable(record.correlation_id)}"
    ]
    if record.redacted_headers:
        redacted = ", ".join(printable(name) for name in record.redacted_headers)
        lines.append(f"    redacted headers: {redacted}")
    for name, body, size in (
        ("request ", record.request_body, record.request_size),
        ("response", record.response_body, record.response_size),
    ):
        if body is None:
            lines.append(f"    {name} {size:,} bytes (not kept at {record.level})")
            continue
        flags = " truncated" if body.truncated else ""
        flags += "" if body.complete else " incomplete"
        preview = _preview((body.data or b"")[:60])
        digest = printable(body.sha256[:16])
        lines.append(f"    {name} {body.size:,} bytes sha256={digest}…{flags} {preview}")
    return "\n".join(lines)


def _preview(head: bytes) -> str:
    """``repr`` already escapes every character :func:`printable` would (none of them is
    ``str.isprintable``); :func:`printable` keeps that true whatever ``repr`` becomes."""
    try:
        return printable(repr(head.decode("utf-8")))
    except UnicodeDecodeError:
        return "(binary)"


__all__ = ["build_app", "describe", "run_demo", "sample_order"]
