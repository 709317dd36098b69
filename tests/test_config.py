"""Configuration: arguments over environment, validation at construction, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asgi_audit import AuditMiddleware, ConfigError, Level, make_rule
from asgi_audit._types import Receive, Scope, Send
from asgi_audit.shipping.delivery import Delivery


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    """An opaque ASGI app: it declares no routes the middleware could check."""


def test_no_arguments_audits_everything_at_request_response() -> None:
    """The default policy audits every exchange with both bodies."""
    middleware = AuditMiddleware(_app, environ={})
    decision = middleware.policy.decide_early("GET", "/anything")
    assert decision.level is Level.REQUEST_RESPONSE  # type: ignore[union-attr]
    assert middleware.settings.overflow == "block"


def test_environment_configures_the_middleware() -> None:
    """ASGI_AUDIT_* variables set routes, methods, exclusions, limits and policies."""
    middleware = AuditMiddleware(
        _app,
        environ={
            "ASGI_AUDIT_ROUTES": "/orders/{order_id}, /admin/*",
            "ASGI_AUDIT_METHODS": "post,put",
            "ASGI_AUDIT_EXCLUDE": "/health",
            "ASGI_AUDIT_LEVEL": "request",
            "ASGI_AUDIT_MEMORY_LIMIT": "2MiB",
            "ASGI_AUDIT_BODY_LIMIT": "none",
            "ASGI_AUDIT_OVERFLOW": "drop",
            "ASGI_AUDIT_OVER_LIMIT": "skip_body",
            "ASGI_AUDIT_SERVICE": "orders-api",
            "ASGI_AUDIT_SAMPLE": "0.5",
        },
    )
    settings = middleware.settings
    assert (settings.memory_limit, settings.body_limit) == (2 << 20, None)
    assert (settings.overflow, settings.over_limit, settings.service) == (
        "drop",
        "skip_body",
        "orders-api",
    )
    assert repr(middleware.policy) == (
        "Policy(exclude(routes=['/health']), marked(), audit('Request', routes=["
        "'/orders/{order_id}', '/admin/*'], methods=['POST', 'PUT'], sample=0.5), "
        "default='None')"
    )


def test_arguments_win_over_the_environment() -> None:
    """A keyword argument replaces the same setting from the environment."""
    middleware = AuditMiddleware(
        _app,
        memory_limit=1024,
        environ={"ASGI_AUDIT_MEMORY_LIMIT": "9", "ASGI_AUDIT_LEVEL": "x"},
        level="Metadata",
    )
    assert middleware.settings.memory_limit == 1024


def test_sizes_accept_units() -> None:
    """Byte sizes take plain integers or SI/IEC units."""
    middleware = AuditMiddleware(_app, memory_limit="64KiB", body_limit="1MB", environ={})
    assert (middleware.settings.memory_limit, middleware.settings.body_limit) == (65536, 10**6)


@pytest.mark.parametrize(
    ("kwargs", "environ", "parameter"),
    [
        ({"memory_limit": -1}, {}, "memory_limit"),
        ({"body_limit": "lots"}, {}, "body_limit"),
        ({"body_limit": True}, {}, "body_limit"),
        ({"overflow": "spill"}, {}, "overflow"),
        ({"over_limit": "cut"}, {}, "over_limit"),
        ({"level": "verbose"}, {}, "level"),
        ({"service": "my service"}, {}, "service"),
        ({"spill_dir": "/nonexistent/asgi-audit"}, {}, "spill_dir"),
        ({}, {"ASGI_AUDIT_ROUTE": "/x"}, "ASGI_AUDIT_ROUTE"),
        ({}, {"ASGI_AUDIT_OVERFLOW": "sometimes"}, "overflow"),
        ({"routes": ["/a"], "rules": [make_rule()]}, {}, "rules"),
        ({"rules": ["/a"]}, {}, "rules"),
    ],
)
def test_bad_configuration_fails_naming_the_parameter(
    kwargs: dict[str, Any], environ: dict[str, str], parameter: str
) -> None:
    """Invalid settings fail at construction, naming the parameter or variable."""
    with pytest.raises(ConfigError) as caught:
        AuditMiddleware(_app, environ=environ, **kwargs)
    assert caught.value.parameter == parameter


def test_unknown_environment_variable_suggests_the_right_one() -> None:
    """A misspelt ASGI_AUDIT_ variable is an error with a suggestion, not ignored."""
    with pytest.raises(ConfigError, match="did you mean ASGI_AUDIT_ROUTES"):
        AuditMiddleware(_app, environ={"ASGI_AUDIT_ROUTE": "/x"})


@pytest.mark.parametrize(
    ("kwargs", "environ", "parameter", "message"),
    [
        ({"sink": "s3://"}, {}, "sink", "bucket"),
        ({}, {"ASGI_AUDIT_SINK": "s3://bucket/p?colour=blue"}, "ASGI_AUDIT_SINK", "colour"),
        ({"sink": "postgresql://localhost/db?table=drop;table"}, {}, "sink", "table"),
    ],
)
def test_server_store_urls_are_checked_at_construction(
    kwargs: dict[str, Any], environ: dict[str, str], parameter: str, message: str
) -> None:
    """PostgreSQL and S3 URLs are checked when the middleware is built (no connection)."""
    with pytest.raises(ConfigError, match=message) as caught:
        AuditMiddleware(_app, environ=environ, **kwargs)
    assert caught.value.parameter == parameter


def test_server_store_urls_are_accepted() -> None:
    """Well-formed postgresql:// and s3:// URLs pass without touching the network."""
    for url in (
        "postgresql://audit@db.internal/audit?table=records",
        "s3://audit-bucket/orders?region=eu-west-1",
    ):
        assert AuditMiddleware(_app, sink=url, environ={}).settings.sink == url


