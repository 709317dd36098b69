"""AuditMiddleware: decide, tap, hand off.

A pure ASGI middleware. For an audited exchange it wraps ``receive`` and ``send``; each
wrapper forwards the very message object it got, immediately, after keeping a reference to
its body bytes on the side. Nothing is read ahead of the app, nothing is rebuilt, and the
work done between receiving a message and returning it is synchronous (an ``await`` there
would lose the message when the task is cancelled). When the exchange ends, the record is
handed to the recorder with one non-blocking call.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .._types import ASGIApp, Headers, Message, Receive, Scope, Send
from ..recording.handoff import Recorder
from ..shipping.delivery import Delivery
from .levels import Level
from .policy import PENDING, Policy, Rule, _Pending
from .record import Body, Exchange, Identity, Outcome, new_record_id
from .routes import TemplateResolver, declared_templates, route_path
from .settings import Settings, check_routes, load_settings
from .tap import BodyTap

logger = logging.getLogger("asgi_audit")


class _Default(enum.Enum):
    DEFAULT = "default"


DEFAULT = _Default.DEFAULT
"""Marks ``body_limit`` as not given, since ``None`` there means "no limit"."""


def _body_limit_argument(value: int | str | _Default | None) -> int | str | None:
    if value is DEFAULT:
        return None  # not given: the environment or the default decides
    return "unlimited" if value is None else value


class AuditMiddleware:
    """Record the raw request and response bodies of selected routes.

    With no arguments every HTTP exchange is audited at ``RequestResponse``, configured
    further by ``ASGI_AUDIT_*`` environment variables. ``routes`` (templates or globs),
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
        }
        self.settings: Settings = load_settings(
            arguments, os.environ if environ is None else environ
        )
        self.policy: Policy = self.settings.policy
        if self.policy.templates():
            check_routes(self.policy, declared_templates(app))
        if recorder is not None and not isinstance(recorder, Recorder):
            raise TypeError(f"recorder: expected a Recorder (got {type(recorder).__name__})")
        self.delivery: Delivery | None = None
        if recorder is None:
            self.delivery = Delivery(self.settings, lambda: self.identity().stream)
            recorder = self.delivery.recorder
        self.recorder: Recorder = recorder
        self.blocks = self.settings.overflow == "block"
        """Whether a full recorder holds responses back (else exchanges are dropped)."""
        self.in_flight = 0
        self.resolver = TemplateResolver()
        self.dropped = 0
        self.failures = 0
        self._identity: Identity | None = None
        self._identity_pid = 0
        self._warned: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.delivery is not None:
                send = self._lifespan_send(send)
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = route_path(scope, root) if root else scope["path"]
        decision = self.policy.decide_early(scope["method"], path)
        if decision is not PENDING and not _max_level(decision):  # type: ignore[arg-type]
            await self.app(scope, receive, send)
            return
        await _Capture(self, scope, receive, send, decision, root, path).run()

    def _lifespan_send(self, send: Send) -> Send:
        """Drain before the server hears that shutdown is complete."""

        async def lifespan_send(message: Message) -> None:
            kind = message["type"]
            if kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.shutdown()
            elif kind == "lifespan.startup.complete" and self.delivery is not None:
                try:
                    self.delivery.adopt_leftovers()
                except Exception:
                    logger.warning("asgi-audit: could not start shipping leftovers", exc_info=True)
            await send(message)

        return lifespan_send

    async def shutdown(self) -> None:
        """Wait (bounded) for audited exchanges still running, drain the queue into the
        spool, and give the shipper the rest of ``shutdown_timeout``."""
        if self.delivery is None:
            return
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        remaining = max(0.0, deadline - time.monotonic())
        try:
            await asyncio.to_thread(self.delivery.shutdown_now, remaining)
        except Exception:
            logger.warning("asgi-audit: shutdown drain failed", exc_info=True)

    def identity(self) -> Identity:
        """This process's identity; renewed after a fork so each worker has its stream."""
        pid = os.getpid()
        if self._identity is None or self._identity_pid != pid:
            self._identity = Identity.current(self.settings.service)
            self._identity_pid = pid
        return self._identity

    def warn_once(self, key: str, message: str, *, exc_info: bool = False) -> None:
        """Log a problem the first time it happens; later ones are only counted."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, exc_info=exc_info)

    def __repr__(self) -> str:
        return f"AuditMiddleware({self.policy!r}, recorder={self.recorder!r})"

    async def hand_off(self, exchange: Exchange) -> None:
        """Give a finished exchange to the recorder, applying the overflow policy."""
        try:
            if self.recorder.try_submit(exchange):
                return
            if not self.blocks:
                self._drop(exchange)
                return
            while True:
                await self.recorder.room()
                if self.recorder.try_submit(exchange):
                    return
        except asyncio.CancelledError:
            self.hand_off_now(exchange)
            raise
        except Exception:
            self._fail(exchange)

    def hand_off_now(self, exchange: Exchange) -> None:
        """Hand off without waiting (the exchange was cancelled): accept past the bounds."""
        try:
            if not self.recorder.try_submit(exchange, force=self.blocks):
                self._drop(exchange)
        except Exception:
            self._fail(exchange)

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


def _max_level(rule: Rule) -> Level:
    return max(rule.level, rule.otherwise) if rule.statuses else rule.level


class _Capture:
    """Per-exchange state: the two taps and what the messages said. Never shared."""

    __slots__ = (
        "_receive",
        "_send",
        "active",
        "disconnected",
        "error",
        "mw",
        "path",
        "req",
        "request_complete",
        "resp",
        "response_complete",
        "response_headers",
        "response_started",
        "response_trailers",
        "root",
        "rule",
        "scope",
        "sent_path",
        "started_at",
        "started_mono",
        "status",
        "template",
        "trailers",
    )

    def __init__(
        self,
        mw: AuditMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        decision: Rule | _Pending,
        root: str,
        path: str,
    ) -> None:
        self.started_at = time.time_ns()
        self.started_mono = time.monotonic_ns()
        self.mw = mw
        self.scope = scope
        self._receive = receive
        self._send = send
        self.root = root
        self.path = path
        self.rule: Rule | None = None if decision is PENDING else decision  # type: ignore[assignment]
        keep_request = self.rule is None or _max_level(self.rule) >= Level.REQUEST
        self.req: BodyTap | None = self._tap(keep_request)
        self.resp: BodyTap | None = None
        self.status: int | None = None
        self.response_headers: Headers = []
        self.trailers = False
        self.response_trailers: Headers = []
        self.response_started: int | None = None
        self.response_complete = False
        self.request_complete = False
        self.disconnected = False
        self.error: BaseException | None = None
        self.sent_path: str | None = None
        self.active = True
        self.template: str | None = None
        """The route template, once routing has run and a decision or the record needed it."""

    def _tap(self, keep: bool) -> BodyTap:
        s = self.mw.settings
        return BodyTap(
            memory_limit=s.memory_limit,
            body_limit=s.body_limit,
            over_limit=s.over_limit,
            spill_dir=s.spill_dir,
            keep=keep,
        )

    async def run(self) -> None:
        self.mw.in_flight += 1
        try:
            await self._run()
        finally:
            self.mw.in_flight -= 1

    async def _run(self) -> None:
        try:
            await self.mw.app(self.scope, self.receive, self.send)
        except Exception as exc:
            self.error = exc
            exchange = self._finish()
            if exchange is not None:
                await self.mw.hand_off(exchange)
            raise
        except BaseException as exc:
            self.error = exc
            exchange = self._finish()
            if exchange is not None:
                self.mw.hand_off_now(exchange)
            raise
        exchange = self._finish()
        if exchange is not None:
            await self.mw.hand_off(exchange)

    async def receive(self) -> Message:
        tap = self.req
        if tap is not None and self.active and tap.backlogged:
            await tap.catch_up()
        message = await self._receive()
        # Synchronous from here on: an await would lose `message` on cancellation.
        if self.active:
            try:
                self._on_receive(message)
            except Exception:
                self._abandon()
        return message

    def _on_receive(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.request":
            if self.rule is None and ("route" in self.scope or "endpoint" in self.scope):
                self._decide()
            tap = self.req
            if tap is not None:
                body = message.get("body", b"")
                tap.feed(body if type(body) is bytes else bytes(body))
            if not message.get("more_body", False):
                self.request_complete = True
        elif kind == "http.disconnect" and not self.response_complete:
            self.disconnected = True

    async def send(self, message: Message) -> None:
        completes = False
        if self.active:
            tap = self.resp
            if tap is not None and tap.backlogged:
                await tap.catch_up()
            try:
                self._on_send(message)
            except Exception:
                self._abandon()
            completes = self._completes(message)
            if completes and self.mw.blocks:
                # Backpressure for overflow="block": while the recorder is full, hold the
                # response's last message. Once it is sent the client (and the server, on
                # a keep-alive connection) goes on to the next request, so waiting after
                # it would let finished exchanges pile up without bound. A recorder that
                # fails here fails again at the hand-off, which counts it.
                with contextlib.suppress(Exception):
                    await self.mw.recorder.room()
        try:
            await self._send(message)
        except OSError:
            if not self.response_complete:
                self.disconnected = True
            raise
        if completes and self.active:
            self.response_complete = True

    def _on_send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            tap = self.resp
            # Servers send no body for HEAD (Starlette's Response still passes one, which
            # uvicorn drops): record what went on the wire, i.e. nothing.
            if tap is not None and self.scope["method"] != "HEAD":
                body = message.get("body", b"")
                tap.feed(body if type(body) is bytes else bytes(body))
        elif kind == "http.response.start":
            self.response_started = time.monotonic_ns()
            self.status = message["status"]
            self.response_headers = list(message.get("headers", ()))
            self.trailers = bool(message.get("trailers", False))
            self._on_status()
        elif kind == "http.response.trailers":
            self.response_trailers.extend(message.get("headers", ()))
        elif kind == "http.response.pathsend":
            self.sent_path = message.get("path")
        elif kind == "http.response.zerocopysend" and self.resp is not None:
            self.resp.size += int(message.get("count") or 0)

    def _completes(self, message: Message) -> bool:
        kind = message["type"]
        if kind == "http.response.body":
            return not self.trailers and not message.get("more_body", False)
        if kind == "http.response.trailers":
            return not message.get("more_trailers", False)
        if kind == "http.response.pathsend":
            return True
        if kind == "http.response.zerocopysend":
            return not message.get("more_body", False)
        return False

    def _decide(self) -> None:
        scope = self.scope
        self.template = template = self.mw.resolver.template(scope, self.root)
        self.rule = self.mw.policy.decide_late(scope, scope["method"], self.path, template)
        if _max_level(self.rule) < Level.REQUEST and self.req is not None:
            self.req.stop_keeping()

    def _on_status(self) -> None:
        if self.rule is None:
            self._decide()
        assert self.rule is not None and self.status is not None
        level = self.rule.level_for_status(self.status)
        if level is Level.NONE:
            self._abandon()
            return
        if level < Level.REQUEST and self.req is not None:
            self.req.stop_keeping()
        self.resp = self._tap(level >= Level.REQUEST_RESPONSE)

    def _abandon(self) -> None:
        """Stop auditing this exchange; the app and the client go on untouched."""
        self.active = False
        for tap in (self.req, self.resp):
            if tap is not None:
                tap.stop_keeping()
        self.req = self.resp = None

    def _finish(self) -> Exchange | None:
        if not self.active:
            return None
        try:
            return self._build()
        except Exception:
            self.mw.failures += 1
            self.mw.warn_once("build", "asgi-audit: could not build a record", exc_info=True)
            self._abandon()
            return None

    def _build(self) -> Exchange | None:
        if self.rule is None:
            self._decide()
        assert self.rule is not None
        level = self.rule.level_for_status(self.status if self.status is not None else 500)
        if level is Level.NONE:
            self._abandon()
            return None
        scope = self.scope
        identity = self.mw.identity()
        headers: Headers = scope.get("headers") or []
        correlation, trace = _correlation(headers)
        outcome, error = self._outcome()
        request_complete = self.request_complete or _bodiless(headers, scope)
        request_body = self._close(self.req, request_complete, level >= Level.REQUEST)
        response_body = self._close(
            self.resp, self.response_complete, level >= Level.REQUEST_RESPONSE
        )
        response_size = self.resp.size if self.resp is not None else 0
        if self.sent_path is not None:
            sent = Body.from_path(self.sent_path)
            with contextlib.suppress(OSError):  # gone already: the size stays unknown (0)
                response_size = sent.file_size()
            if level >= Level.REQUEST_RESPONSE:
                response_body = sent
        record_id = new_record_id()
        client = scope.get("client")
        return Exchange(
            id=record_id,
            stream=identity.stream,
            level=level,
            method=scope["method"],
            scheme=scope.get("scheme", "http"),
            host=_host(headers, scope),
            path=scope["path"],
            query=scope.get("query_string", b""),
            http_version=scope.get("http_version", "1.1"),
            client=(client[0], client[1]) if client else None,
            request_headers=list(headers),
            started_at_ns=self.started_at,
            started_mono_ns=self.started_mono,
            route=self.template or self.mw.resolver.template(scope, self.root),
            status=self.status,
            response_headers=self.response_headers,
            response_trailers=self.response_trailers,
            response_started_mono_ns=self.response_started,
            ended_mono_ns=time.monotonic_ns(),
            request_body=request_body,
            response_body=response_body,
            request_size=self.req.size if self.req is not None else 0,
            response_size=response_size,
            outcome=outcome,
            error=error,
            correlation_id=correlation or record_id,
            trace_id=trace,
            service=identity.service,
            pod=identity.pod,
            namespace=identity.namespace,
            node=identity.node,
        )

    @staticmethod
    def _close(tap: BodyTap | None, complete: bool, keep: bool) -> Body | None:
        if tap is None:
            return None
        if not keep:
            tap.stop_keeping()
        return tap.close(complete)

    def _outcome(self) -> tuple[Outcome, str | None]:
        error = self.error
        # `disconnected` is only set for a disconnect seen before the response completed;
        # whatever the app sent after it (a 400 or 500 made of the disconnect, which
        # uvicorn drops) never reached the client, so it does not make the exchange complete.
        if self.disconnected:
            return "client_disconnected", None if error is None else type(error).__name__
        if error is not None:
            return "app_error", type(error).__name__
        if not self.response_complete:
            return "app_error", "IncompleteResponse"
        return "complete", None


def _correlation(headers: Headers) -> tuple[str | None, str | None]:
    correlation = trace = None
    for name, value in headers:
        if name == b"x-request-id":
            correlation = value.decode("latin-1")
        elif name == b"traceparent":
            parts = value.decode("latin-1").split("-")
            if len(parts) >= 4 and len(parts[1]) == 32:
                trace = parts[1]
    return correlation, trace


def _bodiless(headers: Headers, scope: Scope) -> bool:
    """An HTTP/1.x request with neither Content-Length nor Transfer-Encoding has no body
    (RFC 9112, 6.3), so an app that never read it still saw all of it."""
    if not scope.get("http_version", "1.1").startswith("1"):
        return False
    for name, value in headers:
        if name == b"transfer-encoding":
            return False
        if name == b"content-length":
            return value.strip() == b"0"
    return True


def _host(headers: Headers, scope: Scope) -> str:
    for name, value in headers:
        if name == b"host":
            return value.decode("latin-1")
    server: Any = scope.get("server")
    if server:
        host, port = server[0], server[1]
        return host if port is None else f"{host}:{port}"
    return ""
