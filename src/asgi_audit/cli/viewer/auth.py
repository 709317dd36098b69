"""Access to the viewer: the token, given once, then a session cookie.

The viewer shows whole exchanges (personal data, whatever secrets redaction missed), so
nothing answers without the token but the login form and the static files. As Jupyter
does it: the token comes from ``ASGI_AUDIT_VIEWER_TOKEN`` or is made at start and printed
once, in the URL to open. ``?token=`` on any URL logs in and redirects to the same URL
without it, so that it does not stay in the address bar, the history or a bookmark; the
login form (``POST /login``) takes it too. Tokens are compared in constant time.

The cookie is not the token but an HMAC of a key made per process: a cookie that leaks
(a browser profile, a proxy log) tells nothing of the token and dies with the process.
``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page, link or form
sends it: no cross-site request forgery through the viewer), ``Path=/``, ``Secure`` when
the request came over https. Its name holds the port, since browsers share a host's
cookies between its ports: two viewers on one machine would otherwise log each other out.

Without access, an HTML page redirects to the login form (which comes back to it); a
download, the event stream and anything but GET or HEAD answer 401, since a login page
in their place would land in a file or a script as if it were the answer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from ..._types import ASGIApp, Receive, Scope, Send
from .rendering import Templates

TOKEN_PARAMETER = "token"
PUBLIC_PATHS = frozenset({"/login"})
PUBLIC_PREFIXES = ("/static/",)
"""The stylesheet and the script: the login page needs the one, and neither is secret."""
MACHINE_PREFIXES = ("/raw/", "/export.har", "/tail/events")
"""What a program or a download reads: answered 401 rather than redirected."""
MAX_FORM_BYTES = 8192
"""The login form is a token and a path: a larger body is refused unread."""
_SESSION_CONTEXT = b"asgi-audit viewer session"


class Access:
    """The token of one viewer process, and the session value its cookie holds."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the viewer's token must not be empty")
        self._token = _utf8(token)
        key = secrets.token_bytes(32)
        self._session = hmac.new(key, _SESSION_CONTEXT, hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the token (in constant time)."""
        return hmac.compare_digest(_utf8(given), self._token)

    def signed_in(self, request: Request) -> bool:
        """Whether the request carries this process's session cookie."""
        value = request.cookies.get(cookie_name(request.scope))
        return value is not None and hmac.compare_digest(_utf8(value), self._session.encode())

    def sign_in(self, response: Response, scope: Scope) -> None:
        response.set_cookie(
            cookie_name(scope),
            self._session,
            path="/",
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
        )

    def sign_out(self, response: Response, scope: Scope) -> None:
        response.delete_cookie(
            cookie_name(scope),
            path="/",
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
        )


def cookie_name(scope: Scope) -> str:
    """``asgi-audit-viewer-8900``: the session cookie of the viewer on that port."""
    server = scope.get("server")
    port = server[1] if server and len(server) > 1 else None
    if port is None:  # the scheme's default port (some clients leave it out)
        port = 443 if scope.get("scheme") == "https" else 80
    return f"asgi-audit-viewer-{port}"


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Gate:
    """Pure ASGI: lets through what has access (see the module docstring), logs in a
    ``?token=`` and refuses the rest; the lifespan passes straight through."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            await send({"type": "websocket.close", "code": 1008})
            return
        request = Request(scope)
        given = request.query_params.get(TOKEN_PARAMETER)
        if given is not None:
            response = self._token_in_url(request, given)
        elif is_public(scope["path"]) or self.access.signed_in(request):
            await self.app(scope, receive, send)
            return
        else:
            response = refused(request, without_token(scope))
        await response(scope, receive, send)

    def _token_in_url(self, request: Request, given: str) -> Response:
        target = without_token(request.scope)
        if not self.access.token_matches(given):
            return refused(request, target)
        response = RedirectResponse(target, status_code=303)
        self.access.sign_in(response, request.scope)
        return response


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def refused(request: Request, target: str) -> Response:
    """401 for a machine or a form post, else a redirect to the login form, which
    comes back to ``target``."""
    if request.url.path.startswith(MACHINE_PREFIXES) or request.method not in ("GET", "HEAD"):
        return PlainTextResponse(
            "401 Unauthorized: open the viewer's URL with ?token= first, or log in at /login\n",
            status_code=401,
        )
    return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)


def without_token(scope: Scope) -> str:
    """The request's path and query as received, with every ``token`` parameter left out
    (the other parameters keep their exact bytes); never ``//host``, which a browser
    would take for another site."""
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
    path = "/" + path.lstrip("/\\")
    query = scope.get("query_string", b"").decode("latin-1")
    kept = [
        piece
        for piece in query.split("&")
        if piece and unquote_plus(piece.partition("=")[0]) != TOKEN_PARAMETER
    ]
    return f"{path}?{'&'.join(kept)}" if kept else path


def local_target(value: str | None) -> str:
    """``value`` when it is a path on this viewer, else ``/``: the login form's ``next``
    must not send anyone to another site (``//evil.test``, ``/\\evil.test``, or ``/\\t/``
    which browsers read as ``//``)."""
    if (
        not value
        or not value.isascii()
        or not value.startswith("/")
        or value[1:2] in ("/", "\\")
        or any(ord(char) <= 0x20 or char == "\x7f" for char in value)
    ):
        return "/"
    return value


class Login:
    """``GET /login`` (the form), ``POST /login`` (the token) and ``POST /logout``."""

    def __init__(self, access: Access, templates: Templates) -> None:
        self.access = access
        self.templates = templates

    async def form(self, request: Request) -> Response:
        target = local_target(request.query_params.get("next"))
        return self.templates.page("login.html", signed_in=False, next=target, error=None)

    async def submit(self, request: Request) -> Response:
        fields = await form_fields(request)
        if fields is None:
            return PlainTextResponse("413 the login form is a token and a path\n", 413)
        target = local_target(fields.get("next"))
        if not self.access.token_matches(fields.get(TOKEN_PARAMETER, "")):
            return self.templates.page(
                "login.html",
                status=401,
                signed_in=False,
                next=target,
                error="That is not this viewer's token.",
            )
        response = RedirectResponse(target, status_code=303)
        self.access.sign_in(response, request.scope)
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        self.access.sign_out(response, request.scope)
        return response


async def form_fields(request: Request) -> dict[str, str] | None:
    """An URL-encoded form of at most :data:`MAX_FORM_BYTES` (first value of each name),
    or None when it is larger or has too many fields."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=8)
    except ValueError:
        return None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields
