"""Exceptions raised by asgi-audit.

Two regimes: configuration mistakes fail at once with :class:`ConfigError`, naming the
parameter, what was expected and what arrived; anything that goes wrong while an exchange
is being recorded is counted and logged, never raised into the application.

    AuditError
    └── ConfigError (also a ValueError)
        └── NotSupportedError
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every error asgi-audit raises on purpose."""


class ConfigError(AuditError, ValueError):
    """A parameter or environment variable has a value asgi-audit cannot use."""

    def __init__(self, parameter: str, problem: str) -> None:
        self.parameter = parameter
        self.problem = problem
        super().__init__(f"{parameter}: {problem}")


class NotSupportedError(ConfigError):
    """An option that exists in the documented interface but is not available yet."""
