"""``asgi-audit replay``: traffic recorded from the demo shop, sent again to a second
instance (no difference, exit 0) and to a changed release (the renamed field reported,
exit 1); what cannot be sent as it was is skipped with its reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from asgi_audit.cli import main
from asgi_audit.cli.demo import build_app, sample_order
from asgi_audit.cli.jsondiff import IgnoreRule, compare
from asgi_audit.errors import ConfigError
from factories import Records, body
from session import serving

pytestmark = pytest.mark.server


class Renamed:
    """A changed release: the demo shop with the ``status`` member of its JSON answers
    renamed to ``state``."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def renaming(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            data = b"".join(parts).replace(b'"status":', b'"state":')
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(data)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, renaming)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo shop's store after a morning of traffic."""
    directory = tmp_path_factory.mktemp("recorded")
    sink = f"sqlite:///{directory / 'audit.db'}"
    order = sample_order(200_000)
    with (
        serving(build_app(sink, str(directory / "spool"))) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        for answer in (
            client.get("/orders/7"),
            client.get("/orders/8", params={"token": "s3cret", "view": "full"}),
            client.post(
                "/orders/7",
                content=order,
                headers={"content-type": "application/json", "authorization": "Bearer t0k"},
            ),
            client.post("/upload", content=bytes(range(256)) * 8),
            client.get("/orders/not-a-number"),
        ):
            assert answer.status_code in (200, 422)
    return sink


def replay(recorded: str, target: str, *args: str, **env: str) -> tuple[int, str]:
    result = CliRunner(env=env).invoke(
        main, ["replay", "--sink", recorded, "--target", target, *args]
    )
    return result.exit_code, result.output


def test_a_second_instance_answers_the_same(recorded: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    with serving(build_app(f"sqlite:///{tmp_path / 'b.db'}", str(tmp_path / "spool"))) as base:
        code, output = replay(
            recorded,
            base,
            "--methods",
            "GET,POST",
            "--report",
            str(report),
            AUTHORIZATION="Bearer t0k",
            TOKEN="s3cret",
        )
    assert code == 0, output
    assert "replayed 5: 5 match, 0 differ, 0 failed; 0 skipped" in output
    document = json.loads(report.read_text())
    assert report.stat().st_mode & 0o777 == 0o600
    assert document["summary"] == {"replayed": 5, "match": 5, "differ": 0, "skipped": 0, "error": 0}
    assert {e["outcome"] for e in document["exchanges"]} == {"match"}
    assert "s3cret" not in report.read_text() and "t0k" not in report.read_text()


def test_a_renamed_field_is_reported_and_fails(recorded: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    changed = Renamed(build_app(f"sqlite:///{tmp_path / 'c.db'}", str(tmp_path / "spool")))
    with serving(changed) as base:
        code, output = replay(recorded, base, "--report", str(report), TOKEN="s3cret")
    assert code == 1, output
    assert "replayed 3: 1 match, 2 differ, 0 failed; 2 skipped" in output
    assert '$.status: missing (was "shipped")' in output
    assert '$.state: added ("shipped")' in output
    differing = [e for e in json.loads(report.read_text())["exchanges"] if e["outcome"] == "differ"]
    assert {e["path"] for e in differing} == {"/orders/7", "/orders/8"}
    assert differing[0]["differences"] == [
        {"path": "$.status", "kind": "missing", "expected": "shipped", "actual": None},
        {"path": "$.state", "kind": "added", "expected": None, "actual": "shipped"},
    ]
    # an ignore rule for the renamed pair makes them match again
    with serving(changed) as base:
        code, output = replay(
            recorded, base, "--ignore", "$.status", "--ignore", "state", TOKEN="s3cret"
        )
    assert code == 0, output


def test_what_cannot_be_sent_is_skipped_with_its_reason(recorded: str, tmp_path: Path) -> None:
    with serving(build_app(f"sqlite:///{tmp_path / 'd.db'}", str(tmp_path / "spool"))) as base:
        code, output = replay(recorded, base, "--methods", "GET,POST")
    assert code == 0, output
    assert "header authorization was redacted: give --header authorization" in output
    assert "set $AUTHORIZATION" in output
    assert "query value redacted (token): set $TOKEN" in output
    assert "replayed 3: 3 match, 0 differ, 0 failed; 2 skipped" in output
    code, output = replay(recorded, base.replace("http://", "ftp://"))
    assert code == 2 and "--target: expected an http:// or https:// URL" in output


def test_an_unreachable_target_fails(recorded: str) -> None:
    code, output = replay(recorded, "http://127.0.0.1:9", "--timeout", "2")
    assert code == 1
    assert "ERROR" in output and "ConnectError" in output


def test_a_header_given_on_the_command_line_or_by_name(recorded: str, tmp_path: Path) -> None:
    with serving(build_app(f"sqlite:///{tmp_path / 'e.db'}", str(tmp_path / "spool"))) as base:
        code, output = replay(
            recorded, base, "--methods", "POST", "--header", "Authorization", AUTHORIZATION="B x"
        )
        assert code == 0 and "replayed 2: 2 match" in output, output
        code, output = replay(recorded, base, "--header", "X-Api-Key")
        assert code == 2 and "--header: X-Api-Key: set $X_API_KEY" in output


def test_plan_skips_truncated_and_redacted_bodies() -> None:
    from asgi_audit.cli.replay import Replayer

    make = Records()
    replayer = Replayer("http://127.0.0.1:1", methods=["POST"], environ={"AUTHORIZATION": "x"})
    truncated = make(request_body=body(b"{", size=10, truncated=True))
    assert replayer.plan(truncated) == "request body truncated (1 of 10 bytes stored)"
    redacted = make(request_body=body(b"{}", redacted=["card.number"]))
    assert replayer.plan(redacted) == "request body has redacted fields: card.number"
    plan = replayer.plan(make(request_headers=[("authorization", "[REDACTED]")]))
    assert not isinstance(plan, str)
    assert (b"authorization", b"x") in plan.headers


@pytest.mark.parametrize(
    ("rule", "path", "expected"),
    [
        ("$.created_at", ["created_at"], True),
        ("created_at", ["created_at"], True),
        ("$.created_at", ["x", "created_at"], False),
        ("$..id", ["items", 3, "id"], True),
        ("$..id", ["id"], True),
        ("$.items[*].id", ["items", 3, "id"], True),
        ("$.items[2].id", ["items", 3, "id"], False),
        ("$.meta.*", ["meta", "a"], True),
        ("$['odd.name']", ["odd.name"], True),
        ("$.a..b[*]", ["a", "x", "y", "b", 0], True),
    ],
)
def test_ignore_rules(rule: str, path: list[str | int], expected: bool) -> None:
    assert IgnoreRule(rule).matches(path) is expected


@pytest.mark.parametrize("rule", ["", "$", "$.a[", "$.a b", "x" * 2000])
def test_bad_ignore_rules_are_clear_errors(rule: str) -> None:
    with pytest.raises(ConfigError, match="--ignore"):
        IgnoreRule(rule)


def test_structural_comparison() -> None:
    before = {"a": 1, "b": [1, 2, 3], "c": {"d": True}, "at": 5}
    after = {"a": 1.0, "b": [1, 2], "c": {"d": 1}, "e": None, "at": 6}
    found = {(d.path, d.kind) for d in compare(before, after, [IgnoreRule("$.at")])}
    assert found == {("$.b[2]", "missing"), ("$.c.d", "changed"), ("$.e", "added")}
