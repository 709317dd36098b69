"""With no configuration, secrets in the query, headers and JSON bodies of a real request
reach no disk: not the spool, not the store, not an export; and the rest is kept."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from asgi_audit.cli import main
from processes import ROOT, SIGTERM, environment, serving

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

ORDER = {
    "user": "ann",
    "password": "hunter2",
    "card": {"number": "4111 1111 1111 1111"},
    "items": [{"token": "abc.def.ghi"}],
}
SECRETS = (b"hunter2", b"4111 1111 1111 1111", b"abc.def.ghi", b"K123", b"tok-9f8e7d")
"""Whole values: a short one ("4111") can turn up by chance among the spool's timestamps
and digests."""


def every_byte(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in folder.rglob("*") if path.is_file())


def test_default_redaction_keeps_secrets_off_every_disk(tmp_path: Path) -> None:
    spool, store = tmp_path / "spool", tmp_path / "store"
    store.mkdir()
    sink = f"sqlite:///{store / 'audit.db'}"
    env = environment(ASGI_AUDIT_SINK=sink, ASGI_AUDIT_SPOOL=str(spool), ASGI_AUDIT_SHIP="off")
    with serving(env) as server:
        request = urllib.request.Request(
            f"{server.url}/orders/7?api_key=K123&page=2",
            data=json.dumps(ORDER).encode(),
            headers={"Content-Type": "application/json", "X-Auth-Token": "tok-9f8e7d"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            echoed = json.loads(answer.read())
        assert echoed == ORDER  # the app and the client see everything
        server.signal(SIGTERM)
        assert server.wait(60) in (0, -SIGTERM)
    spooled = every_byte(spool)
    assert b"ann" in spooled
    assert [secret for secret in SECRETS if secret in spooled] == []

    shipped = subprocess.run(
        [sys.executable, "-m", "asgi_audit", "ship", "--spool", str(spool), "--once"],
        env={**environment(), "ASGI_AUDIT_SINK": sink},
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert shipped.returncode == 0, shipped.stderr
    stored = every_byte(store)
    assert b"ann" in stored
    assert [secret for secret in SECRETS if secret in stored] == []

    exported = CliRunner().invoke(main, ["export", "--sink", sink, "--bodies"])
    assert exported.exit_code == 0, exported.output
    [line] = exported.output.splitlines()
    record = json.loads(line)
    assert [secret for secret in SECRETS if secret.decode() in exported.output] == []
    request_body = json.loads(record["request_body"])
    assert request_body == {
        "user": "ann",
        "password": "[REDACTED]",
        "card": {"number": "[REDACTED]"},
        "items": [{"token": "[REDACTED]"}],
    }
    assert record["query"] == "api_key=[REDACTED]&page=2"
    assert record["redacted_query"] == ["api_key"]
    assert record["request_body_redacted"] == ["password", "card.number", "items[0].token"]
    assert record["request_body_size"] == len(json.dumps(ORDER))  # as received
    assert "x-auth-token" in record["redacted_headers"]

    shown = CliRunner().invoke(main, ["show", "--sink", sink, record["id"]])
    assert shown.exit_code == 0, shown.output
    assert "redacted: password, card.number, items[0].token" in shown.output
    assert "?api_key" in shown.output and "x-auth-token" in shown.output
    assert [secret for secret in SECRETS if secret.decode() in shown.output] == []

    verified = CliRunner().invoke(main, ["verify", "--sink", sink])
    assert verified.exit_code == 0, verified.output
