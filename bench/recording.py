"""Recording throughput: 1 MB JSON bodies through the middleware into the spool, then the
shipper into SQLite; event-loop lag and app throughput with and without auditing.

Everything runs in this process, on the ASGI callables (no sockets), so the figures are the
middleware's, the writer thread's and the shipper's own:

* app throughput: exchanges/s of a raw 1 MB echo, 8 concurrent tasks, without auditing
  and with it (spool only, ``ship="off"``), as a ratio;
* event-loop lag while doing so: how late a 1 ms timer fires (p50/p99), both ways;
* the spool's batch window: per record, the time from hand-off to its frame's write,
  the most a SIGKILL can lose with ``fsync="batch"`` (p50/p99/max);
* shipping: records/s and MB/s from the spool into SQLite (hashing included).

    python -m bench.recording [--requests 400] [--body-kib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from asgi_audit import AuditMiddleware
from asgi_audit._types import ASGIApp, Message
from asgi_audit.recording.writer import SpoolRecorder
from asgi_audit.shipping.shipper import Shipper
from asgi_audit.sinks import open_sink
from bench.overhead import raw_echo, scope_for


def order_json(size: int) -> bytes:
    """A realistic order document of about ``size`` bytes."""
    lines = []
    number = 0
    total = 0
    while total < size:
        line = {"sku": f"SKU-{number:06d}", "quantity": number % 7 + 1, "price": 199 + number}
        lines.append(line)
        total += len(json.dumps(line)) + 2
        number += 1
    return json.dumps({"customer": "c-0042", "lines": lines}).encode()


async def serve(
    app: ASGIApp, body: bytes, requests: int, concurrency: int, pace: float = 0.0
) -> tuple[float, list[float]]:
    """Exchanges per second, and the event-loop lags seen by a 1 ms ticker meanwhile;
    ``pace`` > 0 makes each task wait that many seconds between exchanges (open-ish loop)."""
    chunk = 64 << 10
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - before - 0.001) * 1e3)

    async def one() -> None:
        queue = list(pieces)

        async def receive() -> Message:
            piece = queue.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(queue)}

        async def send(message: Message) -> None:
            await asyncio.sleep(0)

        await app(scope_for("/echo"), receive, send)

    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()
            if pace:
                await asyncio.sleep(pace)

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    done.set()
    await tick
    return requests / elapsed, lags


def percentile(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]


class TimedRecorder(SpoolRecorder):
    """Notes, per record, when it was handed off and when its frame was written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted: dict[str, float] = {}
        self.windows: list[float] = []

    def try_submit(self, exchange: Any, *, force: bool = False) -> bool:
        self.submitted[exchange.id] = time.perf_counter()
        return super().try_submit(exchange, force=force)

    def _write(self, writer: Any, batch: list[Any]) -> None:
        super()._write(writer, batch)
        now = time.perf_counter()
        self.windows.extend((now - self.submitted.pop(e.id, now)) * 1e3 for e in batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--body-kib", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--paced-rate", type=float, default=50.0)
    args = parser.parse_args()
    body = order_json(args.body_kib * 1024)
    megabytes = len(body) / 1e6
    with tempfile.TemporaryDirectory(prefix="asgi-audit-bench-") as scratch:
        root = Path(scratch)
        base_rate, base_lags = asyncio.run(serve(raw_echo, body, args.requests, args.concurrency))
        recorder = TimedRecorder(root / "spool", fsync="batch")
        audited = AuditMiddleware(raw_echo, recorder=recorder, environ={})
        rate, lags = asyncio.run(serve(audited, body, args.requests, args.concurrency))
        recorder.shutdown(60)
        paced = TimedRecorder(root / "paced", fsync="batch")
        paced_app = AuditMiddleware(raw_echo, recorder=paced, environ={})
        paced_rate, _ = asyncio.run(serve(paced_app, body, 100, 2, pace=2 / args.paced_rate))
        paced.shutdown(60)
        url = f"sqlite:///{root / 'audit.db'}"
        with closing(open_sink(url)) as store:
            shipper = Shipper(root / "spool", store)
            started = time.perf_counter()
            report = shipper.ship_once()
            shipped = time.perf_counter() - started
    print(
        f"{args.requests} raw echoes of {megabytes:.2f} MB JSON, "
        f"{args.concurrency} concurrent, in process"
    )
    print("| measure | no auditing | audited (spool, fsync=batch) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| exchanges/s | {base_rate:.0f} | {rate:.0f} | {rate / base_rate:.2f}x |")
    print(f"| body MB/s recorded (request + response) | | {rate * 2 * megabytes:.0f} | |")
    for label, p in (("p50", 50), ("p99", 99)):
        print(
            f"| event-loop lag {label} (ms) | {percentile(base_lags, p):.2f} | "
            f"{percentile(lags, p):.2f} | |"
        )
    for label, windows in (
        (f"saturated, {rate:.0f}/s", recorder.windows),
        (f"paced, {paced_rate:.0f}/s", paced.windows),
    ):
        print(
            f"\nbatch window, {label} (hand-off to spool write; what a SIGKILL can lose): "
            f"p50 {percentile(windows, 50):.1f} ms, p99 {percentile(windows, 99):.1f} ms, "
            f"max {max(windows, default=0):.1f} ms"
        )
    print(
        f"shipping into SQLite: {report.delivered} records in {shipped:.2f} s = "
        f"{report.delivered / shipped:.0f} records/s, "
        f"{report.delivered * 2 * megabytes / shipped:.0f} MB/s of bodies "
        "(packed and hashed by the spool writer)"
    )
    print(
        f"mean event-loop lag: {statistics.fmean(base_lags):.2f} ms -> "
        f"{statistics.fmean(lags):.2f} ms"
    )


if __name__ == "__main__":
    main()
