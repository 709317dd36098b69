"""Prometheus metrics of a spool, served by its shipper on ``ASGI_AUDIT_METRICS_PORT``.

One shipper delivers a spool however many worker processes write into it, so it is the
one place that can answer for the pod: at each scrape it sums what every writer
published in its stream (:mod:`asgi_audit.recording.stats`: exchanges written, dropped,
body bytes, queue depth, batch sizes and times), measures the spool (bytes, segments,
the age of the oldest record not yet delivered) and adds its own counts (records and
bytes shipped, sink errors, the quarantine). Names follow Prometheus' conventions:
``asgi_audit_..._total`` for counters, ``_bytes`` and ``_seconds`` units.

A scrape reads a few small files and, per stream, the first frame not yet delivered:
it costs the shipper milliseconds, and never stops delivery (a stream that cannot be
read is left out of that scrape).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..recording import stats
from ..recording.spool import StreamDirectory, streams

if TYPE_CHECKING:
    from .shipper import Shipper

logger = logging.getLogger("asgi_audit.metrics")

_WRITER_COUNTERS = (
    ("written", "asgi_audit_exchanges_audited", "Exchanges written to the spool."),
    ("body_bytes", "asgi_audit_body_bytes_captured", "Body bytes (as received) of them."),
    ("bodies_redacted", "asgi_audit_bodies_redacted", "Bodies stored with secrets replaced."),
    ("errors", "asgi_audit_writer_errors", "Errors of the spool writers (each logged)."),
)
_DROP_REASONS = (
    ("overflow_dropped", "overflow"),
    ("dropped", "spool_full"),
    ("lost", "not_written"),
    ("failures", "capture_failed"),
)


class SpoolCollector:
    """A prometheus-client collector over one spool and its shipper."""

    def __init__(self, root: Path, shipper: Shipper | None = None) -> None:
        self.root = Path(root)
        self.shipper = shipper

    def describe(self) -> list[Any]:
        return []  # collected fresh at each scrape: nothing to describe ahead

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        found = list(self._streams())
        totals: dict[str, float] = {}
        for _, published in found:
            for key, value in published.items():
                totals[key] = totals.get(key, 0.0) + value
        for key, name, text in _WRITER_COUNTERS:
            yield CounterMetricFamily(name, text, value=totals.get(key, 0.0))
        dropped = CounterMetricFamily(
            "asgi_audit_exchanges_dropped", "Exchanges not recorded, by reason.", labels=["reason"]
        )
        for key, reason in _DROP_REASONS:
            dropped.add_metric([reason], totals.get(key, 0.0))
        yield dropped
        for key, text in (
            ("queue_records", "Exchanges waiting for a writer."),
            ("queue_bytes", "Body bytes waiting for a writer."),
        ):
            yield GaugeMetricFamily(f"asgi_audit_{key}", text, totals.get(key, 0.0))
        batches = int(totals.get("batches", 0))
        for key, text in (
            ("batch_records", "Exchanges per batch a writer wrote."),
            ("batch_seconds", "Time a writer took per batch."),
        ):
            yield SummaryMetricFamily(
                f"asgi_audit_writer_{key}",
                text,
                count_value=batches,
                sum_value=totals.get(key, 0.0),
            )
        yield from self._spool(GaugeMetricFamily, [stream for stream, _ in found])
        yield from self._shipped(CounterMetricFamily, GaugeMetricFamily)

    @staticmethod
    def _spool(gauge: Any, found: list[StreamDirectory]) -> Iterator[Any]:
        spool_bytes = segments = 0
        oldest: int | None = None
        for stream in found:
            with contextlib.suppress(OSError):
                names = stream.segments()
                segments += len(names)
                spool_bytes += sum((stream.directory / name).stat().st_size for name in names)
                started = _oldest_pending(stream)
                if started is not None:
                    oldest = started if oldest is None else min(oldest, started)
        yield gauge("asgi_audit_spool_bytes", "Bytes of the spool's segments.", spool_bytes)
        yield gauge("asgi_audit_spool_segments", "Segment files in the spool.", segments)
        lag = 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)
        yield gauge(
            "asgi_audit_shipping_lag_seconds",
            "Age of the oldest exchange in the spool not yet delivered (0: none).",
            lag,
        )

    def _shipped(self, counter: Any, gauge: Any) -> Iterator[Any]:
        shipper = self.shipper
        for name, text, value in (
            ("records_shipped", "Records the sink took.", shipper.delivered if shipper else 0),
            (
                "shipped_body_bytes",
                "Body bytes (as received) of the records the sink took.",
                shipper.delivered_bytes if shipper else 0,
            ),
            (
                "sink_errors",
                "Failed writes to the sink (retried).",
                shipper.failures if shipper else 0,
            ),
        ):
            yield counter(f"asgi_audit_{name}", text, value=value)
        quarantined = 0
        if shipper is not None:
            with contextlib.suppress(OSError):
                quarantined = len(shipper.quarantine.entries())
        yield gauge(
            "asgi_audit_quarantined_records", "Records the sink refused, kept aside.", quarantined
        )

    def _streams(self) -> Iterable[tuple[StreamDirectory, dict[str, float]]]:
        if not self.root.is_dir():
            return []
        return [(stream, stats.read(stream.directory)) for stream in streams(self.root)]


def _oldest_pending(stream: StreamDirectory) -> int | None:
    """The start time of the first exchange of ``stream`` not yet delivered."""
    for spooled in stream.pending():
        started = spooled.meta.get("started_at_ns")
        if isinstance(started, int):
            return started
    return None


def serve_metrics(address: tuple[str, int], root: Path, shipper: Shipper) -> Any:
    """Serve ``/metrics`` on ``address`` from a thread; returns the server (``shutdown()``)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SpoolCollector(root, shipper))
    host, port = address
    served = start_http_server(port, addr=host, registry=registry)
    logger.info("asgi-audit: metrics on http://%s:%d/metrics", host, port)
    return served[0] if isinstance(served, tuple) else served
