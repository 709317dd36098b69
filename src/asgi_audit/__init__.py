"""asgi-audit: record the raw request and response bodies of selected routes of an ASGI
service into durable, tamper-evident audit storage, without slowing the service down."""

from __future__ import annotations

from ._version import __version__ as __version__
from .capture.levels import Level
from .capture.markers import audited
from .capture.middleware import AuditMiddleware
from .capture.policy import Policy, Rule, make_rule
from .capture.record import Body, Exchange
from .errors import AuditError, ConfigError
from .recording.handoff import MemoryRecorder, Recorder

__all__ = [
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
