"""The spool writer redacts bodies before they are hashed, packed and framed: what the
spool holds, and what its record says about the body as received."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_audit import AuditMiddleware
from asgi_audit.recording.chain import record_digest
from asgi_audit.recording.redact_body import UNPARSEABLE, BodyRedactor
from asgi_audit.recording.writer import SpoolRecorder
from harness import EchoApp, call
from spooling import spooled

JSON = [(b"content-type", b"application/json")]


@pytest.fixture
def recorders() -> Iterator[list[SpoolRecorder]]:
    made: list[SpoolRecorder] = []
    yield made
    for recorder in made:
        assert recorder.shutdown(timeout=60)


def record_of(
    recorders: list[SpoolRecorder],
    tmp_path: Path,
    body: bytes,
    *,
    response: bytes | None = None,
    unparseable: str = "redact",
    **options: Any,
) -> Any:
    """``body`` POSTed as JSON through the middleware into a redacting SpoolRecorder; the
    one record the spool then holds."""
    import asyncio

    recorder = SpoolRecorder(
        tmp_path / "spool",
        body_redactor=BodyRedactor(unparseable=unparseable),  # type: ignore[arg-type]
    )
    recorders.append(recorder)
    app = EchoApp(response=response, chunk=1 << 20)
    mw = AuditMiddleware(app, recorder=recorder, environ={}, spill_dir=tmp_path, **options)
    echoed = asyncio.run(call(mw, body, chunk=1 << 20, headers=JSON))
    assert echoed == (body if response is None else response)  # the client sees it all
    assert recorder.flush(timeout=60)
    [record] = spooled(tmp_path / "spool")
    return record


def test_secrets_in_a_json_request_never_reach_the_spool(
    recorders: list[SpoolRecorder], tmp_path: Path
) -> None:
    body = json.dumps({"user": "ann", "password": "hunter2", "n": 1}).encode()
    record = record_of(recorders, tmp_path, body)
    assert json.loads(record.request) == {"user": "ann", "password": "[REDACTED]", "n": 1}
    meta = record.meta["request_body"]
    assert meta["size"] == len(body)  # as received
    assert meta["sha256"] == hashlib.sha256(body).hexdigest()
    assert meta["stored_sha256"] == hashlib.sha256(record.request).hexdigest()
    assert (meta["redacted"], meta["unparseable"]) == (["password"], False)
    # the response was sent as octet-stream: no rules, kept byte for byte
    assert record.response == body and record.meta["response_body"]["redacted"] == []
    assert record.meta["chain_prev"] is None and record.meta["seq"] == 1
    assert len(record_digest(record.meta)) == 64  # its canonical form encodes


def test_a_json_body_without_secrets_is_kept_byte_for_byte(
    recorders: list[SpoolRecorder], tmp_path: Path
) -> None:
    body = b'{ "user" : "ann",\n  "items": [1, 2, 3] }'
    record = record_of(recorders, tmp_path, body)
    assert record.request == body
    assert record.meta["request_body"]["stored_sha256"] == hashlib.sha256(body).hexdigest()


def test_a_body_too_large_to_redact_is_stored_as_a_marker(
    recorders: list[SpoolRecorder], tmp_path: Path
) -> None:
    """A 9 MiB JSON body (spilled) is not parsed by the writer: the marker is stored, with
    the size and digest of the body as received."""
    body = b'{"secret": "s3", "pad": "' + b"x" * (9 << 20) + b'"}'
    record = record_of(
        recorders, tmp_path, body, response=b"ok", memory_limit=1 << 20, body_limit=None
    )
    assert record.request == UNPARSEABLE
    meta = record.meta["request_body"]
    assert (meta["size"], meta["unparseable"]) == (len(body), True)
    assert meta["sha256"] == hashlib.sha256(body).hexdigest()


def test_a_record_streamed_whole_keeps_no_json_body_in_clear(
    recorders: list[SpoolRecorder], tmp_path: Path
) -> None:
    """A record too large for memory (a 7 MiB JSON request, a 10 MiB binary response) is
    streamed from its spill files: the JSON body, which cannot be read to be redacted, is
    the marker; the binary one is there byte for byte."""
    body = b'{"password": "hunter2", "pad": "' + b"y" * (7 << 20) + b'"}'
    binary = random.Random(5).randbytes(10 << 20)
    record = record_of(
        recorders, tmp_path, body, response=binary, memory_limit=1 << 20, body_limit=None
    )
    assert record.request == UNPARSEABLE
    assert record.response == binary
    assert record.meta["request_body"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert record.meta["response_body"]["stored_sha256"] == hashlib.sha256(binary).hexdigest()


def test_keep_stores_an_unreadable_body_as_it_came(
    recorders: list[SpoolRecorder], tmp_path: Path
) -> None:
    body = b'{"password": "hunter2", "broken"'
    record = record_of(recorders, tmp_path, body, unparseable="keep")
    assert record.request == body
    (tmp_path / "other").mkdir()
    redacted = record_of(recorders, tmp_path / "other", body)
    assert redacted.request == UNPARSEABLE


def test_two_large_bodies_are_redacted_and_packed_side_by_side(
    recorders: list[SpoolRecorder], tmp_path: Path
) -> None:
    """Both bodies of 64 KiB or more: the request's is scanned and packed on the
    sidekick thread while the writer does the response's; each comes back as it must
    (the request redacted, the response byte for byte), and the count is right."""
    lines = [{"sku": f"SKU-{n:06d}", "quantity": n % 7} for n in range(4000)]
    body = json.dumps({"password": "hunter2", "lines": lines}).encode()
    response = json.dumps({"lines": lines}).encode() * 2
    assert min(len(body), len(response)) >= 64 << 10
    record = record_of(recorders, tmp_path, body, response=response)
    assert json.loads(record.request) == {"password": "[REDACTED]", "lines": lines}
    assert record.response == response
    request, answer = record.meta["request_body"], record.meta["response_body"]
    assert request["sha256"] == hashlib.sha256(body).hexdigest()
    assert request["stored_sha256"] == hashlib.sha256(record.request).hexdigest()
    assert request["redacted"] == ["password"]
    assert answer["stored_sha256"] == answer["sha256"] == hashlib.sha256(response).hexdigest()
    on_disk = sum(f.stat().st_size for f in (tmp_path / "spool").rglob("*") if f.is_file())
    assert on_disk < (len(body) + len(response)) // 4  # both were packed
    assert recorders[0].bodies_redacted == 1
