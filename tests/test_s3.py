"""What is particular to the S3 store, on a real SeaweedFS server: the object layout, what
listings read, re-delivery with other batch boundaries, write-once keys, Object Lock,
clear errors for a missing bucket or bad credentials, and the URL. The contract every
store meets is in test_sinks.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard

from asgi_audit import AuditMiddleware
from asgi_audit._urls import inline_secret
from asgi_audit.capture.record import new_record_id
from asgi_audit.errors import ConfigError, CorruptRecord, SinkError
from asgi_audit.recording.writer import SpoolRecorder
from asgi_audit.shipping.shipper import Shipper
from asgi_audit.sinks import Query, open_sink, registry
from asgi_audit.sinks.record import StoredRecord
from asgi_audit.sinks.s3 import check_url
from asgi_audit.sinks.s3.frames import decode_record_frame, encode_record_frame
from asgi_audit.sinks.s3.keys import HOUR_NS, key_segment
from asgi_audit.sinks.s3.sink import S3Sink
from asgi_audit.sinks.s3.url import parse_url
from factories import BASE_NS, SECOND_NS, Records, body
from seaweed import SeaweedServer, free_ports
from spooling import request_data
from test_shipper import bodies, record_into

pytestmark = pytest.mark.s3

STREAM = "orders.orders-7f9c.12.1714564000000.1"


@pytest.fixture
def make() -> Records:
    return Records()


@pytest.fixture
def bucket(s3_server: SeaweedServer) -> str:
    """A bucket shared by this module's tests (each test works under its own prefix)."""
    return s3_server.make_bucket("layout")


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def opened() -> Iterator[list[S3Sink]]:
    """Stores a test opened; closed at the end."""
    stores: list[S3Sink] = []
    yield stores
    for store in stores:
        store.close()


@pytest.fixture
def store(s3_server: SeaweedServer, bucket: str, prefix: str, opened: list[S3Sink]) -> S3Sink:
    sink = open_sink(s3_server.url(bucket, prefix))
    assert isinstance(sink, S3Sink)
    opened.append(sink)
    return sink


def keys(server: SeaweedServer, bucket: str, prefix: str) -> list[str]:
    """Every key under ``prefix``, relative to it, in key order."""
    found: list[str] = []
    for page in (
        server.admin().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    ):
        found.extend(item["Key"].removeprefix(f"{prefix}/") for item in page.get("Contents", []))
    return found


def index_of(server: SeaweedServer, bucket: str, key: str) -> dict[str, Any]:
    raw = server.admin().get_object(Bucket=bucket, Key=key)["Body"].read()
    value = json.loads(zstandard.ZstdDecompressor().decompress(raw))
    assert isinstance(value, dict)
    return value


