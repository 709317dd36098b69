"""What the asgi-audit command prints is safe for a terminal, and keeps secrets out.

Record text is chosen by clients: a request to ``/admin/%1b%5d0%3bpwned%07`` is recorded
with the path ESC ] 0 ; pwned BEL, which a terminal would obey (here: retitle the window).
Every command that prints record text shows such characters as visible escapes instead,
whatever standard output is; ``show --raw`` and ``export`` still give exact values. An
export file is readable by its owner only, and sink URLs never show their password.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import unicodedata
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from asgi_audit import AuditMiddleware
from asgi_audit._types import Receive, Scope, Send
from asgi_audit.cli import main, terminal
from asgi_audit.cli.terminal import (
    printable,
    printable_block,
    printable_error,
    printable_json,
    printable_url,
    unsafe_for_terminal,
)
from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.record import StoredRecord
from factories import Records, body
from harness import Client, http_scope, lifespan, request

ESC_PATH = "/admin/\x1b]0;pwned\x07"
"""What a server makes of ``/admin/%1b%5d0%3bpwned%07``: an xterm title sequence."""
TEXT_BODY = b"hello \x1b]0;title\x07 C1 CSI \xc2\x9b31m red\r\n\x1b[2J\x1b[1Aend\n\tindented \x7f"
"""Not JSON: ESC sequences, a C1 CSI (U+009B in UTF-8), CR LF, DEL, a tab."""
JSON_BODY = '{"esc": "\\u001b[31m", "rlo": "\u202egpj.exe", "c1": "\x85\x9b", "ls": "\u2028"}'
"""JSON whose strings hold an escaped ESC (JSON keeps it escaped) and raw U+202E, C1 and
U+2028 (which JSON writers leave raw)."""

BIDI = {chr(c) for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}
FORBIDDEN = (
    {chr(c) for c in range(0x20)} - {"\n", "\t"}
    | {chr(c) for c in range(0x7F, 0xA0)}
    | BIDI
    | {"\u2028", "\u2029"}
)
"""What may not reach a terminal from record text: C0 (but newline and tab), DEL, C1,
bidi controls, line separators."""


def assert_printable(data: bytes) -> None:
    """``data`` (a command's output) is UTF-8 with nothing a terminal would act on."""
    assert all(byte >= 0x20 or byte in b"\n\t" for byte in data), data
    text = data.decode("utf-8")
    found = sorted({f"U+{ord(char):04X}" for char in text if char in FORBIDDEN})
    assert not found, f"{found} in {text!r}"
    assert not any(unicodedata.category(char) == "Cs" for char in text)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def hostile_records() -> list[StoredRecord]:
    """Records with control characters in every text field the CLI prints."""
    make = Records()
    escaped = make(
        id="id-\x1b[8m-hidden",
        stream="orders:\x07pod:1",
        method="GET",
        host="api.example.test\x1b[2J",
        path=ESC_PATH,
        query="q=\x1b[31m&rlo=\u202e&c1=\x9b",
        route="/admin/{name}\x1b[1A",
        status=500,
        outcome="disconnected",
        error="boom\x1b[1A\r\nINFO all good\u2028next",
        correlation_id="corr-\x1b]8;;http://evil.test\x07link",
        trace_id="trace\u202e4736",
        service="svc\x1b[0m",
        pod="pod\u2066x\u2069",
        namespace="ns\x85",
        node="node\x7f",
        client_host="10.0.0.7\x1b",
        request_headers=[
            ("x-\x1b[31m-name", "value \x1b]0;title\x07"),
            ("x-latin1", "obs-text \x9b31m \xe2\x80\xae"),
        ],
        response_headers=[("content-type", "text/plain\u202e")],
        response_trailers=[("x-trailer\x1b", "t\x07")],
        redacted_headers=["authorization\x1b"],
        request_body=body(TEXT_BODY, sent_path="/tmp/spill\x1b[2J"),
        response_body=body(JSON_BODY.encode()),
        request_size=len(TEXT_BODY),
        response_size=len(JSON_BODY.encode()),
    )
    surrogate = make(path="/files/\udcff\udc80", route=None, id="surrogate-path")
    return [escaped, surrogate]


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[str, list[StoredRecord]]:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    records = hostile_records()
    with closing(open_sink(url)) as sink:
        sink.write_batch(records)
    return url, records


# --- the printed commands ------------------------------------------------------------------


def test_ls_tail_and_stats_show_escapes_not_control_characters(
    hostile: tuple[str, list[StoredRecord]],
) -> None:
    """ls, tail and stats print the hostile record with every control character visible;
    nothing a terminal obeys reaches the output."""
    url, _ = hostile
    for args in (["ls"], ["ls", "--oldest-first"], ["tail", "-n", "5"], ["stats"]):
        result = invoke(*args, "--sink", url)
        assert result.exit_code == 0, result.output
        assert_printable(result.stdout_bytes)
    listed = invoke("ls", "--sink", url).output
    assert "/admin/\\x1b]0;pwned\\x07" in listed
    assert "id-\\x1b[8m-hidden" in listed
    assert "/files/\\udcff\\udc80" in listed
    assert len(listed.splitlines()) == 2
    assert "/admin/{name}\\x1b[1A" in invoke("stats", "--sink", url).output


def test_show_escapes_every_field_header_and_body(
    hostile: tuple[str, list[StoredRecord]],
) -> None:
    """show prints metadata, header names and values, the text body and the JSON body
    with visible escapes; the JSON is still JSON and means the same."""
    url, records = hostile
    record = records[0]
    result = invoke("show", record.id, "--sink", url)
    assert result.exit_code == 0, result.output
    assert_printable(result.stdout_bytes)
    shown = result.output
    for expected in (
        "host api.example.test\\x1b[2J",
        "query q=\\x1b[31m&rlo=\\u202e&c1=\\x9b",
        "correlation corr-\\x1b]8;;http://evil.test\\x07link",
        "trace trace\\u202e4736",
        "stream orders:\\x07pod:1",
        "service svc\\x1b[0m  pod pod\\u2066x\\u2069  namespace ns\\x85  node node\\x7f",
        "error boom\\x1b[1A\\r\\nINFO all good\\u2028next",
        "x-\\x1b[31m-name: value \\x1b]0;title\\x07",
        "x-latin1: obs-text \\x9b31m \u00e2\\x80\u00ae",
        "content-type: text/plain\\u202e",
        "x-trailer\\x1b: t\\x07",
        "sent from /tmp/spill\\x1b[2J",
        # the text body keeps its lines and tabs, the rest escaped
        "hello \\x1b]0;title\\x07 C1 CSI \\x9b31m red\\r\n\\x1b[2J\\x1b[1Aend\n\tindented \\x7f",
    ):
        assert expected in shown, expected
    start = shown.index("{", shown.index("── response"))
    end = shown.index("}", start) + 1
    assert json.loads(shown[start:end]) == json.loads(JSON_BODY)
    assert '"rlo": "\\u202egpj.exe"' in shown and '"esc": "\\u001b[31m"' in shown


def test_show_raw_writes_the_exact_bytes(hostile: tuple[str, list[StoredRecord]]) -> None:
    """--raw is the one way to the stored bytes, escape sequences and all."""
    url, records = hostile
    for side, data in (("request", TEXT_BODY), ("response", JSON_BODY.encode())):
        result = invoke("show", records[0].id, "--sink", url, "--raw", side)
        assert result.exit_code == 0
        assert result.stdout_bytes == data


def test_show_raw_refuses_control_characters_on_a_terminal(
    hostile: tuple[str, list[StoredRecord]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal, --raw refuses a body a terminal would act on (as curl does for
    binary), saying how to get it; a clean body is written as usual."""
    from asgi_audit.cli import browse

    url, records = hostile
    monkeypatch.setattr(browse, "is_terminal", lambda stream: True)
    result = invoke("show", records[0].id, "--sink", url, "--raw", "request")
    assert result.exit_code == 1
    assert "redirect --raw to a file or a pipe" in result.output
    assert b"\x1b" not in result.stdout_bytes + result.stderr_bytes
    result = invoke("show", records[1].id, "--sink", url, "--raw", "request")
    assert result.exit_code == 0 and result.stdout_bytes == b'{"order": 1}'


def test_errors_naming_a_record_id_are_printable(
    hostile: tuple[str, list[StoredRecord]],
) -> None:
    """An id given on the command line is shown escaped in the error about it."""
    url, _ = hostile
    result = invoke("show", "nope\x1b]0;x\x07\u202e", "--sink", url)
    assert result.exit_code == 1
    assert_printable(result.stdout_bytes + result.stderr_bytes)


# --- export ---------------------------------------------------------------------------------


def test_export_is_exact_json_and_safe_to_print(hostile: tuple[str, list[StoredRecord]]) -> None:
    """Each record is one line whatever splits it (str.splitlines too), nothing in it is
    a control character, and it decodes to the very values the record holds."""
    url, records = hostile
    result = invoke("export", "--sink", url, "--bodies")
    assert result.exit_code == 0, result.output
    assert_printable(result.stdout_bytes)
    lines = result.stdout_bytes.decode("utf-8").splitlines()
    assert len(lines) == len(records)
    rows = [json.loads(line) for line in lines]
    first, second = rows
    assert first["path"] == ESC_PATH
    assert first["query"] == records[0].query
    assert first["error"] == records[0].error
    assert first["request_headers"] == [list(pair) for pair in records[0].request_headers]
    assert first["request_body"] == TEXT_BODY.decode("utf-8")
    assert first["response_body"] == JSON_BODY
    assert second["path"] == "/files/\udcff\udc80"


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_export_file_is_readable_by_its_owner_only(
    hostile: tuple[str, list[StoredRecord]], tmp_path: Path
) -> None:
    """-o creates the file 0600 under umask 022, and narrows an existing 0644 file to
    0600 as it replaces what it held."""
    url, records = hostile
    fresh = tmp_path / "fresh.jsonl"
    existing = tmp_path / "existing.jsonl"
    existing.write_bytes(b"old content that is much longer than nothing\n" * 1000)
    existing.chmod(0o644)
    with umask(0o022):
        for target in (fresh, existing):
            result = invoke("export", "--sink", url, "--bodies", "-o", str(target))
            assert result.exit_code == 0, result.output
            assert stat.S_IMODE(target.stat().st_mode) == 0o600
            rows = [json.loads(line) for line in target.read_bytes().splitlines()]
            assert [row["id"] for row in rows] == [r.id for r in records]


def test_export_to_an_unwritable_place_is_one_line(
    hostile: tuple[str, list[StoredRecord]], tmp_path: Path
) -> None:
    """A file that cannot be opened is named (escaped) in a one-line error."""
    url, _ = hostile
    target = tmp_path / "no-such-dir\x1b[2J" / "out.jsonl"
    result = invoke("export", "--sink", url, "-o", str(target))
    assert result.exit_code != 0
    assert_printable(result.stdout_bytes + result.stderr_bytes)


# --- a real exchange ------------------------------------------------------------------------


class HostileApp:
    """Answers with a header value of obs-text bytes and a body of escape sequences."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        while (await receive()).get("more_body", False):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"x-note", b"\x1b]0;owned\x07 \x9b31m \xe2\x80\xae"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": TEXT_BODY})


