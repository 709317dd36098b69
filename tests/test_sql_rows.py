"""The per-record work every SQL sink does, pinned where it takes shortcuts: the JSON of
the metadata (orjson, falling back to the standard library), records rebuilt from their
metadata, index columns taken as they are when plain, and the checks before a row is
written (told at once in the usual case, by the full checks otherwise)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from enum import IntEnum
from http import HTTPStatus
from typing import Any

import orjson
import pytest

from asgi_audit.sinks import sql
from asgi_audit.sinks.record import StoredRecord, json_text
from asgi_audit.sinks.sqlite.sink import _DIALECT as SQLITE
from factories import Records, body


@pytest.fixture
def make() -> Records:
    return Records()


def stdlib_text(value: object) -> str:
    """What :func:`json_text` wrote before it used orjson (and writes when orjson cannot)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# json_text --------------------------------------------------------------------------------

SAME_TEXT = {
    "ascii": {"path": "/orders/7", "status": 201, "route": None, "ok": True},
    "non-ascii": {"path": "/caf\u00e9/\u65e5\u672c", "emoji": "\U0001f600"},
    "control characters": {"text": '\x00\x01\x1f\x7f\n\r\t"\\/\u2028\u2029'},
    "nested": {"headers": [["a", "b"], ("c", "d")], "empty": {}, "list": []},
    "64-bit edges": {"low": -(1 << 63), "high": (1 << 64) - 1},
    "beyond 64 bits": {"big": 1 << 64, "small": -(1 << 63) - 1},
    "key not a string": {1: "one", None: "none", 2.5: "float"},
    "a str subclass": {"method": HTTPStatus.OK.phrase, "kind": type("S", (str,), {})("x")},
}


@pytest.mark.parametrize("value", SAME_TEXT.values(), ids=SAME_TEXT.keys())
def test_json_text_writes_what_the_standard_library_wrote(value: Any) -> None:
    """orjson or not, the text is the one json.dumps gave (what sinks already hold), and
    it reads back equal."""
    text = json_text(value)
    assert text == stdlib_text(value)
    assert json.loads(text) == json.loads(stdlib_text(value))


def test_json_text_of_a_record_reads_back_alike_with_both_parsers(make: Records) -> None:
    record = make(path="/caf\u00e9", request_headers=[("x-\u00e9", "\u00ff\x00")])
    text = json_text(record.metadata())
    assert text == stdlib_text(record.metadata())
    assert json.loads(text) == orjson.loads(text) == json.loads(stdlib_text(record.metadata()))
    assert record.request_body is not None and record.response_body is not None
    rebuilt = StoredRecord.from_metadata(
        json.loads(text), record.request_body.data, record.response_body.data
    )
    assert rebuilt == record


@pytest.mark.parametrize(
    "value",
    [{"path": "/bad-\udcff"}, ["\ud800"], {"\udc80": 1}, {"ok": "\u00e9", "bad": "\udfff"}],
)
def test_json_text_falls_back_on_a_lone_surrogate(value: Any) -> None:
    """orjson refuses a lone surrogate: the text is the standard library's, escaped to
    ASCII (valid UTF-8, so a database takes it), and reads back equal."""
    text = json_text(value)
    assert text.isascii()
    text.encode("utf-8")
    assert json.loads(text) == value


def test_json_text_refuses_what_json_cannot_hold_as_before() -> None:
    """What the standard library refused is still refused, with its own error: bytes, and
    the dataclasses and datetimes orjson alone would write."""

    @dataclasses.dataclass
    class Point:
        x: int

    for value in (b"raw", {"at": datetime(2024, 5, 1, tzinfo=UTC)}, [Point(1)]):
        with pytest.raises(TypeError, match="not JSON serializable"):
            json_text(value)
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        json_text(circular)


def test_json_text_of_an_int_enum_is_its_number() -> None:
    class Level(IntEnum):
        HIGH = 3

    assert json_text({"level": Level.HIGH}) == stdlib_text({"level": Level.HIGH}) == '{"level":3}'


# StoredRecord.from_metadata ---------------------------------------------------------------


def test_from_metadata_rebuilds_the_record(make: Records) -> None:
    record = make()
    assert record.request_body is not None and record.response_body is not None
    rebuilt = StoredRecord.from_metadata(
        record.metadata(), record.request_body.data, record.response_body.data
    )
    assert rebuilt == record


def test_from_metadata_of_json_makes_headers_tuples_of_text(make: Records) -> None:
    """Headers come back from JSON as lists: they are made (str, str) tuples again."""
    meta = json.loads(json_text(make().metadata()))
    meta["response_headers"] = [["x-count", 3]]
    rebuilt = StoredRecord.from_metadata(meta)
    assert rebuilt.request_headers == [
        ("content-type", "application/json"),
        ("authorization", "***"),
    ]
    assert rebuilt.response_headers == [("x-count", "3")]


