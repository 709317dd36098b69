"""The ``asgi-audit`` command: look at, export and ship audit records.

Errors are one clear line on standard error and a non-zero exit code; nothing here prints
a traceback for a mistake the user can fix.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import click
import orjson

from .. import __version__
from ..capture.policy import StatusRange
from ..capture.settings import DEFAULT_SPOOL, check_sink_url
from ..errors import AuditError
from ..sinks import DEFAULT_SINK_URL, Query, SinkError, Store, open_sink
from ..sinks.record import StoredBody, StoredRecord
from .exports import iso, jsonl_line

sink_option = click.option(
    "--sink",
    envvar="ASGI_AUDIT_SINK",
    default=DEFAULT_SINK_URL,
    show_default=True,
    help="Store URL (sqlite:///path.db, jsonl:///dir, postgresql://..., s3://bucket/prefix);"
    " env ASGI_AUDIT_SINK.",
)
spool_option = click.option(
    "--spool",
    envvar="ASGI_AUDIT_SPOOL",
    default=DEFAULT_SPOOL,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Spool directory; env ASGI_AUDIT_SPOOL.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asgi-audit")
def main() -> None:
    """Record and inspect the raw HTTP bodies of audited ASGI routes."""


@contextmanager
def store(url: str) -> Iterator[Store]:
    """Open an existing store, turning configuration and store errors into one-line CLI
    errors."""
    try:
        opened = open_sink(url, create=False)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot open {url}: {exc}") from exc
    try:
        yield opened
    except BrokenPipeError:  # click ends quietly when the reader leaves (`| head`)
        raise
    except (SinkError, OSError) as exc:
        raise click.ClickException(f"{url}: {exc}") from exc
    finally:
        opened.close()


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class TimeParam(click.ParamType):  # type: ignore[type-arg]
    """ISO 8601 (``2026-11-26T10:00:00Z``, ``2026-11-26``) or an age (``15m``, ``2h``, ``7d``)."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        relative = _RELATIVE.fullmatch(text)
        if relative:
            seconds = float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
            return time.time_ns() - int(seconds * 1e9)
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"expected ISO 8601 or an age like 15m, 2h, 7d (got {text!r})", param, ctx)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1e9)


class StatusParam(click.ParamType):  # type: ignore[type-arg]
    """``4xx``, ``404`` or ``200-299``."""

    name = "status"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> StatusRange:
        if isinstance(value, StatusRange):
            return value
        try:
            return StatusRange.parse(value, "--status")
        except AuditError as exc:
            self.fail(exc.args[0] if exc.args else str(exc), param, ctx)


def _query(
    since: int | None,
    until: int | None,
    route: str | None,
    method: str | None,
    status: StatusRange | None,
    correlation_id: str | None,
    limit: int | None,
    **extra: Any,
) -> Query:
    return Query(
        since_ns=since,
        until_ns=until,
        route=route,
        method=method.upper() if method else None,
        status_low=status.low if status else None,
        status_high=status.high if status else None,
        correlation_id=correlation_id,
        limit=limit,
        **extra,
    )


def filters(command: Any) -> Any:
    """The search options shared by ls, tail, export and stats."""
    for option in reversed(
        [
            click.option("--since", type=TimeParam(), help="Started at or after (ISO or 2h)."),
            click.option("--until", type=TimeParam(), help="Started before (ISO or 30m)."),
            click.option("--route", help="Route template, e.g. '/orders/{order_id}'."),
            click.option("--method", help="HTTP method."),
            click.option("--status", type=StatusParam(), help="4xx, 404 or 200-299."),
            click.option("--correlation-id", help="X-Request-ID (or generated id)."),
        ]
    ):
        command = option(command)
    return command


def _line(record: StoredRecord) -> str:
    status = record.status if record.status is not None else "-"
    outcome = "" if record.outcome == "complete" else f"  {record.outcome}"
    return (
        f"{iso(record.started_at_ns)}  {record.id}  {record.method:6} {status!s:>3}  "
        f"{record.duration_ns / 1e6:8.1f} ms  {_size(record.request_size):>8} > "
        f"{_size(record.response_size):<8}  {record.path}{outcome}"
    )


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


