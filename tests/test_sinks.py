"""The store contract, run against every store, then what is particular to each one.

A new store joins the contract suite by adding its name to ``CONTRACT_STORES`` and a
``<name>_url`` fixture that returns a fresh URL for one test (or skips when the service
it needs is not configured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_audit.errors import ConfigError, CorruptRecord, RecordRefused, SinkError
from asgi_audit.sinks import DEFAULT_SINK_URL, Query, Sink, open_sink
from asgi_audit.sinks.jsonl import JsonlSink
from asgi_audit.sinks.record import StoredRecord
from asgi_audit.sinks.sql import bounded
from asgi_audit.sinks.sqlite.sink import SqliteSink
from factories import BASE_NS, DAY_NS, LATIN1_HIGH, SECOND_NS, Records, body
from postgres_server import admin_connection, fresh_table
from postgres_server import store_url as postgres_store_url
from seaweed import SeaweedServer

CONTRACT_STORES = ["memory", "jsonl", "sqlite", "postgres", "s3"]
STORE_MARKS = {"s3": pytest.mark.s3, "postgres": pytest.mark.postgres}
"""Markers of stores that need a server, so that ``-m "not s3"`` leaves them out."""

Opener = Callable[[], Sink]


def stripped(record: StoredRecord) -> StoredRecord:
    """What a listing without bodies returns for ``record``."""
    return StoredRecord.from_metadata(record.metadata())


def ids(records: Iterator[StoredRecord] | list[StoredRecord]) -> list[str]:
    return [record.id for record in records]


def everything(**changes: Any) -> Query:
    """A query with no filter and no limit, bodies included, unless changed."""
    return dataclasses.replace(Query(limit=None, with_bodies=True), **changes)


@pytest.fixture
def make() -> Records:
    """A record factory of this test's own."""
    return Records()


@pytest.fixture
def memory_url() -> str:
    """A store name no other test uses (named memory stores are process-global)."""
    return f"memory://test-{uuid.uuid4()}"


@pytest.fixture
def jsonl_url(tmp_path: Path) -> str:
    """An absolute directory path, hence four slashes."""
    return f"jsonl:///{tmp_path / 'jsonl'}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An absolute file path in a directory that does not exist yet."""
    return f"sqlite:///{tmp_path / 'db' / 'audit.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A table of its own on the test server, dropped afterwards with its checkpoints
    table (skips without a server)."""
    with fresh_table() as table:
        yield postgres_store_url(table)


@pytest.fixture
def s3_url(s3_server: SeaweedServer) -> str:
    """A fresh prefix in a bucket the run shares (every new bucket grows volumes: slower)."""
    return s3_server.url(s3_server.make_bucket("contract"), f"t-{uuid.uuid4()}")


@pytest.fixture(
    params=[pytest.param(name, marks=STORE_MARKS.get(name, ())) for name in CONTRACT_STORES]
)
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh store of each kind in turn."""
    url = request.getfixturevalue(f"{request.param}_url")
    assert isinstance(url, str)
    return url


@pytest.fixture
def open_postgres(store_url: str) -> Iterator[Opener]:
    """Opens new instances on this test's URL; every one is closed at the end."""
    opened: list[Sink] = []

    def opener() -> Sink:
        store = open_sink(store_url)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(open_postgres: Opener) -> Sink:
    """One open instance of this test's store."""
    return open_postgres()


# The contract -------------------------------------------------------------------------


def test_records_read_back_equal_to_what_was_written(store: Sink, make: Records) -> None:
    """get and search(with_bodies) return every field and the exact body bytes."""
    records = [make() for _ in range(3)]
    store.write_batch(records)
    for record in records:
        assert store.get(record.id) == record
    assert list(store.search(everything(newest_first=False))) == records


def test_listing_leaves_out_body_bytes_only(store: Sink, make: Records) -> None:
    """Without with_bodies, results keep sizes and digests but carry no body data."""
    record = make()
    store.write_batch([record])
    (listed,) = store.search(Query())
    assert listed == stripped(record)
    assert listed.request_body is not None
    assert listed.request_body.data is None
    assert listed.request_body.sha256 == hashlib.sha256(b'{"order": 0}').hexdigest()


def test_same_batch_twice_keeps_one_copy(store: Sink, make: Records) -> None:
    """Redelivering a whole batch (at-least-once) leaves one copy of each record."""
    batch = [make() for _ in range(4)]
    store.write_batch(batch)
    store.write_batch(batch)
    assert store.count() == 4
    assert list(store.search(everything(newest_first=False))) == batch


def test_overlapping_batch_adds_only_new_records(store: Sink, make: Records) -> None:
    """A batch overlapping stored ids adds the new ones and keeps the first copy of the rest."""
    first = [make() for _ in range(3)]
    store.write_batch(first)
    changed = dataclasses.replace(first[2], status=500, outcome="app_error")
    later = [make() for _ in range(2)]
    store.write_batch([first[1], changed, *later])
    assert store.count() == 5
    assert store.get(first[2].id) == first[2]
    assert ids(store.search(everything(newest_first=False))) == ids(first + later)


def test_duplicates_inside_one_batch_keep_one_copy(store: Sink, make: Records) -> None:
    """An id repeated inside a single batch is stored once, first occurrence kept."""
    record = make()
    store.write_batch([record, dataclasses.replace(record, status=503), record])
    assert store.count() == 1
    assert store.get(record.id) == record


def test_empty_batch_changes_nothing(store: Sink) -> None:
    """Writing no records is allowed and stores nothing."""
    store.write_batch([])
    assert store.count() == 0
    assert list(store.search(everything())) == []


