"""A status filter on SQLite answers the same whichever index the search walks: the
status index for rare statuses, the time index when thousands of records match."""

from __future__ import annotations

import dataclasses
from contextlib import closing
from pathlib import Path

from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.sqlite.sink import STATUS_SORT_MOST
from factories import Records


def test_common_and_rare_statuses_page_alike(tmp_path: Path) -> None:
    make = Records()
    records = [
        dataclasses.replace(
            make(request_body=None, response_body=None), status=500 if n % 200 == 0 else 200
        )
        for n in range(STATUS_SORT_MOST + 1000)
    ]
    with closing(open_sink(f"sqlite:///{tmp_path / 'a.db'}")) as sink:
        for start in range(0, len(records), 1000):
            sink.write_batch(records[start : start + 1000])
        newest = sorted(records, key=lambda r: (r.started_at_ns, r.id), reverse=True)
        for low, high in ((200, 299), (500, 599), (200, 200), (None, 499)):
            query = Query(status_low=low, status_high=high, limit=60)
            expected = [r.id for r in newest if (low or 0) <= (r.status or 0) <= (high or 999)]
            expected = expected[:60]
            assert [r.id for r in sink.search(query)] == expected, (low, high)
            older = Query(status_low=low, status_high=high, limit=None, newest_first=False)
            assert sum(1 for _ in sink.search(older)) == len(
                [r for r in records if (low or 0) <= (r.status or 0) <= (high or 999)]
            )
