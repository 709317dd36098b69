"""The security headers of every response the viewer sends, errors and static files included.

The pages show what clients sent: a body may hold ``<script>``, a header may hold markup.
Templates escape it all; the headers are the second wall, in case something is ever
rendered raw: the CSP runs no script but the viewer's own static file and no inline code
or style, loads nothing from elsewhere, and posts forms only to the viewer. The others
keep the pages out of frames (clickjacking), stop the browser from guessing a download's
type (a raw body served as ``application/octet-stream`` never becomes HTML), keep the
URL, which may carry ``?token=``, out of ``Referer`` headers, and keep whole exchanges out
of caches.

Pure ASGI, wrapped around the whole app (Starlette's error responses included): the
headers are set on ``http.response.start`` as it passes, replacing any the app set itself.
"""

from __future__ import annotations

from ..._types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode("ascii")),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
_REPLACED = frozenset(name for name, _ in SECURITY_HEADERS)


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response of ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if name.lower() not in _REPLACED
                ]
                headers.extend(SECURITY_HEADERS)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
