"""The viewer in a real browser: Debian's Chromium driven by Playwright, against the viewer
under uvicorn on 127.0.0.1, as someone would use it: the token, the filters, a 1 MB
record and its raw body, the HAR download, the diff, markup shown as text, the live tail.

Playwright's own browser download is not used: Chromium comes from the system
(``scripts/install-chromium``). Without it, or without Playwright, these tests are skipped,
and fail when ``CI=true``. With ``ASGI_AUDIT_SCREENSHOTS=DIR`` they also save the README's
screenshots there (``viewer-list.png``, ``viewer-detail.png``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from asgi_audit.cli.viewer.app import create_app
from asgi_audit.recording.verification import summarize
from asgi_audit.sinks import open_sink
from asgi_audit.sinks.record import StoredBody, StoredRecord
from factories import BASE_NS, SECOND_NS, Records, body
from session import serving

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page

pytestmark = [pytest.mark.browser, pytest.mark.server]

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-test-token-0123456789abcdef"
SCREENSHOTS = os.environ.get("ASGI_AUDIT_SCREENSHOTS")
"""Read at import: the tests run with the ASGI_AUDIT_* variables cleared (conftest)."""
BIG_BODY = (
    b'{"lines": ['
    + b",".join(b'{"sku": "A-%06d", "quantity": 1}' % n for n in range(30_000))
    + b"]}"
)
SCRIPT_BODY = b'<h1>Hi</h1><script>alert("owned")</script><img src=x onerror="alert(2)">'
TIMEOUT_MS = 15_000

ENDPOINTS = [
    ("POST", "/orders/{order_id}", "/orders/{n}", 201),
    ("GET", "/orders/{order_id}", "/orders/{n}", 200),
    ("GET", "/users/{user_id}", "/users/{n}", 200),
    ("DELETE", "/orders/{order_id}", "/orders/{n}", 204),
    ("GET", "/orders/{order_id}", "/orders/{n}", 404),
    ("POST", "/payments", "/payments", 422),
    ("GET", "/users/{user_id}", "/users/{n}", 200),
    ("POST", "/payments", "/payments", 201),
    ("POST", "/payments", "/payments", 500),
]


@dataclass
class Viewed:
    """The viewer under test: its URL, its store, and the records in it by name."""

    base: str
    sink: str
    records: dict[str, StoredRecord] = field(default_factory=dict)
    trail: list[StoredRecord] = field(default_factory=list)

    def matching(self, route: str, low: int, high: int) -> list[StoredRecord]:
        return [
            r
            for r in self.trail
            if r.route == route and r.status is not None and low <= r.status <= high
        ]


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail when CI=true (where the browser must be there)."""
    hint = "install Chromium with scripts/install-chromium and Playwright with pip"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; {hint}", pytrace=False)
    pytest.skip(f"{reason}; {hint}")


def kept(data: bytes) -> StoredBody:
    """A body as the writer keeps it: with the digest of its stored bytes."""
    return body(data, stored_sha256=hashlib.sha256(data).hexdigest())


def chained(records: list[StoredRecord]) -> list[StoredRecord]:
    """``records`` as one stream's hash chain, as the writer links them."""
    linked: list[StoredRecord] = []
    previous: str | None = None
    for seq, record in enumerate(records, 1):
        record = dataclasses.replace(record, seq=seq, chain=1, chain_prev=previous)
        linked.append(record)
        request, response = record.request_body, record.response_body
        previous = summarize(
            record.metadata(),
            None if request is None else request.data,
            None if response is None else response.data,
        ).digest
    return linked


def build_trail() -> tuple[list[StoredRecord], dict[str, StoredRecord]]:
    make = Records()
    trail: list[StoredRecord] = []
    for n in range(36):
        method, route, path, status = ENDPOINTS[n % len(ENDPOINTS)]
        answer = (
            {"id": n, "state": "created" if n % 2 else "paid", "total": 12.5 + n}
            if status < 300
            else {"error": "not found" if status == 404 else "rejected", "code": status}
        )
        sent = {"order": n, "lines": [{"sku": f"A-{n}", "quantity": 1 + n % 3}]}
        request = json.dumps(sent).encode() if method == "POST" else b""
        response = json.dumps(answer).encode() if status != 204 else b""
        trail.append(
            make(
                method=method,
                route=route,
                path=path.format(n=1000 + n),
                query="" if n % 4 else "expand=lines",
                status=status,
                correlation_id=f"req-{n:04x}",
                duration_ns=(3 + (n * 37) % 180) * 1_000_000,
                request_body=kept(request),
                request_size=len(request),
                response_body=kept(response),
                response_size=len(response),
            )
        )
    trail.append(
        make(
            route="/imports",
            path="/imports",
            query="",
            request_body=kept(BIG_BODY),
            request_size=len(BIG_BODY),
        )
    )
    trail.append(
        make(
            method="GET",
            route="/pages/{name}",
            path="/pages/<script>alert(1)</script>",
            query="",
            request_body=kept(b""),
            request_size=0,
            response_headers=[("content-type", "text/html; charset=utf-8")],
            response_body=kept(SCRIPT_BODY),
            response_size=len(SCRIPT_BODY),
        )
    )
    trail = chained(trail)
    return trail, {"big": trail[-2], "script": trail[-1]}


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewed]:
    directory = tmp_path_factory.mktemp("browser")
    url = f"sqlite:///{directory / 'audit.db'}"
    trail, named = build_trail()
    with closing(open_sink(url)) as sink:
        sink.write_batch(trail)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)  # the header (and the screenshots) show a short URL
        app = create_app("sqlite:///audit.db", TOKEN, poll_seconds=0.2, tail_seconds=60)
    with serving(app) as base:
        yield Viewed(base, url, named, trail)


