"""The list's filters (those of ``asgi-audit ls``) and its paging, read from a query string.

Filters are kept as typed, so every link (older, tail, HAR) carries them unchanged: an
age like ``2h`` stays an age. Paging is by keyset, newest first: the cursor is the last
record shown, ``(started_at_ns, id)``, and the next page is what sorts before it. A sink
query only bounds time (``until_ns`` is exclusive), so the page asks for records started
before ``cursor + 1 ns`` and skips those at or after the cursor in that order: records
that share the cursor's nanosecond (ties, from a coarse clock or a replayed trail) are
neither lost nor shown twice. Each skipped record costs a row of the page, so it asks for
some extra, and more when ties fill it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import click

from ...capture.policy import StatusRange
from ...sinks import Query, Sink
from ...sinks.record import StoredRecord
from ..main import StatusParam, TimeParam, make_query

PAGE_SIZE = 50
TIE_SLACK = 64
"""Extra rows a later page asks for, to make up for skipped ties."""
MAX_PAGE_ROWS = 50_000
"""The most rows one page reads when ties keep filling it (then it shows what it has)."""
FILTER_NAMES = ("since", "until", "route", "method", "status", "correlation_id")
MAX_VALUE = 1000
"""Characters in one filter value: a route or an id, never more."""


class FilterError(ValueError):
    """A filter or cursor that does not read; its text is shown on the page."""


@dataclass(frozen=True)
class Cursor:
    """The last record of a page: the next one starts before it."""

    started_at_ns: int
    id: str

    @classmethod
    def of(cls, record: StoredRecord) -> Cursor:
        return cls(record.started_at_ns, record.id)

    def after(self, record: StoredRecord) -> bool:
        """Whether ``record`` sorts after the cursor, newest first (so is on a later page)."""
        return (record.started_at_ns, record.id) < (self.started_at_ns, self.id)


@dataclass(frozen=True)
class Filters:
    """The filters as typed (``values``, for links and the form) and as read."""

    values: dict[str, str] = field(default_factory=dict)
    since_ns: int | None = None
    until_ns: int | None = None
    status: StatusRange | None = None

    def text(self, name: str) -> str:
        return self.values.get(name, "")

    def encoded(self, **extra: str) -> str:
        """The filters (and ``extra``) as a query string."""
        return urlencode({**self.values, **extra})

    def query(self, **changes: Any) -> Query:
        """The sink query of these filters; ``changes`` override its fields."""
        arguments: dict[str, Any] = {
            "since": self.since_ns,
            "until": self.until_ns,
            "route": self.values.get("route"),
            "method": self.values.get("method"),
            "status": self.status,
            "correlation_id": self.values.get("correlation_id"),
            "limit": PAGE_SIZE,
        }
        for name, key in (("since_ns", "since"), ("until_ns", "until")):
            if name in changes:
                arguments[key] = changes.pop(name)
        if "limit" in changes:
            arguments["limit"] = changes.pop("limit")
        return make_query(**arguments, **changes)


def parse_filters(params: Mapping[str, str]) -> Filters:
    """The filters of a query string; empty values mean "any"."""
    values: dict[str, str] = {}
    for name in FILTER_NAMES:
        value = params.get(name, "").strip()
        if len(value) > MAX_VALUE:
            raise FilterError(f"{name}: longer than {MAX_VALUE} characters")
        if value:
            values[name] = value
    try:
        since = TimeParam().convert(values["since"], None, None) if "since" in values else None
        until = TimeParam().convert(values["until"], None, None) if "until" in values else None
        status = StatusParam().convert(values["status"], None, None) if "status" in values else None
    except click.BadParameter as exc:
        raise FilterError(exc.message) from exc
    return Filters(values, since, until, status)


def parse_cursor(params: Mapping[str, str]) -> Cursor | None:
    """``before_ns`` and ``before_id``, the "older" link's cursor, or None for page one."""
    ns, record_id = params.get("before_ns"), params.get("before_id")
    if ns is None and record_id is None:
        return None
    if ns is None or record_id is None or len(record_id) > MAX_VALUE:
        raise FilterError("the page cursor needs before_ns and before_id")
    try:
        return Cursor(int(ns), record_id)
    except ValueError as exc:
        raise FilterError(f"before_ns: expected an integer (got {ns[:40]!r})") from exc


@dataclass(frozen=True)
class Page:
    """One page of the list, and the cursor of the next (None on the last)."""

    records: list[StoredRecord]
    older: Cursor | None


def read_page(sink: Sink, filters: Filters, cursor: Cursor | None) -> Page:
    """The page after ``cursor`` (blocking: run it in a thread)."""
    until = filters.until_ns
    if cursor is not None:
        bound = cursor.started_at_ns + 1
        until = bound if until is None else min(until, bound)
    wanted = PAGE_SIZE + 1  # one more than shown: whether there is an older page
    limit = wanted if cursor is None else wanted + TIE_SLACK
    while True:
        found = list(sink.search(filters.query(until_ns=until, limit=limit)))
        kept = found if cursor is None else [r for r in found if cursor.after(r)]
        if len(kept) >= wanted or len(found) < limit or limit >= MAX_PAGE_ROWS:
            break
        limit = min(limit * 4, MAX_PAGE_ROWS)
    shown = kept[:PAGE_SIZE]
    older = Cursor.of(shown[-1]) if len(kept) > PAGE_SIZE else None
    return Page(shown, older)


def older_href(filters: Filters, cursor: Cursor | None) -> str | None:
    if cursor is None:
        return None
    return "/?" + filters.encoded(before_ns=str(cursor.started_at_ns), before_id=cursor.id)
