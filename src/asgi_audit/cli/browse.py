"""Looking at a sink: ``ls``, ``show``, ``tail``, ``export`` and ``stats``.

Record text is printed through :mod:`.terminal` (control characters shown as ``\\x1b``),
always, whether standard output is a terminal or not; ``show --raw`` and ``export`` are
the exact values, the one as bytes, the other as JSON.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import click
import orjson

from ..sinks.record import HeaderList, StoredBody, StoredRecord
from .curl import write_curl
from .exports import open_private, write_jsonl
from .har import write_har
from .main import filters, line_of, main, make_query, opened_sink, sink_option, size_text
from .terminal import (
    is_terminal,
    printable,
    printable_block,
    printable_json,
    printable_url,
    unsafe_for_terminal,
)


@main.command("ls")
@sink_option
@filters
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--oldest-first", is_flag=True, help="Oldest first (default: newest first).")
def list_records(sink: str, limit: int, oldest_first: bool, **options: Any) -> None:
    """List records, newest first."""
    with opened_sink(sink) as opened:
        query = make_query(limit=limit, newest_first=not oldest_first, **options)
        for record in opened.search(query):
            click.echo(line_of(record))


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
    with opened_sink(sink) as opened:
        record = opened.get(record_id)
    if record is None:
        raise click.ClickException(
            f"no record {printable(repr(record_id))} in {printable_url(sink)}"
        )
    if raw is not None:
        body = record.request_body if raw == "request" else record.response_body
        if body is None or body.data is None:
            raise click.ClickException(f"record {printable(record_id)} has no stored {raw} body")
        if is_terminal(sys.stdout) and unsafe_for_terminal(body.data):
            # as curl does: the exact bytes are for a file or a pipe, not for a terminal
            # that would obey the escape sequences in them
            raise click.ClickException(
                f"the {raw} body of record {printable(record_id)} is binary or holds "
                "terminal control characters: redirect --raw to a file or a pipe "
                "(> body.bin, | xxd), or leave --raw out to see it escaped"
            )
        out: BinaryIO = sys.stdout.buffer
        out.write(body.data)
        out.flush()
        return
    click.echo(line_of(record))
    click.echo(
        f"route {printable(record.route or '-')}  stream {printable(record.stream)} "
        f"#{record.seq}  correlation {printable(record.correlation_id)}  "
        f"trace {printable(record.trace_id or '-')}"
    )
    client = record.client_host or "-"
    client += f":{record.client_port}" if record.client_port is not None else ""
    click.echo(
        f"host {printable(record.host)}  query {printable(record.query or '-')}  "
        f"{printable(record.scheme)} HTTP/{printable(record.http_version)}  "
        f"level {printable(record.level)}  client {printable(client)}"
    )
    click.echo(
        f"service {printable(record.service)}  pod {printable(record.pod or '-')}  "
        f"namespace {printable(record.namespace or '-')}  node {printable(record.node or '-')}"
    )
    if record.error:
        click.echo(f"error {printable(record.error)}")
    redacted = [*record.redacted_headers, *(f"?{name}" for name in record.redacted_query)]
    if redacted:
        click.echo(f"redacted {printable(', '.join(redacted))}")
    sides: list[tuple[str, HeaderList, StoredBody | None]] = [
        ("request", record.request_headers, record.request_body),
        ("response", record.response_headers, record.response_body),
    ]
    for title, headers, body in sides:
        click.echo(f"\n── {title} " + "─" * 60)
        _echo_headers(headers)
        click.echo(_describe_body(body))
    if record.response_trailers:
        click.echo("\n── response trailers " + "─" * 51)
        _echo_headers(record.response_trailers)


def _echo_headers(headers: HeaderList) -> None:
    for name, value in headers:
        click.echo(f"{printable(name)}: {printable(value)}")


def _describe_body(body: StoredBody | None) -> str:
    """The body's size and digest, then its text: JSON indented (its raw C1 or bidi
    characters as ``\\u`` escapes, so it is still JSON), other UTF-8 with control
    characters escaped but lines kept, binary only named."""
    if body is None:
        return "(body not kept at this level)"
    head = f"({body.size:,} bytes, sha256 {printable(body.sha256)}"
    head += ", truncated" if body.truncated else ""
    head += ", incomplete" if not body.complete else ""
    head += f", sent from {printable(body.sent_path)}" if body.sent_path else ""
    if body.redacted:
        head += f", redacted: {printable(', '.join(body.redacted))}"
    head += ", unparseable: not kept (redaction rules applied)" if body.unparseable else ""
    head += ")"
    if body.data is None:
        return head
    try:
        text = printable_json(
            orjson.dumps(orjson.loads(body.data), option=orjson.OPT_INDENT_2).decode()
        )
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        try:
            text = printable_block(body.data.decode("utf-8"))
        except UnicodeDecodeError:
            text = f"<{len(body.data):,} bytes of binary; use --raw > FILE to get them>"
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
    with opened_sink(sink) as opened:
        latest = list(opened.search(make_query(limit=lines, **options))) if lines else []
        seen = {record.id for record in latest}
        for record in reversed(latest):
            click.echo(line_of(record))
        since = max((r.started_at_ns for r in latest), default=options.get("since") or 0)
        while follow and (deadline is None or time.monotonic() < deadline):
            time.sleep(interval)
            options["since"] = since
            fresh = [
                r
                for r in opened.search(make_query(limit=None, newest_first=False, **options))
                if r.id not in seen
            ]
            for record in fresh:
                click.echo(line_of(record))
                seen.add(record.id)
                since = max(since, record.started_at_ns)


@main.command()
@sink_option
@filters
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "har", "curl"]),
    default="jsonl",
    show_default=True,
    help="jsonl: one JSON object per record; har: HAR 1.2 (bodies always); curl: one "
    "command line per request that sends it again (secrets as $VARIABLES).",
)
@click.option("--bodies", is_flag=True, help="jsonl: include bodies (UTF-8 text or base64).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many records.")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="File instead of stdout."
)
def export(
    sink: str, fmt: str, bodies: bool, limit: int | None, output: str | None, **options: Any
) -> None:
    """Export records, oldest first, as JSON Lines, HAR 1.2 or curl command lines (-o: a
    file only you can read)."""
    with_bodies = bodies or fmt != "jsonl"
    query = make_query(limit=limit, newest_first=False, with_bodies=with_bodies, **options)
    with opened_sink(sink) as opened:
        total = opened.count() if limit is None else limit
        if output:
            try:
                out: BinaryIO = open_private(output)
            except OSError as exc:
                raise click.ClickException(
                    f"cannot write {printable(output)}: {printable(exc.strerror or str(exc))}"
                ) from exc
        else:
            out = sys.stdout.buffer
        progress = _Progress(total) if sys.stderr.isatty() else None
        records = opened.search(query)
        if progress is not None:
            records = progress.counting(records)
        try:
            if fmt == "har":
                written = write_har(records, out)
            elif fmt == "curl":
                written = write_curl(records, out)
            else:
                written = write_jsonl(records, out, bodies=bodies)
            out.flush()
        finally:
            if output:
                out.close()
        if progress is not None:
            click.echo(f"\rexported {written:,} records" + " " * 20, err=True)


class _Progress:
    """A count on standard error every 100 records, for exports of a large store."""

    def __init__(self, total: int) -> None:
        self.total = total

    def counting(self, records: Iterable[StoredRecord]) -> Iterator[StoredRecord]:
        for done, record in enumerate(records, 1):
            yield record
            if done % 100 == 0:
                click.echo(f"\rexported {done:,} of about {self.total:,}", err=True, nl=False)


@main.command()
@sink_option
@filters
def stats(sink: str, **options: Any) -> None:
    """Counts, bytes and p50/p99 duration by route."""
    by_route: dict[str, list[StoredRecord]] = defaultdict(list)
    with opened_sink(sink) as opened:
        for record in opened.search(make_query(limit=None, **options)):
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
            f"{printable(route)[:40]:40} {len(records):>7} {errors:>7} "
            f"{size_text(sum(r.request_size for r in records)):>11} "
            f"{size_text(sum(r.response_size for r in records)):>11} "
            f"{_percentile(durations, 50):>8.1f} {_percentile(durations, 99):>8.1f}"
        )


def _percentile(values: list[float], percent: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]
