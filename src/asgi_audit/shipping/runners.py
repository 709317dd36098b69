"""Where the shipper runs: a child process of the app, a sidecar, or a thread.

Only one process ships a spool at a time: the holder of its ``shipper.lock``. The app's
durable path starts a child (``python -m asgi_audit ship --child-of PID``, the same
command a sidecar runs) that waits while another process holds the lock, so ``--workers
N`` end up with one shipper and N-1 idle ones, and the shipper of a process that is
stopping (draining, lock held) hands over to the next process's instead of leaving its
records to nobody. The child's sink URL travels in its environment, never in its
arguments (which every local user can read in ``ps``). The parent stops its child by
writing what is left of its shutdown budget to the child's standard input and closing
it; the end of that input is also what the parent's death looks like to it. A thread
mode shares the app's GIL: for tests and small apps.

Every wait here takes a ``timeout`` in seconds, converted to a deadline where a loop needs
one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ShippingStopped
from ..recording.spool import private_directory, try_lock, unlock
from ..sinks import BatchWriter, Sink, open_sink
from .shipper import Shipper

logger = logging.getLogger("asgi_audit.shipper")

SINK_VARIABLE = "ASGI_AUDIT_SINK"
METRICS_VARIABLE = "ASGI_AUDIT_METRICS_PORT"
"""Where the child shipper serves ``/metrics`` (``HOST:PORT``); unset: nowhere."""
"""How a child shipper learns its sink URL (the environment, not its arguments)."""


class ShipperLock:
    """The ``shipper.lock`` of a spool: only its holder ships that spool."""

    def __init__(self, spool: str | os.PathLike[str]) -> None:
        self.path = Path(spool) / "shipper.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True  # held already: a second fd would fail and lose the first
        private_directory(self.path.parent)
        self._fd = try_lock(self.path)
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            unlock(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        """True when another process (or another holder here) ships this spool."""
        if self._fd is not None:
            return False
        if not self.path.exists():
            return False
        fd = try_lock(self.path)
        if fd is None:
            return True
        unlock(fd)
        return False


class ShipperThread:
    """In-process shipping, for tests and small apps (shares the app's GIL). A sink given
    by URL is opened on this thread (so a slow open, such as a bucket check over the
    network, delays nobody) and closed by :meth:`stop`; a sink object stays the caller's."""

    def __init__(self, spool: str | os.PathLike[str], sink: str | BatchWriter) -> None:
        self.spool = spool
        self.sink = sink
        self.lock = ShipperLock(spool)
        self.shipper: Shipper | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="asgi-audit-shipper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.lock.acquire():
                try:
                    sink = self._open()
                except ShippingStopped:
                    self.lock.release()
                    return
                self.shipper = Shipper(self.spool, sink)
                try:
                    self.shipper.run(self._stop)
                finally:
                    self.lock.release()
                return
            self._stop.wait(0.5)

    def _open(self) -> BatchWriter:
        if isinstance(self.sink, str):
            return open_until_stopped(self.sink, self._stop, retry=True)
        return self.sink

    def stop(self, timeout: float | None = None) -> bool:
        """Make a last pass bounded by ``timeout``, then stop and close the sink."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_remaining(deadline))
            if self._thread.is_alive():
                return False  # still inside a pass (a slow sink): it releases the lock
        shipper = self.shipper
        if shipper is None:
            return True
        try:
            if self.lock.acquire():
                try:
                    shipper.ship_once(timeout=_remaining(deadline))
                except ShippingStopped:
                    return False
                finally:
                    self.lock.release()
            return True
        finally:
            if isinstance(self.sink, str):
                with contextlib.suppress(Exception):
                    shipper.sink.close()


class ShipperProcess:
    """The child process a middleware starts to ship its spool."""

    def __init__(
        self,
        spool: str | os.PathLike[str],
        sink_url: str,
        drain_seconds: float = 20.0,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        self.spool = str(spool)
        self.sink_url = sink_url
        self.drain_seconds = drain_seconds
        self.metrics = metrics
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        environment = {**os.environ, SINK_VARIABLE: self.sink_url}
        environment.pop(METRICS_VARIABLE, None)
        if self.metrics is not None:
            environment[METRICS_VARIABLE] = f"{self.metrics[0]}:{self.metrics[1]}"
        command = [
            sys.executable,
            *("-m", "asgi_audit", "ship", "--spool", self.spool),
            *("--drain-seconds", f"{self.drain_seconds:g}"),
        ]
        self.process = subprocess.Popen(
            [*command, "--child-of", str(os.getpid())],
            stdin=subprocess.PIPE,
            env=environment,
            start_new_session=True,
        )

    def running(self) -> bool:
        """True while the child lives (waiting for the lock, or shipping)."""
        process = self.process
        if process is None:
            return False
        if process.poll() is None:
            return True
        if process.stdin is not None:
            process.stdin.close()
        process.wait()
        self.process = None
        return False

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the child for a last pass and wait for it for ``timeout`` seconds.

        The request is the end of the child's stdin, not SIGTERM: a signal arriving
        before the child has installed its handler (it was started moments ago) would kill
        it without its last pass, while an end of file waits until it is read."""
        process = self.process
        if process is None:
            return True
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                if timeout is not None:  # the child's last pass gets what is left,
                    # less a margin for its exit (an interpreter's teardown on a busy
                    # machine takes a good part of a second)
                    margin = max(1.0, timeout / 10)
                    process.stdin.write(f"drain {max(0.0, timeout - margin):.3f}\n".encode())
                process.stdin.close()
        try:
            process.wait(None if timeout is None else max(0.1, timeout))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return False
        finally:
            self.process = None
        return process.returncode == 0

    def forget(self) -> None:
        """In a forked child: the parent's shipper is the parent's to stop."""
        self.process = None


class StopRequest:
    """How a shipper is asked to stop, and how long its last pass may take.

    A signal (SIGTERM, SIGINT), or for a child shipper the end of its stdin, sets it;
    a parent may first write ``drain <seconds>`` on that stdin: what is left of its own
    ``shutdown_timeout``, which then bounds the child's last pass."""

    def __init__(self, drain_seconds: float) -> None:
        self.event = threading.Event()
        self.drain_seconds = drain_seconds
        self.deadline: float | None = None

    def set(self, drain_seconds: float | None = None) -> None:
        if drain_seconds is not None:
            self.drain_seconds = drain_seconds
        if self.deadline is None:
            self.deadline = time.monotonic() + self.drain_seconds
        self.event.set()

    def remaining(self) -> float:
        if self.deadline is None:
            return self.drain_seconds
        return max(0.0, self.deadline - time.monotonic())

    def watch_stdin(self) -> None:
        """Read stdin until its end (on a daemon thread)."""
        buffered = b""
        drain: float | None = None
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside a
        # buffered reader's lock aborts the interpreter at exit ("could not acquire
        # lock for <stdin> at interpreter shutdown").
        with contextlib.suppress(OSError):
            while data := os.read(0, 4096):
                buffered = (buffered + data)[-4096:]
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    words = line.split()
                    if len(words) == 2 and words[0] == b"drain":
                        with contextlib.suppress(ValueError):
                            drain = max(0.0, float(words[1]))
        self.set(drain)


def serve(
    spool: str,
    sink_url: str,
    *,
    parent: int | None = None,
    drain_seconds: float = 20.0,
    once: bool = False,
    stop_on_eof: bool = False,
    keep_delivered: bool = False,
    metrics: tuple[str, int] | None = None,
) -> int:
    """Ship a spool until told to stop (SIGTERM, SIGINT, or with ``stop_on_eof`` the end
    of stdin: how the parent of a child shipper asks, and what its death looks like),
    then deliver what is left within ``drain_seconds``. Returns the process exit code:
    0 when the spool was delivered, 3 when the deadline passed first.

    While another process holds the spool's ``shipper.lock`` (the shipper of a process
    that is stopping, another worker's, a sidecar) it waits for it, and a stop request
    does not end that wait before the drain deadline: a process's records are never
    left without a shipper while it lives, nor because its shipper came second."""
    lock = ShipperLock(spool)
    stop = StopRequest(drain_seconds)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if stop_on_eof:
        threading.Thread(target=stop.watch_stdin, name="asgi-audit-stdin", daemon=True).start()
    while not lock.acquire():
        if stop.event.is_set() and stop.remaining() <= 0:
            logger.warning(
                "asgi-audit: another shipper still held %s at the deadline; it delivers the spool",
                lock.path,
            )
            return 0
        time.sleep(0.2)
    try:
        sink = open_until_stopped(sink_url, stop.event, retry=not once)
    except ShippingStopped:
        lock.release()
        return 3
    except Exception:
        lock.release()
        raise
    shipper = Shipper(spool, sink, keep_delivered=keep_delivered)
    served = _serve_metrics(metrics, shipper) if metrics is not None and not once else None
    try:
        if once:
            report = shipper.ship_once()
            logger.info("asgi-audit: delivered %d records", report.delivered)
            return 0

        def watch_parent() -> None:
            if parent is not None and os.getppid() != parent:
                stop.set()

        shipper.run(stop.event, on_pass=watch_parent)
        return _drain(shipper, stop.remaining())
    finally:
        if served is not None:
            served.shutdown()
            served.server_close()
        sink.close()
        lock.release()


def _serve_metrics(address: tuple[str, int], shipper: Shipper) -> Any:
    """``/metrics`` of the spool, served while this process ships it (the lock holder:
    one per spool); a port that cannot be bound is logged, and shipping goes on."""
    from .metrics import serve_metrics

    try:
        return serve_metrics(address, shipper.root, shipper)
    except OSError as exc:
        logger.warning("asgi-audit: cannot serve metrics on %s:%d: %s", *address, exc)
        return None


def _drain(shipper: Shipper, seconds: float) -> int:
    """The last pass, bounded by ``seconds``; says whether the spool was delivered."""
    try:
        report = shipper.ship_once(timeout=seconds)
    except ShippingStopped:
        logger.warning(
            "asgi-audit: the drain deadline (%.1f s) passed before the sink took everything; "
            "the rest stays in the spool %s",
            seconds,
            shipper.root,
        )
        return 3
    if report.pending_streams:
        logger.warning(
            "asgi-audit: stopped with %d live stream(s) still being written in %s",
            report.pending_streams,
            shipper.root,
        )
    else:
        logger.info("asgi-audit: the spool %s is delivered", shipper.root)
    return 0


def open_until_stopped(url: str, stop: threading.Event, *, retry: bool) -> Sink:
    """Open the sink; while it cannot be opened (a bucket not created yet, a database
    still starting, credentials being rotated), keep the spool and try again with backoff
    instead of exiting: records wait in the spool either way, and a shipper that exits
    would only be restarted to fail again."""
    delay = 1.0
    while True:
        try:
            return open_sink(url)
        except Exception as exc:
            if not retry:
                raise
            logger.warning(
                "asgi-audit: cannot open the sink (%s); the spool keeps the records, "
                "retrying in %.0f s",
                exc,
                delay,
            )
            if stop.wait(delay):
                raise ShippingStopped from exc
            delay = min(delay * 2, 60.0)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
