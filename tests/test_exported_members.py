"""The public API is small and pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import asgi_audit
import asgi_audit.fastapi


def test_package_exports_are_pinned() -> None:
    """`from asgi_audit import *` gives exactly the documented names."""
    assert sorted(asgi_audit.__all__) == [
        "AuditError",
        "AuditMiddleware",
        "Body",
        "ConfigError",
        "Exchange",
        "Level",
        "MemoryRecorder",
        "NotSupportedError",
        "Policy",
        "Recorder",
        "Rule",
        "audited",
        "make_rule",
    ]
    for name in asgi_audit.__all__:
        assert getattr(asgi_audit, name).__module__.startswith("asgi_audit")


def test_fastapi_helpers_are_pinned() -> None:
    """asgi_audit.fastapi offers the marker and the route classes, the same @audited."""
    assert sorted(asgi_audit.fastapi.__all__) == ["AuditedRoute", "audited", "audited_route"]
    assert asgi_audit.fastapi.audited is asgi_audit.audited
