"""An audited FastAPI app for process-level tests; configured only by ASGI_AUDIT_* variables.

uvicorn tests.apps.audited_shop:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from asgi_audit import AuditMiddleware

app = FastAPI()


@app.post("/orders/{order_id}")
async def echo_order(order_id: int, request: Request) -> Response:
    """Echo the raw body, as an order service acknowledging what it received."""
    return Response(await request.body(), media_type="application/json")


@app.get("/exports/{count}")
async def export(count: int) -> StreamingResponse:
    """Stream ``count`` lines."""

    async def lines() -> AsyncIterator[bytes]:
        for number in range(count):
            yield b'{"n": %d}\n' % number

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@app.get("/health")
async def health() -> str:
    return "ok"


@app.get("/pid")
async def pid() -> int:
    """Which worker answered (the multi-worker test makes sure both get traffic)."""
    return os.getpid()


app.add_middleware(AuditMiddleware, exclude=["/health", "/pid"])