class Calls:
    """The S3 operations a store's client makes, with their parameters (botocore hooks)."""

    def __init__(self, store: S3Sink) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        store.client.meta.events.register("provide-client-params.s3", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.seen.append((model.name, dict(params)))

    def of(self, operation: str) -> list[dict[str, Any]]:
        return [params for name, params in self.seen if name == operation]

    def clear(self) -> None:
        self.seen.clear()


def everything(**changes: Any) -> Query:
    return dataclasses.replace(Query(limit=None, with_bodies=True), **changes)


def ids(records: Iterator[StoredRecord] | list[StoredRecord]) -> list[str]:
    return [record.id for record in records]


# Layout -------------------------------------------------------------------------------


def test_one_data_object_and_one_index_per_batch_keyed_by_time_and_stream(
    store: S3Sink, s3_server: SeaweedServer, bucket: str, prefix: str, make: Records
) -> None:
    """prefix/dt=/hour=/<stream>/<first>-<last>.aab plus its index under prefix/index/."""
    batch = [make(stream=STREAM, seq=seq) for seq in (7, 8, 9)]
    store.write_batch(batch)
    segment = "orders.orders-7f9c.12.1714564000000.1"  # dots and dashes are kept as they are
    assert keys(s3_server, bucket, prefix) == [
        f"dt=2024-05-01/hour=12/{segment}/000000000007-000000000009.aab",
        f"index/dt=2024-05-01/hour=12/{segment}/000000000007-000000000009.json.zst",
    ]
    index = index_of(
        s3_server,
        bucket,
        f"{prefix}/index/dt=2024-05-01/hour=12/{segment}/000000000007-000000000009.json.zst",
    )
    assert index["format"] == "asgi-audit.s3-index" and index["version"] == 1
    assert index["data"] == f"dt=2024-05-01/hour=12/{segment}/000000000007-000000000009.aab"
    assert (index["stream"], index["first_seq"], index["last_seq"]) == (STREAM, 7, 9)
    assert [entry["record"] for entry in index["records"]] == [
        json.loads(json.dumps(record.metadata())) for record in batch
    ]
    data = (
        s3_server.admin().get_object(Bucket=bucket, Key=f"{prefix}/{index['data']}")["Body"].read()
    )
    offset = 0
    for entry, record in zip(index["records"], batch, strict=True):
        assert entry["offset"] == offset
        frame = decode_record_frame(data, offset)
        assert frame.end - offset == entry["length"]
        assert StoredRecord.from_metadata(frame.meta, frame.request, frame.response) == record
        offset = frame.end
    assert offset == len(data)


def test_stream_ids_become_safe_distinct_key_segments() -> None:
    """Keys stay ASCII with no '.', '..' or '/' segment, and distinct streams stay distinct."""
    assert key_segment("svc.pod-1.42.1714564000000.1") == "svc.pod-1.42.1714564000000.1"
    assert key_segment("a/b") == "a~2Fb"
    assert key_segment("a:b") == "a~3Ab"
    assert key_segment("a~3Ab") == "a~7E3Ab"
    assert key_segment("..") == "~2E."
    assert key_segment(".hidden") == "~2Ehidden"
    assert key_segment("caf\u00e9") == "caf~C3~A9"
    assert key_segment("") == "~"
    assert key_segment("\udcff") == "~ED~B3~BF"
    samples = ["a:b", "a~3Ab", "a_3Ab", "a/b", "a~2Fb", ".", "..", "~", "", "~2E", "\u00e9"]
    assert len({key_segment(text) for text in samples}) == len(samples)


def test_a_batch_across_hours_is_indexed_by_each_records_own_start_hour(
    store: S3Sink, s3_server: SeaweedServer, bucket: str, prefix: str, make: Records
) -> None:
    """One data object (hour of the first record); an index per hour the records started
    in, so a long exchange recorded late is found in its own hour."""
    top = BASE_NS + HOUR_NS  # 13:00
    early = make(seq=1, started_at_ns=top - 2 * SECOND_NS)
    late = make(seq=2, started_at_ns=top + 2 * SECOND_NS)
    long_one = make(seq=3, started_at_ns=BASE_NS - 120 * SECOND_NS)  # 11:58, ended later
    store.write_batch([early, late, long_one])
    stream = key_segment(early.stream)
    name = "000000000001-000000000003"
    assert keys(s3_server, bucket, prefix) == [
        f"dt=2024-05-01/hour=12/{stream}/{name}.aab",
        f"index/dt=2024-05-01/hour=11/{stream}/{name}.json.zst",
        f"index/dt=2024-05-01/hour=12/{stream}/{name}.json.zst",
        f"index/dt=2024-05-01/hour=13/{stream}/{name}.json.zst",
    ]
    eleven = everything(since_ns=BASE_NS - HOUR_NS, until_ns=BASE_NS)
    assert ids(store.search(eleven)) == [long_one.id]
    assert ids(store.search(everything(since_ns=top))) == [late.id]
    assert ids(store.search(everything(newest_first=False))) == ids([long_one, early, late])
    for record in (early, late, long_one):
        assert store.get(record.id) == record


def test_a_mixed_batch_is_split_by_stream(
    store: S3Sink, s3_server: SeaweedServer, bucket: str, prefix: str, make: Records
) -> None:
    """Records of two streams in one call never share a key (a key names one stream)."""
    first, second = make(stream="a", seq=1), make(stream="b", seq=1)
    store.write_batch([first, second])
    assert [key for key in keys(s3_server, bucket, prefix) if key.endswith(".aab")] == [
        "dt=2024-05-01/hour=12/a/000000000001-000000000001.aab",
        "dt=2024-05-01/hour=12/b/000000000001-000000000001.aab",
    ]
    assert store.count() == 2


# What reads read ----------------------------------------------------------------------


def test_listing_and_time_range_search_read_only_index_objects(
    store: S3Sink, make: Records
) -> None:
    """Listings fetch index objects, never a data object; a repeated one fetches nothing."""
    records = [make(request_body=body(bytes(100_000))) for _ in range(30)]
    for start in range(0, 30, 10):
        store.write_batch(records[start : start + 10])
    calls = Calls(store)
    window = Query(since_ns=records[5].started_at_ns, until_ns=records[25].started_at_ns)
    found = list(store.search(dataclasses.replace(window, limit=None)))
    assert ids(found) == ids(records[5:25][::-1])
    assert store.count() == 30
    gets = [params["Key"] for params in calls.of("GetObject")]
    assert gets and all("/index/" in key and key.endswith(".json.zst") for key in gets)
    assert len(gets) == len(set(gets)) == 3  # each index once: cached afterwards
    lists = calls.of("ListObjectsV2")
    assert all("/index/" in params["Prefix"] for params in lists)
    calls.clear()
    assert ids(store.search(Query(limit=3))) == ids(records[:-4:-1])
    assert calls.of("GetObject") == []


def test_a_narrow_time_range_lists_only_its_hours(store: S3Sink, make: Records) -> None:
    """Searching one hour lists that hour's prefix alone (no discovery of other days)."""
    store.write_batch([make(), make(started_at_ns=BASE_NS + 5 * HOUR_NS)])
    calls = Calls(store)
    found = list(store.search(Query(since_ns=BASE_NS, until_ns=BASE_NS + HOUR_NS)))
    assert len(found) == 1
    assert [params["Prefix"].split("/index/")[1] for params in calls.of("ListObjectsV2")] == [
        "dt=2024-05-01/hour=12/"
    ]


def test_open_ranges_discover_days_and_hours_instead_of_walking_every_hour(
    store: S3Sink, make: Records
) -> None:
    """since=0 costs a handful of listings (days, then hours of each day), not one per hour
    since 1970."""
    later = BASE_NS + 30 * 24 * HOUR_NS
    store.write_batch([make(), make(started_at_ns=later)])
    calls = Calls(store)
    assert len(list(store.search(Query(since_ns=0)))) == 2
    assert len(calls.of("ListObjectsV2")) == 1 + 2 + 2  # days, hours of 2 days, 2 hours


def test_get_fetches_only_the_records_own_bytes(store: S3Sink, make: Records) -> None:
    """get: the record's frame by one ranged GET, not the whole batch object."""
    records = [make(request_body=body(bytes(range(256)) * 400)) for _ in range(5)]
    store.write_batch(records)
    probe = S3Sink(store.options)  # a fresh instance: nothing cached
    try:
        calls = Calls(probe)
        assert probe.get(records[2].id) == records[2]
        (data_get,) = [p for p in calls.of("GetObject") if p["Key"].endswith(".aab")]
        first, last = map(int, data_get["Range"].removeprefix("bytes=").split("-"))
        assert first > 0 and last - first + 1 < 120_000
    finally:
        probe.close()


def test_get_of_a_uuid7_id_looks_in_its_own_hours_first(store: S3Sink, make: Records) -> None:
    """The id says when the exchange ended: that hour and the one before are listed first."""
    now = datetime.now(UTC)
    record = make(id=new_record_id(), started_at_ns=int(now.timestamp() * 1e9) - SECOND_NS)
    store.write_batch([make(), record])
    probe = S3Sink(store.options)
    try:
        calls = Calls(probe)
        assert probe.get(record.id) == record
        assert len(calls.of("ListObjectsV2")) <= 2
    finally:
        probe.close()


def test_search_with_bodies_fetches_neighbouring_records_together(
    store: S3Sink, make: Records
) -> None:
    """Bodies of many records of one batch come from one ranged GET, not one per record."""
    records = [make() for _ in range(40)]
    store.write_batch(records)
    calls = Calls(store)
    assert list(store.search(everything(newest_first=False))) == records
    assert len([p for p in calls.of("GetObject") if p["Key"].endswith(".aab")]) == 1


# Re-delivery --------------------------------------------------------------------------


def test_redelivery_with_other_batch_boundaries_reads_one_copy_per_id(
    store: S3Sink, s3_server: SeaweedServer, bucket: str, prefix: str, make: Records
) -> None:
    """Records stored twice under two keys (re-batched) are read, counted and got once."""
    records = [make(seq=seq) for seq in range(6)]
    store.write_batch(records[:3])
    store.write_batch(records[3:])
    store.write_batch(records[1:5])  # the shipper re-batched after a crash
    assert len([key for key in keys(s3_server, bucket, prefix) if key.endswith(".aab")]) == 3
    assert store.count() == 6
    assert list(store.search(everything(newest_first=False))) == records
    assert ids(store.search(Query(limit=None))) == ids(records[::-1])
    for record in records:
        assert store.get(record.id) == record


def test_between_two_copies_the_first_in_key_order_wins(store: S3Sink, make: Records) -> None:
    """Key order (stream, then first seq), not write order, picks the copy readers see."""
    records = [make(seq=seq) for seq in range(2, 5)]
    changed = dataclasses.replace(records[1], status=599)
    store.write_batch([changed, records[2]])  # seqs 3-4, written first
    store.write_batch(records[:2])  # seqs 2-3 sort before 3-4
    assert store.get(records[1].id) == records[1]
    assert [r.status for r in store.search(everything(newest_first=False))] == [201, 201, 201]
    assert store.count() == 3


def test_the_same_batch_again_writes_nothing_new(
    s3_server: SeaweedServer, opened: list[S3Sink], prefix: str, make: Records
) -> None:
    """Same keys, If-None-Match: even a versioned (Object Lock) bucket keeps one version."""
    bucket = s3_server.make_bucket("versioned-locked", object_lock=True)
    store = open_sink(s3_server.url(bucket, prefix))
    assert isinstance(store, S3Sink)
    opened.append(store)
    batch = [make() for _ in range(3)]
    store.write_batch(batch)
    store.write_batch(batch)
    versions = s3_server.admin().list_object_versions(Bucket=bucket, Prefix=f"{prefix}/")
    assert len(versions["Versions"]) == 2
    assert store.count() == 3


def test_a_crash_between_data_and_index_then_other_bytes_keeps_the_stored_copy(
    store: S3Sink, make: Records
) -> None:
    """The data object was stored, its index not (crash), and the retry carries other bytes
    for the same records (redaction changed): the stored copy stays and is indexed."""
    from botocore.exceptions import EndpointConnectionError

    original = make(request_body=body(b'{"card": "4111"}'))
    redacted = dataclasses.replace(original, request_body=body(b'{"card": "***"}'))

    def fail_index_puts(params: dict[str, Any], **_: Any) -> None:
        if "/index/" in params["Key"]:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/")

    store.client.meta.events.register("provide-client-params.s3.PutObject", fail_index_puts)
    with pytest.raises(SinkError, match="cannot store"):
        store.write_batch([original])
    assert store.count() == 0  # data without an index is invisible
    store.client.meta.events.unregister("provide-client-params.s3.PutObject", fail_index_puts)
    store.write_batch([redacted])
    assert store.get(original.id) == original
    assert list(store.search(everything())) == [original]


def test_a_corrupt_data_object_is_reported_not_returned(
    store: S3Sink, s3_server: SeaweedServer, bucket: str, prefix: str, make: Records
) -> None:
    """A frame whose bytes changed fails its CRC-32: SinkError, never wrong bytes."""
    record = make()
    store.write_batch([record])
    (data_key,) = [k for k in keys(s3_server, bucket, prefix) if k.endswith(".aab")]
    admin = s3_server.admin()
    data = bytearray(admin.get_object(Bucket=bucket, Key=f"{prefix}/{data_key}")["Body"].read())
    data[-3] ^= 0xFF
    admin.put_object(Bucket=bucket, Key=f"{prefix}/{data_key}", Body=bytes(data))
    with pytest.raises(SinkError, match="checksum"):
        store.get(record.id)


def test_data_objects_written_with_the_spools_magic_stay_readable(
    store: S3Sink, s3_server: SeaweedServer, bucket: str, prefix: str, make: Records
) -> None:
    """Frames are written with their own magic "AAS1"; objects stored before, whose frames
    carry the spool's "AAB1", are still read: by get, by search with bodies, and when a
    re-delivery finds one stored without its index and indexes it from its frames."""
    records = [make(seq=seq, request_body=body(b'{"n": %d}' % seq * 50)) for seq in range(3)]
    store.write_batch(records)
    (data_key, index_key) = keys(s3_server, bucket, prefix)
    index = index_of(s3_server, bucket, f"{prefix}/{index_key}")
    admin = s3_server.admin()
    data = bytearray(admin.get_object(Bucket=bucket, Key=f"{prefix}/{data_key}")["Body"].read())
    for entry in index["records"]:
        at = entry["offset"]
        assert data[at : at + 4] == b"AAS1"
        data[at : at + 4] = b"AAB1"  # the header is outside the CRC: the old object exactly
    admin.put_object(Bucket=bucket, Key=f"{prefix}/{data_key}", Body=bytes(data))
    probe = S3Sink(store.options)  # a fresh instance: nothing cached
    try:
        assert [probe.get(record.id) for record in records] == records
        assert list(probe.search(everything(newest_first=False))) == records
    finally:
        probe.close()
    admin.delete_object(Bucket=bucket, Key=f"{prefix}/{index_key}")  # a crash before the index
    probe = S3Sink(store.options)
    try:
        assert probe.count() == 0
        probe.write_batch(records)  # the stored object differs (its magic): it stays, indexed
        assert keys(s3_server, bucket, prefix) == [data_key, index_key]
        assert index_of(s3_server, bucket, f"{prefix}/{index_key}") == index
        assert list(probe.search(everything(newest_first=False))) == records
    finally:
        probe.close()
    stored = admin.get_object(Bucket=bucket, Key=f"{prefix}/{data_key}")["Body"].read()
    assert stored == bytes(data)


def test_a_bad_frame_is_a_corrupt_record_naming_its_position(make: Records) -> None:
    """Decoding errors are CorruptRecord (a SinkError), saying which byte the frame is at."""
    first, second = (b"".join(encode_record_frame(r, r.metadata())) for r in (make(), make()))
    data = first + second
    assert decode_record_frame(data, len(first)).record().id
    with pytest.raises(CorruptRecord, match=f"frame at byte {len(first)} is cut short"):
        decode_record_frame(data[:-1], len(first))
    damaged = bytearray(data)
    damaged[len(first) : len(first) + 4] = b"XXXX"
    with pytest.raises(CorruptRecord, match=f"no frame at byte {len(first)}"):
        decode_record_frame(bytes(damaged), len(first), source="bucket/key")
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    with pytest.raises(CorruptRecord, match=f"^obj: frame at byte {len(first) + 100} fails"):
        decode_record_frame(bytes(damaged), len(first), source="obj", base=100)


def test_shipper_into_s3_every_record_exactly_once_across_rebatching(
    tmp_path: Path, s3_server: SeaweedServer, bucket: str, prefix: str, opened: list[S3Sink]
) -> None:
    """A real spool shipped into the bucket; the same spool shipped again in other batch
    sizes (a crash before the checkpoint moved) adds no record to what readers see."""
    spool, again = tmp_path / "spool", tmp_path / "again"
    recorder = SpoolRecorder(spool)
    data = bodies(23)
    record_into(recorder, data, each_flushed=True)
    assert recorder.shutdown(timeout=30)
    shutil.copytree(spool, again)
    store = open_sink(s3_server.url(bucket, prefix))
    assert isinstance(store, S3Sink)
    opened.append(store)
    assert Shipper(spool, store, batch_records=5).ship_once().delivered == 23
    assert Shipper(again, store, batch_records=7).ship_once().delivered == 23
    records = list(store.search(everything(newest_first=False)))
    assert sorted(request_data(r) for r in records) == sorted(data)
    assert len({r.id for r in records}) == len(records) == store.count() == 23
    assert [r.seq for r in records] == sorted(r.seq for r in records)


# Object Lock --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["governance", "compliance"])
def test_object_lock_retains_every_object(
    s3_server: SeaweedServer, opened: list[S3Sink], prefix: str, make: Records, mode: str
) -> None:
    """Data and index objects carry the mode and a retain-until date N days ahead, and a
    locked version cannot be deleted."""
    bucket = s3_server.make_bucket("worm", object_lock=True)
    store = open_sink(s3_server.url(bucket, prefix, object_lock=mode, retain_days="2"))
    assert isinstance(store, S3Sink)
    opened.append(store)
    record = make()
    store.write_batch([record])
    assert store.get(record.id) == record
    admin = s3_server.admin()
    found = keys(s3_server, bucket, prefix)
    assert len(found) == 2
    expected = datetime.now(UTC) + timedelta(days=2)
    for key in found:
        head = admin.head_object(Bucket=bucket, Key=f"{prefix}/{key}")
        assert head["ObjectLockMode"] == mode.upper()
        assert abs(head["ObjectLockRetainUntilDate"] - expected) < timedelta(minutes=5)
        with pytest.raises(admin.exceptions.ClientError, match="AccessDenied"):
            admin.delete_object(Bucket=bucket, Key=f"{prefix}/{key}", VersionId=head["VersionId"])


def test_object_lock_on_a_bucket_without_it_is_a_config_error(
    s3_server: SeaweedServer, bucket: str, prefix: str
) -> None:
    """Asking for Object Lock on a plain bucket fails at open, saying what to do."""
    url = s3_server.url(bucket, prefix, object_lock="compliance", retain_days="30")
    with pytest.raises(ConfigError, match="has no Object Lock") as caught:
        open_sink(url)
    assert caught.value.parameter == "sink"


# Errors -------------------------------------------------------------------------------


def test_a_missing_bucket_is_a_clear_config_error(s3_server: SeaweedServer) -> None:
    """asgi-audit never creates the bucket: open fails naming it."""
    with pytest.raises(ConfigError, match=r"bucket 'no-such-bucket' does not exist"):
        open_sink(s3_server.url("no-such-bucket", "audit"))


def test_a_bucket_removed_after_open_fails_writes_clearly(
    s3_server: SeaweedServer, opened: list[S3Sink], make: Records
) -> None:
    """A write into a bucket gone since open raises SinkError (retried) naming the cause."""
    name = s3_server.make_bucket(f"gone-{uuid.uuid4().hex[:8]}")
    store = open_sink(s3_server.url(name, "audit"))
    assert isinstance(store, S3Sink)
    opened.append(store)
    s3_server.admin().delete_bucket(Bucket=name)
    with pytest.raises(SinkError, match=f"bucket '{name}' does not exist"):
        store.write_batch([make()])


def test_wrong_credentials_are_a_config_error(
    s3_server: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials come from the standard variables; wrong ones fail at open, clearly."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ConfigError, match="denied"):
        open_sink(s3_server.url(bucket, "audit"))


def test_an_unreachable_endpoint_opens_then_writes_fail_to_be_retried(
    make: Records, s3_server: SeaweedServer
) -> None:
    """A store that is down at start-up does not stop the shipper from starting: open
    succeeds, writes raise SinkError (the shipper retries, the spool keeps the records)."""
    (port,) = free_ports(1)
    store = open_sink(f"s3://audit/x?endpoint_url=http://127.0.0.1:{port}&region=us-east-1")
    try:
        with pytest.raises(SinkError, match="cannot reach"):
            store.write_batch([make()])
        with pytest.raises(SinkError):
            store.count()
    finally:
        store.close()


# URL ----------------------------------------------------------------------------------


def test_url_options_are_read() -> None:
    options = parse_url(
        "s3://audit-logs/prod/orders/?endpoint_url=https://minio.local:9000&region=eu-west-1"
        "&profile=audit&addressing_style=path&object_lock=COMPLIANCE&retain_days=365"
    )
    assert options.bucket == "audit-logs"
    assert options.prefix == "prod/orders"
    assert options.endpoint_url == "https://minio.local:9000"
    assert (options.region, options.profile, options.addressing_style) == (
        "eu-west-1",
        "audit",
        "path",
    )
    assert (options.object_lock, options.retain_days) == ("COMPLIANCE", 365)
    assert parse_url("s3://bucket").prefix == ""


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://key:secret@bucket/p", "credentials do not belong in the URL"),
        ("s3://127.0.0.1:9000/bucket", "not a bucket name"),
        ("s3://bucket/a//b", "empty, '.' or '..' segment"),
        ("s3://bucket/p?endpoint=http://x", "unknown option 'endpoint'"),
        ("s3://bucket/p?region=a&region=b", "given twice"),
        ("s3://bucket/p?region=", "has no value"),
        ("s3://bucket/p?endpoint_url=minio:9000", "endpoint_url must be http"),
        ("s3://bucket/p?addressing_style=dns", "auto, path or virtual"),
        ("s3://bucket/p?object_lock=forever&retain_days=1", "governance or compliance"),
        ("s3://bucket/p?object_lock=governance", "go together"),
        ("s3://bucket/p?retain_days=3", "go together"),
        ("s3://bucket/p?object_lock=governance&retain_days=0", "whole number >= 1"),
        (f"s3://bucket/{'p' * 257}", "more than 256 bytes"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    """Every URL mistake fails at open (no network call made), naming what is wrong."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        open_sink(url)
    assert caught.value.parameter == "sink"


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "url",
    [
        f"s3://audit/x?secret_key={SECRET}&region=us-east-1",
        f"s3://audit/x?aws_secret_access_key={SECRET}",
        f"s3://AKIAEXAMPLE:{SECRET}@audit/x",
        f"s3://audit/x?endpoint_url=https://AKIAEXAMPLE:{SECRET}@minio.local:9000",
        f"s3://audit/x?region=us-east-1#{SECRET}",
        f"s3://audit/x?session_token={SECRET}&session_token=again",
    ],
)
def test_secrets_in_an_s3_url_are_refused_and_never_shown(
    url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials in the URL are refused (boto3 finds them in AWS_* or a credentials
    file); neither the error nor the one warning shows them, and the warning names the
    alternatives."""
    monkeypatch.setattr(registry, "_warned", set())
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError) as caught:
        open_sink(url)
    texts = [str(caught.value), *(r.getMessage() for r in caplog.records)]
    assert all(SECRET not in text for text in texts), texts
    warnings = [r.getMessage() for r in caplog.records if r.name == "asgi_audit.sinks"]
    if inline_secret(url):  # not the fragment, nor a password inside endpoint_url's value
        (warning,) = warnings
        for alternative in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "credentials file"):
            assert alternative in warning


def test_middleware_accepts_an_s3_sink_and_checks_its_url_at_start_up() -> None:
    """The app checks the URL's form at start-up; no boto3 import or network needed."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    AuditMiddleware(app, environ={}, sink="s3://audit/x?region=us-east-1", ship="off")
    with pytest.raises(ConfigError, match="unknown option 'regoin'") as caught:
        AuditMiddleware(app, environ={"ASGI_AUDIT_SINK": "s3://audit/x?regoin=eu-west-1"})
    assert caught.value.parameter == "ASGI_AUDIT_SINK"


def test_without_boto3_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing extra is one ConfigError naming pip install 'asgi-audit[s3]'."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"pip install 'asgi-audit\[s3\]'"):
        check_url("s3://audit/x")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigError, match=r"pip install 'asgi-audit\[s3\]'"):
        open_sink("s3://audit/x?endpoint_url=http://127.0.0.1:9")


def test_the_url_hooks_import_neither_boto3_nor_botocore() -> None:
    """The app imports this package and checks its URL at start-up: boto3 and botocore
    stay unimported (a fresh interpreter, so no other test has imported them already)."""
    code = (
        "import asgi_audit.sinks.s3, sys\n"
        "asgi_audit.sinks.s3.check_url('s3://audit/x?region=us-east-1')\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('boto3', 'botocore')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_closed_store_keeps_no_client(store: S3Sink) -> None:
    """close() releases the client; using the store afterwards is a SinkError."""
    store.close()
    with pytest.raises(SinkError, match="closed"):
        store.client  # noqa: B018
    with pytest.raises(SinkError, match="closed"):
        store.get("x")
