"""The HTTP benchmark's arithmetic: the recording limit, ratios to the baseline of the same
repetition, records lost, and failures reported as results (not dropped rows)."""

from __future__ import annotations

import argparse
import os

import pytest
from bench.http.limit import Costs, recording_limit
from bench.http.load import Sample
from bench.http.report import Report, markdown, targets

COSTS = Costs(
    sha256_ms_per_mb=0.5,
    scan_ms_per_mb=0.25,
    zstd_ms_per_mb=1.0,
    zstd_ratio=10.0,
    append_cpu_ms_per_mb=0.5,
    disk_mb_per_s=1000.0,
)


def test_recording_limit_is_the_smaller_of_the_cpu_and_the_disk_bounds() -> None:
    limit = recording_limit(COSTS, audited_bytes=2_000_000, base_cpu_s=0.002)
    cores = os.cpu_count() or 1
    assert limit.record_cpu_ms == pytest.approx(2 * (0.5 + 0.25 + 1.0 + 0.5))
    assert limit.cpu_bound == pytest.approx(cores / (0.002 + 0.0045))
    # 2 MB into the spool, then a tenth of it twice (WAL and database file)
    assert limit.disk_bound == pytest.approx(1000 / (2 + 2 * 2 / 10))
    assert limit.exchanges_per_s == min(limit.cpu_bound, limit.disk_bound)
    slow_disk = recording_limit(
        Costs(0.5, 0.25, 1.0, 10.0, 0.5, disk_mb_per_s=10.0), 2_000_000, base_cpu_s=0.002
    )
    assert slow_disk.exchanges_per_s == slow_disk.disk_bound < slow_disk.cpu_bound


def arguments() -> argparse.Namespace:
    return argparse.Namespace(repetitions=2, stream_mib=100, big_stream_mib=1024)


def report(results: dict[str, dict[str, list[Sample]]]) -> Report:
    variants = ["baseline", "recipe-route", "asgi-audit"]
    return Report(results, variants, arguments(), 1_000_000, 1000, COSTS, None, 1.0)


def closed(rps: float, p50: float = 10.0, sent: int = 100, stored: int | None = None) -> Sample:
    sample = Sample(metrics={"rps": rps, "p50": p50, "p99": 2 * p50}, sent=sent)
    if stored is not None:
        sample.stored, sample.catch_up = stored, 0.5
    return sample


def test_ratios_pair_repetitions_and_lost_records_and_failures_are_reported() -> None:
    results = {
        "raw 1 MB echo, c=8": {
            "baseline": [closed(400), closed(200)],
            "recipe-route": [Sample(notes=["timed out after 120 s"])] * 2,
            "asgi-audit": [closed(200, stored=100), closed(200, stored=97)],
        },
        "JSON 1 MB echo, c=8": {
            "baseline": [closed(20), closed(20)],
            "recipe-route": [closed(10), closed(12)],
            "asgi-audit": [closed(19, stored=100), closed(20, stored=100)],
        },
    }
    made = report(results)
    # each repetition against its own baseline: 200/400 and 200/200, not 200/300
    assert made.ratios("raw 1 MB echo, c=8", "asgi-audit", "rps") == [0.5, 1.0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in targets(made)}
    assert "3 in 4 runs" in rows["records lost = 0 with block, every run"]
    assert "**NOT MET**" in rows["records lost = 0 with block, every run"]
    assert (
        "0.97x" in rows["JSON c=8: req/s ≥ 0.95x"] and "| met |" in rows["JSON c=8: req/s ≥ 0.95x"]
    )
    text = markdown(made)
    [recipe_row] = [
        line for line in text.splitlines() if line.startswith("| raw 1 MB echo, c=8 | recipe-route")
    ]
    assert "**FAILED in every repetition**" in recipe_row and "timed out after 120 s" in recipe_row
    [audit_row] = [
        line for line in text.splitlines() if line.startswith("| raw 1 MB echo, c=8 | asgi-audit")
    ]
    assert "197/200 (**3 lost**)" in audit_row
