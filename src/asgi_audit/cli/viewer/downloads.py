"""Downloads: one body's exact stored bytes, and a HAR file of the list's selection.

Both are attachments (``Content-Disposition: attachment``): the browser saves them and
never renders them, whatever they hold; the raw body is ``application/octet-stream``
(with ``nosniff``, see :mod:`.headers`), byte for byte what the sink stores. The HAR file
is :func:`~asgi_audit.cli.har.write_har` of the newest :attr:`Viewer.har_limit` records the
filters select, streamed as it is written (:mod:`.pipe`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator
from typing import BinaryIO, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from ...sinks import Query, Sink
from ..har import write_har
from .filters import FilterError, parse_filters
from .pipe import Abandoned, ThreadPipe
from .state import Viewer

SIDES = ("request", "response")
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._-]")


def attachment(filename: str) -> dict[str, str]:
    return {"content-disposition": f'attachment; filename="{filename}"'}


def file_name(record_id: str, side: str) -> str:
    """``<id>-request.bin``, the id reduced to characters safe in any file system."""
    return f"{_UNSAFE_IN_NAME.sub('_', record_id)[:80]}-{side}.bin"


class Downloads:
    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer

    async def raw(self, request: Request) -> Response:
        """``/raw/request/ID``, ``/raw/response/ID``: the stored bytes exactly."""
        side = request.path_params["side"]
        record_id = request.path_params["record_id"]
        if side not in SIDES:
            return PlainTextResponse("404 the body is /raw/request/ID or /raw/response/ID\n", 404)
        record = await run_in_threadpool(self.viewer.sink.get, record_id)
        if record is None:
            return PlainTextResponse("404 no such record\n", 404)
        body = record.request_body if side == "request" else record.response_body
        if body is None or body.data is None:
            return PlainTextResponse(f"404 the record has no stored {side} body\n", 404)
        return Response(
            body.data,
            media_type="application/octet-stream",
            headers=attachment(file_name(record_id, side)),
        )

    async def har(self, request: Request) -> Response:
        """``/export.har?<filters>``: HAR 1.2 of the newest records the filters select."""
        try:
            filters = parse_filters(request.query_params)
        except FilterError as exc:
            return PlainTextResponse(f"400 {exc}\n", 400)
        query = filters.query(limit=self.viewer.har_limit, with_bodies=True)
        return StreamingResponse(
            har_chunks(self.viewer.sink, query),
            media_type="application/json",
            headers=attachment("asgi-audit.har"),
        )


async def har_chunks(sink: Sink, query: Query) -> AsyncIterator[bytes]:
    """The HAR document of ``query``'s records, written by a thread as it reads them."""
    pipe = ThreadPipe()

    def produce() -> None:
        try:
            write_har(sink.search(query), cast(BinaryIO, pipe))
        except Abandoned:
            return
        except BaseException as exc:  # handed to the response, which raises it
            pipe.finish(exc)
            return
        pipe.finish()

    threading.Thread(target=produce, name="asgi-audit-viewer-har", daemon=True).start()
    try:
        while True:
            chunk = await run_in_threadpool(pipe.take)
            if chunk is None:
                return
            if chunk:
                yield chunk
    finally:
        pipe.abandon()
