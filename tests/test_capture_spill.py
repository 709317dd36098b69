"""A failing spill worker never reaches the app.

Spilling a body to disk happens on a shared worker thread; when that worker lags, the app's
receive slows down to wait for it, and when its writes fail, the app never sees an error:
the body is recorded without its bytes, saying why.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest

from asgi_audit import MemoryRecorder
from harness import (
    Client,
    ReplayApp,
    http_scope,
    middleware,
    request,
    response,
    same_objects,
)


@pytest.mark.timeout(30)
def test_backlogged_spill_that_fails_does_not_reach_the_app(
    recorder: MemoryRecorder, tmp_path: Path, held_worker: threading.Event
) -> None:
    """A spill worker that lags then fails slows the app's receive but never raises into it."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    chunk = b"z" * (64 << 10)
    incoming = request(*[chunk] * 12)
    app = ReplayApp(response(b"ok"))
    audited = middleware(app, recorder, memory_limit=0, body_limit=None, spill_dir=spill_dir)
    spill_dir.rmdir()
    spill_dir.write_bytes(b"")  # not a directory: every spill on the worker now fails

    async def main() -> None:
        client = Client(incoming)
        exchange = asyncio.create_task(audited(http_scope(), client.receive, client.send))
        for _ in range(50):
            await asyncio.sleep(0)
        assert 0 < len(app.received) < len(incoming)  # waiting for the worker to catch up
        held_worker.set()
        await asyncio.wait_for(exchange, 20)
        assert same_objects(client.sent, app.messages)

    asyncio.run(main())
    assert same_objects(app.received, incoming)
    [exchange] = recorder.take_all()
    try:
        body = exchange.request_body  # recorded without its bytes, size and digest exact
        assert body is not None
        assert body.sha256() == hashlib.sha256(chunk * 12).hexdigest()  # worker done
        assert (body.size, body.skipped, body.read()) == (12 * len(chunk), True, b"")
        assert body._job is not None and body._job.error is not None
        assert body._job.error.startswith("ENOTDIR")
    finally:
        exchange.discard()