@pytest.mark.parametrize(
    ("kwargs", "environ", "parameter", "message"),
    [
        ({"sink": "audit.db"}, {}, "sink", "expected a URL"),
        ({"sink": "mysql://x/y"}, {}, "sink", "unknown kind of sink 'mysql'"),
        ({}, {"ASGI_AUDIT_SINK": "ftp://x"}, "ASGI_AUDIT_SINK", "known: sqlite://"),
        ({"ship": "sidecar"}, {}, "ship", "'process', 'thread', 'off'"),
        ({"fsync": "sometimes"}, {}, "fsync", "'always', 'batch', 'off'"),
        ({"redact_headers": ["bad header"]}, {}, "redact_headers", "not a header name"),
        ({"redact_query": ["a=b"]}, {}, "redact_query", "not a query parameter name"),
        ({"redact_fields": ["card..number"]}, {}, "redact_fields", "dotted path"),
        ({}, {"ASGI_AUDIT_REDACT_FIELDS": "a.b*"}, "redact_fields", "dotted path"),
        ({"redact_unparseable": "drop"}, {}, "redact_unparseable", "'redact', 'keep'"),
        ({}, {"ASGI_AUDIT_REDACT_BODIES": "maybe"}, "redact_bodies", "true or false"),
        ({"checkpoint_interval": 0}, {}, "checkpoint_interval", "more than 0"),
        ({"signing_key": "/nonexistent/audit.pem"}, {}, "signing_key", "cannot read the key"),
        ({"shutdown_timeout": -1}, {}, "shutdown_timeout", "non-negative"),
        ({}, {"ASGI_AUDIT_SHUTDOWN_TIMEOUT": "soon"}, "shutdown_timeout", "expected seconds"),
    ],
)
def test_bad_delivery_settings_fail_clearly(
    kwargs: dict[str, Any], environ: dict[str, str], parameter: str, message: str
) -> None:
    """Sink URL, shipping mode, fsync policy and redaction list are checked up front."""
    with pytest.raises(ConfigError, match=message) as caught:
        AuditMiddleware(_app, environ=environ, **kwargs)
    assert caught.value.parameter == parameter


def test_delivery_defaults_and_environment() -> None:
    """Defaults: SQLite in the working directory, a local spool, a shipper child process,
    batch fsync, the standard secret headers; all settable by environment."""
    defaults = AuditMiddleware(_app, environ={}).settings
    assert (defaults.sink, defaults.spool, defaults.ship, defaults.fsync) == (
        "sqlite:///asgi-audit.db",
        "asgi-audit-spool",
        "process",
        "batch",
    )
    assert "authorization" in defaults.redact_headers
    configured = AuditMiddleware(
        _app,
        environ={
            "ASGI_AUDIT_SINK": "jsonl:////var/audit",
            "ASGI_AUDIT_SPOOL": "/var/spool/audit",
            "ASGI_AUDIT_SHIP": "off",
            "ASGI_AUDIT_FSYNC": "always",
            "ASGI_AUDIT_REDACT_HEADERS": "X-Trace-Secret",
            "ASGI_AUDIT_REDACT_HEADERS_DEFAULT": "false",
            "ASGI_AUDIT_SHUTDOWN_TIMEOUT": "5",
        },
    ).settings
    assert (configured.sink, configured.spool, configured.ship, configured.fsync) == (
        "jsonl:////var/audit",
        "/var/spool/audit",
        "off",
        "always",
    )
    assert configured.redact_headers == ("x-trace-secret",)
    assert configured.shutdown_timeout == 5.0


