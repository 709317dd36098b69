"""``asgi-audit export --format curl``: each line, run by bash, sends the recorded request
again, byte for byte, to a real server; secrets come from the environment, never from the
file; every line is printable ASCII."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner

from asgi_audit.cli import main
from asgi_audit.cli.curl import curl_line, shell_quote, variable_name
from asgi_audit.cli.har import PATH_SAFE
from asgi_audit.sinks import open_sink
from asgi_audit.sinks.record import StoredRecord
from factories import Records, body
from session import serving

needs_curl = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not (shutil.which("curl") and shutil.which("bash")),
    reason="curl or bash not installed (CI fails instead)",
)


class Received:
    """An ASGI app that keeps what each request carried, as the server parsed it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append(
            {
                "method": scope["method"],
                "path": scope["raw_path"],
                "query": scope["query_string"],
                "headers": list(scope["headers"]),
                "body": data,
            }
        )
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def run_lines(lines: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    script = tmp_path / "replay.sh"
    script.write_text("set -e\n" + lines)
    environment = {"PATH": os.environ["PATH"], **env}
    return subprocess.run(["bash", str(script)], env=environment, capture_output=True, timeout=60)


@needs_curl
@pytest.mark.server
def test_each_line_resends_its_request_exactly(tmp_path: Path) -> None:
    received = Received()
    make = Records()
    with serving(received, lifespan="off") as base:
        host = base.removeprefix("http://")
        common: dict[str, Any] = {"scheme": "http", "host": host, "redacted_headers": []}
        nul_body = b"\x00\x01binary\xff\x00" * 100
        text_body = '{"note": "it\'s a \\"quote\\"\\n", "emoji": "\u00e9\u2603"}\n'.encode()
        big_body = b'{"pad": "' + b"x" * (1 << 20) + b'"}'
        sent = [
            make(
                **common,
                method="HEAD",
                path="/head",
                query="",
                request_body=None,
                request_size=0,
                request_headers=[],
            ),
            make(
                **common,
                method="GET",
                path="/plain",
                query="",
                request_body=None,
                request_size=0,
                request_headers=[("accept", "*/*")],
            ),
            make(
                **common,
                method="POST",
                path="/text",
                query="a=%20b&c",
                request_headers=[
                    ("content-type", "application/json"),
                    ("x-latin", "caf\xe9"),
                    ("x-ctl", "a\x1b[31mb"),
                ],
                request_body=body(text_body),
            ),
            make(
                **common,
                method="PUT",
                path="/nul",
                query="",
                request_headers=[("content-type", "application/octet-stream")],
                request_body=body(nul_body),
            ),
            make(
                **common,
                method="POST",
                path="/big",
                query="",
                request_headers=[("content-type", "application/json")],
                request_body=body(big_body),
            ),
            make(
                **{**common, "redacted_headers": ["authorization", "x-api-key"]},
                method="DELETE",
                path="/secret/it's",
                query="token=[REDACTED]&keep=1",
                redacted_query=["token"],
                request_body=None,
                request_size=0,
                request_headers=[
                    ("authorization", "[REDACTED]"),
                    ("x-api-key", "[REDACTED]"),
                    ("host", "ignored.example"),
                    ("content-length", "0"),
                ],
            ),
        ]
        lines = "".join(curl_line(record) + "\n" for record in sent)
        assert lines.isascii() and all(" " <= c <= "~" for c in lines.replace("\n", ""))
        assert "Bearer" not in lines
        done = run_lines(
            lines, tmp_path, AUTHORIZATION="Bearer from-env", X_API_KEY="k-1", TOKEN="t%200k"
        )
        assert done.returncode == 0, done.stderr.decode()
    assert len(received.requests) == len(sent)
    for record, got in zip(sent, received.requests, strict=True):
        assert got["method"] == record.method
        assert got["path"] == quote(record.path, safe=PATH_SAFE).encode()
        expected_body = record.request_body.data if record.request_body else b""
        assert got["body"] == expected_body
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in got["headers"]]
        for name, value in record.request_headers:
            if name in ("host", "content-length") or name in record.redacted_headers:
                continue
            assert (name, value) in headers
    secret = received.requests[-1]
    assert secret["query"] == b"token=t%200k&keep=1"
    arrived = dict(secret["headers"])
    assert arrived[b"authorization"] == b"Bearer from-env" and arrived[b"x-api-key"] == b"k-1"
    assert arrived[b"host"] == host.encode()


def test_notes_for_what_cannot_be_sent_and_safe_comments() -> None:
    make = Records()
    truncated = make(request_body=body(b'{"a": 1', size=100, truncated=True))
    assert "# request body truncated: 7 of 100 bytes sent" in curl_line(truncated)
    not_kept = make(request_body=None, request_size=42)
    line = curl_line(not_kept)
    assert "--data-binary" not in line and "# request body of 42 bytes not kept" in line
    redacted = make(request_body=body(b'{"password": "[REDACTED]"}', redacted=["password\x1b"]))
    line = curl_line(redacted)
    assert line.endswith("# redacted in the body: password\\x1b") and "\x1b" not in line


def test_quoting_and_variable_names() -> None:
    assert shell_quote("it's") == "'it'\\''s'"
    assert shell_quote("a\x1bb\xe9") == "$'a\\x1bb\\xe9'"
    assert shell_quote("back\\slash\x01") == "$'back\\\\slash\\x01'"
    assert variable_name("X-Api-Key") == "X_API_KEY"
    assert variable_name("1st token") == "_1ST_TOKEN"
    assert variable_name("--") == "SECRET"


def test_export_curl_from_a_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    make = Records()
    stored: list[StoredRecord] = [make(), make()]
    with closing(open_sink(url)) as sink:
        sink.write_batch(stored)
    result = CliRunner().invoke(main, ["export", "--sink", url, "--format", "curl"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("printf %s ") and "| curl -sS -X 'POST'" in line for line in lines)
    assert '"$AUTHORIZATION"' in lines[0]
