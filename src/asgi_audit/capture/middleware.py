"""AuditMiddleware: decide, tap, hand off.

A pure ASGI middleware. Unaudited requests get the server's own ``receive`` and ``send``;
an audited exchange is captured by an :class:`~.exchange_capture.ExchangeCapture` of its
own, whose finished record is handed to the recorder with one non-blocking call.

Lifecycle: constructing it starts nothing (test suites build thousands of apps). At
lifespan startup the durable recorder starts its writer thread, which is all the event
loop does for it: directories, locks, fsyncs, opening a sink and starting the shipper
happen on that thread. Without lifespan the first audited exchange starts it. At lifespan
shutdown the recorder, the durable one or one passed in, is drained (``shutdown``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from .._forks import after_fork
from .._types import ASGIApp, Message, Receive, Scope, Send
from ..errors import ConfigError
from ..recording.handoff import Recorder
from .exchange_capture import ExchangeCapture
from .levels import Level
from .policy import PENDING, Policy, Rule
from .record import Exchange, Identity
from .routes import TemplateResolver, declared_templates, route_path
from .settings import Settings, check_routes, load_settings
from .tap import TapLimits

if TYPE_CHECKING:
    from ..shipping.delivery import Delivery

logger = logging.getLogger("asgi_audit")


class _Default(enum.Enum):
    DEFAULT = "default"


DEFAULT = _Default.DEFAULT
"""Marks ``body_limit`` as not given, since ``None`` there means "no limit"."""

_RECORDER_METHODS = tuple(name for name in vars(Recorder) if not name.startswith("_"))
"""What a recorder passed in must have: the protocol's methods."""


def _body_limit_argument(value: int | str | _Default | None) -> int | str | None:
    if value is DEFAULT:
        return None  # not given: the environment or the default decides
    return "unlimited" if value is None else value


