"""Exceptions raised by asgi-audit.

Two regimes: configuration mistakes fail at once with :class:`ConfigError`, naming the
parameter, what was expected and what arrived; anything that goes wrong while an exchange
is being recorded is counted and logged, never raised into the application. The other
classes are raised to asgi-audit's own callers (the CLI, the shipper, a test), each for
one kind of failure, so that a caller can tell them apart:

    AuditError
    ├── ConfigError (also a ValueError)  a parameter, variable or URL cannot be used
    ├── RecorderClosed                   an exchange handed to a recorder that was shut down
    ├── SpoolError                       the local spool cannot be written or read
    │   └── RecordNotWritten             mode="blocking-strict": a response is withheld
    ├── ShippingStopped                  delivery was asked to stop before a batch was taken
    └── SinkError                        a sink cannot take or give records right now
        ├── RecordRefused                the sink refuses what a record holds (no retry helps)
        └── CorruptRecord                bytes a sink holds cannot be decoded
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every error asgi-audit raises on purpose."""


class ConfigError(AuditError, ValueError):
    """A parameter, environment variable or URL has a value asgi-audit cannot use."""

    def __init__(self, parameter: str, problem: str) -> None:
        self.parameter = parameter
        self.problem = problem
        super().__init__(f"{parameter}: {problem}")


class RecorderClosed(AuditError):
    """The recorder was shut down: it refuses exchanges instead of queueing them where
    nobody writes (the middleware counts them as failures)."""


class SpoolError(AuditError):
    """The spool cannot be used: its directory cannot be made, or another live process
    writes the same stream."""


class RecordNotWritten(SpoolError):
    """``mode="blocking-strict"``: an exchange's record could not be written, so its
    response's last message is withheld and this is raised from ``send`` (the server then
    closes the connection)."""


class ShippingStopped(AuditError):
    """Shipping was asked to stop (a deadline passed, or a stop was requested) before the
    sink took the batch; the spool keeps it for the next pass."""


class SinkError(AuditError):
    """The sink could not take or give records right now (the shipper retries later)."""


class CorruptRecord(SinkError):
    """Bytes a sink holds cannot be decoded into a record (damaged, or written by an
    unknown version); the message says where."""


class RecordRefused(SinkError):
    """The sink refused a batch for what its records hold (a value it cannot index or
    store), not because it is unreachable: sending the same batch again would fail again.
    The shipper splits such a batch to find the records at fault and quarantines them;
    ``ids`` names them when the sink knows which (then no split is needed)."""

    def __init__(self, message: str, *, ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.ids = ids
