"""``asgi-audit serve``, the web viewer, at the app level (Starlette's ViewerClient) and, for
the live tail and the command, through a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import html
import json
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from click.testing import CliRunner

from asgi_audit._types import ASGIApp
from asgi_audit.cli import main
from asgi_audit.cli.viewer import command
from asgi_audit.cli.viewer.app import create_app
from asgi_audit.cli.viewer.auth import local_target, without_token
from asgi_audit.cli.viewer.comparison import line_rows
from asgi_audit.cli.viewer.filters import PAGE_SIZE, Filters
from asgi_audit.cli.viewer.headers import CONTENT_SECURITY_POLICY
from asgi_audit.cli.viewer.live import LATE_NS, Follower
from asgi_audit.cli.viewer.pipe import Abandoned, ThreadPipe
from asgi_audit.errors import SinkError
from asgi_audit.recording.verification import summarize
from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.record import StoredRecord
from asgi_audit.sinks.sqlite.sink import SqliteSink
from factories import BASE_NS, SECOND_NS, Records, body
from processes import ROOT, environment
from session import BINARY, Session, record_session, serving

TOKEN = "viewer-test-token-0123456789abcdef"
SCRIPT_BODY = b'<script>alert("owned")</script><img src=x onerror=alert(2)>'
SECURITY = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class ViewerClient:
    """A synchronous client of an ASGI app, its lifespan run around the requests.

    What Starlette's ``TestClient`` does, on ``httpx.ASGITransport`` (the newest
    Starlette wants ``httpx2`` for its own): one event loop for the client's life, so the
    lifespan task, which waits for shutdown, lives across the requests."""

    def __init__(
        self,
        app: ASGIApp,
        base_url: str = "http://testserver",
        follow_redirects: bool = True,
    ) -> None:
        self.app = app
        self.runner = asyncio.Runner()
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url=base_url,
            follow_redirects=follow_redirects,
        )
        self.lifespan: asyncio.Task[None] | None = None
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()

    def __enter__(self) -> ViewerClient:
        self.runner.run(self._lifespan("startup"))
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.runner.run(self.http.aclose())
            self.runner.run(self._lifespan("shutdown"))
        finally:
            self.runner.close()

    async def _lifespan(self, phase: str) -> None:
        if self.lifespan is None:
            scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
            self.lifespan = asyncio.create_task(
                self.app(scope, self.inbox.get, self.outbox.put)  # type: ignore[arg-type]
            )
        await self.inbox.put({"type": f"lifespan.{phase}"})
        answer = await asyncio.wait_for(self.outbox.get(), 30)
        assert answer["type"] == f"lifespan.{phase}.complete", answer
        if phase == "shutdown":
            await asyncio.wait_for(self.lifespan, 30)

    @property
    def cookies(self) -> httpx.Cookies:
        return self.http.cookies

    def get(self, url: str, **options: Any) -> httpx.Response:
        return self.runner.run(self.http.get(url, **options))

    def post(self, url: str, **options: Any) -> httpx.Response:
        return self.runner.run(self.http.post(url, **options))


@dataclass
class Store:
    """A SQLite store of records of every kind the viewer shows, by name."""

    url: str
    records: dict[str, StoredRecord]


def chained(records: list[StoredRecord]) -> list[StoredRecord]:
    """``records`` as one stream's chain: seq 1, 2, ... each linked to the one before."""
    linked: list[StoredRecord] = []
    previous: str | None = None
    for seq, record in enumerate(records, 1):
        record = dataclasses.replace(
            record, stream="chained:1", seq=seq, chain=1, chain_prev=previous
        )
        linked.append(record)
        data = [
            b.data if b is not None else None for b in (record.request_body, record.response_body)
        ]
        previous = summarize(record.metadata(), data[0], data[1]).digest
    return linked


