"""One variant of ``bench.http.apps`` served in a subprocess, and its store.

Each variant is a real server (one worker, 127.0.0.1, a free port) in a process of its
own, on one of the :data:`STACKS` production runs (uvicorn with uvloop and httptools,
which ``uvicorn[standard]`` installs, is the default; uvicorn on h11 and asyncio, and
granian, are there to compare), so that a recipe that eats memory or crashes cannot
disturb the runner or the next variant; it is stopped by its PID (SIGTERM, then
SIGKILL), never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from asgi_audit.sinks import open_sink
from bench.http.load import Sample
from bench.postgres import drop_postgres_table

ROOT = Path(__file__).resolve().parents[2]
APP = "bench.http.apps:app"

STACKS: dict[str, list[str]] = {
    "uvicorn-standard": ["-m", "uvicorn", APP, "--loop", "uvloop", "--http", "httptools"],
    "uvicorn-h11": ["-m", "uvicorn", APP, "--loop", "asyncio", "--http", "h11"],
    "granian": ["-m", "granian", "--interface", "asgi", "--loop", "uvloop", APP],
}
"""How each server stack is started (host, port and one worker are added)."""
DEFAULT_STACK = "uvicorn-standard"


def stack_command(stack: str, port: int) -> list[str]:
    """The command line serving the benchmark app on ``stack`` at 127.0.0.1:``port``."""
    return [
        sys.executable,
        *STACKS[stack],
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--log-level", "warning", "--no-access-log"),
    ]


@dataclass
class Server:
    """A uvicorn subprocess serving one variant, with what is needed to query its store."""

    variant: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    sink: str | None
    expected: int = 0  # audited exchanges answered and not dropped: what the store holds
    dropped: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(
    variant: str,
    scratch: Path,
    postgres: str,
    settings: dict[str, str] | None = None,
    stack: str = DEFAULT_STACK,
) -> Iterator[Server]:
    """Start ``variant`` on ``stack``, wait until it answers, stop it by PID at the end;
    ``settings`` are asgi-audit's ``ASGI_AUDIT_*`` variables (any others are removed)."""
    scratch.mkdir(parents=True)
    sink: str | None = None
    table: str | None = None
    if variant in ("asgi-audit", "asgi-audit-drop", "asgi-audit-blocking"):
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
    environ.update(settings or {})
    if sink is not None:
        environ["BENCH_HTTP_SINK"] = sink
    port = free_port()
    log = scratch / "server.log"
    command = stack_command(stack, port)
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
        if not server.alive():
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


def tracebacks(server: Server) -> tuple[int, str]:
    """How many tracebacks the server logged so far, and the last exception line."""
    text = server.log.read_text(errors="replace") if server.log.exists() else ""
    last = ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and ("Error" in line or "Exception" in line):
            last = line.strip()
    return text.count("Traceback"), last[:120]


def dropped_so_far(server: Server) -> int:
    """What the middleware counted as dropped (``overflow="drop"``), from the app."""
    if server.sink is None or not server.alive():
        return 0
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        count: int = httpx.get(server.url("/bench/dropped"), timeout=5.0).json()["dropped"]
        return count
    return 0


def catch_up(server: Server, sample: Sample, wait: float) -> None:
    """Wait (at most ``wait`` s) until the store holds every audited exchange answered so
    far and not dropped by policy; note how many it holds and how long that took after the
    load ended. More than expected (wrk abandons requests in flight at its deadline, which
    the server still answers and records) moves the expectation up."""
    if server.sink is None:
        return
    dropped = dropped_so_far(server)
    if server.variant == "asgi-audit-drop":
        sample.metrics["dropped"] = dropped - server.dropped
    newly = sample.sent - (dropped - server.dropped)
    server.dropped = dropped
    before = server.expected
    server.expected += newly
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
    sample.stored = min(count - before, newly)
    if count >= server.expected:
        sample.catch_up = time.perf_counter() - started
        server.expected = count
    else:
        sample.notes.append(f"store held {count} of {server.expected} after {wait:.0f} s")
        server.expected = count
