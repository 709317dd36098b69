"""The ``asgi-audit`` command: look at, export and ship audit records.

Errors are one clear line on standard error and a non-zero exit code; nothing here prints
a traceback for a mistake the user can fix. Whatever is printed goes through
:mod:`.terminal`: record text with its control characters made visible, sink URLs (and
error texts that may quote them) with their secrets masked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click

from .._version import __version__
from ..capture.policy import StatusRange
from ..capture.settings import DEFAULT_SPOOL
from ..errors import AuditError, SinkError
from ..sinks import DEFAULT_SINK_URL, Query, Sink, open_sink
from ..sinks.record import StoredRecord
from .exports import iso
from .terminal import printable, printable_error, printable_url

sink_option = click.option(
    "--sink",
    envvar="ASGI_AUDIT_SINK",
    default=DEFAULT_SINK_URL,
    show_default=True,
    help="Sink URL (sqlite:///path.db, jsonl:///dir, postgresql://..., s3://bucket/prefix);"
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
def opened_sink(url: str) -> Iterator[Sink]:
    """Open an existing sink, turning configuration and sink errors into one-line CLI
    errors, in which the URL's password and secret parameters are masked wherever the
    message (often a driver's) quotes it."""
    try:
        opened = open_sink(url, create=False)
    except (AuditError, OSError) as exc:
        raise open_error(exc, url) from exc
    try:
        yield opened
    except BrokenPipeError:  # click ends quietly when the reader leaves (`| head`)
        raise
    except (SinkError, OSError) as exc:
        raise click.ClickException(
            f"{printable_url(url)}: {printable_error(str(exc), url)}"
        ) from exc
    finally:
        opened.close()


def open_error(exc: AuditError | OSError, url: str) -> click.ClickException:
    """A sink that could not be opened, as one CLI line with the URL masked wherever the
    message (often a driver's) quotes it."""
    if isinstance(exc, AuditError):
        return click.ClickException(printable_error(str(exc), url))
    return click.ClickException(
        f"cannot open {printable_url(url)}: {printable_error(str(exc), url)}"
    )


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
        ns = int(moment.timestamp() * 1e9)
        if not 0 <= ns < 1 << 63:  # what the sinks' 64-bit times can hold
            self.fail(f"expected a time between 1970 and 2262 (got {text!r})", param, ctx)
        return ns


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


def make_query(
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


def line_of(record: StoredRecord) -> str:
    """One record on one line (ls, tail, show): every text field from the record is
    passed through :func:`printable`, since the client chose it."""
    status = record.status if record.status is not None else "-"
    outcome = "" if record.outcome == "complete" else f"  {printable(record.outcome)}"
    return (
        f"{iso(record.started_at_ns)}  {printable(record.id)}  {printable(record.method):6} "
        f"{status!s:>3}  {record.duration_ns / 1e6:8.1f} ms  "
        f"{size_text(record.request_size):>8} > {size_text(record.response_size):<8}  "
        f"{printable(record.path)}{outcome}"
    )


def size_text(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"