def build_store(directory: Path) -> Store:
    make = Records()
    named: dict[str, StoredRecord] = {}
    for n in range(3):
        named[f"order{n}"] = make()
    named["missing"] = make(status=404, method="GET", path="/orders/999", correlation_id="miss")
    named["binary"] = make(
        route="/uploads", path="/uploads", request_body=body(BINARY), request_size=len(BINARY)
    )
    named["script"] = make(
        route="/pages/{name}",
        path="/pages/<script>alert(1)</script>",
        query="q=%3Cscript%3E",
        response_headers=[("content-type", "text/html"), ("x-note", "<b>bold</b>")],
        response_body=body(SCRIPT_BODY),
        response_size=len(SCRIPT_BODY),
    )
    named["redacted"] = make(
        redacted_headers=["authorization"],
        redacted_query=["token"],
        request_body=body(b'{"password": "***"}', redacted=["$.password"]),
        response_body=body(b"[unparseable]", unparseable=True),
    )
    report = b'{"report": "' + b"figures " * 50 + b'"}'
    named["gzip"] = make(
        method="GET",
        path="/report",
        route="/report",
        response_headers=[("content-type", "application/json"), ("content-encoding", "gzip")],
        response_body=body(gzip.compress(report, mtime=0)),
    )
    named["truncated"] = make(
        request_body=body(b'{"lines": [1, 2', size=100_000, sha256="0" * 64, truncated=True)
    )
    text_a = b"line one\nline two\nline three\n"
    text_b = b"line one\nline 2\nline three\nline four\n"
    named["text_a"] = make(
        response_headers=[("content-type", "text/plain")], response_body=body(text_a)
    )
    named["text_b"] = make(
        response_headers=[("content-type", "text/plain")], response_body=body(text_b)
    )
    first, second, third = chained([make(), make(), make()])
    named["chain_first"], named["chain_second"] = first, second
    named["chain_third"] = dataclasses.replace(third, chain_prev="0" * 64)
    wrong = make()
    assert wrong.response_body is not None
    named["bad_digest"] = dataclasses.replace(
        wrong, response_body=dataclasses.replace(wrong.response_body, stored_sha256="f" * 64)
    )
    url = f"sqlite:///{directory / 'audit.db'}"
    with closing(open_sink(url)) as sink:
        sink.write_batch(list(named.values()))
    return Store(url, named)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return build_store(tmp_path)


@pytest.fixture
def client(store: Store) -> Iterator[ViewerClient]:
    """A logged-in client of a viewer of ``store``."""
    with ViewerClient(create_app(store.url, TOKEN), follow_redirects=False) as test_client:
        answer = test_client.get(f"/?token={TOKEN}")
        assert answer.status_code == 303
        yield test_client


@pytest.fixture
def anonymous(store: Store) -> Iterator[ViewerClient]:
    with ViewerClient(create_app(store.url, TOKEN), follow_redirects=False) as test_client:
        yield test_client


def listed_ids(page: str) -> list[str]:
    """The record ids a list page links to, in order."""
    return [unquote(found) for found in re.findall(r'href="/records/([^"]+)"', page)]


