"""The durable path behind the middleware: spool recorder plus shipper, and their shutdown.

Built from the settings when no ``recorder=`` is given. Nothing starts at construction:
the writer thread (and with it the shipper child process or thread) starts with the first
audited exchange of each process. On ASGI ``lifespan.shutdown`` (what uvicorn does on
SIGTERM) the middleware calls :meth:`Delivery.shutdown`: the queue is drained into the
spool, then the shipper gets what is left of ``shutdown_timeout`` to deliver; whatever it
cannot deliver stays in the spool for the next process. An ``atexit`` hook does the same
for apps that run without lifespan.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..capture.settings import Settings
from ..recording.spool import streams
from ..recording.writer import SpoolRecorder
from .shipper import ShipperProcess, ShipperThread

logger = logging.getLogger("asgi_audit")


class Delivery:
    """Owns the spool recorder and the shipper of one middleware."""

    def __init__(self, settings: Settings, stream: Callable[[], str]) -> None:
        self.settings = settings
        self.recorder = SpoolRecorder(
            settings.spool,
            service=settings.service,
            stream=stream,
            fsync=settings.fsync,
            overflow=settings.overflow,
            redact_headers=settings.redact_headers,
            disk_cap=settings.spool_limit,
            on_start=self._start_shipper,
            on_tick=self._keep_shipper,
        )
        self._process: ShipperProcess | None = None
        self._thread: ShipperThread | None = None
        self._pid = 0

    def adopt_leftovers(self) -> None:
        """At start-up: when the spool holds streams of earlier processes (a restart after
        a crash), start shipping now rather than at the first audited exchange."""
        if self._pid != os.getpid() and any(streams(Path(self.settings.spool))):
            self._start_shipper()

    def _start_shipper(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        mode = self.settings.ship
        if mode == "process":
            self._process = ShipperProcess(self.settings.spool, self.settings.sink)
            self._process.start()
        elif mode == "thread":
            from ..sinks import open_sink

            self._thread = ShipperThread(self.settings.spool, open_sink(self.settings.sink))
            self._thread.start()
        atexit.register(self.shutdown_now)

    def _keep_shipper(self) -> None:
        """From the writer thread, every few seconds: when this process's child shipper has
        ended (it found another shipper's lock, and that shipper's process has since
        died) and nobody holds the spool's lock, start a new child."""
        process = self._process
        if process is None or self._pid != os.getpid():
            return
        if process.process is not None:
            if process.process.poll() is None:
                return
            if process.process.stdin is not None:
                process.process.stdin.close()
            process.process.wait()
            process.process = None
        process.start()

    def shutdown_now(self, timeout: float | None = None) -> bool:
        """Drain the queue into the spool, then give the shipper the rest of the time."""
        if self._pid != os.getpid():
            return True
        self._pid = 0
        with contextlib.suppress(Exception):
            atexit.unregister(self.shutdown_now)
        budget = self.settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        drained = self.recorder.close(max(0.0, deadline - time.monotonic()))
        if not drained:
            logger.warning("asgi-audit: the queue was not fully written to the spool in time")
        shipped = True
        if self._process is not None:
            shipped = self._process.stop(deadline)
            self._process = None
        if self._thread is not None:
            shipped = self._thread.stop(deadline)
            with contextlib.suppress(Exception):
                self._thread.shipper.sink.close()
            self._thread = None
        if not shipped:
            logger.warning(
                "asgi-audit: not everything was delivered before shutdown; the rest stays "
                "in the spool %s for the next process",
                self.settings.spool,
            )
        return drained and shipped
