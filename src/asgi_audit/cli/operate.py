"""Running the pipeline: ``spool status``, ``ship`` (the sidecar and the child shipper),
``retention apply`` and ``demo``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import click

from ..errors import AuditError
from ..sinks import check_sink_url
from .main import main, opened_sink, sink_option, size_text, spool_option


@main.group()
def spool() -> None:
    """Inspect the local spool."""


@spool.command("status")
@spool_option
def spool_status(spool: str) -> None:
    """Segments, bytes and shipping lag of every stream in the spool."""
    from ..recording.frames import Frame, decode_payload, read_frames
    from ..recording.spool import streams
    from ..shipping.runners import ShipperLock

    root = Path(spool)
    if not root.is_dir():
        raise click.ClickException(f"no spool at {root}")
    found = False
    for stream in streams(root):
        found = True
        checkpoint = stream.checkpoint()
        segments = stream.segments()
        size = sum((stream.directory / s).stat().st_size for s in segments)
        pending = 0
        oldest: int | None = None
        for segment in segments:
            if checkpoint.segment and segment < checkpoint.segment:
                continue
            start = checkpoint.offset if segment == checkpoint.segment else 0
            for item in read_frames(stream.directory / segment, start):
                if isinstance(item, Frame):
                    for spooled in decode_payload(item.payload, unpack=False):
                        pending += 1
                        started = int(spooled.meta["started_at_ns"])
                        oldest = started if oldest is None else min(oldest, started)
        lag = "none" if oldest is None else f"{(time.time_ns() - oldest) / 1e9:.1f} s"
        state = "live" if stream.writer_alive() else "orphaned"
        click.echo(
            f"{stream.name}  {state}  {len(segments)} segments  {size_text(size)}  "
            f"delivered {checkpoint.delivered}  pending {pending}  oldest pending {lag}"
        )
    if not found:
        click.echo(f"{root}: no streams")
    shipper = "running" if ShipperLock(root).held_elsewhere() else "not running"
    click.echo(f"shipper: {shipper}")


@main.command()
@spool_option
@sink_option
@click.option("--once", is_flag=True, help="Deliver what is there now, then exit.")
@click.option("--keep-delivered", is_flag=True, help="Keep delivered segments (default: delete).")
@click.option(
    "--drain-seconds",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On SIGTERM, keep delivering this long before exiting.",
)
@click.option(
    "--child-of",
    type=int,
    hidden=True,
    help="Run as the child shipper of this process (how the middleware starts one): stop "
    "at the end of stdin or when the parent goes, exit at once if another process ships.",
)
def ship(
    spool: str,
    sink: str,
    once: bool,
    keep_delivered: bool,
    drain_seconds: float,
    child_of: int | None,
) -> None:
    """Deliver a spool to a sink (a sidecar sharing the spool volume)."""
    import logging

    from ..shipping.runners import serve

    level = logging.WARNING if child_of is not None else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    Path(spool).mkdir(parents=True, exist_ok=True)
    try:  # the URL's form now; opening the sink is retried by serve() while it fails
        check_sink_url(sink, "--sink")
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    code = serve(
        spool,
        sink,
        parent=child_of,
        wait_for_lock=child_of is None,
        drain_seconds=drain_seconds,
        once=once,
        stop_on_eof=child_of is not None,
        keep_delivered=keep_delivered,
    )
    if code:
        raise SystemExit(code)


@runtime_checkable
class Retention(Protocol):
    """A sink that forgets old records in bulk (PostgreSQL drops whole day partitions)."""

    def apply_retention(self, keep_days: int) -> list[str]: ...


@main.group()
def retention() -> None:
    """Forget records older than a number of days."""


@retention.command("apply")
@sink_option
@click.option(
    "--keep-days",
    required=True,
    type=click.IntRange(min=1),
    help="Keep this many days of records; whole older days are dropped.",
)
def retention_apply(sink: str, keep_days: int) -> None:
    """Drop the days of records older than --keep-days (run it daily, e.g. a CronJob)."""
    with opened_sink(sink) as opened:
        if not isinstance(opened, Retention):
            raise click.ClickException(
                f"{sink}: this sink has no retention (postgresql:// sinks have)"
            )
        dropped = opened.apply_retention(keep_days)
    for name in dropped:
        click.echo(f"dropped {name}")
    click.echo(f"{len(dropped)} partition(s) dropped; newer than {keep_days} day(s) kept")


@main.command()
@click.option(
    "--sink",
    default=None,
    help="Sink URL for the demo (default: a fresh SQLite file in a temporary directory).",
)
def demo(sink: str | None) -> None:
    """Serve a small audited shop API on loopback, call it, and print what was recorded."""
    try:
        from .demo import run_demo
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise click.ClickException(
            f"the demo needs FastAPI, uvicorn and httpx ({exc.name} is missing): "
            "pip install 'asgi-audit[demo]'"
        ) from exc
    run_demo(click.echo, sink=sink)
