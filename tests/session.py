"""A recorded session for the export, replay and viewer tests: a FastAPI app behind
AuditMiddleware, served by uvicorn on 127.0.0.1, sent one exchange of each kind a trail
holds (JSON with secrets, binary, gzip, streamed, truncated), then shut down through its
lifespan so that every record is in the SQLite store."""

from __future__ import annotations

import contextlib
import gzip
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from asgi_audit import AuditMiddleware

BODY_LIMIT = 256 << 10
"""Bodies past this are truncated in the session (``over_limit="truncate"``)."""
BINARY = bytes(range(256)) * 16
GZIPPED_JSON = b'{"report": "' + b"quarterly figures " * 200 + b'"}'
GZIPPED = gzip.compress(GZIPPED_JSON, mtime=0)
STREAM_CHUNKS = [b'{"n": %d}\n' % n for n in range(5)]
BIG = b"[" + b'"padding padding padding",' * 20_000 + b"0]"
"""A JSON body past :data:`BODY_LIMIT`."""


def session_app(rename: str | None = None) -> FastAPI:
    """The app the session talks to; ``rename`` renames the ``state`` field of the order
    reply (a changed release, for replay)."""
    app = FastAPI()
    state_field = rename or "state"

    @app.post("/orders/{order_id}")
    async def order(order_id: int, request: Request) -> dict[str, Any]:
        sent = await request.json()
        return {"id": order_id, state_field: "created", "lines": len(sent.get("lines", []))}

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, Any]:
        return {"id": order_id, state_field: "created", "at": time.time_ns()}

    @app.post("/blobs")
    async def blob(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    @app.get("/report")
    async def report() -> Response:
        headers = {"content-encoding": "gzip"}
        return Response(GZIPPED, media_type="application/json", headers=headers)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in STREAM_CHUNKS:
                yield chunk

        return StreamingResponse(chunks(), media_type="application/x-ndjson")

    @app.post("/big")
    async def big(request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    return app


@contextlib.contextmanager
def serving(app: Callable[..., Any], lifespan: Literal["on", "off"] = "on") -> Iterator[str]:
    """``app`` under uvicorn on 127.0.0.1 in a thread; yields its base URL; on exit stops
    it (lifespan shutdown: the audit middleware drains) and joins the thread."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http="h11",
        log_level="warning",
        log_config=None,
        lifespan=lifespan,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="session-server", daemon=True)
    thread.start()
    try:
        for _ in range(2000):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.005)
        assert server.started, "uvicorn did not start"
        port = int(server.servers[0].sockets[0].getsockname()[1])
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "uvicorn did not stop"


@dataclass
class Session:
    """The store a session was recorded into, and what the client sent and received,
    by ``"METHOD /path"``."""

    sink: str
    sent: dict[str, bytes] = field(default_factory=dict)
    received: dict[str, bytes] = field(default_factory=dict)


def record_session(directory: Path) -> Session:
    """Record the session into ``directory/audit.db``; returns it once every record is
    stored (six exchanges)."""
    session = Session(sink=f"sqlite:///{directory / 'audit.db'}")
    audited = AuditMiddleware(
        session_app(),
        sink=session.sink,
        spool=directory / "spool",
        ship="thread",
        body_limit=BODY_LIMIT,
        over_limit="truncate",
        environ={},
    )
    order = b'{"lines": [{"sku": "A-1", "quantity": 2}], "password": "hunter2"}'
    exchanges: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        (
            "POST",
            "/orders/7?token=s3cret&verbose=1",
            order,
            {
                "content-type": "application/json",
                "authorization": "Bearer abc.def",
                "cookie": "sid=xyz; theme=dark",
                "x-note": "caf\xe9",
            },
        ),
        ("GET", "/orders/7", None, {}),
        ("POST", "/blobs", BINARY, {"content-type": "application/octet-stream"}),
        ("GET", "/report", None, {"accept-encoding": "gzip"}),
        ("GET", "/stream", None, {}),
        ("POST", "/big", BIG, {"content-type": "application/json"}),
    ]
    with serving(audited) as base, httpx.Client(base_url=base, timeout=30) as client:
        for method, target, body, headers in exchanges:
            encoded = [(name.encode(), value.encode("latin-1")) for name, value in headers.items()]
            answer = client.request(method, target, content=body, headers=encoded)
            assert answer.status_code == 200, (target, answer.status_code)
            key = f"{method} {target.partition('?')[0]}"
            session.sent[key] = body or b""
            session.received[key] = answer.content
    return session
