"""``asgi-audit run``: an app with no auditing in its code, served by uvicorn with two
workers, audited from the environment and a configuration file; SIGTERM drains every
record into the store."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.record import StoredRecord
from processes import ROOT, environment, free_port, wait_answering

pytestmark = pytest.mark.server

CONFIG = ROOT / "examples" / "audit.toml"


@contextlib.contextmanager
def running(
    arguments: list[str], env: dict[str, str], gunicorn: bool = False
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``asgi-audit run ARGUMENTS`` (or gunicorn with them) on a free port; yields its
    URL once it answers."""
    port = free_port()
    if gunicorn:
        command = [sys.executable, "-m", "gunicorn", *arguments, "-b", f"127.0.0.1:{port}"]
    else:
        command = [sys.executable, "-m", "asgi_audit", "run", *arguments]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
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


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as Kubernetes sends it; the exit must be clean and in time (uvicorn, after
    its graceful shutdown, raises the signal again: -15 is what `uvicorn app` gives too)."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) in (0, -signal.SIGTERM)


def stored(sink: str) -> list[StoredRecord]:
    with closing(open_sink(sink, create=False)) as opened:
        return list(opened.search(Query(limit=None, with_bodies=True)))


def test_two_workers_audited_without_code(tmp_path: Path) -> None:
    sink = f"sqlite:///{tmp_path / 'audit.db'}"
    env = environment(ASGI_AUDIT_SINK=sink, ASGI_AUDIT_SPOOL=str(tmp_path / "spool"))
    order = b'{"lines": [{"sku": "A-1", "quantity": 2}]}'
    pids: set[int] = set()
    sent = 0
    with running(["--config", str(CONFIG), "examples.shop:app", "--workers", "2"], env) as (
        url,
        process,
    ):
        with httpx.Client(base_url=url, timeout=10) as client:
            for number in range(200):  # until both workers answered, bounded
                headers = {"content-type": "application/json", "connection": "close"}
                answer = client.post(f"/orders/{number}", content=order, headers=headers)
                assert answer.status_code == 200
                pids.add(answer.json()["pid"])
                sent += 1
                assert client.get("/health").status_code == 200  # excluded by the file
                if len(pids) == 2 and sent >= 10:
                    break
        stop(process)
    assert len(pids) == 2, "one worker answered everything"
    records = stored(sink)
    assert len(records) == sent  # every order, no health check, nothing lost
    assert {r.service for r in records} == {"shop"}
    assert {r.request_body.data if r.request_body else None for r in records} == {order}
    assert len({r.stream for r in records}) == 2


def test_a_factory_and_uvicorn_options(tmp_path: Path) -> None:
    sink = f"sqlite:///{tmp_path / 'audit.db'}"
    env = environment(
        ASGI_AUDIT_SINK=sink, ASGI_AUDIT_SPOOL=str(tmp_path / "spool"), ASGI_AUDIT_EXCLUDE="/health"
    )
    arguments = ["--factory", "examples.shop:create_app", "--proxy-headers"]
    arguments += ["--forwarded-allow-ips", "*"]
    with running(arguments, env) as (url, process):
        forwarded = {"x-forwarded-for": "203.0.113.9"}
        assert httpx.get(url + "/orders/5", headers=forwarded, timeout=10).status_code == 200
        stop(process)
    [record] = stored(sink)
    assert record.path == "/orders/5"
    assert record.client_host == "203.0.113.9"


def test_mistakes_are_one_line_before_anything_starts(tmp_path: Path) -> None:
    env = environment(ASGI_AUDIT_SPOOL=str(tmp_path / "spool"), ASGI_AUDIT_OVERFLOW="sometimes")
    command = [sys.executable, "-m", "asgi_audit", "run", "examples.shop:app"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines() == [
        "Error: overflow: must be one of 'block', 'drop' (got 'sometimes')"
    ]
    done = subprocess.run(
        [sys.executable, "-m", "asgi_audit", "run", "examples.shop"],
        env=environment(),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2 and b"module:attribute" in done.stderr
    assert not (tmp_path / "spool").exists()


def test_gunicorn_with_uvicorn_workers(tmp_path: Path) -> None:
    """The gunicorn recipe: uvicorn's worker class and the factory named with the app."""
    sink = f"sqlite:///{tmp_path / 'audit.db'}"
    env = environment(
        ASGI_AUDIT_SINK=sink,
        ASGI_AUDIT_SPOOL=str(tmp_path / "spool"),
        ASGI_AUDIT_CONFIG=str(CONFIG),
    )
    target = "asgi_audit.cli.run:audited_app('examples.shop:app')"
    arguments = ["-k", "uvicorn.workers.UvicornWorker", "-w", "2", target]
    with running(arguments, env, gunicorn=True) as (url, process):
        with httpx.Client(base_url=url, timeout=10) as client:
            for number in range(5):
                assert client.get(f"/orders/{number}").status_code == 200
        stop(process)
    assert sorted(r.path for r in stored(sink)) == [f"/orders/{n}" for n in range(5)]
