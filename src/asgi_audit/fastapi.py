"""FastAPI opt-in helpers: ``@audited`` for one endpoint, ``AuditedRoute`` for a router."""

from __future__ import annotations

from .capture.fastapi_routes import AuditedRoute, audited_route
from .capture.markers import audited

__all__ = ["AuditedRoute", "audited", "audited_route"]