@pytest.fixture(scope="module")
def browser(viewer: Viewed) -> Iterator[Browser]:
    """Chromium, started after the viewer so that it is closed first (its event streams
    end before the server stops)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        unavailable(f"Playwright is not installed ({exc})")
    if not CHROMIUM.exists():
        unavailable(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), timeout=60_000)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (no cookie) with one page; fails the test if the page
    broke its Content Security Policy (an inline script or style)."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1360, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    refused: list[str] = []

    def watch(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            refused.append(message.text)

    tab.on("console", watch)
    try:
        yield tab
    finally:
        context.close()
    assert not refused, refused


def logged_in(page: Page, viewer: Viewed, path: str = "/") -> None:
    separator = "&" if "?" in path else "?"
    page.goto(f"{viewer.base}{path}{separator}token={TOKEN}")
    assert page.url == f"{viewer.base}{path}", "the token stays in the address bar"


def screenshot(page: Page, name: str) -> None:
    """The README's screenshot, when ASGI_AUDIT_SCREENSHOTS names a directory."""
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name))


def listed_ids(page: Page) -> list[str]:
    ids: list[str] = page.locator("table.records tbody input[type=checkbox]").evaluate_all(
        "boxes => boxes.map(box => box.value)"
    )
    return ids


def test_nothing_without_the_token(page: Page, viewer: Viewed) -> None:
    """The viewer's pages lead to the login form, a wrong token too; a download is a 401."""
    page.goto(viewer.base + "/")
    assert page.url.startswith(viewer.base + "/login?next=")
    assert page.locator("input#token").is_visible()
    assert page.locator("table.records").count() == 0
    page.goto(f"{viewer.base}/records/{viewer.records['big'].id}?token=wrong")
    assert page.url.startswith(viewer.base + "/login?next=")
    download = page.request.get(f"{viewer.base}/raw/request/{viewer.records['big'].id}")
    assert download.status == 401 and b"A-000001" not in download.body()


def test_log_in_and_filter_by_route_and_status(page: Page, viewer: Viewed) -> None:
    """The login form takes the token and comes back; the filters narrow the list by
    route and status; the cookie is HttpOnly and SameSite=Strict."""
    page.goto(viewer.base + "/")
    page.fill("input#token", TOKEN)
    page.click("button:text('Log in')")
    page.wait_for_url(viewer.base + "/")
    newest_first = sorted(viewer.trail, key=lambda r: (r.started_at_ns, r.id), reverse=True)
    assert listed_ids(page) == [r.id for r in newest_first]
    screenshot(page, "viewer-list.png")
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN
    page.fill("input[name=route]", "/orders/{order_id}")
    page.fill("input[name=status]", "4xx")
    page.click("button:text('Filter')")
    page.wait_for_url("**/?*status=4xx*")
    expected = viewer.matching("/orders/{order_id}", 400, 499)
    assert expected and listed_ids(page) == [r.id for r in reversed(expected)]
    assert all(text == "404" for text in page.locator("table.records .status").all_inner_texts())


def test_a_1mb_record_and_its_raw_body(page: Page, viewer: Viewed) -> None:
    """A 1 MB JSON request opens (indented) and its raw download is the stored bytes."""
    big = viewer.records["big"]
    logged_in(page, viewer, "/?route=/imports")
    page.click(f"a[href='/records/{big.id}']")
    page.wait_for_url(f"**/records/{big.id}")
    shown = page.locator("pre.body[data-side=request]").inner_text()
    assert shown.startswith('{\n  "lines": [\n    {\n      "sku": "A-000000"')
    assert f"{len(BIG_BODY):,} bytes" in page.locator("section.side .facts").first.inner_text()
    with page.expect_download() as info:
        page.click("text=Download request body")
    download = info.value
    assert download.suggested_filename == f"{big.id}-request.bin"
    assert Path(download.path()).read_bytes() == BIG_BODY


