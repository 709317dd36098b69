"""Route templates: which declared route served a request, and which routes an app has.

Policy rules name routes the way the app declares them (``/orders/{order_id}``), so the
template has to come from the router, not from a regex over the raw path. Starlette and
FastAPI record the matched route in ``scope["route"]`` (Starlette >= 1.7, FastAPI >= 0.74.1)
and the endpoint in ``scope["endpoint"]``. Two things then need care:

* Mounts grow ``scope["root_path"]``; the template of a route inside a mounted app is that
  growth plus the route's own ``path_format``.
* FastAPI >= 0.137 no longer copies routes on ``include_router``: ``route.path_format``
  lacks the include prefixes. ``fastapi.routing.iter_route_contexts`` lists the full
  templates; when a route's own regex does not match the request path, the prefixed form
  is looked up there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from .._types import Scope

_Contexts = dict[int, list[tuple[Any, str]]]


def route_path(scope: Scope, root_path: str) -> str:
    """The request path below ``root_path`` (what the app's router matches)."""
    path: str = scope["path"]
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


_ROUTES_CACHED = 4096
"""Routes whose attributes a resolver keeps at once (an app's routes, unless it makes
routes per request, which then only cost the lookups again)."""


class TemplateResolver:
    """Finds the full template of the route that served a request; cached per router."""

    __slots__ = ("_contexts", "_endpoints", "_routes")

    def __init__(self) -> None:
        self._contexts: dict[int, tuple[Any, _Contexts]] = {}
        self._endpoints: dict[int, tuple[Any, dict[int, list[str]]]] = {}
        self._routes: dict[int, tuple[Any, str | None, bool, Any]] = {}
        """``id(route)`` to (route, its ``path_format`` or None, whether it is a mount,
        its ``path_regex``): read once per route instead of once per request (finding
        that a route has no ``routes`` costs an AttributeError each time)."""

    def template(self, scope: Scope, entry_root_path: str) -> str | None:
        """Full route template for a routed scope, or None when no route matched."""
        route = scope.get("route")
        if route is None:
            return self._endpoint_template(scope, entry_root_path)
        known = self._routes.get(id(route))
        if known is None or known[0] is not route:
            known = self._route_facts(route)
        _, fmt, mount, regex = known
        if fmt is None:
            return None
        current_root: str = scope.get("root_path", "") or ""
        if current_root == entry_root_path:
            mount_prefix = ""
        elif current_root.startswith(entry_root_path):
            mount_prefix = current_root[len(entry_root_path) :]
        else:
            mount_prefix = ""
        if mount:
            return mount_prefix + "/{path}"
        below = route_path(scope, current_root)
        if regex is None or regex.match(below):
            return mount_prefix + fmt
        included = self._included_template(scope, route, below)
        return mount_prefix + (included if included is not None else fmt)

    def _route_facts(self, route: Any) -> tuple[Any, str | None, bool, Any]:
        fmt = getattr(route, "path_format", None)
        if not isinstance(fmt, str):
            fmt = None
        facts = (
            route,
            fmt,
            fmt is not None and _is_mount(route),
            getattr(route, "path_regex", None),
        )
        if len(self._routes) >= _ROUTES_CACHED:
            self._routes.clear()
        self._routes[id(route)] = facts
        return facts

    def _included_template(self, scope: Scope, route: Any, below: str) -> str | None:
        router = scope.get("router")
        if router is None:
            return None
        cached = self._contexts.get(id(router))
        if cached is None or cached[0] is not router:
            cached = (router, _route_contexts(router))
            self._contexts[id(router)] = cached
        for regex, fmt in cached[1].get(id(route), ()):
            if regex.match(below):
                return fmt
        return None

    def _endpoint_template(self, scope: Scope, entry_root_path: str) -> str | None:
        """Starlette < 1.7 records only ``scope["endpoint"]``: find its declared route."""
        endpoint = scope.get("endpoint")
        router = scope.get("router")
        if endpoint is None or router is None:
            return None
        cached = self._endpoints.get(id(router))
        if cached is None or cached[0] is not router:
            by_endpoint: dict[int, list[str]] = {}
            for template, declared in _walk_routes(list(getattr(router, "routes", [])), ""):
                target = getattr(declared, "endpoint", None)
                if target is not None:
                    by_endpoint.setdefault(id(target), []).append(template)
            cached = (router, by_endpoint)
            self._endpoints[id(router)] = cached
        candidates = cached[1].get(id(endpoint), [])
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        below = route_path(scope, entry_root_path)
        for template in candidates:
            if _template_regex(template).match(below):
                return template
        return None


def _is_mount(route: Any) -> bool:
    fmt = getattr(route, "path_format", "")
    return hasattr(route, "routes") and isinstance(fmt, str) and fmt.endswith("{path}")


def _route_contexts(router: Any) -> _Contexts:
    """Map ``id(original route)`` to (regex, full template) for FastAPI >= 0.137.2."""
    iter_route_contexts = _fastapi_route_contexts()
    if iter_route_contexts is None:
        return {}
    found: _Contexts = {}
    for context in iter_route_contexts(getattr(router, "routes", [])):
        fmt = context.path_format
        regex = getattr(context, "path_regex", None)
        if isinstance(fmt, str) and regex is not None:
            found.setdefault(id(context.original_route), []).append((regex, fmt))
    return found


def _template_regex(template: str) -> re.Pattern[str]:
    from starlette.routing import compile_path

    regex: re.Pattern[str] = compile_path(template)[0]
    return regex


def declared_templates(app: Any) -> set[str] | None:
    """Every route template an app declares, or None when its routes cannot be seen.

    Follows ``.app`` links through middleware (``add_middleware`` hands us the inner stack)
    until an object with ``routes`` appears, then walks mounts.
    """
    seen = 0
    node = app
    while node is not None and seen < 32:
        routes = getattr(node, "routes", None)
        if isinstance(routes, list):
            return {template for template, _ in _walk_routes(routes, "")}
        node = getattr(node, "app", None)
        seen += 1
    return None


def _walk_routes(routes: list[Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """(full template, route) for every route, descending into mounts."""
    for fmt, route in _formats(routes):
        if _is_mount(route):
            mount_prefix = prefix + fmt[: -len("/{path}")]
            inner = getattr(route, "routes", None) or []
            yielded = False
            for found in _walk_routes(list(inner), mount_prefix):
                yielded = True
                yield found
            if not yielded:
                yield mount_prefix + "/{path}", route
        else:
            yield prefix + fmt, route


def _fastapi_route_contexts() -> Callable[[list[Any]], Iterator[Any]] | None:
    """``fastapi.routing.iter_route_contexts`` where FastAPI (>= 0.137.2) has it."""
    try:
        from fastapi import routing
    except ImportError:
        return None
    found: Callable[[list[Any]], Iterator[Any]] | None = getattr(
        routing, "iter_route_contexts", None
    )
    return found


def _formats(routes: list[Any]) -> Iterator[tuple[str, Any]]:
    iter_route_contexts = _fastapi_route_contexts()
    if iter_route_contexts is not None:
        for context in iter_route_contexts(routes):
            fmt = context.path_format
            if isinstance(fmt, str):
                yield fmt, getattr(context, "route", context)
        return
    for route in routes:
        fmt = getattr(route, "path_format", None)
        if isinstance(fmt, str):
            yield fmt, route


_PARAM = re.compile(r"\{[^}]*\}")


def literal_prefix(template: str) -> str:
    """The part of a template before its first parameter: every matching path starts so."""
    match = _PARAM.search(template)
    return template if match is None else template[: match.start()]
