"""The asgi-audit command: version, help, and the demo against a real uvicorn server."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from asgi_audit import __version__
from asgi_audit.cli import main


def test_version() -> None:
    """--version prints the package version."""
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_unknown_command_fails_with_a_clear_error() -> None:
    """An unknown subcommand exits non-zero and says so."""
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.output


@pytest.mark.server
def test_demo_serves_records_and_verifies_the_order() -> None:
    """The demo runs uvicorn, records five audited exchanges and stores the order exactly."""
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    assert "recorded 5 exchanges" in result.output
    assert "POST /orders/7 route=/orders/{order_id} status=200 complete" in result.output
    assert "GET /exports/orders.ndjson route=/exports/orders.ndjson status=200" in result.output
    assert "stored byte for byte: True" in result.output
    assert "GET /health route" not in result.output