def text_of(page: str) -> str:
    """The page's text: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


# --- access ---------------------------------------------------------------------------------


def test_nothing_answers_without_the_token(anonymous: ViewerClient, store: Store) -> None:
    """Pages redirect to the login form (which comes back to them); downloads, the event
    stream and posts answer 401; neither a wrong cookie nor the token as a cookie opens."""
    some = store.records["order0"].id
    for path in ("/", f"/records/{some}", "/diff?a=x&b=y", "/tail", "/nowhere"):
        answer = anonymous.get(path)
        assert answer.status_code == 303, path
        location = urlsplit(answer.headers["location"])
        assert location.path == "/login" and parse_qs(location.query) == {"next": [path]}
    for path in (f"/raw/request/{some}", "/export.har", "/tail/events"):
        answer = anonymous.get(path)
        assert answer.status_code == 401, path
        assert some not in answer.text
    assert anonymous.post("/logout").status_code == 401
    for value in ("nonsense", TOKEN):
        answer = anonymous.get("/", headers={"cookie": f"asgi-audit-viewer-80={value}"})
        assert answer.status_code == 303
    assert anonymous.get("/login").status_code == 200
    assert anonymous.get("/static/viewer.css").status_code == 200


def test_a_token_in_the_url_logs_in_and_leaves_the_url(anonymous: ViewerClient) -> None:
    """``?token=`` sets an HttpOnly, SameSite=Strict cookie (not the token) and redirects
    to the same URL without it, other parameters kept exactly; a wrong one logs nobody in."""
    answer = anonymous.get(f"/?status=4xx&token={TOKEN}&route=%2Forders%2F%7Bid%7D")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/?status=4xx&route=%2Forders%2F%7Bid%7D"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("asgi-audit-viewer-80=")
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
    assert "secure" not in cookie.lower()
    assert TOKEN not in cookie
    assert anonymous.get("/").status_code == 200
    wrong = anonymous.get("/tail?token=wrong&since=2h")
    assert wrong.status_code == 303
    assert wrong.headers["location"] == "/login?next=%2Ftail%3Fsince%3D2h"
    assert "set-cookie" not in wrong.headers


def test_the_cookie_is_secure_over_https(store: Store) -> None:
    """A request that came over https gets a Secure cookie."""
    app = create_app(store.url, TOKEN)
    with ViewerClient(app, base_url="https://viewer.test", follow_redirects=False) as https:
        cookie = https.get(f"/?token={TOKEN}").headers["set-cookie"]
        assert "; secure" in cookie.lower()
        assert cookie.startswith("asgi-audit-viewer-443=")


def test_the_login_form(anonymous: ViewerClient, store: Store) -> None:
    """POST /login with the token logs in and goes to ``next`` when it is a local path;
    a wrong token is a 401 page; an oversized form is refused."""
    form = anonymous.get("/login?next=/tail")
    assert form.status_code == 200 and 'name="token"' in form.text and 'value="/tail"' in form.text
    wrong = anonymous.post("/login", data={"token": "nope", "next": "/tail"})
    assert wrong.status_code == 401 and "not this viewer&#39;s token" in wrong.text
    assert "set-cookie" not in wrong.headers
    target = f"/records/{store.records['order1'].id}"
    right = anonymous.post("/login", data={"token": TOKEN, "next": target})
    assert right.status_code == 303 and right.headers["location"] == target
    assert anonymous.get(target).status_code == 200
    elsewhere = anonymous.post("/login", data={"token": TOKEN, "next": "//evil.test/x"})
    assert elsewhere.headers["location"] == "/"
    huge = anonymous.post("/login", content=b"token=" + b"x" * 10_000)
    assert huge.status_code == 413


def test_logging_out_forgets_the_cookie(client: ViewerClient) -> None:
    """POST /logout clears the cookie: the next page asks to log in again."""
    answer = client.post("/logout")
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert client.get("/").status_code == 303


def test_only_local_paths_are_login_targets() -> None:
    """``next`` never leads to another site, however it is spelled."""
    for bad in ("//evil.test", "/\\evil.test", "/\t/evil.test", "https://evil.test", "", None):
        assert local_target(bad) == "/"
    assert local_target("/records/a?b=1") == "/records/a?b=1"


def test_the_token_is_taken_out_of_the_url_exactly() -> None:
    """Every ``token`` goes, encoded or not; the rest keeps its bytes."""
    scope = {"path": "/x", "raw_path": b"/x", "query_string": b"a=%C3%A9&tok%65n=1&token=2&b"}
    assert without_token(scope) == "/x?a=%C3%A9&b"
    assert without_token({"path": "/a b", "query_string": b"token=1"}) == "/a%20b"
    evil = {"path": "//evil.test/", "raw_path": b"//evil.test/", "query_string": b"token=1"}
    assert without_token(evil) == "/evil.test/"


def test_every_response_carries_the_security_headers(
    client: ViewerClient, anonymous: ViewerClient, store: Store
) -> None:
    """Pages, redirects, 401s, 404s, static files and downloads all carry the CSP and
    the other security headers."""
    record = store.records["order0"].id
    answers = [
        anonymous.get("/"),
        anonymous.get("/login"),
        anonymous.get("/export.har"),
        anonymous.get("/static/tail.js"),
        client.get("/"),
        client.get(f"/records/{record}"),
        client.get(f"/raw/request/{record}"),
        client.get("/records/no-such-record"),
        client.get("/nowhere"),
        client.get("/?status=bogus"),
    ]
    for answer in answers:
        for name, value in SECURITY.items():
            assert answer.headers.get(name) == value, (answer.url, name)
        assert answer.headers.get_list("cache-control") == ["no-store"]


# --- the list -------------------------------------------------------------------------------


def test_the_list_is_newest_first_and_takes_the_ls_filters(
    client: ViewerClient, store: Store
) -> None:
    """Every record, newest first; status, method, route, correlation id and time
    filters narrow it as ``ls`` does; a bad filter is a 400 that says why."""
    everything = sorted(store.records.values(), key=lambda r: (r.started_at_ns, r.id), reverse=True)
    assert listed_ids(client.get("/").text) == [r.id for r in everything]
    assert listed_ids(client.get("/?status=4xx").text) == [store.records["missing"].id]
    assert listed_ids(client.get("/?status=404").text) == [store.records["missing"].id]
    assert listed_ids(client.get("/?method=get&status=200-299").text) == [store.records["gzip"].id]
    assert listed_ids(client.get("/?route=%2Fuploads").text) == [store.records["binary"].id]
    assert listed_ids(client.get("/?correlation_id=miss").text) == [store.records["missing"].id]
    since = "2024-05-01T12:00:02Z"  # the fourth record on (one second apart)
    until = "2024-05-01T12:00:04Z"
    assert listed_ids(client.get(f"/?since={since}&until={until}").text) == [
        everything[-4].id,
        everything[-3].id,
    ]
    bad = client.get("/?status=6xx&route=%2Fkept")
    assert bad.status_code == 400
    assert "expected a status like" in text_of(bad.text)
    assert 'value="/kept"' in bad.text


def test_paging_walks_ties_without_losing_or_repeating(tmp_path: Path) -> None:
    """Older pages follow a cursor: with 130 records sharing one nanosecond among others,
    every record is shown once, in (time, id) order, newest first."""
    make = Records()
    records = [make(started_at_ns=BASE_NS + 5 * SECOND_NS) for _ in range(130)]
    records += [make(started_at_ns=BASE_NS + n * SECOND_NS) for n in range(40)]
    url = f"sqlite:///{tmp_path / 'ties.db'}"
    with closing(open_sink(url)) as sink:
        sink.write_batch(records)
    expected = [r.id for r in sorted(records, key=lambda r: (r.started_at_ns, r.id), reverse=True)]
    seen: list[str] = []
    with ViewerClient(create_app(url, TOKEN), follow_redirects=False) as viewer:
        viewer.get(f"/?token={TOKEN}")
        target: str | None = "/"
        for _ in range(10):
            if target is None:
                break
            page = viewer.get(target).text
            ids = listed_ids(page)
            assert len(ids) == PAGE_SIZE or len(seen) + len(ids) == len(records)
            seen += ids
            older = re.search(r'href="([^"]+)" rel="next"', page)
            target = html.unescape(older.group(1)) if older else None
        assert target is None
    assert seen == expected


def test_the_list_of_a_100k_store_answers_quickly(tmp_path: Path) -> None:
    """The list page of 100,000 records is one index range scan: well under 2 s here
    (``python -m bench.viewer`` holds it to 200 ms)."""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    make = Records()
    with closing(open_sink(url)) as sink:
        for _ in range(20):
            sink.write_batch([make(request_body=None, response_body=None) for _ in range(5000)])
    with ViewerClient(create_app(url, TOKEN), follow_redirects=False) as viewer:
        viewer.get(f"/?token={TOKEN}")
        viewer.get("/")  # warm: templates compiled
        started = time.perf_counter()
        answer = viewer.get("/")
        elapsed = time.perf_counter() - started
        newest = listed_ids(answer.text)
        older = re.search(r'href="([^"]+)" rel="next"', answer.text)
        assert older is not None
        started = time.perf_counter()
        next_page = viewer.get(html.unescape(older.group(1)))
        elapsed_older = time.perf_counter() - started
    assert answer.status_code == 200 and len(newest) == PAGE_SIZE
    assert len(set(newest) | set(listed_ids(next_page.text))) == 2 * PAGE_SIZE
    print(f"list page of 100k records: {elapsed * 1e3:.1f} ms, older: {elapsed_older * 1e3:.1f} ms")
    assert elapsed < 2.0 and elapsed_older < 2.0


# --- one exchange ---------------------------------------------------------------------------


def test_the_detail_page_shows_everything_a_record_says(client: ViewerClient, store: Store) -> None:
    """Metadata, both sides' headers, JSON indented, redactions, and the flags."""
    order = store.records["order0"]
    page = text_of(client.get(f"/records/{order.id}").text)
    for expected in (
        order.id,
        "POST",
        "/orders/0",
        "/orders/{order_id}",
        order.correlation_id,
        "orders:orders-7f9c:1714564000 #0",
        "content-type",
        "application/json",
        '{\n  "order": 0\n}',
        '"state": "created"',
        "headers: authorization",
    ):
        assert expected in page, expected
    redacted = store.records["redacted"]
    page = text_of(client.get(f"/records/{redacted.id}").text)
    assert "query parameters: token" in page
    assert "request body: $.password" in page
    assert "response body: had redaction rules but did not parse" in page
    truncated = text_of(client.get(f"/records/{store.records['truncated'].id}").text)
    assert "100,000 bytes" in truncated and "truncated: only the first bytes were kept" in truncated
    assert client.get("/records/no-such-id").status_code == 404