def test_time_range_includes_since_and_excludes_until(store: Sink, make: Records) -> None:
    """since_ns is inclusive, until_ns exclusive, either may be given alone."""
    records = [make() for _ in range(5)]
    store.write_batch(records)
    start = [record.started_at_ns for record in records]
    window = everything(since_ns=start[1], until_ns=start[3], newest_first=False)
    assert ids(store.search(window)) == ids(records[1:3])
    assert ids(store.search(everything(since_ns=start[3]))) == ids(records[:2:-1])
    assert ids(store.search(everything(until_ns=start[1]))) == [records[0].id]
    assert list(store.search(everything(since_ns=start[4] + 1))) == []


def test_route_method_and_correlation_filters(store: Sink, make: Records) -> None:
    """route, method and correlation_id match exactly, and combine with AND."""
    order = make()
    listing = make(method="GET", route="/orders", path="/orders")
    health = make(method="GET", route=None, path="/healthz", correlation_id="probe")
    store.write_batch([order, listing, health])
    assert ids(store.search(everything(route="/orders/{order_id}"))) == [order.id]
    assert ids(store.search(everything(method="GET", newest_first=False))) == ids([listing, health])
    assert ids(store.search(everything(method="GET", route="/orders"))) == [listing.id]
    assert ids(store.search(everything(correlation_id="probe"))) == [health.id]
    assert list(store.search(everything(method="post"))) == []
    assert list(store.search(everything(route="/orders/1"))) == []


def test_status_ranges_are_inclusive_and_skip_missing_status(store: Sink, make: Records) -> None:
    """status_low/high bound inclusively; an exchange with no status never matches them."""
    by_status = {status: make(status=status) for status in (200, 204, 400, 404, 499, 500, 503)}
    no_response = make(status=None, outcome="client_disconnected", response_body=None)
    store.write_batch([*by_status.values(), no_response])

    def statuses(**bounds: int) -> list[int | None]:
        found = store.search(everything(newest_first=False, **bounds))
        return [record.status for record in found]

    assert statuses(status_low=400, status_high=499) == [400, 404, 499]
    assert statuses(status_low=500) == [500, 503]
    assert statuses(status_high=204) == [200, 204]
    assert statuses(status_low=404, status_high=404) == [404]
    assert None in statuses()


def test_order_both_ways_with_ties_broken_by_id(store: Sink, make: Records) -> None:
    """Results follow (started_at_ns, id): newest first by default, oldest first on request."""
    same_time = BASE_NS + 30 * SECOND_NS
    tied = [make(id=f"{letter}{uuid.uuid4()}", started_at_ns=same_time) for letter in "cab"]
    others = [make() for _ in range(3)]
    store.write_batch([*tied, *others])
    oldest_first = sorted([*tied, *others], key=lambda r: (r.started_at_ns, r.id))
    assert ids(store.search(everything(newest_first=False))) == ids(oldest_first)
    assert ids(store.search(everything())) == ids(oldest_first[::-1])
    assert ids(store.search(Query())) == ids(oldest_first[::-1])


def test_limit_keeps_the_first_results_of_the_order(store: Sink, make: Records) -> None:
    """limit cuts after ordering: the newest N by default, the oldest N when ascending."""
    records = [make() for _ in range(6)]
    store.write_batch(records[::-1])
    assert ids(store.search(everything(limit=2))) == ids([records[5], records[4]])
    assert ids(store.search(everything(limit=2, newest_first=False))) == ids(records[:2])
    since = records[1].started_at_ns
    assert ids(store.search(everything(limit=2, since_ns=since))) == ids([records[5], records[4]])
    assert ids(store.search(everything(limit=2, since_ns=since, newest_first=False))) == ids(
        records[1:3]
    )
    assert list(store.search(everything(limit=0))) == []
    assert len(list(store.search(Query(limit=100)))) == 6


def test_long_results_come_back_whole_and_in_order(store: Sink, make: Records) -> None:
    """Hundreds of matches (more than a read page) arrive complete, ordered, unduplicated."""
    records = [make() for _ in range(600)]
    for start in range(0, 600, 150):
        store.write_batch(records[start : start + 150])
    assert ids(store.search(Query(limit=None))) == ids(records[::-1])
    assert ids(store.search(Query(limit=530, newest_first=False))) == ids(records[:530])
    with_bodies = list(store.search(everything(since_ns=records[550].started_at_ns)))
    assert with_bodies == records[550:][::-1]


def test_many_records_sharing_a_start_time_page_by_id(store: Sink, make: Records) -> None:
    """Ties on started_at_ns larger than a read page are neither skipped nor repeated."""
    tied = [make(started_at_ns=BASE_NS) for _ in range(300)]
    store.write_batch(tied)
    by_id = sorted(ids(tied))
    assert ids(store.search(Query(limit=None, newest_first=False))) == by_id
    assert ids(store.search(everything(limit=290))) == by_id[::-1][:290]


def test_ten_megabyte_body_is_stored_exactly(store: Sink, make: Records) -> None:
    """A 10 MB binary body comes back byte for byte, through get and search."""
    data = os.urandom(10 * 1024 * 1024)
    record = make(request_body=body(data), request_size=len(data))
    store.write_batch([record])
    assert store.get(record.id) == record
    (found,) = store.search(everything())
    assert found.request_body is not None
    assert found.request_body.data == data


def test_empty_body_and_missing_body_stay_distinct(store: Sink, make: Records) -> None:
    """b"" (stored, empty), data None (not stored) and no body at all all round-trip."""
    empty = make(request_body=body(b""), request_size=0)
    unstored = make(request_body=body(None, size=2048, sha256="ab" * 32, truncated=True))
    absent = make(request_body=None, response_body=None, request_size=0, response_size=0)
    store.write_batch([empty, unstored, absent])
    for record in (empty, unstored, absent):
        assert store.get(record.id) == record
    got_empty = store.get(empty.id)
    assert got_empty is not None
    assert got_empty.request_body is not None
    assert got_empty.request_body.data == b""
    assert got_empty.metadata()["request_body"]["stored"] is True
    got_unstored = store.get(unstored.id)
    assert got_unstored is not None
    assert got_unstored.metadata()["request_body"]["stored"] is False


