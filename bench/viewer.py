"""Viewer latency: how long the list page of a large SQLite store takes to answer.

Builds a store of ``--records`` records (100,000 by default: tiny bodies, written with
``write_batch`` in batches of 5,000, one in ten a 404 on another route), then asks the
viewer's ASGI app (``httpx.ASGITransport``, no socket) for list pages: the first page,
filtered by status (``404``, and ``2xx``: most of the store), by route, and the page
after a cursor. Each is asked ``--repeat`` times after one warm-up; the figure is the
median, and the target is 200 ms: the script exits 1 when a median is above it.

    python -m bench.viewer [--records 100000] [--repeat 15] [--target-ms 200]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager, closing
from html import unescape
from pathlib import Path
from typing import Any

import httpx

from asgi_audit._types import ASGIApp
from asgi_audit.cli.viewer.app import create_app
from asgi_audit.sinks import open_sink
from bench.sinks import records

TOKEN = "bench-viewer-token"
BATCH = 5000
START_NS = 1_714_564_800 * 1_000_000_000


def build(url: str, count: int) -> float:
    """Fill the store; returns the seconds it took."""
    started = time.perf_counter()
    with closing(open_sink(url)) as sink:
        for first in range(0, count, BATCH):
            batch = records(min(BATCH, count - first), b'{"n": 1}', START_NS + first * 1_000_000)
            batch = [
                dataclasses.replace(r, status=404, route="/missing/{x}") if n % 10 == 0 else r
                for n, r in enumerate(batch)
            ]
            sink.write_batch(batch)
    return time.perf_counter() - started


@asynccontextmanager
async def running(app: ASGIApp) -> AsyncIterator[None]:
    """The app's lifespan, started and shut down around the block (its end closes the
    sink the app opened)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task: asyncio.Task[None] = asyncio.create_task(app(scope, inbox.get, outbox.put))  # type: ignore[arg-type]
    await inbox.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(outbox.get(), 30))["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(outbox.get(), 30)
        await asyncio.wait_for(task, 30)


async def timed(client: httpx.AsyncClient, path: str, repeat: int) -> float:
    """The median milliseconds of ``repeat`` requests for ``path`` (after one warm-up)."""
    assert (await client.get(path)).status_code == 200, path
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        answer = await client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, path
    return statistics.median(times)


async def measure(url: str, repeat: int) -> dict[str, float]:
    """The median time of each kind of list page, through the ASGI app (no socket)."""
    app = create_app(url, TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with (
        running(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
    ):
        await client.get(f"/?token={TOKEN}")
        first = (await client.get("/")).text
        older = re.search(r'href="([^"]+)" rel="next"', first)
        paths = {
            "first page": "/",
            "status 404": "/?status=404",
            "status 2xx": "/?status=2xx",
            "route": "/?route=%2Forders%2F%7Border_id%7D",
            "older page": unescape(older.group(1)) if older else "/",
        }
        return {name: await timed(client, path, repeat) for name, path in paths.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--target-ms", type=float, default=200.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as scratch:
        url = f"sqlite:///{Path(scratch) / 'viewer.db'}"
        seconds = build(url, args.records)
        print(f"store of {args.records:,} records built in {seconds:.1f} s")
        medians = asyncio.run(measure(url, args.repeat))
    for name, median in medians.items():
        print(f"list page, {name:<11} {median:7.1f} ms (median of {args.repeat})")
    slow = [name for name, median in medians.items() if median > args.target_ms]
    if slow:
        print(f"over the {args.target_ms:.0f} ms target: {', '.join(slow)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
