"""The load generators and probes the HTTP benchmark drives, each bounded in time.

* ``hey`` (Debian package ``hey``) for the 1 MB echoes: closed loop (``-c``), or open loop
  at a steady rate (``-q``, per worker), with a per-request CSV to take percentiles from;
* ``wrk`` (Debian package ``wrk``) for small requests, where a load generator's own cost
  per request would otherwise be the bottleneck;
* a plain socket client with ``h11`` for streamed responses, so that time to first byte is
  the server's, not an HTTP client library's;
* CPU time of a process tree and high-water RSS, from ``/proc``.

Every function returns a ``Sample``; a run that fails, stalls or times out is a ``Sample``
with no metrics and a note saying what happened, never an exception.
"""

from __future__ import annotations

import csv
import io
import os
import resource
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    """One workload against one variant in one repetition; ``metrics`` is empty when the
    run produced no usable figure, and ``notes`` says why or what went wrong."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sent: int = 0  # audited exchanges answered: what the store should gain
    stored: int | None = None
    catch_up: float | None = None


def percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants (uvicorn and, for
    asgi-audit, its shipper process)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def peak_rss_mib(pid: int) -> float | None:
    """The process's high-water RSS (VmHWM) so far, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def hey(
    url: str,
    body: Path,
    requests: int,
    concurrency: int,
    timeout: float,
    rate: float | None = None,
) -> Sample:
    """A ``hey`` run, closed loop, or open loop at ``rate`` requests/s in all (hey paces
    each worker at ``rate / concurrency``). Latencies come from its per-request CSV
    (successes only); the sample also carries hey's CPU seconds (``load_cpu``). hey gives
    each worker ``requests // concurrency`` requests, so ``requests`` is rounded down to a
    multiple of it (else the missing ones would look failed)."""
    requests = max(concurrency, requests // concurrency * concurrency)
    command = ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST"]
    command += ["-D", str(body), "-T", "application/json", "-t", str(int(timeout)), "-o", "csv"]
    if rate is not None:
        command += ["-q", f"{rate / concurrency:g}"]
    sample = Sample()
    cpu = children_cpu()
    try:
        done = subprocess.run([*command, url], capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        sample.notes.append(f"timed out after {timeout:.0f} s")
        return sample
    sample.metrics["load_cpu"] = children_cpu() - cpu
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
    if not ok:
        sample.metrics.clear()
        return sample
    latencies = [float(row["response-time"]) * 1e3 for row in ok]
    span = max(float(row["offset"]) + float(row["response-time"]) for row in ok)
    sample.metrics.update(
        p50=statistics.median(latencies),
        p99=percentile(latencies, 99),
        rps=len(ok) / span if span > 0 else float("nan"),
    )
    return sample


_WRK_SCRIPT = """
wrk.method = "{method}"
wrk.headers["Content-Type"] = "application/json"
{body}
function done(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %d\\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write,
    summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk(url: str, body: bytes | None, seconds: float, concurrency: int, timeout: float) -> Sample:
    """A closed-loop ``wrk`` run of ``seconds`` (one thread, ``concurrency`` connections);
    POST ``body`` when given, else GET. wrk stops on time, not on a count: requests in
    flight at the end are abandoned by wrk yet may still be recorded by the server."""
    sample = Sample()
    method = "GET" if body is None else "POST"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        lua_body = "" if body is None else f"wrk.body = [[{body.decode()}]]"
        script.write(_WRK_SCRIPT.format(method=method, body=lua_body))
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-s", script.name, url]
    cpu = children_cpu()
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        sample.notes.append(f"timed out after {timeout:.0f} s")
        return sample
    finally:
        os.unlink(script.name)
    load_cpu = children_cpu() - cpu
    result = [line for line in done.stdout.decode().splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not result:
        sample.notes.append(f"wrk exit {done.returncode}: {done.stderr.decode()[-200:].strip()}")
        return sample
    requests, duration_us, status, socket_errors, timeouts, p50, p99 = map(
        int, result[0].split()[1:]
    )
    sample.sent = requests - status - socket_errors - timeouts
    if status or socket_errors or timeouts:
        sample.notes.append(
            f"{status} non-2xx, {socket_errors} socket errors, {timeouts} timeouts of {requests}"
        )
    if sample.sent > 0:
        sample.metrics.update(
            p50=p50 / 1e3, p99=p99 / 1e3, rps=sample.sent / (duration_us / 1e6), load_cpu=load_cpu
        )
    return sample


def stream(port: int, path: str, expected: int, timeout: float) -> Sample:
    """One streamed GET over a plain socket: time to the first body byte, counted from the
    request's send on an already open connection, and total time; bounded by ``timeout``."""
    sample = Sample()
    connection = h11.Connection(h11.CLIENT)
    received = 0
    first: float | None = None
    status = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            request = h11.Request(
                method="GET", target=path, headers=[("Host", "127.0.0.1"), ("Connection", "close")]
            )
            data = connection.send(request) + (connection.send(h11.EndOfMessage()) or b"")
            started = time.perf_counter()
            sock.sendall(data)
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    if time.perf_counter() - started > timeout:
                        sample.notes.append(f"timed out after {timeout:.0f} s ({received} bytes)")
                        return sample
                    connection.receive_data(sock.recv(1 << 20))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    if first is None:
                        first = time.perf_counter() - started
                    received += len(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    except TimeoutError:
        sample.notes.append(f"timed out after {timeout:.0f} s ({received} bytes)")
        return sample
    except (OSError, h11.ProtocolError) as exc:
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
