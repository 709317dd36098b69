"""``asgi-audit export --format har``: a recorded session (JSON, binary, gzip, streamed,
truncated) as HAR 1.2, validated against the ``har-schema`` JSON Schema, every stored byte
recovered from the file."""

from __future__ import annotations

import base64
import dataclasses
import json
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jsonschema import Draft6Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT6

from asgi_audit.cli import main
from asgi_audit.cli.exports import printable_json_bytes
from asgi_audit.cli.har import har_entry
from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.record import StoredBody
from factories import Records, body
from session import BIG, BODY_LIMIT, GZIPPED, GZIPPED_JSON, STREAM_CHUNKS, Session, record_session

SCHEMAS = Path(__file__).parent / "data" / "har-schema"


def har_validator() -> Draft6Validator:
    """The vendored schema set, each file under its own ``$id`` (``log.json#``...)."""
    resources = []
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        resources.append((path.name, Resource.from_contents(schema, default_specification=DRAFT6)))
    registry: Registry[Any] = Registry().with_resources(resources)
    root = json.loads((SCHEMAS / "har.json").read_text())
    return Draft6Validator(root, registry=registry)


def validate(document: Any) -> None:
    errors = sorted(har_validator().iter_errors(document), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]


def stored_bytes(part: dict[str, Any]) -> bytes | None:
    """The exact stored bytes of a ``postData`` or ``content``, as the export documents."""
    if "_wire" in part:
        return base64.b64decode(part["_wire"]["text"])
    if "text" not in part:
        return None
    if part.get("encoding") == "base64" or part.get("_encoding") == "base64":
        return base64.b64decode(part["text"])
    return str(part["text"]).encode("utf-8")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return record_session(tmp_path_factory.mktemp("session"))


def export(session: Session, tmp_path: Path, *args: str) -> dict[str, Any]:
    target = tmp_path / "session.har"
    result = CliRunner().invoke(
        main, ["export", "--sink", session.sink, "--format", "har", "-o", str(target), *args]
    )
    assert result.exit_code == 0, result.output
    assert target.stat().st_mode & 0o777 == 0o600
    document: dict[str, Any] = json.loads(target.read_bytes())
    return document


@pytest.mark.server
def test_a_recorded_session_is_valid_har_and_every_stored_byte_comes_back(
    session: Session, tmp_path: Path
) -> None:
    document = export(session, tmp_path)
    validate(document)
    log = document["log"]
    assert log["version"] == "1.2" and log["pages"] == [] and log["creator"]["name"] == "asgi-audit"
    entries = {
        f"{e['request']['method']} {e['request']['url'].split('?')[0]}": e for e in log["entries"]
    }
    assert len(log["entries"]) == len(session.sent) == 6
    with closing(open_sink(session.sink, create=False)) as sink:
        records = {r.id: r for r in sink.search(Query(limit=None, with_bodies=True))}
    for entry in log["entries"]:
        record = records[entry["_id"]]
        post = entry["request"].get("postData")
        request_data = record.request_body.data if record.request_body else None
        if request_data:
            assert post is not None and stored_bytes(post) == request_data
        response_data = record.response_body.data if record.response_body else None
        assert stored_bytes(entry["response"]["content"]) == (response_data or None)
    base = next(iter(entries)).split(" ", 1)[1].rsplit("/orders", 1)[0]

    # JSON, with what redaction replaced named and nothing secret left
    order = entries[f"POST {base}/orders/7"]
    assert json.loads(order["request"]["postData"]["text"])["password"] == "[REDACTED]"
    assert order["request"]["postData"]["_redacted"] == ["password"]
    assert order["request"]["cookies"] == []  # the Cookie header is redacted
    headers = dict((h["name"], h["value"]) for h in order["request"]["headers"])
    assert headers["authorization"] == "[REDACTED]" and headers["x-note"] == "caf\xe9"
    assert {"name": "token", "value": "[REDACTED]"} in order["request"]["queryString"]
    assert {"name": "verbose", "value": "1"} in order["request"]["queryString"]
    assert "s3cret" not in json.dumps(document) and "hunter2" not in json.dumps(document)
    assert order["response"]["status"] == 200 and order["response"]["statusText"] == "OK"
    timings = order["timings"]
    assert order["time"] == pytest.approx(timings["send"] + timings["wait"] + timings["receive"])

    # binary both ways: base64, the request's in the `_encoding` extension
    blob = entries[f"POST {base}/blobs"]
    assert blob["request"]["postData"]["_encoding"] == "base64"
    assert stored_bytes(blob["request"]["postData"]) == session.sent["POST /blobs"]
    assert blob["response"]["content"]["encoding"] == "base64"
    assert stored_bytes(blob["response"]["content"]) == session.received["POST /blobs"]

    # gzip: decoded in `text` as HAR wants it, the wire bytes in `_wire`
    report = entries[f"GET {base}/report"]["response"]["content"]
    assert report["text"].encode() == GZIPPED_JSON and report["size"] == len(GZIPPED_JSON)
    assert base64.b64decode(report["_wire"]["text"]) == GZIPPED
    assert report["compression"] == len(GZIPPED_JSON) - len(GZIPPED)

    # streamed: every chunk, in order
    stream = entries[f"GET {base}/stream"]["response"]["content"]
    assert stream["text"].encode() == b"".join(STREAM_CHUNKS)

    # truncated: the stored prefix, the true size and digest beside it
    big = entries[f"POST {base}/big"]
    for part in (big["request"]["postData"], big["response"]["content"]):
        assert part["_truncated"] is True and part["_size"] == len(BIG)
        assert stored_bytes(part) == BIG[:BODY_LIMIT]
    assert big["request"]["bodySize"] == len(BIG)