def test_unicode_latin1_headers_and_binary_bodies(store: Sink, make: Records) -> None:
    """Non-ASCII paths, latin-1 header text (0x80-0xFF) and non-UTF-8 bytes survive as-is."""
    binary = bytes(range(256)) + b"\xff\xfe\x00\x80\xc3("
    record = make(
        path="/caf\u00e9/\u65e5\u672c/\U0001f600",
        query="q=%C3%A9&x=\u00ff",
        route="/caf\u00e9/{name}",
        request_headers=[("x-latin", LATIN1_HIGH), ("x-\u00e9", "\u00c0 la carte")],
        response_headers=[("content-disposition", "attachment; filename=\u00e9t\u00e9.bin")],
        response_trailers=[("x-checksum", "\u00fe\u00ff")],
        request_body=body(binary),
        response_body=body(b"\x89PNG\r\n\x1a\n\x00\x00"),
    )
    store.write_batch([record])
    assert store.get(record.id) == record
    assert ids(store.search(everything(route="/caf\u00e9/{name}"))) == [record.id]


def test_lone_surrogate_is_stored_not_refused(store: Sink, make: Records) -> None:
    """Text no UTF-8 codec accepts is still stored (a refused record would block its stream)."""
    record = make(path="/bad-\udcff-path", request_headers=[("x-odd", "\ud800")])
    store.write_batch([record])
    assert store.get(record.id) == record


def long_text(length: int, seed: str = "") -> str:
    """Text that does not compress (as PostgreSQL would shrink a repeated one), with
    multi-byte characters so that a cut must respect them."""
    chunk = hashlib.sha256(seed.encode()).hexdigest()
    text = ""
    while len(text) < length:
        chunk = hashlib.sha256(chunk.encode()).hexdigest()
        text += chunk + "\u00e9\u65e5\U0001f600"
    return text[:length]


def test_long_indexed_values_are_stored_whole_and_found(store: Sink, make: Records) -> None:
    """An X-Request-ID of 3,000 characters (PostgreSQL refused its index entry and blocked
    delivery for good), and long paths, routes, trace ids, services and streams, are
    stored, read back exactly, and found by their exact value, not by a neighbour's."""
    correlation = long_text(3000, "correlation")
    record = make(
        correlation_id=correlation,
        path="/" + long_text(5000, "path"),
        route="/" + long_text(1000, "route"),
        trace_id=long_text(2000, "trace"),
        service=long_text(700, "service"),
        stream=long_text(1500, "stream"),
        host=long_text(600, "host"),
        pod=long_text(400, "pod"),
        method=long_text(300, "method"),
    )
    twin = make(correlation_id=correlation[:-1] + "x", route=record.route)
    short = make(correlation_id=correlation[:200])
    store.write_batch([record, twin, short])
    assert store.get(record.id) == record
    assert list(store.search(everything(correlation_id=correlation))) == [record]
    assert ids(store.search(Query(correlation_id=twin.correlation_id))) == [twin.id]
    assert ids(store.search(Query(correlation_id=correlation[:200]))) == [short.id]
    assert ids(store.search(Query(correlation_id=correlation[:300]))) == []
    assert ids(store.search(everything(route=record.route, newest_first=False))) == ids(
        [record, twin]
    )
    assert ids(store.search(Query(method=record.method))) == [record.id]
    assert store.count() == 3


def test_a_long_value_finds_no_record_by_its_bounded_form(store: Sink, make: Records) -> None:
    """A short value equal to what a long one is indexed as does not find the long one."""
    long_one = make(correlation_id=long_text(1000, "long"))
    store.write_batch([long_one])
    assert ids(store.search(Query(correlation_id=bounded(long_one.correlation_id)))) == []
    assert ids(store.search(Query(correlation_id=long_one.correlation_id))) == [long_one.id]


def test_get_of_an_unknown_id_is_none(store: Sink, make: Records) -> None:
    """get returns None for an id never written."""
    store.write_batch([make()])
    assert store.get(str(uuid.uuid4())) is None


def test_count_counts_distinct_records(store: Sink, make: Records) -> None:
    """count starts at zero and grows by the records actually added."""
    assert store.count() == 0
    batch = [make() for _ in range(7)]
    store.write_batch(batch[:5])
    assert store.count() == 5
    store.write_batch(batch[3:])
    assert store.count() == 7


def test_stored_copy_is_independent_of_the_callers_objects(store: Sink, make: Records) -> None:
    """Mutating a record after writing it, or a record read back, changes nothing stored."""
    record = make()
    kept = dataclasses.replace(record, request_headers=list(record.request_headers))
    store.write_batch([record])
    record.request_headers.append(("x-late", "1"))
    record.status = 599
    read = store.get(record.id)
    assert read == kept
    assert read is not None
    read.response_headers.clear()
    assert store.get(record.id) == kept


def test_reopened_store_sees_the_data(open_postgres: Opener, make: Records) -> None:
    """A new instance on the same URL reads what an earlier one wrote, and still dedupes."""
    first = open_postgres()
    batch = [make() for _ in range(3)]
    first.write_batch(batch)
    first.close()
    second = open_postgres()
    assert second.count() == 3
    assert second.get(batch[1].id) == batch[1]
    second.write_batch([*batch, make()])
    assert second.count() == 4


def test_second_instance_reads_while_the_first_writes(open_postgres: Opener, make: Records) -> None:
    """A reader opened beside a live writer (the CLI beside the shipper) sees each commit."""
    writer, reader = open_postgres(), open_postgres()
    for n in range(1, 4):
        writer.write_batch([make()])
        assert reader.count() == n
    assert ids(reader.search(Query())) == ids(writer.search(Query()))


