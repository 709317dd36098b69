"""What every handler of one viewer shares: the sink it reads, its templates, its bounds."""

from __future__ import annotations

from dataclasses import dataclass

from ...sinks import Sink
from .rendering import Templates


@dataclass(frozen=True)
class Viewer:
    """One viewer app's state. Sink calls block: handlers make them in a thread."""

    sink: Sink
    sink_url: str
    """As given; shown only through :func:`~asgi_audit.cli.terminal.printable_url`."""
    templates: Templates
    poll_seconds: float = 1.0
    """How often the live tail asks the sink for new records."""
    tail_seconds: float = 3600.0
    """How long one event stream lasts; the browser then reconnects where it was."""
    har_limit: int = 1000
    """The most records one HAR download holds."""
