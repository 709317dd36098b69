"""The ``asgi-audit`` command."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asgi-audit")
def main() -> None:
    """Record and inspect the raw HTTP bodies of audited ASGI routes."""


@main.command()
def demo() -> None:
    """Serve a small audited shop API on loopback, call it, and print what was recorded."""
    try:
        from .demo import run_demo
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise click.ClickException(
            f"the demo needs FastAPI, uvicorn and httpx ({exc.name} is missing): "
            "pip install 'asgi-audit[demo]'"
        ) from exc
    run_demo(click.echo)