@main.command("ls")
@sink_option
@filters
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--oldest-first", is_flag=True, help="Oldest first (default: newest first).")
def list_records(sink: str, limit: int, oldest_first: bool, **options: Any) -> None:
    """List records, newest first."""
    with store(sink) as opened:
        query = _query(limit=limit, newest_first=not oldest_first, **options)
        for record in opened.search(query):
            click.echo(_line(record))


@main.command()
@sink_option
@click.argument("record_id")
@click.option(
    "--raw",
    type=click.Choice(["request", "response"]),
    help="Write exactly the stored bytes of that body to standard output.",
)
def show(sink: str, record_id: str, raw: str | None) -> None:
    """Show one record: metadata, headers and bodies (JSON pretty-printed)."""
    with store(sink) as opened:
        record = opened.get(record_id)
    if record is None:
        raise click.ClickException(f"no record {record_id!r} in {sink}")
    if raw is not None:
        body = record.request_body if raw == "request" else record.response_body
        if body is None or body.data is None:
            raise click.ClickException(f"record {record_id} has no stored {raw} body")
        out: BinaryIO = sys.stdout.buffer
        out.write(body.data)
        out.flush()
        return
    click.echo(_line(record))
    click.echo(
        f"route {record.route}  stream {record.stream} #{record.seq}  "
        f"correlation {record.correlation_id}  trace {record.trace_id or '-'}"
    )
    if record.error:
        click.echo(f"error {record.error}")
    for title, headers, body in (
        ("request", record.request_headers, record.request_body),
        ("response", record.response_headers, record.response_body),
    ):
        click.echo(f"\n── {title} " + "─" * 60)
        for name, value in headers:
            click.echo(f"{name}: {value}")
        click.echo(_describe_body(body))