def test_detail_page_of_an_order(page: Page, viewer: Viewed) -> None:
    """A usual exchange in detail: metadata, integrity, headers, both bodies indented."""
    order = viewer.trail[0]
    logged_in(page, viewer, f"/records/{order.id}")
    assert page.locator("h1.exchange").inner_text().split() == [
        "POST",
        "/orders/1000?expand=lines",
        "201",
    ]
    assert '"quantity": 1' in page.locator("pre.body[data-side=request]").inner_text()
    assert "headers: authorization" in page.locator(".redactions").inner_text()
    checks = page.locator(".checks li").all_inner_texts()
    assert "OK chain: record #2 links to this record's digest" in " ".join(checks)
    assert not [check for check in checks if check.startswith("BAD")]
    screenshot(page, "viewer-detail.png")


def test_har_download_parses_in_the_page(page: Page, viewer: Viewed) -> None:
    """The HAR of the filtered list downloads, and the page's own JSON.parse reads it:
    one entry per record the filters select."""
    logged_in(page, viewer, "/?route=%2Fpayments")
    expected = [r for r in viewer.trail if r.route == "/payments"]
    with page.expect_download() as info:
        page.click("text=Download HAR")
    text = Path(info.value.path()).read_text("utf-8")
    count = page.evaluate("text => JSON.parse(text).log.entries.length", text)
    ids = page.evaluate("text => JSON.parse(text).log.entries.map(entry => entry._id)", text)
    assert count == len(expected) and sorted(ids) == sorted(r.id for r in expected)


def test_diff_of_two_selected_records(page: Page, viewer: Viewed) -> None:
    """Two checkboxes and "Compare" lead to the diff: differing fields marked, the JSON
    bodies' differences by path."""
    a, b = viewer.trail[0], viewer.trail[9]  # two orders created, one paid
    logged_in(page, viewer, "/?route=%2Forders%2F%7Border_id%7D&method=POST")
    page.check(f"input[value='{a.id}']")
    page.check(f"input[value='{b.id}']")
    page.click("button:text('Compare the two selected')")
    page.wait_for_url("**/diff?a=*")
    differing = page.locator("table.fields tr.differs th").all_inner_texts()
    assert "path" in differing and "method" not in differing
    json_rows = page.locator("table.json tbody th").all_inner_texts()
    assert "$.state (changed)" in json_rows and "$.order (changed)" in json_rows


def test_markup_in_a_body_is_shown_as_text(page: Page, viewer: Viewed) -> None:
    """A body holding ``<script>`` and an ``onerror`` image shows as text: no dialog, no
    element made from it, the path too."""
    dialogs: list[str] = []

    def record_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", record_dialog)
    record = viewer.records["script"]
    logged_in(page, viewer, f"/records/{record.id}")
    assert page.locator("pre.body[data-side=response]").inner_text() == SCRIPT_BODY.decode()
    assert page.locator("main img, main h1:text('Hi')").count() == 0
    assert page.evaluate("document.scripts.length") == 0
    assert "/pages/<script>alert(1)</script>" in page.locator("h1.exchange").inner_text()
    page.goto(viewer.base + "/?route=%2Fpages%2F%7Bname%7D")
    assert page.locator("td.path a").inner_text() == "/pages/<script>alert(1)</script>"
    page.wait_for_timeout(300)
    assert dialogs == []


def test_the_live_tail_shows_new_records_as_text(page: Page, viewer: Viewed) -> None:
    """The tail page adds a row for a record stored after it opened (its path as text,
    linking to the record), and none for those already there."""
    from playwright.sync_api import expect

    logged_in(page, viewer, "/tail")
    expect(page.locator("#tail-status")).to_have_text("live · 0 new")
    fresh = Records()(
        started_at_ns=BASE_NS + 7200 * SECOND_NS, path="/live/<b>bold</b>", route="/live/{x}"
    )
    with closing(open_sink(viewer.sink)) as sink:
        sink.write_batch([fresh])
    rows = page.locator("#tail-rows tr")
    expect(rows).to_have_count(1)
    link = rows.locator("td.path a")
    expect(link).to_have_text("/live/<b>bold</b>")
    assert link.get_attribute("href") == f"/records/{fresh.id}"
    assert page.locator("#tail-rows b").count() == 0
    expect(page.locator("#tail-status")).to_have_text("live · 1 new")
