"""The capture of one exchange: its two taps, what its messages said, and its record.

One object per audited exchange, made by the middleware and dropped when the exchange
ends: per-request state never lives on the middleware, which concurrent requests share.
Its ``receive`` and ``send`` forward the very message objects they get, immediately,
after keeping a reference to their body bytes on the side; the work between receiving a
message and returning it is synchronous (an ``await`` there would lose the message when
the task is cancelled).

The common path (one request, one response, records handed off in batches) runs once per
audited exchange on the event loop, so it is kept short: per-middleware facts (tap limits,
the mode, a rule's ceiling) are worked out beforehand, the request headers are scanned
once, and the record is handed off without a coroutine unless the recorder is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

from .._types import Headers, Message, Receive, Scope, Send
from ..errors import RecordNotWritten
from .levels import Level
from .policy import PENDING, Policy, Rule, _Pending
from .record import Body, Exchange, Identity, Outcome, new_record_id
from .routes import TemplateResolver
from .settings import Settings
from .tap import BodyTap, TapLimits

# Enum members read through the class cost a lookup each; these run on every exchange.
_NONE = Level.NONE
_REQUEST = Level.REQUEST
_REQUEST_RESPONSE = Level.REQUEST_RESPONSE


class Roomy(Protocol):
    """The part of a recorder a capture uses: waiting for room (``overflow="block"``)."""

    async def room(self) -> None: ...


class Host(Protocol):
    """What a capture needs from the middleware that made it."""

    settings: Settings
    policy: Policy
    resolver: TemplateResolver
    blocks: bool
    waits_for_record: bool
    tap_limits: TapLimits
    failures: int
    unwritten: int

    def identity(self) -> Identity: ...

    def warn_once(self, key: str, message: str, *, exc_info: bool = False) -> None: ...

    async def hand_off(self, exchange: Exchange) -> bool: ...

    @property
    def recorder(self) -> Roomy: ...


class ExchangeCapture:
    """Per-exchange state: the two taps and what the messages said. Never shared."""

    __slots__ = (
        "_receive",
        "_send",
        "active",
        "closed_while_finishing",
        "disconnected",
        "error",
        "finishing",
        "level",
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
        rule: Rule | None = None if decision is PENDING else decision  # type: ignore[assignment]
        self.rule = rule
        self.req: BodyTap | None = BodyTap.with_limits(
            mw.tap_limits, rule is None or rule.ceiling >= _REQUEST
        )
        self.resp: BodyTap | None = None
        self.status: int | None = None
        self.level: Level | None = None
        """The level for ``status``, once the response started."""
        self.response_headers: Headers | None = None
        """A copy of the start message's headers, once it went by."""
        self.trailers = False
        self.response_trailers: Headers = []
        self.response_started: int | None = None
        self.response_complete = False
        self.finishing = False
        """The response's last message is being sent: a disconnect seen meanwhile is its
        consequence (HTTP/2 servers such as hypercorn close the stream, and tell the app,
        while that send is in progress), not a client leaving early."""
        self.closed_while_finishing = False
        """Such a disconnect came: if the app's task is then cancelled inside that send
        (Starlette's streaming response stops on a disconnect), the server had the last
        message already, and the response counts as complete."""
        self.request_complete = False
        self.disconnected = False
        self.error: BaseException | None = None
        self.sent_path: str | None = None
        self.active = True
        self.recorded = False
        """The record was handed off before the last message (the ``blocking`` modes)."""
        self.template: str | None = None
        """The route template, once routing has run and a decision or the record needed it."""

    async def receive(self) -> Message:
        tap = self.req
        if tap is not None and tap.spilling and self.active and tap.backlogged:
            await tap.catch_up()
        message = await self._receive()
        # Synchronous from here on: an await would lose `message` on cancellation.
        if self.active:
            try:
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
                    if self.finishing:
                        self.closed_while_finishing = True
                    else:
                        self.disconnected = True
            except Exception:
                self._abandon()
        return message

    async def send(self, message: Message) -> None:
        completes = False
        if self.active:
            tap = self.resp
            if tap is not None and tap.spilling and tap.backlogged:
                await tap.catch_up()
            try:
                completes = self._on_send(message)
            except Exception:
                self._abandon()
                completes = self._completes(message)
            if completes:
                if self.mw.waits_for_record:
                    await self._record_first()
                elif self.mw.blocks:
                    # Backpressure for overflow="block": while the recorder is full, hold
                    # the response's last message. Once it is sent the client (and the
                    # server, on a keep-alive connection) goes on to the next request, so
                    # waiting after it would let finished exchanges pile up without bound.
                    # A recorder that fails here fails again at the hand-off, which counts
                    # it. (try/except rather than contextlib.suppress: this runs for every
                    # exchange, and suppress costs three calls.)
                    try:  # noqa: SIM105
                        await self.mw.recorder.room()
                    except Exception:
                        pass
        self.finishing = completes
        try:
            await self._send(message)
        except OSError:
            if not self.response_complete:
                self.disconnected = True
            raise
        except asyncio.CancelledError:
            if self.closed_while_finishing and self.active:
                self.response_complete = True
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
        exchange = self.finish()
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

    def _on_send(self, message: Message) -> bool:
        """Take in what ``message`` says; return whether it completes the response (what
        :meth:`_completes` answers, worked out in the same pass)."""
        kind = message["type"]
        if kind == "http.response.body":
            tap = self.resp
            # Servers send no body for HEAD (Starlette's Response still passes one, which
            # uvicorn drops): record what went on the wire, i.e. nothing.
            if tap is not None and self.scope["method"] != "HEAD":
                body = message.get("body", b"")
                tap.feed(body if type(body) is bytes else bytes(body))
            return not self.trailers and not message.get("more_body", False)
        if kind == "http.response.start":
            self.response_started = time.monotonic_ns()
            self.status = message["status"]
            self.response_headers = list(message.get("headers", ()))
            self.trailers = bool(message.get("trailers", False))
            self._on_status()
            return False
        if kind == "http.response.trailers":
            self.response_trailers.extend(message.get("headers", ()))
            return not message.get("more_trailers", False)
        if kind == "http.response.pathsend":
            self.sent_path = message.get("path")
            return True
        if kind == "http.response.zerocopysend":
            if self.resp is not None:
                self.resp.size += int(message.get("count") or 0)
            return not message.get("more_body", False)
        return False

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
        self.rule = rule = self.mw.policy.decide_late(scope, scope["method"], self.path, template)
        if rule.ceiling < _REQUEST and self.req is not None:
            self.req.stop_keeping()

    def _on_status(self) -> None:
        if self.rule is None:
            self._decide()
        assert self.rule is not None and self.status is not None
        self.level = level = self.rule.level_for_status(self.status)
        if level is _NONE:
            self._abandon()
            return
        if level < _REQUEST and self.req is not None:
            self.req.stop_keeping()
        self.resp = BodyTap.with_limits(self.mw.tap_limits, level >= _REQUEST_RESPONSE)

    def _abandon(self) -> None:
        """Stop auditing this exchange; the app and the client go on untouched."""
        self.active = False
        for tap in (self.req, self.resp):
            if tap is not None:
                tap.stop_keeping()
        self.req = self.resp = None

    def finish(self) -> Exchange | None:
        """The record of this exchange, or None when it is no longer audited (or was
        handed off already); a record that cannot be built is counted and logged."""
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
        status = self.status
        level = self.level  # worked out at the response start, for the same rule and status
        if level is None:
            level = self.rule.level_for_status(status if status is not None else 500)
        if level is _NONE:
            self._abandon()
            return None
        scope = self.scope
        mw = self.mw
        identity = mw.identity()
        headers: Headers = scope.get("headers") or []
        correlation, trace, host = _header_facts(headers)
        if self.response_complete and self.error is None and not self.disconnected:
            outcome: Outcome = "complete"  # what _outcome says, without the call
            error = None
        else:
            outcome, error = self._outcome()
        req, resp = self.req, self.resp
        request_body = response_body = None
        if req is not None:
            if level < _REQUEST:
                req.stop_keeping()
            request_body = req.close(self.request_complete or _bodiless(headers, scope))
        response_size = 0
        if resp is not None:
            if level < _REQUEST_RESPONSE:
                resp.stop_keeping()
            response_body = resp.close(self.response_complete)
            response_size = resp.size
        if self.sent_path is not None:
            sent = Body.from_path(self.sent_path)
            with contextlib.suppress(OSError):  # gone already: the size stays unknown (0)
                response_size = sent.file_size()
            if level >= _REQUEST_RESPONSE:
                response_body = sent
        ended = time.monotonic_ns()
        # The wall clock now, from the monotonic one: a clock read less per exchange.
        record_id = new_record_id(self.started_at + ended - self.started_mono)
        client = scope.get("client")
        if client and (type(client) is not tuple or len(client) != 2):
            client = (client[0], client[1])
        # Positional: keyword arguments cost more than the rest of this method. The
        # order is Exchange's field order (a test holds the two together).
        return Exchange(
            record_id,
            identity.stream,
            level,
            scope["method"],
            scope.get("scheme", "http"),
            host.decode("latin-1") if host is not None else _server_host(scope),
            scope["path"],
            scope.get("query_string", b""),
            scope.get("http_version", "1.1"),
            client or None,
            list(headers),
            self.started_at,
            self.started_mono,
            self.template or self._template(),
            status,
            self.response_headers if self.response_headers is not None else [],
            self.response_trailers,
            self.response_started,
            ended,
            request_body,
            response_body,
            req.size if req is not None else 0,
            response_size,
            outcome,
            error,
            correlation or record_id,
            trace,
            identity.service,
            identity.pod,
            identity.namespace,
            identity.node,
        )

    def _template(self) -> str | None:
        """The route template for the record (None without routing, as in a raw app)."""
        scope = self.scope
        if "route" not in scope and "endpoint" not in scope:
            return None  # what the resolver would find, without asking it
        return self.mw.resolver.template(scope, self.root)

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


def _header_facts(headers: Headers) -> tuple[str | None, str | None, bytes | None]:
    """The correlation id (the last ``X-Request-Id``), the trace id (of the last valid
    ``traceparent``) and the first ``Host``, in one pass over the request headers."""
    correlation = trace = None
    host: bytes | None = None
    for name, value in headers:
        if name == b"host":
            if host is None:
                host = value
        elif name == b"x-request-id":
            correlation = value.decode("latin-1")
        elif name == b"traceparent":
            parts = value.decode("latin-1").split("-")
            if len(parts) >= 4 and len(parts[1]) == 32:
                trace = parts[1]
    return correlation, trace, host


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


def _server_host(scope: Scope) -> str:
    """The host of a request without a ``Host`` header: the server's address."""
    server: Any = scope.get("server")
    if server:
        host, port = server[0], server[1]
        return host if port is None else f"{host}:{port}"
    return ""