def test_closed_store_refuses_work(store: Sink, make: Records) -> None:
    """After close, writes and reads raise SinkError; closing again is harmless."""
    store.close()
    store.close()
    with pytest.raises(SinkError):
        store.write_batch([make()])
    with pytest.raises(SinkError):
        store.count()
    with pytest.raises(SinkError):
        store.get("x")
    with pytest.raises(SinkError):
        list(store.search(Query()))


def test_every_store_is_sink_and_reader(store: Sink) -> None:
    """open_sink returns an object satisfying both protocols."""
    assert isinstance(store, Sink)


def test_stream_filter_matches_records_exactly(store: Sink, make: Records) -> None:
    """Query(stream=...) keeps the records of that stream only: not those of a stream it
    begins or that begins it, and a name over 256 bytes (indexed bounded) finds its own
    records, not a neighbour's, nor by its bounded form."""
    long = long_text(300, "records stream")
    assert len(long.encode()) > 256
    names = ["orders:pod-a:1", "orders:pod-a", "orders:pod-a:10", long, long + "x", long[:-1]]
    by_name = {name: [make(stream=name), make(stream=name)] for name in names}
    store.write_batch([record for pair in zip(*by_name.values(), strict=True) for record in pair])
    for name, records in by_name.items():
        assert ids(store.search(everything(stream=name, newest_first=False))) == ids(records)
    _, second = by_name["orders:pod-a"]
    assert ids(store.search(Query(stream="orders:pod-a", since_ns=second.started_at_ns))) == [
        second.id
    ]
    assert list(store.search(Query(stream="orders:pod-a", method="GET"))) == []
    assert list(store.search(Query(stream="orders"))) == []
    assert list(store.search(Query(stream=bounded(long)))) == []
    assert len(list(store.search(Query(limit=None)))) == 2 * len(names)


# checkpoints ------------------------------------------------------------------------------


def checkpoint(stream: str, index: int, **extra: Any) -> dict[str, Any]:
    """A checkpoint with the three keys every sink reads, and what else a test adds."""
    return {"stream": stream, "index": index, "at_ns": BASE_NS + index * SECOND_NS, **extra}


def keys(found: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(value["stream"], value["index"]) for value in found]


LONG_STREAM = long_text(300, "checkpoint stream")
"""A 300-character stream name of more than 256 UTF-8 bytes: indexed and keyed bounded."""


def test_checkpoints_read_back_exactly(store: Sink) -> None:
    """Nested values, integers up to 2**63-1 (still ints), unicode and a 300-character
    stream name come back as equal dicts of the same JSON types."""
    assert len(LONG_STREAM.encode()) > 256
    nested = {
        "chain": {"head": "ab" * 32, "seqs": [1, 2, 2**63 - 1], "ok": True, "gap": None},
        "empty": {"list": [], "dict": {}},
        "text": 'caf\u00e9 \u65e5\u672c \U0001f600 "quoted" \\ \n',
        "negative": -(2**63),
    }
    written = [
        checkpoint("orders:pod-a:1", 1, **nested),
        checkpoint(LONG_STREAM, 2**63 - 1, at_ns=2**63 - 1, signature="\u00e9" * 50),
        checkpoint("\u65e5\u672c:pod", 7, at_ns=0),
    ]
    store.write_checkpoints(written)
    expected = sorted(written, key=lambda value: (value["stream"], value["index"]))
    found = list(store.checkpoints())
    assert found == expected
    # Equality takes True for 1 and 1.0 for 1; the JSON text does not.
    assert json.dumps(found, sort_keys=True) == json.dumps(expected, sort_keys=True)
    (long_one,) = store.checkpoints(LONG_STREAM)
    assert long_one == written[1]
    assert type(long_one["index"]) is int and type(long_one["at_ns"]) is int


def test_checkpoints_are_kept_once_first_copy_first(store: Sink) -> None:
    """A (stream, index) written again, in a later call or the same one, keeps its first
    copy; the others of the call are added."""
    store.write_checkpoints([checkpoint("s", 1, copy="first")])
    store.write_checkpoints([checkpoint("s", 1, copy="second"), checkpoint("s", 2, copy="a")])
    store.write_checkpoints(
        [checkpoint("s", 3, copy="a"), checkpoint("s", 3, copy="b"), checkpoint("s", 2)]
    )
    assert list(store.checkpoints("s")) == [
        checkpoint("s", 1, copy="first"),
        checkpoint("s", 2, copy="a"),
        checkpoint("s", 3, copy="a"),
    ]
    store.write_checkpoints([])
    assert len(list(store.checkpoints())) == 3


def test_checkpoints_are_ordered_by_stream_then_index(store: Sink) -> None:
    """Written out of order over several calls, they read back by stream name, then by
    index as a number (10 after 9, not after 1)."""
    pairs = [("b", 2), ("a", 10), ("b", 1), ("a", 9), ("ab", 1), ("a", 1), (LONG_STREAM, 1)]
    store.write_checkpoints([checkpoint(*pair) for pair in pairs[:3]])
    store.write_checkpoints([checkpoint(*pair) for pair in pairs[3:]])
    expected = [("a", 1), ("a", 9), ("a", 10), ("ab", 1), ("b", 1), ("b", 2)]
    expected.insert(sum(name < LONG_STREAM for name, _ in expected), (LONG_STREAM, 1))
    assert keys(store.checkpoints()) == expected
    assert keys(store.checkpoints("a")) == [("a", 1), ("a", 9), ("a", 10)]


