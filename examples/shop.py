"""A small shop API with no auditing in its code: ``asgi-audit run examples.shop:app``
audits it from the environment (``ASGI_AUDIT_*``) and a configuration file.

``create_app`` is the same app as a factory (``asgi-audit run --factory
examples.shop:create_app``)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request


def create_app() -> FastAPI:
    shop = FastAPI(title="shop")

    @shop.post("/orders/{order_id}")
    async def put_order(order_id: int, request: Request) -> dict[str, Any]:
        order = await request.json()
        return {"order_id": order_id, "lines": len(order.get("lines", [])), "pid": os.getpid()}

    @shop.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, Any]:
        return {"order_id": order_id, "status": "shipped", "pid": os.getpid()}

    @shop.get("/health")
    async def health() -> str:
        return "ok"

    return shop


app = create_app()
