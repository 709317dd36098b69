"""Run every workload against every variant of ``bench.http.apps`` and compare with
``baseline``: ``python -m bench.http`` (or ``bench/run``, which also makes the venv).

Why this shape:
* Load comes from ``hey`` and ``wrk`` on the same machine: the load generator shares the
  CPU with the server, the recorder and the shipper, as in production sidecars do.
* Every figure is a ratio to ``baseline`` measured in the same repetition, and the tables
  show the median of the repetitions with their min-max spread: absolute numbers on a
  shared 2-core machine move from run to run, ratios taken side by side move much less.
* A recipe that errors, stalls or runs out of time is a result, not a crash of the bench:
  every run is bounded, and its row says what happened.
* For asgi-audit the records are counted in the store after each load run (records lost =
  0 is measured, not assumed), with the time the store took to catch up.
* The recording limit (``bench.http.limit``) is measured on this machine and printed beside
  the results: above it no recorder can keep up, and the overflow policy decides.

The script installs nothing: it checks for the tools it needs and says how to get them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.http.limit import measure, recording_limit
from bench.http.load import Sample, hey, peak_rss_mib, stream, tree_cpu, wrk
from bench.http.report import BASELINE, SMALL, Report, Results, write_report
from bench.http.server import DEFAULT_STACK, STACKS, Server, catch_up, serving, tracebacks
from bench.postgres import postgres_reachable
from bench.recording import order_json

RESULTS = Path(__file__).resolve().parents[1] / "results"
DEFAULT_POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WARM_UPS = 3  # of each route, before any measurement
TOOLS = {
    "hey": "apt-get install hey   (Debian/Ubuntu; or: go install github.com/rakyll/hey@latest)",
    "wrk": "apt-get install wrk   (Debian/Ubuntu)",
}
SMALL_BODY = order_json(1000)


@dataclass(frozen=True)
class Workload:
    """One measured run against a server: ``run`` makes the sample; ``audited`` says
    whether to wait for its exchanges to reach the store afterwards (the streams wait
    between runs themselves)."""

    label: str
    kind: str  # "closed", "open", "stream"
    run: Callable[[Server], Sample]
    audited: bool = True


def workloads(args: argparse.Namespace, files: dict[str, Path]) -> list[Workload]:
    """The workloads served by one long-lived server per variant and repetition, in order."""
    timeout = args.timeout

    def closed(path: str, kind: str, requests: int, concurrency: int) -> Callable[[Server], Sample]:
        return lambda s: hey(s.url(path), files[kind], requests, concurrency, timeout)

    def steady(path: str, kind: str, rate: float, workers: int) -> Callable[[Server], Sample]:
        requests = int(rate * args.open_seconds)
        return lambda s: hey(s.url(path), files[kind], requests, workers, timeout, rate=rate)

    def streams(s: Server) -> Sample:
        # Several streams, their median: one TTFB is a few milliseconds of scheduling luck.
        # Each starts once the store holds the one before (catch_up waits for that), so it
        # meets the recorder idle, as the baseline's streams meet an idle machine: the
        # figure is what recording an exchange costs that exchange, not what recording
        # the previous 100 MiB costs the next one.
        size = args.stream_mib << 20
        runs: list[Sample] = []
        for _ in range(args.streams):
            runs.append(stream(s.port, f"/stream/{args.stream_mib}", size, args.stream_timeout))
            catch_up(s, runs[-1], args.store_wait)
            if not runs[-1].metrics:
                break
        merged = Sample(sent=sum(r.sent for r in runs))
        merged.notes = [note for r in runs for note in r.notes]
        if s.sink is not None:
            merged.stored = sum(r.stored or 0 for r in runs)
            waits = [r.catch_up for r in runs if r.catch_up is not None]
            merged.catch_up = max(waits) if len(waits) == len(runs) else None
        if all(r.metrics for r in runs):
            for key in ("ttfb", "total"):
                merged.metrics[key] = statistics.median(r.metrics[key] for r in runs)
        return merged

    small_seconds = args.small_seconds
    chosen = [
        # First, while the recorder is idle: the cost of merely being installed, not that
        # of sharing the CPU with the recording of the audited loads before it.
        Workload(
            "unaudited GET, c=8",
            "closed",
            lambda s: wrk(s.url("/unaudited"), None, small_seconds, 8, timeout),
            audited=False,
        ),
        Workload("raw 1 MB echo, c=1", "closed", closed("/raw/echo", "raw", args.requests // 4, 1)),
        Workload("raw 1 MB echo, c=8", "closed", closed("/raw/echo", "raw", args.requests, 8)),
        Workload(
            "JSON 1 MB echo, c=1",
            "closed",
            closed("/json/echo", "json", args.json_requests // 2, 1),
        ),
        Workload(
            "JSON 1 MB echo, c=8", "closed", closed("/json/echo", "json", args.json_requests, 8)
        ),
        Workload(
            f"raw 1 MB echo at {args.raw_rate:g}/s",
            "open",
            steady("/raw/echo", "raw", args.raw_rate, 4),
        ),
        Workload(
            f"JSON 1 MB echo at {args.json_rate:g}/s",
            "open",
            steady("/json/echo", "json", args.json_rate, 2),
        ),
        Workload(
            SMALL,
            "closed",
            lambda s: wrk(s.url("/small"), SMALL_BODY, small_seconds, 8, timeout),
        ),
        Workload(f"stream {args.stream_mib} MiB", "stream", streams, audited=False),
    ]
    if args.workloads:
        wanted = args.workloads.split(",")
        chosen = [w for w in chosen if any(part in w.label for part in wanted)]
    return chosen


def measured(server: Server, workload: Workload, store_wait: float) -> Sample:
    """Run one workload; add the server's CPU per exchange, the store's catch-up, and any
    traceback the server logged meanwhile."""
    if not server.alive():
        return Sample(notes=[f"server had exited ({server.process.returncode})"])
    before = tracebacks(server)[0]
    cpu = tree_cpu(server.process.pid)
    started = time.perf_counter()
    sample = workload.run(server)
    elapsed = time.perf_counter() - started
    load_cpu = sample.metrics.pop("load_cpu", 0.0)
    if workload.audited:
        catch_up(server, sample, store_wait)
    if sample.sent:
        # After the catch-up: the shipper's work for this load is part of its cost.
        server_cpu = tree_cpu(server.process.pid) - cpu
        sample.metrics["cpu_ms"] = (server_cpu + load_cpu) * 1e3 / sample.sent
    if sample.stored and sample.catch_up is not None and workload.kind == "closed":
        # Sustained recording rate: records in the store over the load and the catch-up.
        sample.metrics["recorded_rps"] = sample.stored / (elapsed + sample.catch_up)
    after, last = tracebacks(server)
    if after > before:
        sample.notes.append(f"server logged {after - before} traceback(s): {last}")
    return sample


def warm_up(server: Server, files: dict[str, Path]) -> int:
    """A few requests to each route (imports, connections, the recorder's start); returns
    how many audited exchanges they made."""
    made = 0
    with httpx.Client(timeout=30.0) as client:
        for _ in range(WARM_UPS):
            for path, kind in (("/raw/echo", "raw"), ("/json/echo", "json")):
                response = client.post(
                    server.url(path),
                    content=files[kind].read_bytes(),
                    headers={"content-type": "application/json"},
                )
                made += response.status_code == 200
            made += client.post(server.url("/small"), content=SMALL_BODY).status_code == 200
            client.get(server.url("/unaudited"))
    return made


def run_variant(
    server: Server, args: argparse.Namespace, files: dict[str, Path], results: Results
) -> None:
    """Every workload against one running server, in a fixed order; then the server's
    peak RSS, which the saturating runs set."""
    catch_up(server, Sample(sent=warm_up(server, files)), args.store_wait)
    for workload in workloads(args, files):
        sample = measured(server, workload, args.store_wait)
        rss = peak_rss_mib(server.process.pid)
        if rss is not None:  # the high-water mark so far: after the raw c=8 run, saturated
            sample.metrics["rss"] = rss
        results[workload.label].setdefault(server.variant, []).append(sample)
    rss = peak_rss_mib(server.process.pid)
    results["peak RSS"].setdefault(server.variant, []).append(
        Sample(metrics={} if rss is None else {"rss": rss})
    )


def big_stream(server: Server, args: argparse.Namespace) -> Sample:
    """The 1 GiB stream on a server that did nothing else: its peak RSS is the stream's."""
    size = args.big_stream_mib << 20
    sample = stream(server.port, f"/stream/{args.big_stream_mib}", size, args.big_stream_timeout)
    catch_up(server, sample, args.store_wait)
    rss = peak_rss_mib(server.process.pid)
    if rss is not None:
        sample.metrics["rss"] = rss
    return sample


def variants(postgres: str) -> list[str]:
    chosen = [
        BASELINE,
        "recipe-middleware",
        "recipe-route",
        "asgi-audit",
        "asgi-audit-drop",
        "asgi-audit-blocking",
    ]
    reason = postgres_reachable(postgres)
    if reason is None:
        chosen.append("asgi-audit-postgres")
    else:
        print(f"skipping asgi-audit-postgres: {reason}", file=sys.stderr)
    return chosen


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="End-to-end HTTP benchmark against recipes")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--requests", type=int, default=480, help="per raw-echo c=8 run")
    parser.add_argument("--json-requests", type=int, default=32, help="per JSON-echo c=8 run")
    parser.add_argument("--raw-rate", type=float, default=100.0, help="open-loop req/s, raw")
    parser.add_argument("--json-rate", type=float, default=4.0, help="open-loop req/s, JSON")
    parser.add_argument("--open-seconds", type=float, default=6.0)
    parser.add_argument("--small-seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--stream-mib", type=int, default=100)
    parser.add_argument("--streams", type=int, default=5, help="per repetition, median kept")
    parser.add_argument("--big-stream-mib", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per load run")
    parser.add_argument("--stream-timeout", type=float, default=30.0)
    parser.add_argument("--big-stream-timeout", type=float, default=30.0)
    parser.add_argument("--store-wait", type=float, default=60.0, help="catch-up bound, s")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server URL (no table)")
    parser.add_argument("--variants", help="comma-separated subset (baseline is always run)")
    parser.add_argument(
        "--workloads", help="comma-separated substrings: run only the workloads they match"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an asgi-audit setting for the audited variants, e.g. ship=off (repeatable)",
    )
    parser.add_argument("--no-big-stream", action="store_true", help="skip the 1 GiB stream")
    parser.add_argument(
        "--server",
        choices=sorted(STACKS),
        default=DEFAULT_STACK,
        help="the server stack every variant runs on (default: %(default)s)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "http.md")
    args = parser.parse_args()
    try:
        args.settings = {
            "ASGI_AUDIT_" + name.strip().upper(): value
            for name, value in (item.split("=", 1) for item in args.setting)
        }
    except ValueError:
        parser.error("--setting takes NAME=VALUE, e.g. --setting ship=off")
    return args


def main() -> None:
    args = parse_arguments()
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C: the servers started so far
    # are stopped by their context managers instead of being left running.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    missing = {name: how for name, how in TOOLS.items() if shutil.which(name) is None}
    for name, how in missing.items():
        print(f"{name} not found on PATH; install it with: {how}", file=sys.stderr)
    if missing:
        sys.exit(2)
    chosen = variants(args.postgres)
    if args.variants:
        wanted = {BASELINE, *args.variants.split(",")}
        chosen = [v for v in chosen if v in wanted]
    started = time.perf_counter()
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="asgi-audit-bench-http-") as temporary:
        scratch = Path(temporary)
        body = order_json(1 << 20)
        files = {"raw": scratch / "raw.json", "json": scratch / "order.json"}
        for path in files.values():
            path.write_bytes(body)  # the same document: the routes differ, not the bytes
        print("measuring the recording costs of this machine", file=sys.stderr)
        costs = measure(body, scratch)
        labels = [w.label for w in workloads(args, files)]
        big_label = f"stream {args.big_stream_mib} MiB"
        for label in [*labels, "peak RSS", big_label]:
            results[label] = {}
        for repetition in range(1, args.repetitions + 1):
            # A different variant starts each repetition: none is always measured first
            # (cold caches) or last (after the others warmed the machine).
            shift = (repetition - 1) % len(chosen)
            for variant in chosen[shift:] + chosen[:shift]:
                print(f"rep {repetition}/{args.repetitions}: {variant}", file=sys.stderr)
                directory = scratch / f"{variant}-{repetition}"
                try:
                    with serving(
                        variant, directory, args.postgres, args.settings, args.server
                    ) as server:
                        run_variant(server, args, files, results)
                    if not args.no_big_stream:
                        with serving(
                            variant, directory / "big", args.postgres, args.settings, args.server
                        ) as server:
                            sample = big_stream(server, args)
                        results[big_label].setdefault(variant, []).append(sample)
                except Exception as exc:  # a variant that breaks is a result, not a crash
                    for per_variant in results.values():
                        samples = per_variant.setdefault(variant, [])
                        if len(samples) < repetition:
                            samples.append(Sample(notes=[f"{type(exc).__name__}: {exc}"]))
                shutil.rmtree(directory, ignore_errors=True)
    base_cpu = [
        s.metrics["cpu_ms"] / 1e3
        for s in results.get("raw 1 MB echo, c=8", {}).get(BASELINE, [])
        if "cpu_ms" in s.metrics
    ]
    limit = recording_limit(costs, 2 * len(body), statistics.median(base_cpu)) if base_cpu else None
    report = Report(
        results=results,
        variants=chosen,
        args=args,
        body_size=len(body),
        small_size=len(SMALL_BODY),
        costs=costs,
        limit=limit,
        elapsed=time.perf_counter() - started,
    )
    text = write_report(report, args.output)
    print(text)
