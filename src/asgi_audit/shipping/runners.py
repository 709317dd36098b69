"""Where the shipper runs: a child process of the app, a sidecar, or a thread.

Only one process ships a spool at a time: the holder of its ``shipper.lock``. The app's
durable path starts a child (``python -m asgi_audit ship --child-of PID``, the same
command a sidecar runs) that exits at once when another process holds the lock, so
``--workers N`` end up with one shipper. The child's sink URL travels in its environment,
never in its arguments (which every local user can read in ``ps``). The parent stops its
child by closing the child's standard input, which is also what the parent's death looks
like to it. A thread mode shares the app's GIL: for tests and small apps.

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

from ..errors import ShippingStopped
from ..recording.spool import try_lock, unlock
from ..sinks import BatchWriter, Sink, open_sink
from .shipper import Shipper

logger = logging.getLogger("asgi_audit.shipper")

SINK_VARIABLE = "ASGI_AUDIT_SINK"
"""How a child shipper learns its sink URL (the environment, not its arguments)."""


class ShipperLock:
    """The ``shipper.lock`` of a spool: only its holder ships that spool."""

    def __init__(self, spool: str | os.PathLike[str]) -> None:
        self.path = Path(spool) / "shipper.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True  # held already: a second fd would fail and lose the first
        self.path.parent.mkdir(parents=True, exist_ok=True)
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

    def __init__(self, spool: str | os.PathLike[str], sink_url: str) -> None:
        self.spool = str(spool)
        self.sink_url = sink_url
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if ShipperLock(self.spool).held_elsewhere():
            return  # a shipper (another worker's child, or a sidecar) is already there
        environment = {**os.environ, SINK_VARIABLE: self.sink_url}
        command = [sys.executable, "-m", "asgi_audit", "ship", "--spool", self.spool]
        self.process = subprocess.Popen(
            [*command, "--child-of", str(os.getpid())],
            stdin=subprocess.PIPE,
            env=environment,
            start_new_session=True,
        )

    def running(self) -> bool:
        """True while the child lives (it exits at once when another holds the lock)."""
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


def serve(
    spool: str,
    sink_url: str,
    *,
    parent: int | None = None,
    wait_for_lock: bool = True,
    drain_seconds: float = 20.0,
    once: bool = False,
    stop_on_eof: bool = False,
    keep_delivered: bool = False,
) -> int:
    """Ship a spool until told to stop (SIGTERM, SIGINT, or with ``stop_on_eof`` the end
    of stdin: how the parent of a child shipper asks, and what its death looks like).
    Returns the process exit code."""
    lock = ShipperLock(spool)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if stop_on_eof:

        def watch_stdin() -> None:
            # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside a
            # buffered reader's lock aborts the interpreter at exit ("could not acquire
            # lock for <stdin> at interpreter shutdown").
            with contextlib.suppress(OSError):
                while os.read(0, 4096):
                    pass
            stop.set()

        threading.Thread(target=watch_stdin, name="asgi-audit-stdin", daemon=True).start()
    while not lock.acquire():
        if not wait_for_lock or stop.wait(1.0):
            return 0
    try:
        sink = open_until_stopped(sink_url, stop, retry=not once)
    except ShippingStopped:
        lock.release()
        return 3
    except Exception:
        lock.release()
        raise
    shipper = Shipper(spool, sink, keep_delivered=keep_delivered)
    try:
        if once:
            report = shipper.ship_once()
            logger.info("asgi-audit: delivered %d records", report.delivered)
            return 0

        def watch_parent() -> None:
            if parent is not None and os.getppid() != parent:
                stop.set()

        shipper.run(stop, on_pass=watch_parent)
        try:
            shipper.ship_once(timeout=drain_seconds)
        except ShippingStopped:
            return 3
        return 0
    finally:
        sink.close()
        lock.release()


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
