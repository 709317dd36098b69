"""Run every variant of ``bench.http.apps`` under uvicorn and compare them with ``baseline``.

Why this shape:
* Each variant is a real uvicorn server (one worker, 127.0.0.1, a free port) in a
  subprocess of its own, so a recipe that eats memory or crashes cannot disturb the
  runner or the next variant; it is stopped by its PID (SIGTERM, then SIGKILL).
* Load comes from ``hey`` (Debian package ``hey``), closed loop, on the same machine: the
  load generator shares the CPU with the server, as it did in issue 6's reference figures.
* Every figure is a ratio to ``baseline`` measured in the same repetition, and the table
  shows the median of the repetitions with their min-max spread: absolute numbers on a
  shared 2-core machine move from run to run, ratios taken side by side move much less.
* A recipe that errors, stalls or runs out of time is a result, not a crash of the bench:
  every run is bounded, and its row says what happened.
* For asgi-audit the records are counted in the store after each load run (records lost =
  0 is measured, not assumed), with the time the store took to catch up.

The script installs nothing: it checks for the tools it needs and says how to get them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import httpx

from asgi_audit.sinks import open_sink
from bench.postgres import drop_postgres_table, postgres_reachable
from bench.recording import order_json

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
DEFAULT_POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BASELINE = "baseline"
ECHO_WORKLOADS = (  # (label, path, which body, concurrency)
    ("raw 1 MB echo, c=1", "/raw/echo", "raw", 1),
    ("raw 1 MB echo, c=8", "/raw/echo", "raw", 8),
    ("JSON 1 MB echo, c=1", "/json/echo", "json", 1),
    ("JSON 1 MB echo, c=8", "/json/echo", "json", 8),
)
WARM_UPS = 3  # of each route, before any measurement
TOOLS = {
    "hey": "apt-get install hey   (Debian/Ubuntu; or: go install github.com/rakyll/hey@latest)",
    "wrk": "apt-get install wrk   (not used by this first step; later workloads will)",
}


@dataclass
class Sample:
    """One workload against one variant in one repetition; ``metrics`` is empty when the
    run produced no usable figure, and ``notes`` says why or what went wrong."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sent: int = 0
    stored: int | None = None
    catch_up: float | None = None


