"""What a writer tells the shipper's ``/metrics``: a small JSON file in its stream.

Several worker processes share a spool, each with its own writer and stream, and one
shipper delivers them all; Prometheus scrapes one endpoint per pod. So each writer
publishes its counters where the shipper already looks, ``stats.json`` in its stream's
directory, replaced whole (written beside, then renamed: a reader never sees half of
one) about once a second, and the shipper sums them at each scrape. No
prometheus-client multiprocess directory to clean up: the file goes with its stream.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATS_FILE = "stats.json"
MAX_STATS_BYTES = 64 << 10
"""A stats file larger than this is not one (a reader skips it)."""

COUNTERS = (
    "written",
    "body_bytes",
    "dropped",
    "lost",
    "errors",
    "bodies_redacted",
    "batches",
    "batch_records",
    "batch_seconds",
    "overflow_dropped",
    "failures",
)
"""Totals since the writer started (the shipper sums them over the spool's streams)."""
GAUGES = ("queue_records", "queue_bytes")
"""What the writer holds now."""


def publish(directory: Path, values: Mapping[str, float]) -> None:
    """Replace ``directory/stats.json`` with ``values`` (mode 0600)."""
    text = json.dumps({"pid": os.getpid(), **values}, separators=(",", ":")).encode()
    partial = directory / f".{STATS_FILE}.{os.getpid()}"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(descriptor, text)
    finally:
        os.close(descriptor)
    os.replace(partial, directory / STATS_FILE)


def read(directory: Path) -> dict[str, float]:
    """The stats a writer published in ``directory`` (empty when none, or unreadable:
    a scrape never fails for one stream)."""
    with contextlib.suppress(OSError, ValueError):
        with open(directory / STATS_FILE, "rb") as handle:
            data: Any = json.loads(handle.read(MAX_STATS_BYTES + 1)[:MAX_STATS_BYTES])
        if isinstance(data, dict):
            return {
                key: float(value)
                for key, value in data.items()
                if key in COUNTERS or key in GAUGES
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
    return {}
