"""The HTML pages: the list, one exchange, the diff of two, the live tail's page.

Handlers read the sink in a thread (sink calls block) and hand the templates plain
records and views; every value is escaped there (:mod:`.rendering`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ...sinks.record import HeaderList, StoredRecord
from ..terminal import printable
from .bodies import BodyView, body_view
from .comparison import compare_records
from .filters import (
    FILTER_NAMES,
    FilterError,
    Filters,
    older_href,
    parse_cursor,
    parse_filters,
    read_page,
)
from .integrity import Check, integrity
from .state import Viewer


@dataclass(frozen=True)
class Side:
    """The request or the response of the detail page."""

    name: str
    headers: HeaderList
    body: BodyView


@dataclass(frozen=True)
class Detail:
    record: StoredRecord
    sides: list[Side]
    checks: list[Check]
    redactions: list[str]


def redactions(record: StoredRecord) -> list[str]:
    """What redaction replaced in the record, one line per place (names and paths only)."""
    lines = []
    if record.redacted_headers:
        lines.append("headers: " + ", ".join(record.redacted_headers))
    if record.redacted_query:
        lines.append("query parameters: " + ", ".join(record.redacted_query))
    for side, body in (("request", record.request_body), ("response", record.response_body)):
        if body is None:
            continue
        if body.redacted:
            lines.append(f"{side} body: " + ", ".join(body.redacted))
        if body.unparseable:
            lines.append(
                f"{side} body: had redaction rules but did not parse, so only a marker is stored"
            )
    return [printable(line) for line in lines]


def typed_filters(params: Mapping[str, str]) -> Filters:
    """The filters as typed, unread: to show them back beside an error."""
    return Filters({name: params[name][:1000] for name in FILTER_NAMES if params.get(name)})


class Pages:
    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer
        self.templates = viewer.templates

    def error(self, status: int, title: str, message: str) -> Response:
        return self.templates.page("error.html", status=status, title=title, message=message)

    async def records(self, request: Request) -> Response:
        """``/``: one page of the list, newest first."""
        params = request.query_params
        try:
            filters = parse_filters(params)
            cursor = parse_cursor(params)
        except FilterError as exc:
            return self.templates.page(
                "list.html",
                status=400,
                filters=typed_filters(params),
                records=[],
                error=str(exc),
                older_href=None,
                newest_href="/",
                har_limit=self.viewer.har_limit,
            )
        page = await run_in_threadpool(read_page, self.viewer.sink, filters, cursor)
        return self.templates.page(
            "list.html",
            filters=filters,
            records=page.records,
            error=None,
            older_href=older_href(filters, page.older),
            newest_href=None if cursor is None else "/?" + filters.encoded(),
            har_limit=self.viewer.har_limit,
        )

    async def record(self, request: Request) -> Response:
        """``/records/ID``: one exchange."""
        record_id = request.path_params["record_id"]
        detail = await run_in_threadpool(self.detail, record_id)
        if detail is None:
            return self.error(404, "No such record", f"no record {printable(record_id)!r}")
        return self.templates.page("detail.html", detail=detail, record=detail.record)

    def detail(self, record_id: str) -> Detail | None:
        """What the detail page shows (blocking: the record, then one bounded query)."""
        record = self.viewer.sink.get(record_id)
        if record is None:
            return None
        sides = [
            Side(
                "request",
                record.request_headers,
                body_view(record.request_body, record.request_headers),
            ),
            Side(
                "response",
                record.response_headers,
                body_view(record.response_body, record.response_headers),
            ),
        ]
        return Detail(record, sides, integrity(self.viewer.sink, record), redactions(record))

    async def diff(self, request: Request) -> Response:
        """``/diff?a=ID&b=ID``; the list's form sends ``?id=ID&id=ID``, redirected there."""
        params = request.query_params
        chosen = params.getlist("id")
        if chosen:
            if len(chosen) != 2:
                return self.error(
                    400, "Choose two records", f"select exactly two records ({len(chosen)} chosen)"
                )
            return RedirectResponse("/diff?" + urlencode({"a": chosen[0], "b": chosen[1]}), 303)
        a_id, b_id = params.get("a"), params.get("b")
        if not a_id or not b_id:
            return self.error(400, "Choose two records", "the diff needs ?a=ID&b=ID")
        sink = self.viewer.sink
        a = await run_in_threadpool(sink.get, a_id)
        b = await run_in_threadpool(sink.get, b_id)
        for wanted, found in ((a_id, a), (b_id, b)):
            if found is None:
                return self.error(404, "No such record", f"no record {printable(wanted)!r}")
        assert a is not None and b is not None
        comparison = await run_in_threadpool(compare_records, a, b)
        return self.templates.page("diff.html", c=comparison)

    async def tail(self, request: Request) -> Response:
        """``/tail``: the live tail's page; its script reads ``/tail/events``."""
        try:
            filters = parse_filters(request.query_params)
        except FilterError as exc:
            return self.error(400, "Bad filter", str(exc))
        return self.templates.page(
            "tail.html", filters=filters, events_href="/tail/events?" + filters.encoded()
        )
