"""Shared fixtures: a fresh recorder per test, and helpers to drive raw ASGI apps."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from asgi_audit import MemoryRecorder
from asgi_audit.spill import executor


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own ASGI_AUDIT_* variables out of the tests."""
    for name in list(os.environ):
        if name.startswith("ASGI_AUDIT_"):
            monkeypatch.delenv(name)


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
