"""Route classes that mark every route of a FastAPI router as audited.

``APIRouter(route_class=AuditedRoute)`` marks every route the router declares; the marker
is read from ``scope["route"]`` after routing, before the body is read. (A ``Depends()``
marker would come too late: FastAPI reads the body before it solves dependencies.) Only
``asgi_audit.fastapi`` imports this module, so FastAPI is needed only by its users.
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute

from .levels import Level
from .markers import MARKER_ATTRIBUTE, note_marker


def audited_route(level: str | Level = Level.REQUEST_RESPONSE) -> type[APIRoute]:
    """A route class that marks its routes as audited at ``level``."""
    parsed = Level.parse(level, "audited_route(level=...)")

    def __init__(self: APIRoute, *args: Any, **kwargs: Any) -> None:
        APIRoute.__init__(self, *args, **kwargs)
        note_marker()

    namespace: dict[str, Any] = {
        MARKER_ATTRIBUTE: parsed,
        "__init__": __init__,
        "__module__": __name__,
        "__doc__": f"An APIRoute audited at {parsed.word}.",
    }
    return type(f"AuditedRoute{parsed.word}", (APIRoute,), namespace)


AuditedRoute = audited_route()
"""Route class for ``APIRouter(route_class=AuditedRoute)``: audits at ``RequestResponse``."""

__all__ = ["AuditedRoute", "audited_route"]
