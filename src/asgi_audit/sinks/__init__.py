"""Sinks: where records end up and are queried from, chosen by URL.

The registry (:func:`open_sink`, :func:`check_sink_url`) finds each kind of sink by the
URL's scheme and imports its module only when that scheme is asked for, so an optional
backend's dependencies are needed only by those who use it.

This room may import the recording room (how bodies are packed) and the capture room
(settings' defaults); the shipping and cli rooms import it, never the other way round.
"""

from __future__ import annotations

from ..capture.settings import DEFAULT_SINK_URL
from .protocols import BatchWriter, Query, Sink
from .registry import KNOWN_SCHEMES, check_sink_url, open_sink

__all__ = [
    "DEFAULT_SINK_URL",
    "KNOWN_SCHEMES",
    "BatchWriter",
    "Query",
    "Sink",
    "check_sink_url",
    "open_sink",
]