def _describe_body(body: StoredBody | None) -> str:
    if body is None:
        return "(body not kept at this level)"
    head = f"({body.size:,} bytes, sha256 {body.sha256}"
    head += ", truncated" if body.truncated else ""
    head += ", incomplete" if not body.complete else ""
    head += f", sent from {body.sent_path}" if body.sent_path else ""
    head += ")"
    if body.data is None:
        return head
    try:
        text = orjson.dumps(orjson.loads(body.data), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        try:
            text = body.data.decode("utf-8")
        except UnicodeDecodeError:
            text = f"<{len(body.data):,} bytes of binary; use --raw to get them>"
    return f"{head}\n{text}" if text else head


@main.command()
@sink_option
@filters
@click.option("-n", "--lines", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records as they arrive.")
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(min=0.05))
@click.option("--max-seconds", type=click.FloatRange(min=0), help="Stop following after this.")
def tail(
    sink: str,
    lines: int,
    follow: bool,
    interval: float,
    max_seconds: float | None,
    **options: Any,
) -> None:
    """Print the latest records; with -f, keep printing new ones."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    with store(sink) as opened:
        latest = list(opened.search(_query(limit=lines, **options))) if lines else []
        seen = {record.id for record in latest}
        for record in reversed(latest):
            click.echo(_line(record))
        since = max((r.started_at_ns for r in latest), default=options.get("since") or 0)
        while follow and (deadline is None or time.monotonic() < deadline):
            time.sleep(interval)
            options["since"] = since
            fresh = [
                r
                for r in opened.search(_query(limit=None, newest_first=False, **options))
                if r.id not in seen
            ]
            for record in fresh:
                click.echo(_line(record))
                seen.add(record.id)
                since = max(since, record.started_at_ns)


@main.command()
@sink_option
@filters
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option("--bodies", is_flag=True, help="Include bodies (UTF-8 text or base64).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many records.")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="File instead of stdout."
)
def export(
    sink: str, fmt: str, bodies: bool, limit: int | None, output: str | None, **options: Any
) -> None:
    """Export records, oldest first, one JSON object per line."""
    query = _query(limit=limit, newest_first=False, with_bodies=bodies, **options)
    with store(sink) as opened:
        total = opened.count() if limit is None else limit
        out: BinaryIO = (
            open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
        )
        show_progress = sys.stderr.isatty()
        try:
            written = 0
            for record in opened.search(query):
                out.write(jsonl_line(record, bodies=bodies))
                written += 1
                if show_progress and written % 100 == 0:
                    click.echo(f"\rexported {written:,} of about {total:,}", err=True, nl=False)
            out.flush()
        finally:
            if output:
                out.close()
        if show_progress:
            click.echo(f"\rexported {written:,} records" + " " * 20, err=True)


@main.command()
@sink_option
@filters
def stats(sink: str, **options: Any) -> None:
    """Counts, bytes and p50/p99 duration by route."""
    by_route: dict[str, list[StoredRecord]] = defaultdict(list)
    with store(sink) as opened:
        for record in opened.search(_query(limit=None, **options)):
            by_route[record.route or "(no route)"].append(record)
    if not by_route:
        click.echo("no records")
        return
    click.echo(
        f"{'route':40} {'count':>7} {'errors':>7} {'req bytes':>11} {'resp bytes':>11} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    for route, records in sorted(by_route.items(), key=lambda item: -len(item[1])):
        durations = sorted(r.duration_ns / 1e6 for r in records)
        errors = sum(1 for r in records if r.outcome != "complete" or (r.status or 0) >= 500)
        click.echo(
            f"{route[:40]:40} {len(records):>7} {errors:>7} "
            f"{_size(sum(r.request_size for r in records)):>11} "
            f"{_size(sum(r.response_size for r in records)):>11} "
            f"{_percentile(durations, 50):>8.1f} {_percentile(durations, 99):>8.1f}"
        )


def _percentile(values: list[float], percent: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


@main.group()
def spool() -> None:
    """Inspect the local spool."""


@spool.command("status")
@spool_option
def spool_status(spool: str) -> None:
    """Segments, bytes and shipping lag of every stream in the spool."""
    from ..recording.frames import Frame, decode_payload, read_frames
    from ..recording.spool import streams
    from ..shipping.shipper import ShipperLock

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
                    for spooled in decode_payload(item.payload):
                        pending += 1
                        started = int(spooled.meta["started_at_ns"])
                        oldest = started if oldest is None else min(oldest, started)
        lag = "none" if oldest is None else f"{(time.time_ns() - oldest) / 1e9:.1f} s"
        state = "live" if stream.writer_alive() else "orphaned"
        click.echo(
            f"{stream.name}  {state}  {len(segments)} segments  {_size(size)}  "
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
def ship(spool: str, sink: str, once: bool, keep_delivered: bool, drain_seconds: float) -> None:
    """Deliver a spool to a store (a sidecar sharing the spool volume)."""
    import logging

    from ..shipping.shipper import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    Path(spool).mkdir(parents=True, exist_ok=True)
    try:  # the URL's form now; opening the store is retried by serve() while it fails
        check_sink_url(sink, "--sink")
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    code = serve(
        spool,
        sink,
        wait_for_lock=True,
        drain_seconds=drain_seconds,
        once=once,
        keep_delivered=keep_delivered,
    )
    if code:
        raise SystemExit(code)


@runtime_checkable
class Retention(Protocol):
    """A store that forgets old records in bulk (PostgreSQL drops whole day partitions)."""

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
    with store(sink) as opened:
        if not isinstance(opened, Retention):
            raise click.ClickException(
                f"{sink}: this store has no retention (postgresql:// stores have)"
            )
        dropped = opened.apply_retention(keep_days)
    for name in dropped:
        click.echo(f"dropped {name}")
    click.echo(f"{len(dropped)} partition(s) dropped; newer than {keep_days} day(s) kept")


@main.command()
@click.option(
    "--sink",
    default=None,
    help="Store URL for the demo (default: a fresh SQLite file in a temporary directory).",
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
