"""HAR 1.2 export: stored exchanges as a browser's devtools, proxies and HAR viewers read them.

HAR (http://www.softwareishard.com/blog/har-12-spec/) is the common format of recorded
HTTP traffic: a browser's network panel imports it, and so do proxies and load tools. The
log always has ``pages: []``: Firefox's importer fails without it.

What HAR cannot say is said in fields starting with ``_``, which HAR reserves for
extensions (importers ignore them):

* Bodies. ``content.text`` is the response body (UTF-8 text, else base64 with
  ``"encoding": "base64"``). A ``gzip`` or ``deflate`` body is given decoded, as HAR wants
  it (``compression`` is the bytes saved), and the exact stored bytes are kept beside it
  in ``_wire`` (``{"encoding": "base64", "text": ...}``). ``postData`` has no encoding
  field in HAR 1.2: a request body that is not UTF-8 is written in base64 with
  ``"_encoding": "base64"``.
* The audit facts: ``_size`` (the body's true size), ``_sha256`` (its digest as received),
  ``_truncated`` (only a prefix was stored), ``_redacted`` (the JSON paths or form fields
  redaction replaced); on the entry, ``_id``, ``_route``, ``_correlationId``, ``_outcome``.

So every stored byte can be recovered from the file: ``_wire`` when present, else
``text`` decoded as its encoding says.

Timings come from the record: ``wait`` from the exchange's start to the response's first
byte (reading the request body included), ``receive`` from there to the end; what the
server does not see (DNS, connect, send) is ``-1`` or 0.

The document is written entry by entry, never held whole: a HAR of many 1 MB exchanges
costs one entry's memory.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, quote

from .._version import __version__
from ..recording.redact_body import decode_content
from ..sinks.record import HeaderList, StoredBody, StoredRecord
from .exports import iso, printable_json_bytes

MAX_DECODED = 64 << 20
"""A compressed body is given decoded only up to this size; past it, as stored (base64)."""
PATH_SAFE = "/:@!$&'()*+,;=-._~"
"""What the URL keeps unescaped in a path: records hold the decoded path."""


def write_har(records: Iterable[StoredRecord], out: BinaryIO) -> int:
    """Write a HAR 1.2 document of ``records`` (with their bodies) to ``out``; returns how
    many entries were written."""
    creator = {"name": "asgi-audit", "version": __version__}
    out.write(b'{"log":{"version":"1.2","creator":' + printable_json_bytes(creator))
    out.write(b',"pages":[],"entries":[')
    written = 0
    for record in records:
        if written:
            out.write(b",\n")
        out.write(printable_json_bytes(har_entry(record)))
        written += 1
    out.write(b"]}}\n")
    return written


def har_entry(record: StoredRecord) -> dict[str, Any]:
    """One record as a HAR 1.2 entry (see the module docstring for the ``_`` fields)."""
    wait_ns = record.duration_ns
    if record.response_started_at_ns is not None:
        wait_ns = max(
            0, min(record.duration_ns, record.response_started_at_ns - record.started_at_ns)
        )
    wait = wait_ns / 1e6
    receive = max(0, record.duration_ns - wait_ns) / 1e6
    version = f"HTTP/{record.http_version}"
    entry: dict[str, Any] = {
        "startedDateTime": iso(record.started_at_ns),
        "time": wait + receive,
        "request": _request(record, version),
        "response": _response(record, version),
        "cache": {},
        "timings": {
            "blocked": -1,
            "dns": -1,
            "connect": -1,
            "send": 0,
            "wait": wait,
            "receive": receive,
            "ssl": -1,
        },
        "_id": record.id,
        "_route": record.route,
        "_correlationId": record.correlation_id,
        "_outcome": record.outcome,
    }
    if record.error:
        entry["comment"] = record.error
    return entry


def record_url(record: StoredRecord) -> str:
    """The exchange's URL: scheme, host, the path percent-encoded again, the raw query."""
    url = f"{record.scheme}://{record.host}{quote(record.path, safe=PATH_SAFE)}"
    return f"{url}?{record.query}" if record.query else url


