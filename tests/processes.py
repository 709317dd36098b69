"""Real processes for the durability tests: uvicorn serving an audited app, the shipper
sidecar, and a bounded load generator. Every process is stopped by its PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def environment(**settings: str) -> dict[str, str]:
    """This process's environment without ASGI_AUDIT_*, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_AUDIT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(settings)
    return env


@dataclass
class Server:
    """A uvicorn process serving ``tests.apps.audited_shop:app``."""

    env: Mapping[str, str]
    workers: int = 1
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    """Where the server's (and its shipper's) stderr goes; inherited when None."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.apps.audited_shop:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        stderr = None if self.log is None else open(self.log, "ab")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(command, env=dict(self.env), cwd=ROOT, stderr=stderr)
        finally:
            if stderr is not None:
                stderr.close()
        try:
            wait_answering(self.process, self.url + "/health", timeout)
        except RuntimeError:
            self.kill()
            raise
        return self

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def wait_answering(process: subprocess.Popen[bytes], url: str, timeout: float = 30.0) -> None:
    """Until ``url`` answers 200 (bounded by ``timeout``); RuntimeError, with what the
    process wrote on a piped stderr, when it exits first or does not answer in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"exited with {process.returncode}: {stderr[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")


@contextlib.contextmanager
def serving(env: Mapping[str, str], workers: int = 1, log: Path | None = None) -> Iterator[Server]:
    server = Server(env, workers, log=log).start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def sidecar(spool: Path, sink: str) -> Iterator[subprocess.Popen[bytes]]:
    """``asgi-audit ship`` on the spool, as a sidecar container would run it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "asgi_audit", "ship", "--spool", str(spool), "--sink", sink],
        env=environment(),
        cwd=ROOT,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


@dataclass
class Load:
    """Sends POSTs with distinct bodies and X-Request-IDs from a few threads, bounded in
    count and time; records which requests got a complete, correct response."""

    url: str
    total: int
    threads: int = 4
    body_size: int = 2048
    seconds: float = 60.0
    prefix: str = "load"
    fresh_connections: bool = False
    """A new connection per request (spreads requests over --workers)."""
    completed: set[str] = field(default_factory=set)
    failed: int = 0
    stopped: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0

    def body(self, request_id: str) -> bytes:
        head = f'{{"request": "{request_id}", "pad": "'.encode()
        return head + b"x" * max(0, self.body_size - len(head) - 2) + b'"}'

    def _claim(self) -> int | None:
        with self._lock:
            if self._next >= self.total:
                return None
            self._next += 1
            return self._next

    def _worker(self, deadline: float) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while time.monotonic() < deadline and not self.stopped.is_set():
                number = self._claim()
                if number is None:
                    return
                request_id = f"{self.prefix}-{number:06d}"
                body = self.body(request_id)
                headers = {"x-request-id": request_id}
                if self.fresh_connections:
                    headers["connection"] = "close"
                try:
                    response = client.post(f"/orders/{number}", content=body, headers=headers)
                except httpx.HTTPError:
                    with self._lock:
                        self.failed += 1
                    continue
                if response.status_code == 200 and response.content == body:
                    with self._lock:
                        self.completed.add(request_id)
                else:
                    with self._lock:
                        self.failed += 1

    def run(self) -> Load:
        deadline = time.monotonic() + self.seconds
        workers = [
            threading.Thread(target=self._worker, args=(deadline,)) for _ in range(self.threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return self

    def start(self) -> threading.Thread:
        """Run in the background; join the returned thread."""
        thread = threading.Thread(target=self.run)
        thread.start()
        return thread


def wait_for(condition: object, timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll ``condition()`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(condition())  # type: ignore[operator]


SIGTERM = signal.SIGTERM
SIGKILL = signal.SIGKILL
