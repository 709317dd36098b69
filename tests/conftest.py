"""Shared fixtures: a fresh recorder per test, and helpers to drive raw ASGI apps."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

import seaweed
from asgi_audit import MemoryRecorder
from asgi_audit.capture.spill import executor


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own ASGI_AUDIT_* variables out of the tests."""
    for name in list(os.environ):
        if name.startswith("ASGI_AUDIT_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _own_working_directory(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run each test in an empty working directory of its own.

    Default settings put the spool (spill files included) and the SQLite sink in the
    working directory, which is the repository's checkout, and many tests pass an explicit
    ``environ``, so a variable could not redirect them. Not ``tmp_path``: tests that list
    it expect only what they made there. Subprocesses choose their own ``cwd``."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def recorder() -> Iterator[MemoryRecorder]:
    """An in-memory recorder whose leftover spill files are removed after the test."""
    rec = MemoryRecorder()
    yield rec
    for exchange in rec.take_all():
        exchange.discard()


@pytest.fixture
def held_worker() -> Iterator[threading.Event]:
    """Hold the shared spill worker until the event is set (always released at the end)."""
    event = threading.Event()
    blocker = executor().submit(event.wait, 30)
    try:
        yield event
    finally:
        event.set()
        blocker.result(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[seaweed.SeaweedServer]:
    """One SeaweedFS S3 server on loopback for the whole run, stopped by its PID at the end.

    Its keys go into the standard AWS variables, which is how the store finds credentials;
    profiles, config files and instance metadata are shut out so nothing but loopback is
    ever asked. Missing binary or a server that does not start: skip, or fail in CI."""
    try:
        import boto3  # noqa: F401

        server = seaweed.start(tmp_path_factory.mktemp("seaweedfs"))
    except (ImportError, seaweed.SeaweedUnavailable) as exc:
        reason = f"no S3 test server: {exc}; {seaweed.INSTALL_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    nowhere = str(server.directory / "no-such-aws-file")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        patch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        patch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        patch.setenv("AWS_CONFIG_FILE", nowhere)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("NO_PROXY", "no_proxy"):
            patch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
        try:
            yield server
        finally:
            server.stop()