@dataclass
class Server:
    """A uvicorn subprocess serving one variant, with what is needed to query its store."""

    variant: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    sink: str | None
    expected: int = 0  # audited exchanges answered so far: what the store should hold

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def missing_tools() -> dict[str, str]:
    """Tools not on PATH, with how to install them (never installed from here)."""
    return {name: how for name, how in TOOLS.items() if shutil.which(name) is None}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(variant: str, scratch: Path, postgres: str) -> Iterator[Server]:
    """Start ``variant`` under uvicorn, wait until it answers, stop it by PID at the end."""
    scratch.mkdir(parents=True)
    sink: str | None = None
    table: str | None = None
    if variant == "asgi-audit":
        sink = f"sqlite:///{scratch / 'audit.db'}"
    elif variant == "asgi-audit-postgres":
        table = f"bench_http_{uuid.uuid4().hex[:12]}"
        sink = f"{postgres}{'&' if '?' in postgres else '?'}table={table}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("ASGI_AUDIT_", "BENCH_"))}
    environ.update(
        BENCH_HTTP_VARIANT=variant,
        BENCH_HTTP_LOG=str(scratch / "bodies.log"),
        BENCH_HTTP_SPOOL=str(scratch / "spool"),
        PYTHONUNBUFFERED="1",
    )
    if sink is not None:
        environ["BENCH_HTTP_SINK"] = sink
    port = free_port()
    log = scratch / "server.log"
    command = [sys.executable, "-m", "uvicorn", "bench.http.apps:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    server = Server(variant, process, port, log, sink)
    try:
        wait_until_ready(server, timeout=30.0)
        yield server
    finally:
        stop(process, grace=30.0 if sink is not None else 5.0)
        if table is not None:
            with contextlib.suppress(Exception):
                drop_postgres_table(postgres, table)


def wait_until_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.variant} exited at start-up: {tail(server.log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url("/unaudited"), timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.variant} did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM (uvicorn drains, asgi-audit ships what it can), then SIGKILL, by PID; the
    session it leads (its shipper child) is killed too if anything of it is left. A recipe
    still draining a timed-out stream would hold SIGTERM up: its grace is short."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def server_problems(server: Server) -> tuple[int, str]:
    """How many tracebacks the server logged so far, and the last exception line."""
    text = server.log.read_text(errors="replace") if server.log.exists() else ""
    last = ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and ("Error" in line or "Exception" in line):
            last = line.strip()
    return text.count("Traceback"), last[:120]


def peak_rss_mib(pid: int) -> float | None:
    """The server process's high-water RSS (VmHWM) so far, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]


def hey(url: str, body: Path, requests: int, concurrency: int, timeout: float) -> Sample:
    """A closed-loop ``hey`` run; latencies from its per-request CSV (successes only).
    hey gives each of its ``concurrency`` workers ``requests // concurrency`` requests, so
    ``requests`` is rounded down to a multiple of it (else the missing ones look failed)."""
    requests = max(concurrency, requests // concurrency * concurrency)
    command = ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST"]
    command += ["-D", str(body), "-T", "application/json", "-t", str(int(timeout)), "-o", "csv"]
    sample = Sample(sent=0)
    try:
        done = subprocess.run(
            [*command, url], capture_output=True, timeout=timeout, check=False, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        sample.notes.append(f"timed out after {timeout:.0f} s")
        return sample
    rows = list(csv.DictReader(io.StringIO(done.stdout.decode(errors="replace"))))
    ok = [row for row in rows if row.get("status-code") == "200"]
    sample.sent = len(ok)
    failed = requests - len(ok)
    if failed:
        codes = sorted({row.get("status-code", "?") for row in rows} - {"200"})
        sample.notes.append(
            f"{failed} of {requests} failed" + (f" (HTTP {', '.join(codes)})" if codes else "")
        )
    if done.returncode != 0:
        sample.notes.append(f"hey exit {done.returncode}: {done.stderr.decode()[-200:].strip()}")
    if ok:
        latencies = [float(row["response-time"]) * 1e3 for row in ok]
        span = max(float(row["offset"]) + float(row["response-time"]) for row in ok)
        sample.metrics = {
            "p50": statistics.median(latencies),
            "p99": percentile(latencies, 99),
            "rps": len(ok) / span if span > 0 else float("nan"),
        }
    return sample


def stream(url: str, expected: int, timeout: float) -> Sample:
    """Time to first body byte and total time of one streamed GET, bounded by ``timeout``."""
    sample = Sample()
    received = 0
    first: float | None = None
    started = time.perf_counter()
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(timeout)) as client,
            client.stream("GET", url) as response,
        ):
            status = response.status_code
            for chunk in response.iter_raw():
                if first is None:
                    first = time.perf_counter() - started
                received += len(chunk)
                if time.perf_counter() - started > timeout:
                    sample.notes.append(f"timed out after {timeout:.0f} s")
                    return sample
    except httpx.TimeoutException:
        sample.notes.append(f"timed out after {timeout:.0f} s ({received} bytes)")
        return sample
    except httpx.HTTPError as exc:
        sample.notes.append(f"broken after {received} of {expected} bytes: {type(exc).__name__}")
        return sample
    total = time.perf_counter() - started
    if status != 200 or received != expected:
        cut = " (body silently cut short, no error)" if status == 200 else ""
        sample.notes.append(f"HTTP {status}, {received} of {expected} bytes{cut}")
        return sample
    sample.sent = 1
    sample.metrics = {"ttfb": (first or total) * 1e3, "total": total}
    return sample


def catch_up(server: Server, sample: Sample, wait: float) -> None:
    """Wait (at most ``wait`` s) until the store holds every audited exchange answered so
    far; note how many it holds and how long that took after the load ended."""
    if server.sink is None:
        return
    server.expected += sample.sent
    started = time.perf_counter()
    deadline = started + wait
    count = 0
    store = None
    try:
        while True:
            if store is None:
                with contextlib.suppress(Exception):  # not created until the first delivery
                    store = open_sink(server.sink, create=False)
            if store is not None:
                with contextlib.suppress(Exception):
                    count = store.count()
            if count >= server.expected or time.perf_counter() > deadline:
                break
            time.sleep(0.05)
    finally:
        if store is not None:
            store.close()
    sample.stored = count - (server.expected - sample.sent)
    if count >= server.expected:
        sample.catch_up = time.perf_counter() - started
    else:
        sample.notes.append(f"store held {count} of {server.expected} after {wait:.0f} s")


def warm_up(server: Server, bodies: dict[str, bytes]) -> int:
    """A few requests to each route (imports, connections, the recorder's start); returns
    how many audited exchanges they made."""
    made = 0
    with httpx.Client(timeout=30.0) as client:
        for _ in range(WARM_UPS):
            for path, kind in (("/raw/echo", "raw"), ("/json/echo", "json")):
                response = client.post(
                    server.url(path),
                    content=bodies[kind],
                    headers={"content-type": "application/json"},
                )
                made += response.status_code == 200
            client.get(server.url("/unaudited"))
    return made


Results = dict[str, dict[str, list[Sample]]]  # workload -> variant -> one sample per rep


def run_variant(
    server: Server, args: argparse.Namespace, files: dict[str, Path], results: Results
) -> None:
    """Every workload against one running server, in a fixed order."""
    bodies = {kind: path.read_bytes() for kind, path in files.items()}
    warm = Sample(sent=warm_up(server, bodies))
    catch_up(server, warm, args.store_wait)
    for label, path, kind, concurrency in ECHO_WORKLOADS:
        requests = args.requests if kind == "raw" else args.json_requests
        before = server_problems(server)[0]
        if server.process.poll() is not None:
            sample = Sample(notes=[f"server had exited ({server.process.returncode})"])
        else:
            sample = hey(server.url(path), files[kind], requests, concurrency, args.timeout)
            catch_up(server, sample, args.store_wait)
        note_tracebacks(server, sample, before)
        results[label].setdefault(server.variant, []).append(sample)
    label = f"stream {args.stream_mib} MiB"
    before = server_problems(server)[0]
    sample = stream(
        server.url(f"/stream/{args.stream_mib}"), args.stream_mib << 20, args.stream_timeout
    )
    catch_up(server, sample, args.store_wait)
    note_tracebacks(server, sample, before)
    rss = peak_rss_mib(server.process.pid)
    if rss is not None:
        sample.metrics["rss"] = rss
    results[label].setdefault(server.variant, []).append(sample)


def note_tracebacks(server: Server, sample: Sample, before: int) -> None:
    after, last = server_problems(server)
    if after > before:
        sample.notes.append(f"server logged {after - before} traceback(s): {last}")


def variants(postgres: str) -> list[str]:
    chosen = [BASELINE, "recipe-middleware", "recipe-route", "asgi-audit"]
    reason = postgres_reachable(postgres)
    if reason is None:
        chosen.append("asgi-audit-postgres")
    else:
        print(f"skipping asgi-audit-postgres: {reason}", file=sys.stderr)
    return chosen


def spread(values: list[float], form: Callable[[float], str]) -> str:
    """Median and, with more than one value, the min-max range."""
    if not values:
        return "—"
    middle = form(statistics.median(values))
    if min(values) == max(values):
        return middle
    return f"{middle} ({form(min(values))} to {form(max(values))})"


def ratios(results: Results, workload: str, variant: str, metric: str) -> list[float]:
    """Per repetition, the variant's figure over baseline's from the same repetition."""
    out = []
    for mine, base in zip(results[workload][variant], results[workload][BASELINE], strict=True):
        if metric in mine.metrics and base.metrics.get(metric):
            out.append(mine.metrics[metric] / base.metrics[metric])
    return out


def absolute(results: Results, workload: str, variant: str, metric: str) -> list[float]:
    return [s.metrics[metric] for s in results[workload][variant] if metric in s.metrics]


def records_cell(samples: list[Sample]) -> tuple[str, str]:
    """Records stored / requests answered over all repetitions, and catch-up seconds."""
    if all(s.stored is None for s in samples):
        return "", ""
    stored = sum(s.stored or 0 for s in samples)
    sent = sum(s.sent for s in samples)
    times = [s.catch_up for s in samples if s.catch_up is not None]
    return f"{stored}/{sent}", spread(times, lambda v: f"{v:.2f}")


def notes_cell(samples: list[Sample]) -> str:
    notes: list[str] = []
    for number, sample in enumerate(samples, 1):
        notes.extend(f"rep {number}: {note}" for note in sample.notes)
    if samples and not any(set(s.metrics) - {"rss"} for s in samples):
        notes.insert(0, "**FAILED in every repetition**")
    return "; ".join(notes).replace("|", "/")


def x(value: float) -> str:
    return f"{value:.2f}x"


def table(results: Results, chosen: list[str], stream_label: str) -> list[str]:
    lines = [
        "| workload | variant | p50 ms | p99 ms | req/s | p50 vs base | p99 vs base "
        "| req/s vs base | records / answered | store catch-up s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, *_ in ECHO_WORKLOADS:
        for variant in chosen:
            samples = results[label][variant]
            cells = [
                spread(absolute(results, label, variant, "p50"), lambda v: f"{v:.1f}"),
                spread(absolute(results, label, variant, "p99"), lambda v: f"{v:.1f}"),
                spread(absolute(results, label, variant, "rps"), lambda v: f"{v:.0f}"),
                *(spread(ratios(results, label, variant, m), x) for m in ("p50", "p99", "rps")),
                *records_cell(samples),
                notes_cell(samples),
            ]
            lines.append(f"| {label} | {variant} | {' | '.join(cells)} |")
    lines += [
        "",
        f"| {stream_label} | TTFB ms | total s | TTFB vs base | total vs base "
        "| server peak RSS MiB | records / answered | store catch-up s | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for variant in chosen:
        samples = results[stream_label][variant]
        cells = [
            spread(absolute(results, stream_label, variant, "ttfb"), lambda v: f"{v:.1f}"),
            spread(absolute(results, stream_label, variant, "total"), lambda v: f"{v:.2f}"),
            spread(ratios(results, stream_label, variant, "ttfb"), x),
            spread(ratios(results, stream_label, variant, "total"), x),
            spread(absolute(results, stream_label, variant, "rss"), lambda v: f"{v:.0f}"),
            *records_cell(samples),
            notes_cell(samples),
        ]
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    return lines


def machine() -> str:
    """What the figures depend on: CPU, cores, memory, versions."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f"{kib / (1 << 20):.0f} GiB"
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("fastapi", "starlette", "uvicorn")
    )
    parsers = [name for name in ("httptools", "uvloop") if find_spec(name) is not None]
    http = f"uvicorn with {', '.join(parsers)}" if parsers else "uvicorn on h11 and asyncio"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory} RAM; Python {platform.python_version()}, "
        f"{versions} ({http}); load from hey on the same cores, loopback"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="End-to-end HTTP benchmark (issue 6, step 1)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200, help="per raw-echo run")
    parser.add_argument("--json-requests", type=int, default=24, help="per JSON-echo run")
    parser.add_argument("--stream-mib", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per hey run")
    parser.add_argument("--stream-timeout", type=float, default=30.0)
    parser.add_argument("--store-wait", type=float, default=60.0, help="catch-up bound, s")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server URL (no table)")
    parser.add_argument("--variants", help="comma-separated subset (baseline is always run)")
    parser.add_argument("--output", type=Path, default=RESULTS / "http.md")
    args = parser.parse_args()
    missing = missing_tools()
    for name, how in missing.items():
        print(f"{name} not found on PATH; install it with: {how}", file=sys.stderr)
    if "hey" in missing:
        sys.exit(2)
    chosen = variants(args.postgres)
    if args.variants:
        wanted = {BASELINE, *args.variants.split(",")}
        chosen = [v for v in chosen if v in wanted]
    stream_label = f"stream {args.stream_mib} MiB"
    results: Results = {label: {} for label, *_ in ECHO_WORKLOADS}
    results[stream_label] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asgi-audit-bench-http-") as temporary:
        scratch = Path(temporary)
        files = {"raw": scratch / "raw.json", "json": scratch / "order.json"}
        body = order_json(1 << 20)
        for path in files.values():
            path.write_bytes(body)  # the same document: the routes differ, not the bytes
        for repetition in range(1, args.repetitions + 1):
            for variant in chosen:
                print(f"rep {repetition}/{args.repetitions}: {variant}", file=sys.stderr)
                directory = scratch / f"{variant}-{repetition}"
                try:
                    with serving(variant, directory, args.postgres) as server:
                        run_variant(server, args, files, results)
                except RuntimeError as exc:
                    for label in results:
                        results[label].setdefault(variant, []).append(Sample(notes=[str(exc)]))
                shutil.rmtree(directory, ignore_errors=True)
    elapsed = time.perf_counter() - started
    lines = [
        f"# HTTP benchmark ({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        f"Machine: {machine()}.",
        f"Body: {len(body) / 1e6:.2f} MB order JSON; {args.requests} raw / "
        f"{args.json_requests} JSON requests per echo run (closed loop, hey); "
        f"median of {args.repetitions} repetitions (min to max); ratios to baseline from the "
        f"same repetition; {elapsed:.0f} s in all. "
        "Reproduce: `python -m bench.http`.",
        "",
        *table(results, chosen, stream_label),
        "",
        "Server peak RSS is the uvicorn process's VmHWM after all workloads of a repetition "
        "(the shipper child is not included).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