def test_binary_bodies_are_a_hex_dump_of_their_start(client: ViewerClient, store: Store) -> None:
    """A body that is not UTF-8 shows its first 4 KiB as hex, and says so."""
    page = text_of(client.get(f"/records/{store.records['binary'].id}").text)
    assert "00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  ................" in page
    assert "00000ff0  f0 f1" in page and "00001000" not in page
    assert f"the first 4,096 of {len(BINARY):,} bytes as hex" in page


def test_a_gzip_body_is_shown_decoded(client: ViewerClient, store: Store) -> None:
    """``Content-Encoding: gzip`` is undone for the eye, and the page says so."""
    page = text_of(client.get(f"/records/{store.records['gzip'].id}").text)
    assert "shown decoded from gzip" in page and '"report": "figures figures' in page


def test_markup_in_a_record_is_text(client: ViewerClient, store: Store) -> None:
    """A path, header or body holding ``<script>`` is shown as text: escaped, never markup;
    the detail page has no script at all."""
    record = store.records["script"]
    page = client.get(f"/records/{record.id}").text
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in page
    assert "/pages/&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    listing = client.get("/").text
    assert "<script" not in listing and "/pages/&lt;script&gt;" in listing


def test_control_characters_are_made_visible(client: ViewerClient, tmp_path: Path) -> None:
    """Bidi overrides and escapes in a record show as ``\\u202e`` and ``\\x1b``."""
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    odd = Records()(path="/gpj\u202e.exe", response_body=body(b"text \x1b[2J end"))
    with closing(open_sink(url)) as sink:
        sink.write_batch([odd])
    with ViewerClient(create_app(url, TOKEN)) as viewer:
        viewer.get(f"/?token={TOKEN}")
        page = viewer.get(f"/records/{odd.id}").text
    assert "\u202e" not in page and "\x1b" not in page
    assert "/gpj\\u202e.exe" in page and "text \\x1b[2J end" in page


