"""The durable path behind the middleware: the spool writer and the shipper it feeds.

Built from the settings when no ``recorder=`` is given, and a :class:`Recorder` itself, so
the middleware treats it like any other. It starts and stops the two in order:

* constructing it starts nothing;
* :meth:`Delivery.start` (at lifespan startup, or the first audited exchange) starts the
  writer thread, and that is all it does on the event loop; the writer thread then starts
  the shipper: at once when the spool holds streams of earlier processes (a restart after
  a crash), else once its own stream is open, and it restarts a child shipper that has
  gone (``on_tick``);
* :meth:`Delivery.shutdown` drains the queue into the spool, then gives the shipper what
  is left of the time to deliver; what it cannot deliver stays in the spool for the next
  process. An ``atexit`` hook does the same for apps that run without lifespan.

This module is how the capture room reaches the durable path (the middleware imports it
when no recorder is given); it is the only place that knows all the rooms below it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .._forks import after_fork
from ..capture.record import Exchange
from ..capture.settings import Settings
from ..errors import ConfigError
from ..recording.redact_body import BodyRedactor
from ..recording.signing import load_signer
from ..recording.spool import streams
from ..recording.writer import SpoolRecorder
from ..sinks import check_sink_url
from .runners import ShipperProcess, ShipperThread

logger = logging.getLogger("asgi_audit")

__all__ = ["Delivery", "check_sink_url"]


class Delivery:
    """The durable :class:`Recorder`: a :class:`SpoolRecorder` and its shipper."""

    def __init__(
        self,
        settings: Settings,
        stream: Callable[[], str],
        extra_stats: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        self.settings = settings
        self.spool_recorder = SpoolRecorder(
            settings.spool,
            service=settings.service,
            stream=stream,
            fsync=settings.fsync,
            overflow=settings.overflow,
            redact_headers=settings.redact_headers,
            redact_query=settings.redact_query,
            body_redactor=body_redactor(settings),
            signer=None if settings.signing_key is None else load_signer(settings.signing_key),
            checkpoint_interval=settings.checkpoint_interval,
            disk_cap=settings.spool_limit,
            on_start=self._start_shipper_for_leftovers,
            on_open=self._start_shipper,
            on_tick=self._keep_shipper,
            extra_stats=extra_stats,
        )
        self._shipping = threading.Lock()
        self._process: ShipperProcess | None = None
        self._thread: ShipperThread | None = None
        self._started = False
        after_fork(self._forget_parent)

    # -- Recorder ------------------------------------------------------------------------

    def try_submit(self, exchange: Exchange, *, force: bool = False) -> bool:
        if not self._started:  # no lifespan: the first audited exchange starts the writer
            self.start()
        return self.spool_recorder.try_submit(exchange, force=force)

    async def room(self) -> None:
        await self.spool_recorder.room()

    def flush(self, timeout: float | None = None) -> bool:
        return self.spool_recorder.flush(timeout)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Drain the queue into the spool, then give the shipper the rest of ``timeout``
        (``shutdown_timeout`` when None)."""
        budget = self.settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        with contextlib.suppress(Exception):
            atexit.unregister(self.shutdown)
        drained = self.spool_recorder.shutdown(_remaining(deadline))
        if not drained:
            logger.warning("asgi-audit: the queue was not fully written to the spool in time")
        shipped = True
        with self._shipping:
            process, self._process = self._process, None
            thread, self._thread = self._thread, None
        if process is not None:
            shipped = process.stop(_remaining(deadline))
        if thread is not None:
            shipped = thread.stop(_remaining(deadline))
        if not shipped:
            logger.warning(
                "asgi-audit: the shutdown deadline (%.1f s) passed before everything was "
                "delivered; the rest stays in the spool %s for the next process",
                budget,
                self.settings.spool,
            )
        elif process is not None or thread is not None:
            logger.info("asgi-audit: the spool %s is delivered", self.settings.spool)
        return drained and shipped

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (nothing else happens on the caller's thread); after a
        shutdown, start again. Exchanges handed over after a shutdown and before a new
        start are refused (:class:`RecorderClosed`)."""
        self._started = True
        atexit.register(self.shutdown)
        self.spool_recorder.start()

    def _forget_parent(self) -> None:
        self._shipping = threading.Lock()
        if self._process is not None:
            self._process.forget()
        self._process = self._thread = None
        self._started = False

    # -- on the writer thread --------------------------------------------------------------

    def _start_shipper_for_leftovers(self) -> None:
        """When the spool holds streams of earlier processes, ship them now rather than
        after this process's first audited exchange; with ``metrics_port``, start it now
        in any case, so that ``/metrics`` answers from the start."""
        if self.settings.metrics_address is not None or any(streams(Path(self.settings.spool))):
            self._start_shipper()

    def _start_shipper(self) -> None:
        with self._shipping:
            if self._process is not None or self._thread is not None:
                return
            mode = self.settings.ship
            if mode == "process":
                self._process = ShipperProcess(
                    self.settings.spool,
                    self.settings.sink,
                    self.settings.shutdown_timeout,
                    metrics=self.settings.metrics_address,
                )
                self._process.start()
            elif mode == "thread":
                self._thread = ShipperThread(self.settings.spool, self.settings.sink)
                self._thread.start()

    def _keep_shipper(self) -> None:
        """Every few seconds: when this process's child shipper has ended (it failed,
        or was killed), start a new one."""
        with self._shipping:
            process = self._process
            if process is None or process.running():
                return
            process.start()


def body_redactor(settings: Settings) -> BodyRedactor | None:
    """The body redaction the settings ask for (None: bodies are kept as they are)."""
    if not settings.redact_bodies and not settings.redact_fields:
        return None
    try:
        return BodyRedactor(
            fields=settings.redact_fields,
            defaults=settings.redact_bodies,
            values=settings.redact_bodies,
            unparseable=settings.redact_unparseable,
        )
    except ValueError as exc:
        raise ConfigError("redact_fields", str(exc)) from None


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
