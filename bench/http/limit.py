"""The machine's recording limit: how many audited exchanges per second it can hash and
write durably at all, measured on the machine the benchmark runs on.

Every audited byte is scanned for secrets (the redaction policy's prefilter: a JSON body
is parsed only when it may hold one), copied into the spool (appended, fsync'd in groups),
read back by the shipper, hashed (SHA-256), compressed (zstd) and written to the store. Those costs
bound the exchanges/s of any correct recorder, however it is built:

* by CPU: the cores are shared by the server, the load generator, the recorder and the
  shipper; an exchange costs what it costs without auditing (measured in the baseline
  run: server and load generator CPU seconds per request) plus the recording work;
* by disk: each exchange's bodies go to the spool once, then (compressed) to the store.

The limit is the smaller of the two. It is a model, printed with its inputs, so that a
reader can check it: the audited variants' throughput is reported beside it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from asgi_audit.recording import packing
from asgi_audit.recording.redact_body import BodyRedactor

_ROUNDS = 20
_SPOOL_TOTAL = 256 << 20
_GROUP = 4  # appends per fdatasync, as the spool's group commit does under load


@dataclass(frozen=True)
class Costs:
    """Per-MB costs measured here, and the bench body's compression ratio."""

    sha256_ms_per_mb: float
    scan_ms_per_mb: float
    zstd_ms_per_mb: float
    zstd_ratio: float
    append_cpu_ms_per_mb: float
    disk_mb_per_s: float

    def describe(self) -> str:
        return (
            f"SHA-256 {self.sha256_ms_per_mb:.2f} ms/MB; secret scan (default redaction, "
            f"nothing found) {self.scan_ms_per_mb:.2f} ms/MB; zstd level {packing.LEVEL} "
            f"{self.zstd_ms_per_mb:.2f} ms/MB at ratio {self.zstd_ratio:.1f}; spool append "
            f"{self.append_cpu_ms_per_mb:.2f} ms/MB of CPU; sequential write with fdatasync "
            f"every {_GROUP} appends {self.disk_mb_per_s:.0f} MB/s"
        )


def _per_mb(seconds: float, size: int) -> float:
    return seconds * 1e3 / (size / 1e6)


def measure(body: bytes, directory: Path) -> Costs:
    """Time each recording step on ``body`` (best of a few rounds: the cost, not the
    noise) and the disk's durable write rate in ``directory`` (the spool's file system)."""
    sha = min(_timed(lambda: hashlib.sha256(body).digest()) for _ in range(_ROUNDS))
    redactor = BodyRedactor()
    if redactor.redact(body, "application/json") is not None:
        raise ValueError("the bench body must hold no secret: the limit times the scan alone")
    scan = min(_timed(lambda: redactor.redact(body, "application/json")) for _ in range(_ROUNDS))
    compressor = zstandard.ZstdCompressor(level=packing.LEVEL, write_content_size=True)
    compressed = compressor.compress(body)
    zstd = min(_timed(lambda: compressor.compress(body)) for _ in range(_ROUNDS))
    cpu, wall = _durable_appends(body, directory)
    return Costs(
        sha256_ms_per_mb=_per_mb(sha, len(body)),
        scan_ms_per_mb=_per_mb(scan, len(body)),
        zstd_ms_per_mb=_per_mb(zstd, len(body)),
        zstd_ratio=len(body) / len(compressed),
        append_cpu_ms_per_mb=_per_mb(cpu, _SPOOL_TOTAL),
        disk_mb_per_s=_SPOOL_TOTAL / 1e6 / wall,
    )


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _durable_appends(body: bytes, directory: Path) -> tuple[float, float]:
    """CPU and wall seconds to append ``_SPOOL_TOTAL`` bytes in ``body``-sized writes,
    fdatasync'd every ``_GROUP`` appends, as a spool segment is written."""
    handle, name = tempfile.mkstemp(prefix="disk-probe-", dir=directory)
    try:
        cpu = time.process_time()
        wall = time.perf_counter()
        written = 0
        appends = 0
        while written < _SPOOL_TOTAL:
            written += os.write(handle, body)
            appends += 1
            if appends % _GROUP == 0:
                os.fdatasync(handle)
        os.fdatasync(handle)
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        os.close(handle)
        os.unlink(name)


@dataclass(frozen=True)
class Limit:
    """The recording limit in exchanges/s, and what bounds it."""

    exchanges_per_s: float
    cpu_bound: float
    disk_bound: float
    base_cpu_ms: float
    record_cpu_ms: float

    def describe(self, audited_mb: float) -> str:
        bound = "CPU" if self.cpu_bound <= self.disk_bound else "disk"
        return (
            f"recording limit {self.exchanges_per_s:.0f} exchanges/s ({bound}-bound) for "
            f"{audited_mb:.2f} MB audited per exchange: CPU {self.cpu_bound:.0f}/s "
            f"({os.cpu_count()} cores / ({self.base_cpu_ms:.2f} ms unaudited exchange, "
            f"server and load generator, + {self.record_cpu_ms:.2f} ms recording)), disk "
            f"{self.disk_bound:.0f}/s"
        )


def recording_limit(costs: Costs, audited_bytes: int, base_cpu_s: float) -> Limit:
    """``audited_bytes`` is request + response body per exchange; ``base_cpu_s`` the CPU
    seconds an unaudited exchange costs the server and the load generator together."""
    mb = audited_bytes / 1e6
    record_cpu = (
        mb
        * (
            costs.append_cpu_ms_per_mb
            + costs.scan_ms_per_mb
            + costs.sha256_ms_per_mb
            + costs.zstd_ms_per_mb
        )
        / 1e3
    )
    cores = os.cpu_count() or 1
    cpu_bound = cores / (base_cpu_s + record_cpu)
    # The spool takes the raw bytes; the store about a ratio-th of them, written twice
    # (SQLite's write-ahead log, then the database file).
    disk_bytes_mb = mb + 2 * mb / costs.zstd_ratio
    disk_bound = costs.disk_mb_per_s / disk_bytes_mb
    return Limit(
        exchanges_per_s=min(cpu_bound, disk_bound),
        cpu_bound=cpu_bound,
        disk_bound=disk_bound,
        base_cpu_ms=base_cpu_s * 1e3,
        record_cpu_ms=record_cpu * 1e3,
    )