def test_integrity_checks_the_chain_link_and_the_digests(
    client: ViewerClient, store: Store
) -> None:
    """The next record's link is compared with the recomputed digest: intact, broken, or
    not checked when the next is not there; stored bytes against their digests."""

    def checks(name: str) -> str:
        return text_of(client.get(f"/records/{store.records[name].id}").text)

    assert "ok chain: record #2 links to this record's digest" in checks("chain_first")
    assert "bad chain: record #3 links to another digest" in checks("chain_second")
    assert "not checked (next record not found)" in checks("chain_third")
    assert "not chained (written before hash chains)" in checks("order0")
    assert "unknown response body: no digest of the stored bytes recorded" in checks("order0")
    assert "ok response body: stored bytes match the digest as received" in checks("order0")
    assert "bad response body: stored bytes do NOT match their recorded digest" in checks(
        "bad_digest"
    )


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return record_session(tmp_path_factory.mktemp("session"))


def test_a_recorded_trail_checks_out(session: Session) -> None:
    """Records written by the real pipeline: each body matches its digest, and each
    record but the last is vouched for by the next one's link."""
    with closing(open_sink(session.sink)) as sink:
        records = sorted(sink.search(Query(limit=None)), key=lambda r: r.seq)
    with ViewerClient(create_app(session.sink, TOKEN)) as viewer:
        viewer.get(f"/?token={TOKEN}")
        pages = [text_of(viewer.get(f"/records/{r.id}").text) for r in records]
    assert len(pages) == 6
    for page in pages[:-1]:
        assert "ok chain: record #" in page
        assert "bad chain" not in page and "do NOT match" not in page
    assert "not checked (next record not found)" in pages[-1]
    assert any("ok request body: stored bytes match their recorded digest" in p for p in pages)


