"""Running the pipeline: ``spool status``, ``ship`` (the sidecar and the child shipper),
``retention apply`` and ``demo``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import click

from ..capture.settings import metrics_address
from ..errors import AuditError
from ..recording.chain import RETENTION_STREAM, retention_marker
from ..recording.signing import load_signer
from ..shipping.quarantine import Quarantine
from ..sinks import Query, check_sink_url
from .exports import iso
from .main import main, opened_sink, sink_option, size_text, spool_option
from .terminal import printable, printable_url


@main.group()
def spool() -> None:
    """Inspect the local spool."""


@spool.command("status")
@spool_option
def spool_status(spool: str) -> None:
    """Segments, bytes and shipping lag of every stream in the spool."""
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
        for spooled in stream.pending():
            pending += 1
            started = int(spooled.meta["started_at_ns"])
            oldest = started if oldest is None else min(oldest, started)
        lag = "none" if oldest is None else f"{(time.time_ns() - oldest) / 1e9:.1f} s"
        state = "live" if stream.writer_alive() else "orphaned"
        click.echo(
            f"{printable(stream.name)}  {state}  {len(segments)} segments  {size_text(size)}  "
            f"delivered {checkpoint.delivered}  pending {pending}  oldest pending {lag}"
        )
    if not found:
        click.echo(f"{printable(str(root))}: no streams")
    shipper = "running" if ShipperLock(root).held_elsewhere() else "not running"
    click.echo(f"shipper: {shipper}")
    quarantined = Quarantine(root).entries()
    click.echo(f"quarantine: {len(quarantined)} record(s) the sink refused")
    for entry in quarantined:
        click.echo(
            f"  {printable(entry.id)}  {iso(entry.at_ns)}  stream {printable(entry.stream)}  "
            f"tried {entry.attempts}x  {printable(entry.reason)}"
        )
    if quarantined:
        click.echo("  (asgi-audit spool retry sends them again once the sink can take them)")


@spool.command("retry")
@spool_option
@sink_option
@click.option("--id", "ids", multiple=True, help="Only this quarantined record (repeatable).")
def spool_retry(spool: str, sink: str, ids: tuple[str, ...]) -> None:
    """Send the records in quarantine to the sink again; those it takes leave the
    quarantine, those it still refuses stay there with its new reason."""
    from ..errors import RecordRefused
    from ..recording.frames import checkpoint_of
    from ..shipping.shipper import stored_record

    quarantine = Quarantine(Path(spool))
    entries = [e for e in quarantine.entries() if not ids or e.id in ids]
    missing = sorted(set(ids) - {e.id for e in entries})
    if missing:
        raise click.ClickException(f"not in quarantine: {', '.join(printable(i) for i in missing)}")
    stored = refused = 0
    with opened_sink(sink) as opened:
        for entry in entries:
            spooled = quarantine.read(entry)
            checkpoints = [c for c in (checkpoint_of(r.meta) for r in spooled) if c is not None]
            try:
                if checkpoints:
                    opened.write_checkpoints(checkpoints)
                else:
                    opened.write_batch([stored_record(r) for r in spooled])
            except RecordRefused as exc:
                refused += 1
                quarantine.refused_again(entry, str(exc))
                click.echo(f"still refused {printable(entry.id)}: {printable(str(exc))}")
                continue
            quarantine.release(entry)
            stored += 1
            click.echo(f"stored {printable(entry.id)}")
    click.echo(f"{stored} stored, {refused} still in quarantine")
    if refused:
        raise SystemExit(1)


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
    "--metrics-port",
    envvar="ASGI_AUDIT_METRICS_PORT",
    help="Serve Prometheus /metrics of the spool on PORT or HOST:PORT; env "
    "ASGI_AUDIT_METRICS_PORT.",
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
    metrics_port: str | None,
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
        metrics = None if not metrics_port else metrics_address(metrics_port)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    code = serve(
        spool,
        sink,
        parent=child_of,
        drain_seconds=drain_seconds,
        once=once,
        stop_on_eof=child_of is not None,
        keep_delivered=keep_delivered,
        metrics=metrics,
    )
    if code:
        raise SystemExit(code)


DAY_NS = 86_400 * 10**9


@runtime_checkable
class Retention(Protocol):
    """A sink that forgets old records in bulk (PostgreSQL drops whole day partitions)."""

    def apply_retention(self, keep_days: int, *, now_ns: int | None = None) -> list[str]: ...

    def partitions(self) -> Sequence[Any]:
        """What would go: each with ``name`` and ``high_ns`` (exclusive end)."""
        ...


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
@click.option(
    "--signing-key",
    envvar="ASGI_AUDIT_SIGNING_KEY",
    help="The Ed25519 private key (a PEM file) that signs the retention marker; env "
    "ASGI_AUDIT_SIGNING_KEY (a path or the PEM text).",
)
def retention_apply(sink: str, keep_days: int, signing_key: str | None) -> None:
    """Drop the days of records older than --keep-days (run it daily, e.g. a CronJob).

    First a retention marker is stored beside the checkpoints, listing every record about
    to go by stream and sequence number, signed with the signing key when one is given:
    `asgi-audit verify` then reports those records as removed by retention, not deleted."""
    signer = None
    if signing_key:
        try:
            signer = load_signer(signing_key, "--signing-key")
        except AuditError as exc:
            raise click.UsageError(str(exc)) from None
    with opened_sink(sink) as opened:
        if not isinstance(opened, Retention):
            raise click.ClickException(
                f"{printable_url(sink)}: this sink has no retention (postgresql:// sinks have)"
            )
        now = time.time_ns()
        cutoff = now - keep_days * DAY_NS
        going = [part for part in opened.partitions() if part.high_ns <= cutoff]
        if going:
            until = max(part.high_ns for part in going)
            removed: dict[str, list[int]] = {}
            for record in opened.search(Query(until_ns=until, limit=None, newest_first=False)):
                removed.setdefault(record.stream, []).append(record.seq)
            markers = sorted(
                opened.checkpoints(RETENTION_STREAM), key=lambda marker: marker["index"]
            )
            marker = retention_marker(
                index=(markers[-1]["index"] + 1) if markers else 1,
                previous=markers[-1] if markers else None,
                at_ns=now,
                until_ns=until,
                removed=removed,
                dropped=[part.name for part in going],
                signer=signer,
            )
            opened.write_checkpoints([marker])
            click.echo(
                f"retention marker {marker['index']}: "
                f"{sum(len(seqs) for seqs in removed.values())} records of "
                f"{len(removed)} stream(s){'' if signer else ' (unsigned: no signing key)'}"
            )
        dropped = opened.apply_retention(keep_days, now_ns=now)
    for name in dropped:
        click.echo(f"dropped {printable(name)}")
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