def test_checkpoints_of_a_stream_match_it_exactly(store: Sink) -> None:
    """checkpoints(stream) gives that stream's only: not a stream it begins or that begins
    it, not a long stream's neighbour, and nothing for a long stream's bounded form."""
    names = ["orders", "orders-2", "order", LONG_STREAM, LONG_STREAM + "x", LONG_STREAM[:-1]]
    store.write_checkpoints([checkpoint(name, index) for index in (2, 1) for name in names])
    for name in names:
        assert keys(store.checkpoints(name)) == [(name, 1), (name, 2)]
    assert list(store.checkpoints("nobody")) == []
    assert list(store.checkpoints("orders-")) == []
    assert list(store.checkpoints(bounded(LONG_STREAM))) == []
    assert len(list(store.checkpoints())) == 2 * len(names)


BAD_CHECKPOINTS = {
    "no index": {"stream": "s", "at_ns": 1},
    "index 0": checkpoint("s", 0),
    "stream not a string": {"stream": 7, "index": 3, "at_ns": 1},
    "empty stream": checkpoint("", 3),
    "index a bool": checkpoint("s", True),
    "at_ns a string": {"stream": "s", "index": 3, "at_ns": "1"},
    "index over 64 bits": checkpoint("s", 2**63),
    "a tuple JSON gives back as a list": checkpoint("s", 3, path=(1, 2)),
    "a value JSON cannot hold": checkpoint("s", 3, raw=b"bytes"),
}


@pytest.mark.parametrize("bad", BAD_CHECKPOINTS.values(), ids=BAD_CHECKPOINTS.keys())
def test_a_bad_checkpoint_is_refused_and_its_call_stores_nothing(
    store: Sink, bad: dict[str, Any]
) -> None:
    """A checkpoint without stream, index and at_ns of the right types (or that JSON would
    not give back equal) is a RecordRefused, and the good ones of that call are not stored
    either; the store stays usable."""
    store.write_checkpoints([checkpoint("kept", 1)])
    with pytest.raises(RecordRefused, match=r"checkpoint 2 .*refused"):
        store.write_checkpoints([checkpoint("s", 1), bad, checkpoint("s", 2)])
    assert keys(store.checkpoints()) == [("kept", 1)]
    store.write_checkpoints([checkpoint("s", 1)])
    assert keys(store.checkpoints()) == [("kept", 1), ("s", 1)]


def test_checkpoints_survive_reopening(open_postgres: Opener) -> None:
    """A new instance on the same URL reads the checkpoints an earlier one wrote, and
    still keeps the first copy of each."""
    first = open_postgres()
    first.write_checkpoints([checkpoint("s", 1), checkpoint(LONG_STREAM, 1), checkpoint("s", 2)])
    first.close()
    second = open_postgres()
    assert keys(second.checkpoints("s")) == [("s", 1), ("s", 2)]
    second.write_checkpoints([checkpoint("s", 2, late=True), checkpoint("s", 3)])
    assert list(second.checkpoints("s")) == [checkpoint("s", n) for n in (1, 2, 3)]
    assert list(second.checkpoints(LONG_STREAM)) == [checkpoint(LONG_STREAM, 1)]


def test_checkpoints_and_records_stay_apart(store: Sink, make: Records) -> None:
    """Checkpoints are neither counted nor listed as records, and records are not
    checkpoints."""
    record = make()
    store.write_checkpoints([checkpoint(record.stream, 1)])
    assert store.count() == 0
    assert list(store.search(everything())) == []
    store.write_batch([record])
    assert store.count() == 1
    assert list(store.search(everything())) == [record]
    assert list(store.checkpoints()) == [checkpoint(record.stream, 1)]


def test_closed_store_refuses_checkpoints(store: Sink) -> None:
    """After close, writing and reading checkpoints raise SinkError."""
    store.close()
    with pytest.raises(SinkError):
        store.write_checkpoints([checkpoint("s", 1)])
    with pytest.raises(SinkError):
        list(store.checkpoints())


# memory -------------------------------------------------------------------------------


def test_memory_named_stores_are_shared_and_unnamed_ones_private(make: Records) -> None:
    """memory://name is one store per process; memory:// is a new store each time."""
    name = f"memory://shared-{uuid.uuid4()}"
    with contextlib.closing(open_sink(name)) as a, contextlib.closing(open_sink(name)) as b:
        a.write_batch([make()])
        assert b.count() == 1
    with contextlib.closing(open_sink("memory://")) as c:
        c.write_batch([make()])
        with contextlib.closing(open_sink("memory://")) as d:
            assert d.count() == 0


# sqlite -------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def test_sqlite_file_is_wal_with_schema_version_and_indexes(sqlite_url: str) -> None:
    """The file is in WAL mode, records layout version 1 and indexes what ls filters on."""
    open_sink(sqlite_url).close()
    with contextlib.closing(sqlite3.connect(sqlite_path(sqlite_url))) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
    assert {"records_started", "records_route", "records_status", "records_correlation"} <= indexes


def test_sqlite_commits_are_synced(sqlite_url: str) -> None:
    """The store's connection runs synchronous=FULL, so a returned batch survives power loss."""
    with contextlib.closing(open_sink(sqlite_url)) as store:
        assert isinstance(store, SqliteSink)
        connection = store._connection
        assert connection is not None
        assert connection.execute("PRAGMA synchronous").fetchone() == (2,)


def test_sqlite_bodies_are_blobs_and_columns_are_filled(sqlite_url: str, make: Records) -> None:
    """Body columns hold the exact bytes (empty blob vs NULL); index columns copy metadata."""
    full = make(request_body=body(b"\x00\xff binary"))
    empty = make(request_body=body(b""), response_body=None)
    with contextlib.closing(open_sink(sqlite_url)) as store:
        store.write_batch([full, empty])
    with contextlib.closing(sqlite3.connect(sqlite_path(sqlite_url))) as db:
        rows = {
            row[0]: row[1:]
            for row in db.execute(
                "SELECT id, request_body, typeof(request_body), response_body, route, status,"
                " correlation_id, json_extract(metadata, '$.seq') FROM records"
            )
        }
    assert rows[full.id][:2] == (b"\x00\xff binary", "blob")
    assert rows[empty.id][:3] == (b"", "blob", None)
    assert rows[full.id][3:] == ("/orders/{order_id}", 201, full.correlation_id, full.seq)