# --- downloads ------------------------------------------------------------------------------


def test_raw_downloads_are_the_exact_stored_bytes(client: ViewerClient, store: Store) -> None:
    """Each body downloads as an octet-stream attachment, byte for byte."""
    for name, side in (("binary", "request"), ("script", "response"), ("gzip", "response")):
        record = store.records[name]
        stored = record.request_body if side == "request" else record.response_body
        assert stored is not None
        answer = client.get(f"/raw/{side}/{record.id}")
        assert answer.status_code == 200
        assert answer.content == stored.data
        assert answer.headers["content-type"] == "application/octet-stream"
        assert (
            answer.headers["content-disposition"]
            == f'attachment; filename="{record.id}-{side}.bin"'
        )
    assert client.get(f"/raw/body/{store.records['binary'].id}").status_code == 404
    assert client.get("/raw/request/no-such-id").status_code == 404


def test_har_download_of_the_selection(client: ViewerClient, store: Store) -> None:
    """The HAR of the list's filters parses, holds those records and their bytes."""
    answer = client.get("/export.har?status=4xx")
    assert answer.status_code == 200
    assert answer.headers["content-disposition"] == 'attachment; filename="asgi-audit.har"'
    entries = json.loads(answer.content)["log"]["entries"]
    assert [entry["_id"] for entry in entries] == [store.records["missing"].id]
    everything = json.loads(client.get("/export.har").content)["log"]["entries"]
    assert len(everything) == len(store.records)
    binary = next(e for e in everything if e["_id"] == store.records["binary"].id)
    assert binary["request"]["postData"]["_encoding"] == "base64"
    assert client.get("/export.har?since=never").status_code == 400


def test_har_download_is_bounded(store: Store) -> None:
    """At most ``har_limit`` records, the newest."""
    with ViewerClient(create_app(store.url, TOKEN, har_limit=2)) as viewer:
        viewer.get(f"/?token={TOKEN}")
        entries = json.loads(viewer.get("/export.har").content)["log"]["entries"]
    newest = sorted(store.records.values(), key=lambda r: r.started_at_ns)[-2:]
    assert sorted(entry["_id"] for entry in entries) == sorted(r.id for r in newest)


def test_the_pipe_stops_a_writer_whose_reader_left() -> None:
    """Once the reader abandons it, the writer's next write raises; a writer's error
    reaches the reader after the bytes written before it."""
    pipe = ThreadPipe(depth=2)
    pipe.write(b"a")
    pipe.write(b"b")
    pipe.abandon()
    with pytest.raises(Abandoned):
        pipe.write(b"c")
    failing = ThreadPipe()
    failing.write(b"head")
    failing.finish(SinkError("gone"))
    assert failing.take(0.1) == b"head"
    with pytest.raises(SinkError):
        failing.take(0.1)
    assert failing.take(0.1) is None
    assert ThreadPipe().take(0.01) == b""


# --- diff -----------------------------------------------------------------------------------


