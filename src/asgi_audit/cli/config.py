"""``asgi-audit config check``: the settings a middleware would run with, before it runs.

The same merge and validation as the middleware (arguments, then ``ASGI_AUDIT_*``
variables, then the file): what it prints is what a pod with this environment and this
file gets, and a mistake is the same one-line error, with exit status 1, before the
deployment rather than in its logs. The sink URL is printed with its password and secret
parameters masked, the signing key only as set or not.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click

from .._urls import mask_url
from ..capture.settings import Settings, load_settings
from ..errors import ConfigError
from ..sinks import check_sink_url
from .main import main
from .terminal import printable

HIDDEN = frozenset({"signing_key"})
"""Settings shown only as set or not."""
URLS = frozenset({"sink"})
"""Settings shown with :func:`~asgi_audit._urls.mask_url`."""


@main.group()
def config() -> None:
    """Check the audit configuration (environment and --config file)."""


@config.command("check")
@click.option(
    "--config",
    "path",
    envvar="ASGI_AUDIT_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML file of settings and [[rule]] tables; env ASGI_AUDIT_CONFIG.",
)
def check(path: str | None) -> None:
    """Print the effective settings and policy; exit 1 on any error in them."""
    try:
        settings = load_settings({"config": path}, os.environ, check_sink_url)
    except ConfigError as exc:
        raise click.ClickException(printable(str(exc))) from exc
    for line in describe(settings):
        click.echo(line)


def describe(settings: Settings) -> list[str]:
    """``name = value`` per setting, the policy last, every value printable."""
    lines = []
    for item in dataclasses.fields(settings):
        if item.name == "policy":
            continue
        value: Any = getattr(settings, item.name)
        if item.name in HIDDEN:
            shown = "(set)" if value else "(not set)"
        elif item.name in URLS:
            shown = mask_url(str(value))
        elif isinstance(value, tuple):
            shown = ", ".join(str(v) for v in value) or "(none)"
        else:
            shown = "(none)" if value is None else str(value)
        lines.append(f"{item.name} = {printable(shown)}")
    lines.append(f"policy = {printable(repr(settings.policy))}")
    return lines