def header_value(headers: HeaderList, name: str) -> str | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _request(record: StoredRecord, version: str) -> dict[str, Any]:
    headers = record.request_headers
    request: dict[str, Any] = {
        "method": record.method,
        "url": record_url(record),
        "httpVersion": version,
        "cookies": [] if "cookie" in record.redacted_headers else _cookies(headers),
        "headers": [{"name": name, "value": value} for name, value in headers],
        "queryString": [
            {"name": name, "value": value}
            for name, value in parse_qsl(record.query, keep_blank_values=True)
        ],
        "headersSize": -1,
        "bodySize": record.request_size,
    }
    body = record.request_body
    if body is not None and (body.size or body.data):
        post: dict[str, Any] = {"mimeType": header_value(headers, "content-type") or ""}
        if body.data is not None:
            try:
                post["text"] = body.data.decode("utf-8")
            except UnicodeDecodeError:
                post["text"] = base64.b64encode(body.data).decode("ascii")
                post["_encoding"] = "base64"
        post.update(_audit_facts(body))
        request["postData"] = post
    return request


def _response(record: StoredRecord, version: str) -> dict[str, Any]:
    headers = record.response_headers
    status = record.status or 0
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    content: dict[str, Any] = {
        "size": record.response_size,
        "mimeType": header_value(headers, "content-type") or "",
    }
    body = record.response_body
    if body is not None:
        if body.data is not None:
            content.update(
                _content(body.data, body.truncated, header_value(headers, "content-encoding"))
            )
        content.update(_audit_facts(body))
    else:
        content["comment"] = "body not kept at this record's level"
    location = header_value(headers, "location") or ""
    return {
        "status": status,
        "statusText": reason,
        "httpVersion": version,
        "cookies": [] if "set-cookie" in record.redacted_headers else _set_cookies(headers),
        "headers": [{"name": name, "value": value} for name, value in headers],
        "content": content,
        "redirectURL": location,
        "headersSize": -1,
        "bodySize": record.response_size,
    }


def _content(data: bytes, truncated: bool, coding: str | None) -> dict[str, Any]:
    """``content``'s text: decoded when HTTP-compressed (and whole: the size is then the
    decoded one), the exact bytes then kept in ``_wire``."""
    decoded = None if truncated else decode_content(data, coding, MAX_DECODED)
    shown = data if decoded is None else decoded
    content: dict[str, Any] = {} if decoded is None else {"size": len(decoded)}
    try:
        content["text"] = shown.decode("utf-8")
    except UnicodeDecodeError:
        content["text"] = base64.b64encode(shown).decode("ascii")
        content["encoding"] = "base64"
    if decoded is not None:
        content["compression"] = len(decoded) - len(data)
        content["_wire"] = {"encoding": "base64", "text": base64.b64encode(data).decode("ascii")}
    return content


def decoded_body(data: bytes, coding: str | None) -> bytes:
    """``data`` with its ``Content-Encoding`` (gzip, deflate) undone, or as it is when
    there is none, another one, or it does not decode."""
    decoded = decode_content(data, coding, MAX_DECODED)
    return data if decoded is None else decoded


def _audit_facts(body: StoredBody) -> dict[str, Any]:
    facts: dict[str, Any] = {"_size": body.size, "_sha256": body.sha256}
    if body.truncated:
        facts["_truncated"] = True
    if not body.complete:
        facts["_incomplete"] = True
    if body.redacted:
        facts["_redacted"] = list(body.redacted)
    if body.unparseable:
        facts["_unparseable"] = True
    return facts


def _cookies(headers: HeaderList) -> list[dict[str, str]]:
    cookies = []
    for name, value in headers:
        if name.lower() != "cookie":
            continue
        for pair in value.split(";"):
            key, _, val = pair.strip().partition("=")
            if key:
                cookies.append({"name": key, "value": val})
    return cookies


def _set_cookies(headers: HeaderList) -> list[dict[str, Any]]:
    cookies = []
    for name, value in headers:
        if name.lower() != "set-cookie":
            continue
        first, *attributes = value.split(";")
        key, _, val = first.strip().partition("=")
        if not key:
            continue
        cookie: dict[str, Any] = {"name": key, "value": val}
        for attribute in attributes:
            attr, _, setting = attribute.strip().partition("=")
            attr = attr.lower()
            if attr in ("path", "domain", "expires"):
                cookie[attr] = setting
            elif attr == "httponly":
                cookie["httpOnly"] = True
            elif attr == "secure":
                cookie["secure"] = True
        cookies.append(cookie)
    return cookies