def test_sqlite_checkpoints_table_is_added_to_an_older_file(sqlite_url: str) -> None:
    """A file of layout 1 made before checkpoints existed gets its table at open, keyed
    (stream, idx), without a new layout version; rows hold the bounded stream and the
    exact JSON text."""
    open_sink(sqlite_url).close()
    with contextlib.closing(sqlite3.connect(sqlite_path(sqlite_url))) as db, db:
        db.execute("DROP TABLE checkpoints")
    with contextlib.closing(open_sink(sqlite_url)) as store:
        store.write_checkpoints([checkpoint(LONG_STREAM, 3, note="\u00e9")])
    with contextlib.closing(sqlite3.connect(sqlite_path(sqlite_url))) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        key = [row[1] for row in db.execute("PRAGMA table_info(checkpoints)") if row[5]]
        ((stream, idx, at_ns, text),) = db.execute("SELECT * FROM checkpoints").fetchall()
    assert key == ["stream", "idx"]
    assert (stream, idx, at_ns) == (bounded(LONG_STREAM), 3, BASE_NS + 3 * SECOND_NS)
    assert json.loads(text) == checkpoint(LONG_STREAM, 3, note="\u00e9")


def test_sqlite_refuses_a_newer_layout(sqlite_url: str) -> None:
    """A file written by a newer layout version fails at open with a clear ConfigError."""
    open_sink(sqlite_url).close()
    with contextlib.closing(sqlite3.connect(sqlite_path(sqlite_url))) as db, db:
        db.execute("INSERT INTO schema_version VALUES (2, 0)")
    with pytest.raises(ConfigError, match="newer than this asgi-audit"):
        open_sink(sqlite_url)


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """A path holding some other file fails at open, naming the file."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"not a database, just text that is long enough to have a header" * 4)
    with pytest.raises(ConfigError, match=r"notes\.txt"):
        open_sink(f"sqlite:///{path}")


def test_sqlite_relative_path_and_default_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three slashes mean a path relative to the working directory, as in the default URL."""
    monkeypatch.chdir(tmp_path)
    open_sink("sqlite:///nested/dir/audit.db").close()
    open_sink(DEFAULT_SINK_URL).close()
    assert (tmp_path / "nested" / "dir" / "audit.db").is_file()
    assert (tmp_path / "asgi-audit.db").is_file()


def test_sqlite_writer_thread_and_reader_process_style_access(
    sqlite_url: str, make: Records
) -> None:
    """A writer thread and another connection reading meanwhile neither block nor fail."""
    batches = [[make() for _ in range(5)] for _ in range(40)]
    failures: list[BaseException] = []

    def ship() -> None:
        with contextlib.closing(open_sink(sqlite_url)) as writer:
            try:
                for batch in batches:
                    writer.write_batch(batch)
            except BaseException as exc:
                failures.append(exc)

    with contextlib.closing(open_sink(sqlite_url)) as reader:
        thread = threading.Thread(target=ship)
        thread.start()
        seen = 0
        while thread.is_alive():
            count = reader.count()
            assert count >= seen
            seen = count
            list(reader.search(Query(limit=20)))
        thread.join()
        assert failures == []
        assert reader.count() == 200


# jsonl --------------------------------------------------------------------------------


def jsonl_dir(url: str) -> Path:
    return Path(url.removeprefix("jsonl:///"))


def test_jsonl_lines_are_metadata_plus_base64_bodies(jsonl_url: str, make: Records) -> None:
    """Each line is the record's metadata with data and an explicit base64 encoding."""
    record = make(request_body=body(b"\xff\x00raw"), response_body=body(None, size=9))
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_batch([record])
    (path,) = jsonl_dir(jsonl_url).glob("records-*.jsonl")
    assert path.name == "records-2024-05-01.jsonl"
    (line,) = path.read_bytes().splitlines()
    value = json.loads(line)
    assert value["request_body"]["encoding"] == "base64"
    assert value["request_body"]["data"] == "/wByYXc="
    assert value["response_body"]["data"] is None
    assert value["request_headers"] == [list(pair) for pair in record.request_headers]
    assert value["id"] == record.id


def test_jsonl_files_follow_the_utc_day_of_start(jsonl_url: str, make: Records) -> None:
    """Records land in the file of their start day; time-bounded searches span the files."""
    day_end = BASE_NS - BASE_NS % DAY_NS + DAY_NS
    late, early = make(started_at_ns=day_end - 1), make(started_at_ns=day_end)
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_batch([early, late])
        names = sorted(path.name for path in jsonl_dir(jsonl_url).glob("*.jsonl"))
        assert names == ["records-2024-05-01.jsonl", "records-2024-05-02.jsonl"]
        assert ids(store.search(everything(since_ns=day_end))) == [early.id]
        assert ids(store.search(everything(until_ns=day_end))) == [late.id]
        assert ids(store.search(everything(newest_first=False))) == [late.id, early.id]


def test_jsonl_torn_last_line_is_skipped_then_repaired(jsonl_url: str, make: Records) -> None:
    """A line cut by a crash is invisible to readers and cut off before the next write."""
    first, second = make(), make()
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_batch([first])
    (path,) = jsonl_dir(jsonl_url).glob("*.jsonl")
    with path.open("ab") as file:
        file.write(b'{"id":"torn-by-a-crash","stream":')
    with contextlib.closing(open_sink(jsonl_url)) as store:
        assert store.count() == 1
        store.write_batch([second])
        assert ids(store.search(everything(newest_first=False))) == [first.id, second.id]
    assert [json.loads(line)["id"] for line in path.read_bytes().splitlines()] == [
        first.id,
        second.id,
    ]