def test_a_recorded_exchange_with_escapes_prints_safely(tmp_path: Path) -> None:
    """Through the middleware into a SQLite sink and back out: ls, show and tail print
    the escape sequences of the path, query, headers and body as visible text."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    mw = AuditMiddleware(
        HostileApp(), spool=tmp_path / "spool", sink=url, ship="thread", environ={}
    )

    async def exercise() -> None:
        async with lifespan(mw):
            scope = http_scope(
                ESC_PATH,
                headers=[(b"x-request-id", b"req\x9b\xe2\x80\xae"), (b"user-agent", b"\x1b[2J")],
                query_string=b"q=\x1b[31m&x=%1b",
            )
            client = Client(request(JSON_BODY.encode()))
            await mw(scope, client.receive, client.send)

    asyncio.run(exercise())
    with closing(open_sink(url, create=False)) as sink:
        [stored] = list(sink.search(Query(limit=None)))
    assert stored.path == ESC_PATH
    for args in (["ls"], ["tail"], ["show", stored.id], ["stats"]):
        result = invoke(*args, "--sink", url)
        assert result.exit_code == 0, result.output
        assert_printable(result.stdout_bytes)
    shown = invoke("show", stored.id, "--sink", url).output
    assert "/admin/\\x1b]0;pwned\\x07" in shown
    # header bytes are latin-1: the UTF-8 of U+202E shows as a, an escaped C1, and (R)
    assert "x-note: \\x1b]0;owned\\x07 \\x9b31m \u00e2\\x80\u00ae" in shown
    assert "user-agent: \\x1b[2J" in shown and "query q=\\x1b[31m&x=%1b" in shown
    raw = invoke("show", stored.id, "--sink", url, "--raw", "response")
    assert raw.stdout_bytes == TEXT_BODY


# --- sink URLs ------------------------------------------------------------------------------


ALL_READERS = (("ls",), ("show", "no-such-id"), ("stats",), ("export",), ("tail",))


@pytest.mark.parametrize(
    ("url", "commands"),
    [
        # PostgreSQL fails in the pool's own time (seconds): one command is enough, they
        # all open the sink the same way
        ("postgresql://u:hunter2@127.0.0.1:1/db", ALL_READERS[:1]),
        ("sqlite:///nonexistent/x.db?password=hunter2", ALL_READERS),
        ("jsonl:///nonexistent/dir?token=hunter2", ALL_READERS),
        ("s3://bucket/prefix?secret_key=hunter2", ALL_READERS),
        ("postgres://u:hunter2@[::1/db", ALL_READERS),
    ],
)
def test_sink_urls_never_show_their_secret(url: str, commands: tuple[tuple[str, ...], ...]) -> None:
    """Errors that name the sink URL, or quote a driver's message about it, mask the
    password and secret parameters (nothing listens on port 1)."""
    for args in commands:
        result = invoke(*args, "--sink", url)
        assert result.exit_code == 1, result.output
        everything = result.stdout_bytes + result.stderr_bytes
        assert b"hunter2" not in everything
        assert b"***" in everything


def test_a_missing_record_names_the_sink_masked() -> None:
    """The error for an unknown id names the sink, which did open, by its masked URL."""
    for url in ("memory://u:hunter2@name?password=hunter2", "memory://x?token=hunter2"):
        result = invoke("show", "no-such-id", "--sink", url)
        assert result.exit_code == 1, result.output
        everything = result.stdout_bytes + result.stderr_bytes
        assert b"hunter2" not in everything
        assert b"***" in everything


def test_printable_error_masks_every_copy_and_folds_lines() -> None:
    """A driver text quoting the URL (plainly, through repr, or another URL) is masked,
    and its line breaks are folded so that the error stays one line."""
    url = "postgresql://u:it's-hunter2@db/x"
    text = f"cannot connect to {url!r}\n\tretry postgresql://v:hunter2@other/y then {url}"
    shown = printable_error(text, url)
    assert "hunter2" not in shown and "\n" not in shown and "\t" not in shown
    assert shown.count("***") == 3
    assert printable_url("sqlite:///a\x1b.db?password=x") == "sqlite:///a\\x1b.db?password=***"


# --- the functions ----------------------------------------------------------------------------


BLOCK_ALLOWED = {"\n", "\t"}
ANY_TEXT = st.text(st.characters(blacklist_categories=()))
"""Any text at all, lone surrogates included (which a sink may hand back)."""
SAFE_TEXT = st.text(
    st.characters(
        blacklist_categories=["Cs"], blacklist_characters=sorted(FORBIDDEN | BLOCK_ALLOWED)
    )
)
"""Text without control characters (backslashes, quotes and any script welcome)."""


@given(ANY_TEXT)
def test_printable_leaves_no_control_character(text: str) -> None:
    """Whatever the text, printable's result holds no control character, no bidi
    control, no separator and no lone surrogate; newline and tab are escaped too."""
    shown = printable(text)
    assert not any(char in FORBIDDEN or char in BLOCK_ALLOWED for char in shown)
    assert not any(unicodedata.category(char) == "Cs" for char in shown)
    shown.encode("utf-8")


@given(ANY_TEXT)
def test_printable_block_keeps_only_newlines_and_tabs(text: str) -> None:
    """printable_block's result holds no control character but newline and tab, and has
    as many lines as the text has newlines."""
    shown = printable_block(text)
    assert not any(char in FORBIDDEN for char in shown)
    assert not any(unicodedata.category(char) == "Cs" for char in shown)
    assert shown.count("\n") == text.count("\n") and shown.count("\t") == text.count("\t")


@given(SAFE_TEXT)
def test_text_without_control_characters_is_unchanged(text: str) -> None:
    """Without control characters, all three are the identity (backslashes included)."""
    assert printable(text) is text
    assert printable_block(text) is text
    assert printable_json(text) is text


@given(st.text(st.characters(blacklist_categories=["Cs"])))
def test_printable_json_is_the_same_json(value: str) -> None:
    """JSON as orjson and json write it (compact or indented) stays JSON meaning the
    same, with no control character left but the newlines of its layout."""
    document = {"value": value, "list": [value]}
    for written in (
        orjson.dumps(document).decode(),
        orjson.dumps(document, option=orjson.OPT_INDENT_2).decode(),
        json.dumps(document, ensure_ascii=False, indent=1),
    ):
        shown = printable_json(written)
        assert json.loads(shown) == document
        assert not any(char in FORBIDDEN or char == "\t" for char in shown)


@given(st.binary())
def test_unsafe_for_terminal_agrees_with_printable_block(data: bytes) -> None:
    """Raw bytes are unsafe when they are not UTF-8, or printable_block would change
    their text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        assert unsafe_for_terminal(data)
    else:
        assert unsafe_for_terminal(data) is (printable_block(text) != text)


def test_escapes_read_like_ls_and_journalctl() -> None:
    """The escapes name the code point: \\xHH below 0x100, \\uHHHH above, \\t \\n \\r."""
    assert printable("\x1b]0;pwned\x07") == "\\x1b]0;pwned\\x07"
    assert printable("a\tb\nc\rd") == "a\\tb\\nc\\rd"
    assert printable("\x85\x9b\x7f\x00") == "\\x85\\x9b\\x7f\\x00"
    assert printable("\u202egpj.exe\u2066\u2028") == "\\u202egpj.exe\\u2066\\u2028"
    assert printable("ünïcode ✓ \\x1b") == "ünïcode ✓ \\x1b"
    assert printable_block("a\r\n\tb\x1b") == "a\\r\n\tb\\x1b"
    assert printable_json('"\u202e\x7f"') == '"\\u202e\\u007f"'


def test_is_terminal_is_false_for_files_and_closed_streams(tmp_path: Path) -> None:
    """Only a real terminal counts; a closed stream is no error."""
    with (tmp_path / "f").open("w") as stream:
        assert not terminal.is_terminal(stream)
    assert not terminal.is_terminal(stream)