def test_recorder_must_be_a_recorder() -> None:
    """Passing something that is not a Recorder fails at construction."""
    with pytest.raises(TypeError, match="recorder"):
        AuditMiddleware(_app, recorder=object(), environ={})  # type: ignore[arg-type]


def test_construction_starts_no_thread() -> None:
    """Building the middleware is cheap: no thread starts before an audited exchange."""
    import threading

    before = {t.ident for t in threading.enumerate()}
    AuditMiddleware(_app, environ={})
    assert {t.ident for t in threading.enumerate()} == before


def test_body_limit_none_means_no_limit() -> None:
    """body_limit=None lifts the limit; leaving it out keeps the 64 MiB default."""
    assert AuditMiddleware(_app, body_limit=None, environ={}).settings.body_limit is None
    assert AuditMiddleware(_app, environ={}).settings.body_limit == 64 << 20
    from_env = AuditMiddleware(_app, environ={"ASGI_AUDIT_BODY_LIMIT": "1KiB"})
    assert from_env.settings.body_limit == 1024


def test_spool_limit_reaches_the_recorder(tmp_path: Any) -> None:
    """spool_limit caps the spool's disk use (the recorder's disk cap); unlimited by default."""
    assert AuditMiddleware(_app, environ={}).settings.spool_limit is None
    middleware = AuditMiddleware(_app, spool=str(tmp_path), spool_limit="1GiB", environ={})
    assert isinstance(middleware.recorder, Delivery)
    assert middleware.recorder.spool_recorder.disk_cap == 1 << 30
    with pytest.raises(ConfigError) as caught:
        AuditMiddleware(_app, environ={"ASGI_AUDIT_SPOOL_LIMIT": "-3"})
    assert caught.value.parameter == "spool_limit"


def test_redaction_and_signing_settings_add_to_the_defaults(tmp_path: Path) -> None:
    """redact_headers adds to the default secret headers; query names, field paths and
    the unparseable policy come from arguments or the environment; the signing key's
    text never shows in the settings' repr."""
    from asgi_audit.recording.signing import generate

    private, _ = generate()
    key = tmp_path / "audit.pem"
    key.write_bytes(private)
    settings = AuditMiddleware(
        _app,
        redact_headers=["X-Session"],
        redact_fields=["card.number", "**.ssn"],
        signing_key=str(key),
        environ={
            "ASGI_AUDIT_REDACT_QUERY": "Session,ticket",
            "ASGI_AUDIT_REDACT_UNPARSEABLE": "keep",
            "ASGI_AUDIT_CHECKPOINT_INTERVAL": "15",
        },
    ).settings
    assert settings.redact_headers[-1] == "x-session"
    assert {"authorization", "x-auth-token", "x-csrf-token"} <= set(settings.redact_headers)
    assert settings.redact_query == ("session", "ticket")
    assert settings.redact_fields == ("card.number", "**.ssn")
    assert (settings.redact_unparseable, settings.checkpoint_interval) == ("keep", 15.0)
    assert settings.redact_bodies is True
    assert settings.signing_key == str(key)
    pem = AuditMiddleware(_app, environ={"ASGI_AUDIT_SIGNING_KEY": private.decode()}).settings
    assert "PRIVATE" not in repr(pem)


def test_a_signing_key_that_is_not_one_fails_without_showing_it(tmp_path: Path) -> None:
    from asgi_audit.recording.signing import generate

    _, public = generate()
    with pytest.raises(ConfigError, match="Ed25519 private key") as caught:
        AuditMiddleware(_app, environ={"ASGI_AUDIT_SIGNING_KEY": public.decode()})
    assert "BEGIN" not in str(caught.value)


def test_kubernetes_service_links_are_not_settings() -> None:
    """A Service named ``asgi-audit`` in the namespace makes Kubernetes inject these into
    every container: the app must still start; a real typo still fails."""
    injected = {
        "ASGI_AUDIT_SERVICE_HOST": "10.0.0.12",
        "ASGI_AUDIT_SERVICE_PORT": "8000",
        "ASGI_AUDIT_SERVICE_PORT_HTTP": "8000",
        "ASGI_AUDIT_PORT": "tcp://10.0.0.12:8000",
        "ASGI_AUDIT_PORT_8000_TCP_ADDR": "10.0.0.12",
        "ASGI_AUDIT_SERVICE": "orders",
    }
    middleware = AuditMiddleware(_app, environ=injected)
    assert middleware.settings.service == "orders"
    with pytest.raises(ConfigError, match="ASGI_AUDIT_SERVICEE"):
        AuditMiddleware(_app, environ={"ASGI_AUDIT_SERVICEE": "x"})
