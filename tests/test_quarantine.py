"""Poison never blocks the trail: records a sink refuses for good are found by splitting
their batch, kept in the spool's quarantine, listed by ``spool status`` and stored by
``spool retry`` once the sink can take them; delivery of the rest goes on."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from asgi_audit.cli import main
from asgi_audit.errors import RecordRefused
from asgi_audit.recording.spool import StreamDirectory, streams
from asgi_audit.shipping.quarantine import Quarantine
from asgi_audit.shipping.shipper import Shipper
from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.record import StoredRecord
from spooling import FlakySink, record_frames, request_data
from test_shipper import bodies, dead_spool


class PickySink(FlakySink):
    """Refuses, as a whole batch, any batch holding a record whose request body starts
    with one of ``poison`` (as PostgreSQL refuses a batch with one row it cannot index);
    names the records when ``names`` is set."""

    def __init__(self, poison: Sequence[bytes], *, names: bool = False, failures: int = 0):
        super().__init__(failures)
        self.poison = tuple(poison)
        self.names = names
        self.refusals = 0

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        bad = [r.id for r in records if request_data(r).startswith(self.poison)]
        if bad:
            self.refusals += 1
            raise RecordRefused(
                f"index row size exceeds maximum (records {', '.join(bad)})",
                ids=tuple(bad) if self.names else (),
            )
        super().write_batch(records)


@pytest.mark.parametrize("names", [False, True])
def test_refused_records_go_to_quarantine_and_the_rest_is_delivered(
    tmp_path: Path, names: bool
) -> None:
    spool = tmp_path / "spool"
    data = bodies(50, seed=3)
    poison = [data[7], data[31]]
    dead_spool(spool, data)
    sink = PickySink([p[:6] for p in poison], names=names)
    report = Shipper(spool, sink, batch_records=500).ship_once(timeout=30)
    assert sorted(request_data(r) for r in sink.records) == sorted(
        d for d in data if d not in poison
    )
    assert report.quarantined == 2 and report.delivered == 48
    if names:
        assert sink.refusals == 1  # named by the sink: no split needed
    else:
        assert 2 <= sink.refusals <= 2 * 6  # halves down to single records, log2(50) deep
    entries = Quarantine(spool).entries()
    assert len(entries) == 2
    kept = sorted(r.request for e in entries for r in Quarantine(spool).read(e))
    assert kept == sorted(poison)
    assert all("index row size" in e.reason for e in entries)
    assert not list(streams(spool))  # the dead stream is delivered (or set aside) and gone
    for path in (spool / "quarantine").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((spool / "quarantine").stat().st_mode) == 0o700


def test_transient_errors_are_retried_not_quarantined(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    data = bodies(10, seed=4)
    dead_spool(spool, data)
    sink = FlakySink(failures=3)
    Shipper(spool, sink, backoff_initial=0.01).ship_once(timeout=30)
    assert sorted(request_data(r) for r in sink.records) == sorted(data)
    assert Quarantine(spool).entries() == []


def test_a_record_that_is_not_a_record_is_quarantined(tmp_path: Path) -> None:
    """Metadata no sink can take (a missing field) is set aside, not retried forever."""
    spool = tmp_path / "spool"
    data = bodies(5, seed=5)
    dead_spool(spool, data)
    sink = FlakySink()
    original = Shipper._settle

    def broken(self: Shipper, spooled: object, *args: object) -> object:
        record = spooled  # remove a required field from the third record only
        meta = record.meta  # type: ignore[attr-defined]
        if bytes(record.request).startswith(b"2:"):  # type: ignore[attr-defined]
            meta.pop("started_at_ns")
        return original(self, record, *args)  # type: ignore[arg-type]

    Shipper._settle = broken  # type: ignore[method-assign, assignment]
    try:
        report = Shipper(spool, sink).ship_once(timeout=30)
    finally:
        Shipper._settle = original  # type: ignore[method-assign]
    assert report.quarantined == 1
    assert len(sink.records) == 4
    (entry,) = Quarantine(spool).entries()
    assert "not a valid record" in entry.reason


def test_spool_status_lists_quarantine_and_retry_stores_it(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    data = bodies(6, seed=6)
    dead_spool(spool, data)
    picky = PickySink([data[2][:6]])
    Shipper(spool, picky).ship_once(timeout=30)
    assert len(picky.records) == 5
    runner = CliRunner()
    status = runner.invoke(main, ["spool", "status", "--spool", str(spool)])
    assert status.exit_code == 0, status.output
    assert "quarantine: 1 record(s)" in status.output
    assert "index row size exceeds maximum" in status.output
    # The sink can take it now (a real SQLite sink): retry stores it and empties the folder.
    open_sink(url).close()
    retried = runner.invoke(main, ["spool", "retry", "--spool", str(spool), "--sink", url])
    assert retried.exit_code == 0, retried.output
    assert "1 stored, 0 still in quarantine" in retried.output
    assert Quarantine(spool).entries() == []
    with closing(open_sink(url)) as store:
        (record,) = store.search(Query(limit=None, with_bodies=True))
    assert request_data(record) == data[2]
    missing = runner.invoke(main, ["spool", "retry", "--spool", str(spool), "--id", "nope"])
    assert missing.exit_code != 0 and "not in quarantine" in missing.output


def test_damaged_bytes_are_skipped_and_the_rest_shipped(tmp_path: Path) -> None:
    """A byte flipped in the middle of a segment costs the frame it hits, reported with
    its range; the frames after it are still delivered (not cut off with it)."""
    spool = tmp_path / "spool"
    data = bodies(12, seed=7)
    stream_name = dead_spool(spool, data)
    stream = StreamDirectory(spool / "streams" / stream_name)
    (segment,) = stream.segments()
    path = stream.directory / segment
    frames = record_frames(path)
    assert len(frames) == 12
    hit = frames[4]
    with open(path, "r+b") as handle:
        handle.seek((hit.offset + hit.end) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    sink = FlakySink()
    report = Shipper(spool, sink).ship_once(timeout=30)
    assert len(sink.records) == 11
    assert report.damaged
    (stream_of, segment_of, first, end) = report.damaged[0]
    assert (stream_of, segment_of) == (stream_name, segment)
    assert first <= (hit.offset + hit.end) // 2 < end
