"""The same audited app on every common ASGI server: uvicorn (uvloop and httptools, and
h11), hypercorn (HTTP/1.1, and HTTP/2 over cleartext), granian, and gunicorn with uvicorn
workers. On each: a 1 MB body comes back byte for byte, a streamed answer arrives whole
and in order, SIGTERM drains (lifespan shutdown), and the store holds exactly what was
sent, with the bytes' digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from asgi_audit.sinks import Query, open_sink
from processes import ROOT, environment, free_port, wait_answering

pytestmark = [pytest.mark.server, pytest.mark.servers]

APP = "tests.apps.audited_shop:app"
LINES = 2000
"""Lines the streamed export sends: many chunks, each its own ``http.response.body``."""


@dataclass(frozen=True)
class Stack:
    name: str
    command: tuple[str, ...]
    """The server's command line, ``{port}`` for the port."""
    http2: bool = False
    clean_exits: tuple[int, ...] = (0, -signal.SIGTERM)
    """Exit statuses of a graceful SIGTERM (uvicorn raises the signal again once done)."""


STACKS = [
    Stack(
        "uvicorn-standard",
        ("-m", "uvicorn", APP, "--loop", "uvloop", "--http", "httptools", "--port", "{port}"),
    ),
    Stack(
        "uvicorn-h11",
        ("-m", "uvicorn", APP, "--loop", "asyncio", "--http", "h11", "--port", "{port}"),
    ),
    Stack("hypercorn-h1", ("-m", "hypercorn", APP, "--bind", "127.0.0.1:{port}")),
    Stack("hypercorn-h2", ("-m", "hypercorn", APP, "--bind", "127.0.0.1:{port}"), http2=True),
    Stack(
        "granian",
        ("-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}", APP),
    ),
    Stack(
        "gunicorn-uvicorn",
        ("-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-b", "127.0.0.1:{port}", APP),
    ),
]


@contextlib.contextmanager
def serving(stack: Stack, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    command = [sys.executable, *(part.replace("{port}", str(port)) for part in stack.command)]
    if stack.name.startswith("uvicorn"):
        command += ["--host", "127.0.0.1", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(process, url + "/health")
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        if process.stderr is not None:
            process.stderr.close()


def order(size: int) -> bytes:
    lines = [
        {"sku": f"SKU-{n:06d}", "quantity": n % 9 + 1, "note": "Zoë ✓"} for n in range(size // 48)
    ]
    return json.dumps({"customer": "c-7", "lines": lines}, ensure_ascii=False).encode()


@pytest.mark.parametrize("stack", STACKS, ids=[stack.name for stack in STACKS])
def test_an_audited_app_on_each_server(stack: Stack, tmp_path: Path) -> None:
    sink = f"sqlite:///{tmp_path / 'audit.db'}"
    env = environment(ASGI_AUDIT_SINK=sink, ASGI_AUDIT_SPOOL=str(tmp_path / "spool"))
    big = order(1 << 20)
    small = order(2000)
    with serving(stack, env) as (url, process):
        client = httpx.Client(base_url=url, timeout=30, http1=not stack.http2, http2=stack.http2)
        with client:
            echoed = client.post(
                "/orders/1", content=big, headers={"content-type": "application/json"}
            )
            assert echoed.status_code == 200 and echoed.content == big
            assert echoed.http_version == ("HTTP/2" if stack.http2 else "HTTP/1.1")
            assert client.post("/orders/2", content=small).content == small
            with client.stream("GET", f"/exports/{LINES}") as streamed:
                chunks = [chunk for chunk in streamed.iter_bytes() if chunk]
            received = b"".join(chunks)
            assert received == b"".join(b'{"n": %d}\n' % n for n in range(LINES))
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) in stack.clean_exits
    with closing(open_sink(sink, create=False)) as opened:
        records = {r.path: r for r in opened.search(Query(limit=None, with_bodies=True))}
    assert sorted(records) == [f"/exports/{LINES}", "/orders/1", "/orders/2"]  # health excluded
    for path, sent in (("/orders/1", big), ("/orders/2", small)):
        record = records[path]
        assert record.request_body is not None and record.response_body is not None
        assert record.request_body.data == sent == record.response_body.data
        assert record.request_body.sha256 == hashlib.sha256(sent).hexdigest()
    export = records[f"/exports/{LINES}"].response_body
    outcome = records[f"/exports/{LINES}"].outcome
    error = records[f"/exports/{LINES}"].error
    assert export is not None and export.data == received and export.complete, (outcome, error)
    assert records["/orders/1"].http_version == ("2" if stack.http2 else "1.1")