def test_jsonl_damaged_line_is_skipped_and_reported(
    jsonl_url: str, make: Records, caplog: pytest.LogCaptureFixture
) -> None:
    """A complete line that is not a record hides nothing else: listings and counts skip
    it with a warning naming the file and line (more in test_sink_files.py)."""
    record = make()
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_batch([record])
        (path,) = jsonl_dir(jsonl_url).glob("*.jsonl")
        path.write_bytes(b"garbage\n" + path.read_bytes())
        with caplog.at_level("WARNING", logger="asgi_audit.sinks.jsonl"):
            assert store.count() == 1
            assert list(store.search(everything())) == [record]
    (warning,) = [r.getMessage() for r in caplog.records if "damaged line" in r.getMessage()]
    assert "records-2024-05-01.jsonl, line 1 (byte 0)" in warning


def test_jsonl_redelivery_appends_no_lines(jsonl_url: str, make: Records) -> None:
    """Duplicates, across batches or inside one, never reach the file (readers see one line)."""
    batch = [make() for _ in range(3)]
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_batch([*batch, batch[0]])
        store.write_batch(batch[1:])
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_batch(batch)
    (path,) = jsonl_dir(jsonl_url).glob("*.jsonl")
    assert [json.loads(line)["id"] for line in path.read_bytes().splitlines()] == ids(batch)


def test_jsonl_checkpoints_are_lines_of_their_own_file(jsonl_url: str, make: Records) -> None:
    """checkpoints.jsonl, 0600, holds one line per checkpoint, its JSON as written; a
    re-delivery appends nothing, and no record file or record listing shows it."""
    record = make()
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_batch([record])
        store.write_checkpoints([checkpoint("s", 2), checkpoint("s", 1)])
        store.write_checkpoints([checkpoint("s", 1, again=True)])
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_checkpoints([checkpoint("s", 2, again=True), checkpoint("s", 3)])
        assert store.count() == 1
        assert ids(store.search(everything())) == [record.id]
    path = jsonl_dir(jsonl_url) / "checkpoints.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    lines = path.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [checkpoint("s", n) for n in (2, 1, 3)]
    assert lines[0] == json.dumps(checkpoint("s", 2), separators=(",", ":")).encode()


def test_jsonl_damaged_checkpoint_lines_are_skipped_and_repaired(
    jsonl_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged line hides no other checkpoint (one warning naming the file and line),
    its checkpoint counts as not stored so a re-delivery appends it, and a torn last line
    is cut off before the next write."""
    with contextlib.closing(open_sink(jsonl_url)) as store:
        store.write_checkpoints([checkpoint("s", 1), checkpoint("s", 2)])
    path = jsonl_dir(jsonl_url) / "checkpoints.jsonl"
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"garbage\n" + first + b'{"stream":"s","at_ns":5}\n' + second + b'{"str')
    with (
        contextlib.closing(open_sink(jsonl_url)) as store,
        caplog.at_level("WARNING", logger="asgi_audit.sinks.jsonl"),
    ):
        assert keys(store.checkpoints()) == [("s", 1), ("s", 2)]
        assert keys(store.checkpoints()) == [("s", 1), ("s", 2)]
        store.write_checkpoints([checkpoint("s", 2), checkpoint("s", 3)])
        assert keys(store.checkpoints("s")) == [("s", 1), ("s", 2), ("s", 3)]
    warnings = [r.getMessage() for r in caplog.records if "damaged line" in r.getMessage()]
    assert len(warnings) == 2
    assert "checkpoints.jsonl, line 1 (byte 0)" in warnings[0]
    assert "checkpoints.jsonl, line 3" in warnings[1] and "'index'" in warnings[1]
    third = json.dumps(checkpoint("s", 3), separators=(",", ":")).encode() + b"\n"
    assert (
        path.read_bytes() == b"garbage\n" + first + b'{"stream":"s","at_ns":5}\n' + second + third
    )


def test_jsonl_allows_one_writer_per_directory(jsonl_url: str, make: Records) -> None:
    """A second writer is refused while the first holds the directory, then may take over."""
    first, second = JsonlSink(jsonl_dir(jsonl_url)), JsonlSink(jsonl_dir(jsonl_url))
    try:
        first.write_batch([make()])
        with pytest.raises(SinkError, match="another writer"):
            second.write_batch([make()])
        first.close()
        second.write_batch([make()])
        assert second.count() == 2
    finally:
        first.close()
        second.close()


# the SQL stores --------------------------------------------------------------------


DAMAGE = {
    "metadata cut short": "metadata = '{{\"id\": '",
    "metadata not a record": "metadata = '[1, 2]'",
    "body not zstd": "response_body = {zstd_garbage}, response_encoding = 'zstd'",
    "unknown encoding": "response_encoding = 'brotli'",
}
"""Ways to spoil a stored row, as SET clauses (``{zstd_garbage}``: a bytes literal)."""


def damage_row(url: str, record_id: str, damage: str) -> None:
    """Spoil the row of ``record_id`` behind the store's back, as a disk or a person might."""
    change = DAMAGE[damage]
    if url.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(sqlite_path(url))) as db, db:
            change = change.format(zstd_garbage="x'28b52ffd00'")
            db.execute(f"UPDATE records SET {change} WHERE id = ?", (record_id,))
        return
    table = url.rpartition("table=")[2]
    with admin_connection() as server:
        change = change.format(zstd_garbage="'\\x28b52ffd00'::bytea")
        server.execute(f"UPDATE {table} SET {change} WHERE id = %s", (record_id,))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_store_url(request: pytest.FixtureRequest) -> str:
    """A fresh SQLite file, then a fresh PostgreSQL table."""
    url = request.getfixturevalue(f"{request.param}_url")
    assert isinstance(url, str)
    return url


