"""``asgi-audit serve``: the web viewer, under uvicorn.

Imported by the CLI for the command it registers, so it imports nothing heavy: Starlette,
Jinja2 and uvicorn (the ``viewer`` extra) are imported when the command runs, and their
absence is one line naming the extra.

The token: ``ASGI_AUDIT_VIEWER_TOKEN`` (an environment variable, not an option, which
every local user could read in ``ps``), or one made at start and printed once, in the URL
to open, as Jupyter does. Nothing else prints it: uvicorn's access log, which would
write every URL and so the first one's ``?token=``, is off. The sink URL is printed
masked.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

import click

from ...errors import AuditError
from ..main import main, open_error, sink_option
from ..terminal import printable, printable_url

TOKEN_VARIABLE = "ASGI_AUDIT_VIEWER_TOKEN"
INSTALL_HINT = "pip install 'asgi-audit[viewer]'"


@main.command()
@sink_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (any other than loopback shows the records to the network).",
)
@click.option(
    "--port",
    default=8900,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free one).",
)
def serve(sink: str, host: str, port: int) -> None:
    """A read-only web viewer of the sink: list, detail, diff, downloads, live tail.

    Open the URL it prints; the token in it is asked for once, then kept in a cookie.
    Set ASGI_AUDIT_VIEWER_TOKEN to choose the token. Needs asgi-audit[viewer]."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise click.ClickException(
            f"asgi-audit serve needs {exc.name or 'starlette, jinja2 and uvicorn'}: {INSTALL_HINT}"
        ) from exc
    from .app import create_app

    token, generated = viewer_token()
    listening = listen(host, port)
    try:
        app = open_viewer(create_app, sink, token)
        url = base_url(host, int(listening.getsockname()[1]))
        click.echo(f"asgi-audit viewer of {printable_url(sink)}")
        if generated:
            click.echo(f"open {url}?token={token}")
        else:
            click.echo(f"open {url} (the token is in {TOKEN_VARIABLE})")
        config = uvicorn.Config(
            app,
            lifespan="on",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            log_level="warning",
        )
        uvicorn.Server(config).run(sockets=[listening])
    finally:
        listening.close()


def open_viewer(create_app: Callable[[str, str], Any], sink: str, token: str) -> Any:
    """``create_app(sink, token)``, its sink errors as one line with the URL masked
    (as :func:`~asgi_audit.cli.main.opened_sink` words them)."""
    try:
        return create_app(sink, token)
    except (AuditError, OSError) as exc:
        raise open_error(exc, sink) from exc


def viewer_token() -> tuple[str, bool]:
    """The token from the environment, or a new one; and whether it is new."""
    given = os.environ.get(TOKEN_VARIABLE)
    if given is None:
        return secrets.token_urlsafe(32), True
    if not given.strip():
        raise click.ClickException(f"{TOKEN_VARIABLE} is set but empty")
    return given, False


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (before anything is printed, so the URL shown has
    the real port, and "address in use" is one line)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bound = socket.socket(family, socket.SOCK_STREAM)
    try:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bound.bind((host, port))
        bound.listen(128)  # from now on connections wait for uvicorn in the backlog
    except OSError as exc:
        bound.close()
        reason: Any = exc.strerror or exc
        raise click.ClickException(
            f"cannot listen on {printable(host)}:{port}: {printable(str(reason))}"
        ) from exc
    return bound


def base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"