@pytest.mark.server
def test_har_export_takes_the_ls_filters(session: Session, tmp_path: Path) -> None:
    document = export(session, tmp_path, "--method", "GET", "--limit", "2")
    validate(document)
    methods = [entry["request"]["method"] for entry in document["log"]["entries"]]
    assert methods == ["GET", "GET"]


records = Records()


def test_an_entry_without_response_or_bodies_is_still_valid_har() -> None:
    record = dataclasses.replace(
        records(),
        status=None,
        response_started_at_ns=None,
        outcome="disconnected",
        error="client went away",
        request_body=None,
        response_body=None,
    )
    entry = har_entry(record)
    validate(
        {"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": [entry]}}
    )
    assert entry["response"]["status"] == 0 and entry["comment"] == "client went away"
    assert "postData" not in entry["request"]
    assert entry["response"]["content"]["comment"].startswith("body not kept")
    assert entry["timings"]["wait"] == record.duration_ns / 1e6 and entry["timings"]["receive"] == 0


def test_cookies_control_characters_and_odd_statuses() -> None:
    record = records(
        request_headers=[("cookie", "a=1; b=two=2"), ("x-evil", "\x1b]0;owned\x07")],
        response_headers=[
            ("set-cookie", "sid=abc; Path=/; HttpOnly; Secure; Domain=example.test"),
            ("content-type", "text/plain"),
        ],
        redacted_headers=[],
        status=799,
        path="/caf\xe9 menu/\u202e",
        response_body=body("\x1b[2Jplain \x85 text \u202e".encode()),
    )
    entry = har_entry(record)
    assert entry["request"]["cookies"] == [
        {"name": "a", "value": "1"},
        {"name": "b", "value": "two=2"},
    ]
    assert entry["response"]["cookies"] == [
        {
            "name": "sid",
            "value": "abc",
            "path": "/",
            "httpOnly": True,
            "secure": True,
            "domain": "example.test",
        }
    ]
    assert entry["response"]["statusText"] == ""
    assert entry["request"]["url"].startswith(
        "https://api.example.test/caf%C3%A9%20menu/%E2%80%AE?"
    )
    text = printable_json_bytes(entry)
    assert not any(0x80 <= ord(char) < 0xA0 for char in text.decode())  # no raw C1
    assert b"\x1b" not in text and b"\x07" not in text and "\u202e".encode() not in text
    assert json.loads(text) == entry


def test_a_body_that_does_not_decode_as_its_encoding_is_kept_as_stored() -> None:
    broken = b"\x1f\x8b not really gzip"
    record = records(
        response_headers=[("content-encoding", "gzip"), ("content-type", "application/json")],
        response_body=StoredBody(size=len(broken), sha256="0" * 64, data=broken),
    )
    content = har_entry(record)["response"]["content"]
    assert "_wire" not in content and "compression" not in content
    assert stored_bytes(content) == broken


def test_har_to_stdout_and_an_empty_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    open_sink(url).close()
    result = CliRunner().invoke(main, ["export", "--sink", url, "--format", "har"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout_bytes)
    validate(document)
    assert document["log"]["entries"] == []
