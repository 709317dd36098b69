"""Prometheus metrics: each writer publishes its counters in its stream, the spool's one
shipper serves them summed with its own on ``ASGI_AUDIT_METRICS_PORT``. Scraped under a
saturating load: the queue and lag gauges move, then return to zero, and what the
metrics say was shipped is what the store holds."""

from __future__ import annotations

import json
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asgi_audit import AuditMiddleware, ConfigError
from asgi_audit.recording import stats
from asgi_audit.recording.spool import streams
from asgi_audit.recording.writer import SpoolRecorder
from asgi_audit.sinks import Query, open_sink
from processes import Load, environment, free_port, serving, wait_for
from spooling import exchange


def scrape(url: str) -> dict[str, float]:
    """Every sample of ``/metrics``, by name with its labels (``name{label=value}``)."""
    text = httpx.get(url, timeout=5).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def stored_count(sink: str) -> int:
    with closing(open_sink(sink, create=False)) as opened:
        return sum(1 for _ in opened.search(Query(limit=None)))


@pytest.mark.server
def test_metrics_under_a_saturating_load(tmp_path: Path) -> None:
    sink = f"sqlite:///{tmp_path / 'audit.db'}"
    port = free_port()
    env = environment(
        ASGI_AUDIT_SINK=sink,
        ASGI_AUDIT_SPOOL=str(tmp_path / "spool"),
        ASGI_AUDIT_METRICS_PORT=f"127.0.0.1:{port}",
    )
    metrics = f"http://127.0.0.1:{port}/metrics"
    seen = {"queue": 0.0, "lag": 0.0}
    with serving(env) as server:
        assert wait_for(lambda: _answers(metrics), timeout=30), "no /metrics"
        load = Load(server.url, total=600, threads=8, body_size=512 << 10, seconds=60)
        running = load.start()
        deadline = time.monotonic() + 60
        while running.is_alive() and time.monotonic() < deadline:
            now = scrape(metrics)
            seen["queue"] = max(seen["queue"], now["asgi_audit_queue_records"])
            seen["lag"] = max(seen["lag"], now["asgi_audit_shipping_lag_seconds"])
            time.sleep(0.05)
        running.join()
        assert load.failed == 0 and len(load.completed) == 600

        def settled() -> bool:
            now = scrape(metrics)
            return (
                now["asgi_audit_queue_records"] == 0
                and now["asgi_audit_shipping_lag_seconds"] == 0
                and now["asgi_audit_records_shipped_total"] >= 600
            )

        assert wait_for(settled, timeout=60), scrape(metrics)
        final = scrape(metrics)
        stored = stored_count(sink)
    assert seen["queue"] > 0 and seen["lag"] > 0, seen
    assert stored == 600
    assert final["asgi_audit_records_shipped_total"] == stored
    assert final["asgi_audit_exchanges_audited_total"] == stored
    assert final["asgi_audit_body_bytes_captured_total"] >= 600 * 2 * (512 << 10)
    assert (
        final["asgi_audit_shipped_body_bytes_total"]
        == final["asgi_audit_body_bytes_captured_total"]
    )
    assert final["asgi_audit_exchanges_dropped_total{reason=overflow}"] == 0
    assert final["asgi_audit_writer_batch_records_count"] > 0
    assert final["asgi_audit_writer_batch_records_sum"] == stored
    assert final["asgi_audit_sink_errors_total"] == 0
    assert final["asgi_audit_quarantined_records"] == 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_writers_publish_their_counts_in_their_stream(tmp_path: Path) -> None:
    recorder = SpoolRecorder(tmp_path / "spool", extra_stats=lambda: {"overflow_dropped": 3})
    for number in range(5):
        assert recorder.try_submit(exchange(request=b"x" * (100 + number)))
    assert recorder.flush(timeout=30)
    assert recorder.shutdown(timeout=30)
    [stream] = list(streams(tmp_path / "spool"))
    path = stream.directory / stats.STATS_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    published = json.loads(path.read_text())
    assert published["written"] == 5 and published["overflow_dropped"] == 3
    assert published["queue_records"] == 0
    assert stats.read(stream.directory)["written"] == 5.0
    (stream.directory / stats.STATS_FILE).write_text("{not json")
    assert stats.read(stream.directory) == {}  # a scrape skips what it cannot read


@pytest.mark.parametrize("value", ["abc", "0", "70000", "host:"])
def test_a_bad_metrics_port_is_a_clear_error(value: str) -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        """Never called."""

    with pytest.raises(ConfigError, match="metrics_port: expected a port or HOST:PORT"):
        AuditMiddleware(app, environ={"ASGI_AUDIT_METRICS_PORT": value})
    with pytest.raises(ConfigError, match="metrics_port"):
        AuditMiddleware(app, metrics_port=value, environ={})
    good = AuditMiddleware(app, metrics_port=9464, environ={})
    assert good.settings.metrics_address == ("0.0.0.0", 9464)
