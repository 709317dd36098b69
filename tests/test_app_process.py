"""What the durable path costs the app's own process: no database driver, cloud SDK or CLI
library is imported, and the event loop never starts a process, makes a directory, takes a
lock, syncs, opens or lists a file, not even for a fresh worker's first audited request.

Each check runs in a fresh interpreter: imports and audit hooks cannot be undone."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest

from processes import ROOT, environment

HEAVY = ("psycopg", "psycopg_pool", "boto3", "botocore", "sqlite3", "click")

_SERVE_ONE = textwrap.dedent(
    """
    import asyncio, json, sys
    from asgi_audit import AuditMiddleware

    async def echo(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"] + ".complete"
                await send({"type": kind})
                if message["type"] == "lifespan.shutdown":
                    return
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message.get("body", b"")})

    async def main(app):
        lifespan = asyncio.Queue()
        await lifespan.put({"type": "lifespan.startup"})
        sent = []

        async def lifespan_send(message):
            sent.append(message)

        task = asyncio.create_task(app({"type": "lifespan"}, lifespan.get, lifespan_send))
        while not sent:
            await asyncio.sleep(0.01)
        answer = []

        async def receive():
            return {"type": "http.request", "body": b'{"order": 7}', "more_body": False}

        async def send(message):
            answer.append(message)

        scope = {"type": "http", "method": "POST", "path": "/orders/7", "headers": []}
        await app(scope, receive, send)
        await lifespan.put({"type": "lifespan.shutdown"})
        await task
        return answer[-1]["body"]

    app = AuditMiddleware(
        echo, sink=sys.argv[1], spool=sys.argv[2], ship=sys.argv[3], environ={},
        shutdown_timeout=30,
    )
    body = asyncio.run(main(app))
    print(json.dumps({"body": body.decode(), "modules": sorted(set(sys.modules) & set(
        json.loads(sys.argv[4])))}))
    """
)


def run_python(*args: str) -> str:
    """Run a fresh interpreter in the project's directory; its standard output."""
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=environment(),
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("sink", "ship"),
    [
        ("postgresql://u@h/db", "off"),
        ("s3://audit-bucket/orders?endpoint_url=http://127.0.0.1:9", "off"),
        ("sqlite:///{tmp}/audit.db", "process"),
    ],
    ids=["postgresql", "s3", "sqlite-with-child-shipper"],
)
def test_building_the_middleware_and_serving_imports_no_driver(
    sink: str, ship: str, tmp_path: Path
) -> None:
    """Building AuditMiddleware for any sink and serving an exchange (lifespan included)
    imports none of psycopg, boto3, botocore, sqlite3 or click into the app's process."""
    output = run_python(
        "-c",
        _SERVE_ONE,
        sink.format(tmp=tmp_path),
        str(tmp_path / "spool"),
        ship,
        json.dumps(HEAVY),
    )
    answer = json.loads(output)
    assert answer == {"body": '{"order": 7}', "modules": []}


@pytest.mark.server
@pytest.mark.parametrize("lifespan", ["on", "off"])
def test_a_fresh_workers_first_requests_do_no_io_on_the_event_loop(
    lifespan: str, tmp_path: Path
) -> None:
    """Under uvicorn, from a fresh process: while its first audited requests are served,
    the loop's thread starts no process and makes no directory, lock, sync, open or
    listing (all of that happens on the writer thread); the records still arrive."""
    output = run_python(
        str(ROOT / "tests" / "apps" / "loop_probe.py"),
        str(tmp_path / "spool"),
        f"sqlite:///{tmp_path / 'audit.db'}",
        *("--lifespan", lifespan, "--requests", "3"),
    )
    requests = json.loads(output)["requests"]
    assert requests == [[], [], []]
    with closing(sqlite3.connect(tmp_path / "audit.db")) as database:
        assert database.execute("SELECT count(*) FROM records").fetchone() == (3,)