def test_the_diff_of_two_records(client: ViewerClient, store: Store) -> None:
    """The list's form (``?id=A&id=B``) leads to ``/diff?a=A&b=B``: metadata, headers and
    JSON bodies compared, with the differing rows marked."""
    a, b = store.records["order0"], store.records["missing"]
    redirect = client.get(f"/diff?id={a.id}&id={b.id}")
    assert redirect.status_code == 303
    assert redirect.headers["location"] == f"/diff?a={a.id}&b={b.id}"
    page = client.get(redirect.headers["location"]).text
    text = text_of(page)
    assert re.search(r'<tr class="differs"><th>status</th><td>201</td><td>404</td>', page)
    assert re.search(r'<tr class=""><th>host</th>', page)
    assert "$.order (changed)" in text and "$.id (changed)" in text
    assert client.get(f"/diff?id={a.id}").status_code == 400
    assert client.get(f"/diff?a={a.id}&b=no-such").status_code == 404


def test_text_bodies_diff_line_by_line(client: ViewerClient, store: Store) -> None:
    """Non-JSON text is compared line by line, in two columns, escaped."""
    a, b = store.records["text_a"], store.records["text_b"]
    page = client.get(f"/diff?a={a.id}&b={b.id}").text
    assert re.search(
        r'<tr class="replace">\s*<td class="number">2</td>\s*<td class="pre ">line two</td>', page
    )
    assert "line four" in page
    script = store.records["script"]
    escaped = client.get(f"/diff?a={a.id}&b={script.id}").text
    assert "<script" not in escaped and "&lt;script&gt;" in escaped


def test_line_rows_keep_context_and_mark_skips() -> None:
    """Equal runs beyond the context become one skip row."""
    left = [f"line {n}" for n in range(20)]
    right = [*left[:10], "changed", *left[11:]]
    rows = line_rows(left, right)
    assert [row.tag for row in rows] == ["skip"] + ["equal"] * 3 + ["replace"] + ["equal"] * 3 + [
        "skip"
    ]
    assert (rows[4].left, rows[4].right, rows[4].left_number) == ("line 10", "changed", 11)


# --- live tail ------------------------------------------------------------------------------