class AuditMiddleware:
    """Record the raw request and response bodies of selected routes.

    With no arguments every HTTP exchange is audited at ``RequestResponse``, configured
    further by ``ASGI_AUDIT_*`` environment variables and a TOML file (``config`` or
    ``ASGI_AUDIT_CONFIG``). ``routes`` (templates or globs),
    ``methods`` and ``exclude`` narrow it; ``rules`` gives a full ordered policy instead.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Iterable[str] | None = None,
        methods: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        level: str | Level | None = None,
        statuses: Iterable[str | int] | None = None,
        otherwise: str | Level | None = None,
        sample: float | None = None,
        rules: Iterable[Rule] | None = None,
        memory_limit: int | str | None = None,
        body_limit: int | str | _Default | None = DEFAULT,
        over_limit: str | None = None,
        overflow: str | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        service: str | None = None,
        recorder: Recorder | None = None,
        sink: str | None = None,
        spool: str | os.PathLike[str] | None = None,
        ship: str | None = None,
        fsync: str | None = None,
        redact_headers: Iterable[str] | None = None,
        shutdown_timeout: float | None = None,
        spool_limit: int | str | None = None,
        mode: str | None = None,
        spill_limit: int | str | None = None,
        redact_headers_default: bool | None = None,
        redact_query: Iterable[str] | None = None,
        redact_fields: Iterable[str] | None = None,
        redact_bodies: bool | None = None,
        redact_unparseable: str | None = None,
        signing_key: str | os.PathLike[str] | None = None,
        checkpoint_interval: float | None = None,
        config: str | os.PathLike[str] | None = None,
        metrics_port: int | str | None = None,
        trace_events: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        arguments = {
            "routes": routes,
            "methods": methods,
            "exclude": exclude,
            "level": level,
            "statuses": statuses,
            "otherwise": otherwise,
            "sample": sample,
            "rules": None if rules is None else list(rules),
            "memory_limit": memory_limit,
            "body_limit": _body_limit_argument(body_limit),
            "over_limit": over_limit,
            "overflow": overflow,
            "spill_dir": spill_dir,
            "service": service,
            "sink": sink,
            "spool": spool,
            "ship": ship,
            "fsync": fsync,
            "redact_headers": None if redact_headers is None else list(redact_headers),
            "shutdown_timeout": shutdown_timeout,
            "spool_limit": spool_limit,
            "mode": mode,
            "spill_limit": spill_limit,
            "redact_headers_default": redact_headers_default,
            "redact_query": None if redact_query is None else list(redact_query),
            "redact_fields": None if redact_fields is None else list(redact_fields),
            "redact_bodies": redact_bodies,
            "redact_unparseable": redact_unparseable,
            "signing_key": signing_key,
            "checkpoint_interval": checkpoint_interval,
            "config": config,
            "metrics_port": metrics_port,
            "trace_events": trace_events,
        }
        # The hand-off to the durable path: a sink URL is checked by its own kind of
        # sink (the registry), and the recorder built, without importing any sink here.
        from ..shipping.delivery import Delivery, check_sink_url

        self.settings: Settings = load_settings(
            arguments, os.environ if environ is None else environ, check_sink_url
        )
        self.policy: Policy = self.settings.policy
        self._trace: Callable[[Exchange], None] | None = (
            span_event() if self.settings.trace_events else None
        )
        if self.policy.templates():
            check_routes(self.policy, declared_templates(app))
        if recorder is not None:
            missing = [name for name in _RECORDER_METHODS if not hasattr(recorder, name)]
            if missing:
                raise TypeError(
                    f"recorder: expected a Recorder (got {type(recorder).__name__}, "
                    f"which has no {', '.join(missing)})"
                )
        self._durable: Delivery | None = None
        if recorder is None:
            self._durable = Delivery(
                self.settings, lambda: self.identity().stream, extra_stats=self._counters
            )
            recorder = self._durable
        self.recorder: Recorder = recorder
        self.blocks = self.settings.overflow == "block"
        """Whether a full recorder holds responses back (else exchanges are dropped)."""
        self.waits_for_record = self.settings.mode != "batch"
        """The ``blocking`` modes: a response's last message waits for its record."""
        settings = self.settings
        self.tap_limits = TapLimits(
            settings.memory_limit,
            settings.body_limit,
            settings.over_limit,
            settings.spill_dir,
            settings.spill_limit,
        )
        """The limits of every body tap, worked out once rather than per exchange."""
        self.in_flight = 0
        self.resolver = TemplateResolver()
        self.dropped = 0
        self.failures = 0
        self.unwritten = 0
        """Exchanges of the ``blocking`` modes whose record could not be written."""
        self._identity: Identity | None = None
        self._warned: set[str] = set()
        after_fork(self._forget_identity)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._lifespan_send(send)
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = route_path(scope, root) if root else scope["path"]
        decision = self.policy.decide_early(scope["method"], path)
        if decision is not PENDING and not decision.ceiling:  # type: ignore[union-attr]
            await self.app(scope, receive, send)
            return
        # The capture's run is spelled out here rather than in a coroutine of its own:
        # one coroutine less per audited exchange.
        capture = ExchangeCapture(self, scope, receive, send, decision, root, path)
        self.in_flight += 1
        try:
            await self.app(scope, capture.receive, capture.send)
        except Exception as exc:
            capture.error = exc
            exchange = capture.finish()
            if exchange is not None:
                if self._trace is not None:
                    self._trace(exchange)
                await self.hand_off(exchange)
            raise
        except BaseException as exc:  # cancelled: hand off without waiting
            capture.error = exc
            exchange = capture.finish()
            if exchange is not None:
                if self._trace is not None:
                    self._trace(exchange)
                self.hand_off_now(exchange)
            raise
        else:
            exchange = capture.finish()
            if exchange is not None and self._trace is not None:
                self._trace(exchange)
            # The recorder nearly always has room: only a full one needs a coroutine.
            if exchange is not None and self.offer(exchange) is None:
                await self.submit_when_room(exchange)
        finally:
            self.in_flight -= 1

    def _lifespan_send(self, send: Send) -> Send:
        """Start the writer at startup; drain before the server hears that shutdown is
        complete."""

        async def lifespan_send(message: Message) -> None:
            kind = message["type"]
            if kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.shutdown()
            elif kind == "lifespan.startup.complete" and self._durable is not None:
                try:
                    self._durable.start()
                except Exception:
                    logger.warning("asgi-audit: could not start the recorder", exc_info=True)
            await send(message)

        return lifespan_send

    async def shutdown(self) -> None:
        """Wait (bounded) for audited exchanges still running, then shut the recorder down
        (drain the queue into the spool, give the shipper the rest of ``shutdown_timeout``).
        """
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        remaining = max(0.0, deadline - time.monotonic())
        try:
            await asyncio.to_thread(self.recorder.shutdown, remaining)
        except Exception:
            logger.warning("asgi-audit: shutdown drain failed", exc_info=True)

    def _counters(self) -> dict[str, float]:
        """What the writer publishes of the middleware's own counts, for ``/metrics``."""
        return {"overflow_dropped": self.dropped, "failures": self.failures}

    def identity(self) -> Identity:
        """This process's identity, computed once (and again in a forked child, so that
        each worker has its own stream)."""
        identity = self._identity
        if identity is None:
            identity = self._identity = Identity.current(self.settings.service)
        return identity

    def _forget_identity(self) -> None:
        self._identity = None

    def warn_once(self, key: str, message: str, *, exc_info: bool = False) -> None:
        """Log a problem the first time it happens; later ones are only counted."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, exc_info=exc_info)

    def __repr__(self) -> str:
        return f"AuditMiddleware({self.policy!r}, recorder={self.recorder!r})"

    async def hand_off(self, exchange: Exchange) -> bool:
        """Give a finished exchange to the recorder, applying the overflow policy; False
        when it was dropped or the recorder failed."""
        settled = self.offer(exchange)
        if settled is not None:
            return settled
        return await self.submit_when_room(exchange)

    def offer(self, exchange: Exchange) -> bool | None:
        """The part of :meth:`hand_off` that needs no waiting, so that the usual exchange
        costs no coroutine: True when the recorder took it, False when it was dropped or
        the recorder failed (both counted), None when the recorder is full and
        ``overflow="block"`` says to wait (:meth:`submit_when_room`)."""
        try:
            if self.recorder.try_submit(exchange):
                return True
            if not self.blocks:
                self._drop(exchange)
                return False
        except asyncio.CancelledError:
            self.hand_off_now(exchange)
            raise
        except Exception:
            self._fail(exchange)
            return False
        return None

    async def submit_when_room(self, exchange: Exchange) -> bool:
        """The rest of :meth:`hand_off` for a full recorder under ``overflow="block"``:
        wait for room, as often as it takes."""
        try:
            while True:
                await self.recorder.room()
                if self.recorder.try_submit(exchange):
                    return True
        except asyncio.CancelledError:
            self.hand_off_now(exchange)
            raise
        except Exception:
            self._fail(exchange)
            return False

    def hand_off_now(self, exchange: Exchange) -> bool:
        """Hand off without waiting (the exchange was cancelled): accept past the bounds."""
        try:
            if self.recorder.try_submit(exchange, force=self.blocks):
                return True
            self._drop(exchange)
        except Exception:
            self._fail(exchange)
        return False

    def _drop(self, exchange: Exchange) -> None:
        self.dropped += 1
        exchange.discard()
        self.warn_once("drop", "asgi-audit: recorder full, dropping exchanges (overflow='drop')")

    def _fail(self, exchange: Exchange) -> None:
        self.failures += 1
        exchange.discard()
        logger.debug("asgi-audit: recorder failed", exc_info=True)
        self.warn_once(
            "recorder", "asgi-audit: the recorder raised; exchanges are being lost", exc_info=True
        )


def span_event() -> Callable[[Exchange], None]:
    """``trace_events``: a function adding an ``asgi_audit.exchange`` event (the record's
    id, level, outcome and body sizes) to the OpenTelemetry span current when an exchange
    ends (the server span of OpenTelemetry's ASGI instrumentation, when it wraps the
    app): a trace then leads to its audit record. opentelemetry-api is imported here,
    once, when the setting is on."""
    try:
        from opentelemetry import trace
    except ImportError:
        raise ConfigError(
            "trace_events", "needs opentelemetry-api (pip install opentelemetry-api)"
        ) from None
    current = trace.get_current_span

    def add(exchange: Exchange) -> None:
        span = current()
        if span.is_recording():
            span.add_event(
                "asgi_audit.exchange",
                {
                    "asgi_audit.record_id": exchange.id,
                    "asgi_audit.level": exchange.level.word,
                    "asgi_audit.outcome": exchange.outcome,
                    "asgi_audit.request_body.size": exchange.request_size,
                    "asgi_audit.response_body.size": exchange.response_size,
                },
            )

    return add
