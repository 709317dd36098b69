"""The public API is small and pinned: changing it is a decision, not an accident.

Pinned the httpx way: each public namespace holds exactly the names its ``__all__`` lists,
so a helper imported for internal use cannot become public by leaking into it.
"""

from __future__ import annotations

import importlib.metadata
from types import ModuleType

import pytest

import asgi_audit
import asgi_audit.fastapi
import asgi_audit.sinks


def public_names(module: ModuleType) -> set[str]:
    """The names a user sees in ``module``: not private, not a module, not a compiler directive.

    ``from __future__ import annotations`` binds ``annotations`` in every module that uses it;
    that is how Python works, not an export, so ``__future__`` features are left out."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, ModuleType)
        and type(value).__module__ != "__future__"
    }


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


def test_sinks_registry_exports_are_pinned() -> None:
    """asgi_audit.sinks offers the registry, the protocols and the query, nothing else."""
    assert sorted(asgi_audit.sinks.__all__) == [
        "BatchWriter",
        "DEFAULT_SINK_URL",
        "KNOWN_SCHEMES",
        "Query",
        "Sink",
        "check_sink_url",
        "open_sink",
    ]


def test_package_version_stands_beside_all() -> None:
    """``__version__`` is public beside ``__all__``: the installed distribution's version."""
    assert asgi_audit.__version__ == importlib.metadata.version("asgi-audit")


@pytest.mark.parametrize(
    "module",
    [
        asgi_audit,
        asgi_audit.sinks,
        asgi_audit.fastapi,
    ],
    ids=lambda module: module.__name__,
)
def test_namespace_is_exactly_all(module: ModuleType) -> None:
    """A public namespace holds exactly the names its ``__all__`` lists, no more, no fewer."""
    assert public_names(module) == set(module.__all__)


@pytest.mark.parametrize(
    "module", [asgi_audit, asgi_audit.sinks, asgi_audit.fastapi], ids=lambda m: m.__name__
)
def test_only_own_submodules_are_module_attributes(module: ModuleType) -> None:
    """The only modules a public namespace holds are its own submodules (no stray imports)."""
    for name, value in vars(module).items():
        if isinstance(value, ModuleType):
            assert value.__name__ == f"{module.__name__}.{name}", name
