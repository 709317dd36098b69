"""The TOML configuration file: every setting and ordered [[rule]] tables, below the
environment and the arguments, validated as they are, and ``asgi-audit config check``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from asgi_audit import AuditMiddleware, ConfigError, Level, MemoryRecorder
from asgi_audit._types import Receive, Scope, Send
from asgi_audit.cli import main
from harness import EchoApp, call

POLICY = """
sink = "sqlite:///audit.db"
body_limit = "8MiB"
overflow = "drop"
service = "orders-api"
redact_fields = ["card.number"]
level = "None"

[[rule]]
routes = ["/health"]
level = "None"

[[rule]]
routes = ["/orders/*"]
methods = ["POST"]
statuses = ["2xx"]
otherwise = "Metadata"

[[rule]]
routes = ["/reports/*"]
level = "Metadata"
sample = 0.5
"""


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    """An opaque ASGI app: it declares no routes the middleware could check."""


def write(tmp_path: Path, text: str, name: str = "audit.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_file_sets_everything_and_its_rules_in_order(tmp_path: Path) -> None:
    middleware = AuditMiddleware(_app, config=write(tmp_path, POLICY), environ={})
    settings = middleware.settings
    assert (settings.body_limit, settings.overflow, settings.service) == (
        8 << 20,
        "drop",
        "orders-api",
    )
    assert settings.redact_fields == ("card.number",)
    assert repr(middleware.policy) == (
        "Policy(exclude(routes=['/health']), audit('RequestResponse', routes=['/orders/*'], "
        "methods=['POST'], statuses=['2xx'], otherwise='Metadata'), "
        "audit('Metadata', routes=['/reports/*'], sample=0.5), default='None')"
    )
    assert middleware.policy.decide_early("GET", "/elsewhere").level is Level.NONE  # type: ignore[union-attr]


def test_the_environment_names_the_file_and_wins_over_it(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    environ = {"ASGI_AUDIT_CONFIG": str(path), "ASGI_AUDIT_OVERFLOW": "block"}
    middleware = AuditMiddleware(_app, environ=environ)
    assert middleware.settings.overflow == "block"  # the environment's
    assert middleware.settings.service == "orders-api"  # the file's
    # arguments win over both, and a policy from a higher source replaces the file's
    middleware = AuditMiddleware(_app, routes=["/a"], service="x", environ=environ)
    assert middleware.settings.service == "x"
    assert repr(middleware.policy) == (
        "Policy(marked(), audit('RequestResponse', routes=['/a']), default='None')"
    )
    middleware = AuditMiddleware(_app, environ={**environ, "ASGI_AUDIT_EXCLUDE": "/x"})
    assert repr(middleware.policy) == (
        "Policy(exclude(routes=['/x']), audit('RequestResponse'), default='None')"
    )


def test_the_rules_decide_real_exchanges(tmp_path: Path) -> None:
    """Through the middleware: the excluded route leaves no record; the POST that
    succeeds (2xx) keeps its bodies."""
    text = POLICY.replace('sink = "sqlite:///audit.db"\n', "")
    recorder = MemoryRecorder()
    app = AuditMiddleware(EchoApp(), recorder=recorder, config=write(tmp_path, text), environ={})
    asyncio.run(call(app, b"{}", path="/health"))
    asyncio.run(call(app, b'{"n": 1}', path="/orders/7"))
    [kept] = recorder.take_all()
    assert kept.path == "/orders/7" and kept.level is Level.REQUEST_RESPONSE
    assert kept.request_body is not None
    kept.discard()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sinkk = "x"\n', "audit.toml: sinkk: unknown setting; did you mean 'sink'?"),
        ('[[rule]]\nroute = ["/x"]\n', "audit.toml: rule 1: route: unknown setting; did you mean"),
        ('[[rule]]\nlevel = "loud"\n', "audit.toml: rule 1: level:"),
        ("overflow = 3\n", "overflow:"),
        ("rule = 1\n", "audit.toml: rule: expected [[rule]] tables"),
        ("body_limit = \n", "is not valid TOML"),
        ('config = "other.toml"\n', "audit.toml: config: unknown setting"),
    ],
)
def test_mistakes_in_the_file_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        AuditMiddleware(_app, config=write(tmp_path, text), environ={})
    assert message in str(raised.value)


def test_a_missing_or_oversized_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config: cannot read"):
        AuditMiddleware(_app, config=tmp_path / "absent.toml", environ={})
    big = write(tmp_path, "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        AuditMiddleware(_app, config=big, environ={})


def test_config_check_prints_the_effective_settings_masked(tmp_path: Path) -> None:
    text = POLICY.replace("sqlite:///audit.db", "postgresql://audit:hunter2@db/audit")
    path = write(tmp_path, 'signing_key = "/secrets/signing.pem"\n' + text)
    result = CliRunner().invoke(main, ["config", "check", "--config", str(path)], env={})
    assert result.exit_code == 0, result.output
    assert "sink = postgresql://audit:***@db/audit" in result.output
    assert "hunter2" not in result.output and "signing.pem" not in result.output
    assert "signing_key = (set)" in result.output
    assert "body_limit = 8388608" in result.output
    assert "policy = Policy(exclude(routes=['/health'])" in result.output
    environment = {"ASGI_AUDIT_CONFIG": str(path), "ASGI_AUDIT_SERVICE": "from-env"}
    result = CliRunner().invoke(main, ["config", "check"], env=environment)
    assert result.exit_code == 0 and "service = from-env" in result.output


def test_config_check_fails_on_any_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'sink = "sqlite:///a.db"\nmode = "sometimes"\n')
    result = CliRunner().invoke(main, ["config", "check", "--config", str(path)], env={})
    assert result.exit_code == 1
    assert "mode:" in result.output and "sometimes" in result.output
    result = CliRunner().invoke(main, ["config", "check"], env={"ASGI_AUDIT_SINKK": "x"})
    assert result.exit_code == 1 and "did you mean ASGI_AUDIT_SINK?" in result.output