def test_the_tail_page_loads_its_script(client: ViewerClient) -> None:
    """The tail page is the filters, a table and the vendored script: no inline code."""
    page = client.get("/tail?status=5xx").text
    assert '<script src="/static/tail.js" defer></script>' in page
    assert 'data-events="/tail/events?status=5xx"' in page
    script = client.get("/static/tail.js").text
    assert "textContent" in script
    assert (
        re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write|eval\(", script)
        is None
    )


@pytest.mark.server
def test_the_event_stream_sends_new_records(store: Store) -> None:
    """A record stored once the stream is ready arrives as an event; those already there
    do not."""
    app = create_app(store.url, TOKEN, poll_seconds=0.05, tail_seconds=30)
    fresh = Records()(started_at_ns=BASE_NS + 3600 * SECOND_NS, path="/orders/new")
    with (
        serving(app) as base,
        httpx.Client(base_url=base, timeout=10, follow_redirects=True) as http,
    ):
        assert http.get(f"/?token={TOKEN}").status_code == 200
        with http.stream("GET", "/tail/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            lines = events.iter_lines()
            opening = [next(lines) for _ in range(4)]
            assert opening == ["retry: 2000", "", "event: ready", "data: {}"]
            with closing(open_sink(store.url)) as writer:
                writer.write_batch([fresh])
            received: list[dict[str, Any]] = []
            deadline = time.monotonic() + 10
            for line in lines:
                if line.startswith("data: "):
                    received.append(json.loads(line[6:]))
                if received or time.monotonic() > deadline:
                    break
    assert [event["id"] for event in received] == [fresh.id]
    assert received[0]["href"] == f"/records/{fresh.id}" and received[0]["path"] == "/orders/new"


def test_the_follower_resumes_and_forgets(store: Store) -> None:
    """Resuming from a Last-Event-ID sends what started since; ids older than the
    lateness window are forgotten."""
    with closing(open_sink(store.url)) as sink:
        newest = max(store.records.values(), key=lambda r: r.started_at_ns)
        follower = Follower(sink, Filters())
        assert follower.start(None) == [] and follower.poll() == []
        resumed = Follower(sink, Filters()).start(newest.started_at_ns)
        assert [r.id for r in resumed] == [newest.id]
        late = Records()(started_at_ns=newest.started_at_ns + LATE_NS + SECOND_NS)
        sink.write_batch([late])
        assert [r.id for r in follower.poll()] == [late.id]
        assert set(follower.seen) == {late.id}


# --- failures and the command ---------------------------------------------------------------


def test_a_failing_sink_is_a_503_with_its_url_masked(
    client: ViewerClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink error is a page that names the sink with its secrets masked."""

    def fail(self: SqliteSink, record_id: str) -> None:
        raise SinkError("cannot reach postgresql://u:hunter2@db/x")

    monkeypatch.setattr(SqliteSink, "get", fail)
    answer = client.get(f"/records/{store.records['order0'].id}")
    assert answer.status_code == 503
    assert "hunter2" not in answer.text and "postgresql://u:***@db/x" in answer.text


def test_the_sink_url_is_shown_masked() -> None:
    """The page header names the sink without its password or secret parameters."""
    url = "memory://u:hunter2@viewer-masked?password=hunter2"
    with ViewerClient(create_app(url, TOKEN)) as viewer:
        page = viewer.get(f"/?token={TOKEN}").text
    assert "hunter2" not in page and "memory://u:***@viewer-masked?password=***" in page


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_serve_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing sink, an empty token variable and a missing dependency are each one line."""
    assert command.serve is main.commands["serve"]
    here = ("--host", "127.0.0.1", "--port", "0")
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    code, output = run_cli("serve", *here, "--sink", f"{missing}?password=hunter2")
    assert code == 1 and len(output.splitlines()) == 1 and "hunter2" not in output
    code, output = run_cli("serve", *here, "--sink", missing)
    assert code == 1 and output.startswith("Error: ") and "no sink at" in output
    monkeypatch.setenv(command.TOKEN_VARIABLE, " ")
    code, output = run_cli("serve", *here, "--sink", "memory://x")
    assert code == 1 and "ASGI_AUDIT_VIEWER_TOKEN is set but empty" in output
    monkeypatch.setitem(sys.modules, "jinja2", None)
    code, output = run_cli("serve", *here, "--sink", "memory://x")
    assert code == 1 and len(output.splitlines()) == 1
    assert "pip install 'asgi-audit[viewer]'" in output


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of the process's output, waiting at most ``timeout`` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError("no output in time")
    return process.stdout.readline().decode()


@pytest.mark.server
@pytest.mark.parametrize("from_environment", [False, True])
def test_serve_prints_the_url_to_open(from_environment: bool) -> None:
    """``serve`` prints the sink masked and the URL; with a made token the URL holds it
    (and opens the viewer), with ``ASGI_AUDIT_VIEWER_TOKEN`` it does not."""
    env = environment()
    if from_environment:
        env[command.TOKEN_VARIABLE] = TOKEN
    code = "import asgi_audit.cli.viewer.command; from asgi_audit.cli import main; main()"
    url = "memory://u:hunter2@served?password=hunter2"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--sink", url, "--port", "0"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        bufsize=0,  # unbuffered: each readline takes one line, and select sees the rest
    )
    try:
        first = read_line(process, 30)
        second = read_line(process, 30)
        assert first.strip() == "asgi-audit viewer of memory://u:***@served?password=***"
        match = re.fullmatch(r"open (http://127\.0\.0\.1:\d+/)(\?token=(\S+))?( \(.*\))?\n", second)
        assert match, second
        base, token = match.group(1), match.group(3)
        if from_environment:
            assert token is None and "ASGI_AUDIT_VIEWER_TOKEN" in second
            token = TOKEN
        else:
            assert token is not None and len(token) >= 40
        with httpx.Client(timeout=10) as http:
            assert http.get(base).status_code == 303
            opened = http.get(f"{base}?token={token}", follow_redirects=True)
            assert opened.status_code == 200 and "Records" in opened.text
    finally:
        process.terminate()
        process.wait(30)
        assert process.stdout is not None
        rest = process.stdout.read().decode()
        process.stdout.close()
    assert "hunter2" not in rest and (token is None or token not in rest)