def test_from_metadata_without_newer_fields_or_with_unknown_ones(make: Records) -> None:
    """Metadata written before a field existed rebuilds with its default; a key that is
    no field (written by a newer version) is dropped; a required field missing fails."""
    record = make(chain=1, chain_prev="ab" * 32)
    meta = record.metadata()
    del meta["chain"], meta["chain_prev"], meta["response_trailers"]
    meta["written_by_a_newer_version"] = {"x": 1}
    rebuilt = StoredRecord.from_metadata(meta)
    assert rebuilt.chain is None and rebuilt.chain_prev is None
    assert rebuilt.response_trailers == []
    assert rebuilt.request_headers == record.request_headers
    assert not hasattr(rebuilt, "written_by_a_newer_version")
    del meta["id"]
    with pytest.raises(TypeError, match="id"):
        StoredRecord.from_metadata(meta)


# Index columns ----------------------------------------------------------------------------

WITHOUT_SHORTCUT = dataclasses.replace(SQLITE, plain=None)

INDEXED = {
    "ascii": {},
    "no route or trace": {"route": None, "trace_id": None},
    "empty texts": {"correlation_id": "", "service": "", "route": ""},
    "as long as fits": {"path": "/" + "a" * (sql.INDEX_BYTES - 1)},
    "one byte too long": {"path": "/" + "a" * sql.INDEX_BYTES},
    "non-ascii": {"path": "/caf\u00e9", "service": "\u65e5" * 100},
    "lone surrogate": {"correlation_id": "id-\udcff", "stream": "s-\ud800"},
    "long stream": {"stream": "s" * 1000},
}


@pytest.mark.parametrize("changes", INDEXED.values(), ids=INDEXED.keys())
def test_plain_index_columns_are_what_the_full_path_makes(
    make: Records, changes: dict[str, Any]
) -> None:
    """Taking plain text as it is gives the row that escaping and bounding every value
    gives."""
    record = make(**changes)
    assert sql.row(record, SQLITE) == sql.row(record, WITHOUT_SHORTCUT)
    for value in changes.values():
        if isinstance(value, str):
            assert SQLITE.index(value) == sql.bounded(sql.surrogate_safe(value))


# Checks before a row is written -----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"seq": True}, "seq is a bool, not an integer"),
        ({"status": 200.0}, "status is a float, not an integer"),
        ({"started_at_ns": None}, "started_at_ns is a NoneType, not an integer"),
        (
            {"status": 1 << 31},
            "status 2147483648 is out of its column's range [-2147483648, 2147483647]",
        ),
        ({"route": 7}, "route is a int, not a string"),
        ({"service": None}, "service is a NoneType, not a string"),
        ({"id": "\u00e9" * 129}, "its id has more than 256 bytes"),
        ({"id": "i" * 257}, "its id has more than 256 bytes"),
    ],
)
def test_wrong_fields_name_what_is_wrong(
    make: Records, changes: dict[str, Any], reason: str
) -> None:
    assert sql.wrong_fields(make(**changes), SQLITE) == reason


def test_wrong_fields_take_subclasses_as_before(make: Records) -> None:
    """An IntEnum status (HTTPStatus) and str subclasses pass, as isinstance lets them."""
    text = type("Text", (str,), {})
    record = make(status=HTTPStatus.CREATED, method=text("POST"), route=text("/r"))
    assert sql.wrong_fields(record, SQLITE) is None
    assert sql.wrong_fields(make(id="i" * 256), SQLITE) is None


def test_rows_refuse_at_the_limits_too_large_sets(make: Records) -> None:
    """The shortcut only spares measuring what surely fits: at limits equal to the row's
    own sizes (where 4 bytes a character does not fit) the row is taken, one byte less
    and it is refused with too_large's reason."""
    record = make(path="/\u65e5" * 40, request_body=body(b"x" * 2000))
    row = sql.row(record, SQLITE)
    largest = max(sql.utf8_size(v) for v in row if isinstance(v, str | bytes))
    total = sql.ROW_OVERHEAD + sum(sql.utf8_size(v) for v in row if isinstance(v, str | bytes))
    assert sql.rows([record], SQLITE, sql.Limits(largest, total), "t") == [row]
    for limits in (sql.Limits(largest - 1, total), sql.Limits(largest, total - 1)):
        reason = sql.too_large(row, limits)
        assert reason is not None
        with pytest.raises(Exception, match=reason.split(" over ")[0]):
            sql.rows([record], SQLITE, limits, "t")
