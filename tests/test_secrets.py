"""Sink passwords stay secret: not in any process's arguments (``ps`` shows them to every
local user), not in any log line, with a warning that names the alternative."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postgres_server import SERVER_URL, fresh_table
from processes import SIGTERM, Load, environment, serving, wait_for

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.timeout(120)]

SECRET = "hunter2-not-for-ps"


def command_lines() -> list[bytes]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return found


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in its user info (trust auth on the test server ignores it)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{password}@{host}"


def test_the_sink_password_is_in_no_command_line_and_no_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with fresh_table() as table:
        sink = with_password(SERVER_URL, SECRET) + f"?table={table}"
        env = environment(ASGI_AUDIT_SINK=sink, ASGI_AUDIT_SPOOL=str(tmp_path / "spool"))
        with serving(env, log=log) as server:
            load = Load(server.url, total=20, threads=2).run()
            assert len(load.completed) == 20
            assert wait_for(lambda: b"asgi_audit" in b"".join(command_lines()))
            lines = command_lines()
            assert any(b"asgi_audit\x00ship" in line for line in lines)  # the child runs
            assert not [line for line in lines if SECRET.encode() in line]
            server.signal(SIGTERM)
            assert server.wait(60) in (0, -SIGTERM)
    text = log.read_text(errors="replace")
    assert SECRET not in text
    assert "password" in text.lower()  # the inline-password warning, masked
