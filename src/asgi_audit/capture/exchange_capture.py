"""The capture of one exchange: its two taps, what its messages said, and its record.

One object per audited exchange, made by the middleware and dropped when the exchange
ends: per-request state never lives on the middleware, which concurrent requests share.
Its ``receive`` and ``send`` forward the very message objects they get, immediately,
after keeping a reference to their body bytes on the side; the work between receiving a
message and returning it is synchronous (an ``await`` there would lose the message when
the task is cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

from .._types import ASGIApp, Headers, Message, Receive, Scope, Send
from ..errors import RecordNotWritten
from .levels import Level
from .policy import PENDING, Policy, Rule, _Pending
from .record import Body, Exchange, Identity, Outcome, new_record_id
from .routes import TemplateResolver
from .settings import Settings
from .tap import BodyTap


class Roomy(Protocol):
    """The part of a recorder a capture uses: waiting for room (``overflow="block"``)."""

    async def room(self) -> None: ...


class Host(Protocol):
    """What a capture needs from the middleware that made it."""

    app: ASGIApp
    settings: Settings
    policy: Policy
    resolver: TemplateResolver
    blocks: bool
    in_flight: int
    failures: int
    unwritten: int

    def identity(self) -> Identity: ...

    def warn_once(self, key: str, message: str, *, exc_info: bool = False) -> None: ...

    async def hand_off(self, exchange: Exchange) -> bool: ...

    def hand_off_now(self, exchange: Exchange) -> bool: ...

    @property
    def recorder(self) -> Roomy: ...


def max_level(rule: Rule) -> Level:
    """The most a rule can keep of an exchange (its status filter may lower it later)."""
    return max(rule.level, rule.otherwise) if rule.statuses else rule.level


class ExchangeCapture:
    """Per-exchange state: the two taps and what the messages said. Never shared."""

    __slots__ = (
        "_receive",
        "_send",
        "active",
        "disconnected",
        "error",
        "mw",
        "path",
        "recorded",
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
        mw: Host,
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
        keep_request = self.rule is None or max_level(self.rule) >= Level.REQUEST
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
        self.recorded = False
        """The record was handed off before the last message (the ``blocking`` modes)."""
        self.template: str | None = None
        """The route template, once routing has run and a decision or the record needed it."""

    def _tap(self, keep: bool) -> BodyTap:
        s = self.mw.settings
        return BodyTap(
            memory_limit=s.memory_limit,
            body_limit=s.body_limit,
            over_limit=s.over_limit,
            spill_dir=s.spill_dir,
            spill_limit=s.spill_limit,
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
            if completes and self.mw.settings.mode != "batch":
                await self._record_first()
            elif completes and self.mw.blocks:
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

    async def _record_first(self) -> None:
        """The ``blocking`` modes: hand the record off and wait until the recorder has
        kept it, before the response's last message goes out. When it cannot be kept,
        ``blocking`` sends the message anyway (the failure is counted and logged) and
        ``blocking-strict`` withholds it: the exception reaches the server, which closes
        the connection, so no client sees a complete response that went unaudited."""
        self.response_complete = True  # what the record says once this message is sent
        exchange = self._finish()
        self.response_complete = False
        if exchange is None:  # no longer audited (its status, or a capture failure)
            return
        self.recorded = True
        loop = asyncio.get_running_loop()
        written: asyncio.Future[bool] = loop.create_future()

        def on_written(ok: bool) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, written, ok)

        exchange.on_written = on_written
        ok = await self.mw.hand_off(exchange)
        if ok:
            try:
                ok = await asyncio.wait_for(written, self.mw.settings.shutdown_timeout)
            except TimeoutError:
                ok = False
        if ok:
            return
        self.mw.unwritten += 1
        strict = self.mw.settings.mode == "blocking-strict"
        self.mw.warn_once(
            "unwritten",
            "asgi-audit: a record could not be written to the spool; "
            + (
                "its response is withheld (mode='blocking-strict')"
                if strict
                else "its response is sent anyway (mode='blocking')"
            ),
        )
        if strict:
            raise RecordNotWritten(
                f"the audit record of {self.scope['method']} {self.path!r} could not be "
                "written; the response is withheld (mode='blocking-strict')"
            )

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
        if max_level(self.rule) < Level.REQUEST and self.req is not None:
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
        if not self.active or self.recorded:
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


def _settle(written: asyncio.Future[bool], ok: bool) -> None:
    if not written.done():
        written.set_result(ok)


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