@pytest.mark.parametrize(
    ("damage", "listing_reads_it"),
    [
        ("metadata cut short", True),
        ("metadata not a record", True),
        ("body not zstd", False),
        ("unknown encoding", False),
    ],
)
def test_damaged_row_is_a_corrupt_record(
    sql_store_url: str, make: Records, damage: str, listing_reads_it: bool
) -> None:
    """A row that cannot be read back raises CorruptRecord naming the record, from get and
    from search, never a JSON or zstd error; the other rows still read, and a listing
    without bodies does not touch the damaged bytes of a body."""
    damaged, intact = make(), make()
    with contextlib.closing(open_sink(sql_store_url)) as store:
        store.write_batch([damaged, intact])
        damage_row(sql_store_url, damaged.id, damage)
        with pytest.raises(CorruptRecord, match=damaged.id):
            store.get(damaged.id)
        with pytest.raises(CorruptRecord, match=damaged.id):
            list(store.search(Query(with_bodies=True)))
        assert store.get(intact.id) == intact
        listing = store.search(Query(newest_first=False))
        if listing_reads_it:
            with pytest.raises(CorruptRecord, match=damaged.id):
                list(listing)
        else:
            assert [record.id for record in listing] == [damaged.id, intact.id]


# open_sink ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://host/x", "redis://localhost:6379/0"])
def test_unknown_scheme_lists_the_known_ones(url: str) -> None:
    """An unknown scheme fails naming the parameter and every scheme that exists."""
    with pytest.raises(ConfigError, match="unknown kind of sink") as caught:
        open_sink(url)
    assert caught.value.parameter == "sink"
    for scheme in ("sqlite", "jsonl", "memory", "postgresql", "s3"):
        assert scheme in caught.value.problem


@pytest.mark.parametrize("url", ["", "audit.db", "/var/lib/audit.db", "://x"])
def test_text_that_is_not_a_url_is_refused(url: str) -> None:
    """A bare path or an empty string fails with an example of a valid URL."""
    with pytest.raises(ConfigError, match="expected a URL such as"):
        open_sink(url)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "jsonl://", "jsonl:///"])
def test_file_store_without_a_path_is_refused(url: str) -> None:
    """sqlite:// and jsonl:// need a path after the third slash."""
    with pytest.raises(ConfigError, match="path"):
        open_sink(url)


@pytest.mark.parametrize("url", ["sqlite://audit.db", "jsonl://logs/audit"])
def test_two_slashes_is_explained(url: str) -> None:
    """A host part where a path belongs fails and shows the three- and four-slash forms."""
    with pytest.raises(ConfigError, match=r"relative/path or .*:////absolute/path"):
        open_sink(url)


def test_url_options_are_refused(tmp_path: Path) -> None:
    """A query string is not silently made part of the file name."""
    with pytest.raises(ConfigError, match="options"):
        open_sink(f"sqlite:///{tmp_path}/a.db?mode=ro")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("scheme", ["sqlite", "jsonl"])
def test_directory_that_cannot_be_created_is_refused(tmp_path: Path, scheme: str) -> None:
    """A path below a regular file fails at open, naming the directory."""
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(ConfigError, match="cannot create directory"):
        open_sink(f"{scheme}:///{blocker / 'sub' / 'audit'}")


def test_sqlite_url_naming_a_directory_is_refused(tmp_path: Path) -> None:
    """A sqlite URL must name a file, not an existing directory."""
    with pytest.raises(ConfigError, match="names a directory"):
        open_sink(f"sqlite:///{tmp_path}")


def test_checking_sql_urls_loads_no_database_driver() -> None:
    """The middleware checks its sink URL in the app's process: for sqlite:// and
    postgresql:// that imports neither sqlite3 nor psycopg (only the shipper needs them).
    A fresh interpreter, since this one has loaded them all."""
    code = "\n".join(
        [
            "import sys",
            "from asgi_audit.sinks import check_sink_url, postgres, sqlite",
            "sqlite.check_url('sqlite:///audit.db')",
            "postgres.check_url('postgresql://audit@db.internal:5432/audit?sslmode=require')",
            "check_sink_url('sqlite:////var/lib/audit.db')",
            "check_sink_url('postgres://db/audit?table=audit_records')",
            "drivers = ('sqlite3', '_sqlite3', 'psycopg', 'psycopg_pool')",
            "print(sorted(name for name in drivers if name in sys.modules))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_scheme_is_case_insensitive(tmp_path: Path) -> None:
    """SQLITE:/// opens the same store as sqlite:///."""
    with contextlib.closing(open_sink(f"SQLITE:///{tmp_path / 'a.db'}")) as store:
        assert store.count() == 0


def test_sqlite_compresses_bodies_that_shrink_and_returns_them_exactly(
    sqlite_url: str, make: Records
) -> None:
    """JSON bodies are stored zstd-compressed, random ones as they are; both read back exact."""
    json_body = json.dumps([{"sku": f"SKU-{i:06d}", "quantity": i % 7} for i in range(5000)])
    noise = os.urandom(100_000)
    record = make(request_body=body(json_body.encode()), response_body=body(noise))
    with contextlib.closing(open_sink(sqlite_url)) as store:
        store.write_batch([record])
        assert store.get(record.id) == record
    path = sqlite_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as raw:
        stored = raw.execute(
            "SELECT request_encoding, length(request_body), response_encoding,"
            " length(response_body) FROM records"
        ).fetchone()
    assert stored[0] == "zstd" and stored[1] * 5 < len(json_body)
    assert stored[2] == "identity" and stored[3] == len(noise)
