"""Per-endpoint opt-in: ``@audited`` sets an attribute the policy reads after routing.

An attribute on the endpoint is visible in ``scope["endpoint"]`` as soon as the router has
matched, before the app reads the request body, so a marked endpoint's body is captured
from its first byte. The module keeps a count of marked endpoints so that a policy can
skip the per-request wrapping entirely while nothing in the process is marked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from .levels import Level

MARKER_ATTRIBUTE = "__asgi_audit_level__"
"""Attribute set on endpoints (by ``@audited``) and routes (by ``AuditedRoute``)."""

F = TypeVar("F", bound=Callable[..., Any])

_marked = 0


def markers_in_use() -> bool:
    """True once any endpoint or route class in this process carries a marker."""
    return _marked > 0


def note_marker() -> None:
    """Record that a marker exists (called by ``@audited`` and route classes)."""
    global _marked
    _marked += 1


@overload
def audited(endpoint: F, /) -> F: ...


@overload
def audited(*, level: str | Level = ...) -> Callable[[F], F]: ...


def audited(
    endpoint: F | None = None, /, *, level: str | Level = Level.REQUEST_RESPONSE
) -> F | Callable[[F], F]:
    """Mark an endpoint as audited at ``level`` (default ``RequestResponse``).

    Works above or below the framework's route decorator, with or without arguments::

        @app.post("/orders")
        @audited
        async def create_order(order: Order): ...

        @app.get("/orders/{order_id}")
        @audited(level="Metadata")
        async def read_order(order_id: int): ...
    """
    parsed = Level.parse(level, "audited(level=...)")

    def mark(func: F) -> F:
        setattr(func, MARKER_ATTRIBUTE, parsed)
        note_marker()
        return func

    if endpoint is not None:
        return mark(endpoint)
    return mark


def marker_level(obj: object) -> Level | None:
    """The level a marker on ``obj`` asks for, or None when it carries none."""
    level = getattr(obj, MARKER_ATTRIBUTE, None)
    return level if isinstance(level, Level) else None
