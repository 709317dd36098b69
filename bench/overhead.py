"""Per-request overhead of AuditMiddleware, in process, as ratios to no middleware.

Drives the ASGI callables directly (no sockets, no HTTP parsing), so the middleware's own
cost is not hidden behind the server's: a raw echo app and a FastAPI route, each with
  * no middleware (the baseline),
  * the middleware installed but the route excluded (cost of merely being there),
  * the middleware auditing a small POST (1 KiB body, RequestResponse).
Each variant runs interleaved in rounds; the figure is the median of the per-round times.
The in-memory recorder is emptied every 100 requests, as a recorder thread would keep
it: records piling up by the thousand would bill the garbage collector to the middleware.

    python -m bench.overhead [--requests 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response

from asgi_audit import AuditMiddleware, MemoryRecorder
from asgi_audit._types import ASGIApp, Message, Receive, Scope, Send

BODY = b"x" * 1024


async def raw_echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Echo the request body: the hard case, where no parsing hides the middleware."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def fastapi_echo() -> ASGIApp:
    """The same echo as a FastAPI route reading the raw body."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body())

    return app


def scope_for(path: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-length", b"1024")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def drive(
    app: ASGIApp, path: str, requests: int, recorder: MemoryRecorder | None = None
) -> float:
    """Seconds per request for ``requests`` sequential exchanges."""
    request: Message = {"type": "http.request", "body": BODY, "more_body": False}

    async def receive() -> Message:
        return request

    async def send(message: Message) -> None:
        return None

    started = time.perf_counter()
    for number in range(requests):
        await app(scope_for(path), receive, send)
        if recorder is not None and number % 100 == 99:
            recorder.take_all()
    return (time.perf_counter() - started) / requests


def variants(make: Callable[[], ASGIApp], recorder: MemoryRecorder) -> dict[str, tuple[Any, str]]:
    excluded = AuditMiddleware(make(), exclude=["/echo"], recorder=recorder, environ={})
    audited = AuditMiddleware(make(), recorder=recorder, environ={})
    return {
        "no middleware": (make(), "/echo"),
        "installed, route unaudited": (excluded, "/echo"),
        "audited 1 KiB POST": (audited, "/echo"),
    }


async def measure(requests: int, rounds: int) -> list[tuple[str, str, float, float]]:
    """Median seconds per request of every variant, and its ratio to no middleware."""
    recorder = MemoryRecorder(max_records=requests + 1, max_bytes=1 << 40)
    rows = []
    for name, make in (("raw ASGI echo", lambda: raw_echo), ("FastAPI echo", fastapi_echo)):
        apps = variants(make, recorder)
        times: dict[str, list[float]] = {label: [] for label in apps}
        for app, path in apps.values():  # warm up
            await drive(app, path, 200, recorder)
        for _ in range(rounds):
            for label, (app, path) in apps.items():
                times[label].append(await drive(app, path, requests, recorder))
        recorder.take_all()
        base = statistics.median(times["no middleware"])
        for label, samples in times.items():
            median = statistics.median(samples)
            rows.append((name, label, median * 1e6, median / base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.requests, args.rounds))
    print(f"{args.requests} requests x {args.rounds} rounds, medians")
    print("| app | variant | µs/request | ratio to no middleware |")
    print("|---|---|---:|---:|")
    for app, label, micros, ratio in rows:
        print(f"| {app} | {label} | {micros:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
