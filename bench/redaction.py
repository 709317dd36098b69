"""What default body redaction costs: the redactor's own time on 1 MB bodies, and the
spool writer under load beside an event loop (lag, records/s), rules on against rules off.

The requirement is that redacting a 1 MB JSON body is bounded in time. Redaction runs on
the writer thread, not on the event loop, but its walk is Python and holds the GIL: the
loop pays for it in lag even though no request waits on it. So the redactor's time alone
(micro) is not the whole answer; the pipeline runs measure the event loop while the
writer redacts, against the same writer with ``body_redactor=None``, in this process:

* micro: ``BodyRedactor().redact`` per call (median, p99) on ~1 MB JSON documents that
  take each of its paths: orders without secrets (the byte prefilter skips the parse),
  the same with three secrets planted (parse, walk, re-encode), LLM-style responses whose
  ``"total_tokens"`` keys make the prefilter say "maybe" (parse and walk, nothing found),
  orders with epoch-millisecond timestamps (13 digits: the card-number prefilter says
  "maybe"); then form bodies and query strings for scale, against the writer's own work
  on the same body (SHA-256 and zstd) and ``orjson.loads``;
* pipeline: exchanges with a ~1 MB JSON request and a ~1 MB JSON response handed to a
  ``SpoolRecorder`` (``fsync="off"``, a temporary spool) from an asyncio loop in the main
  thread, at a fixed rate and as fast as the writer takes them (``overflow="block"``'s
  wait for room), while a ticker measures how late a 1 ms sleep wakes: lag p50/p99/max
  and records written per second, for rules off, default rules on bodies without
  secrets, and default rules on bodies with secrets.

    python -m bench.redaction [--calls 40] [--exchanges 200] [--seconds 20]
                              [--rate 2] [--paced-seconds 10] [--body-kib 1024] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from asgi_audit.capture.levels import Level
from asgi_audit.capture.record import Body, Exchange, new_record_id
from asgi_audit.recording import packing
from asgi_audit.recording.redact_body import BodyRedactor
from asgi_audit.recording.redact_query import QueryRedactor
from bench.recording import TimedRecorder, percentile

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
CHUNK = 64 << 10
"""Bodies reach the writer in chunks, as the middleware's taps keep them."""
CARD = "4111 1111 1111 1111"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiJjdXNfMDA0MiIsImV4cCI6MTc2NDE1MzYwMH0"
    ".c2lnbmF0dXJlLW5vdC1yZWFsLWp1c3QtZm9yLXRoZS1iZW5jaA"
)
PLANTED = 3
"""Secrets planted in the "with secrets" documents: a card number under an innocent key,
a ``password`` and an ``id_token`` holding a JWT."""
EPOCH_MS = 1_764_153_600_000

NAMES = ("Ada Byron", "Grace Hopper", "Alan Turing", "Edsger Dijkstra", "Barbara Liskov")
CITIES = (("London", "GB"), ("Lyon", "FR"), ("Berlin", "DE"), ("Utrecht", "NL"))
PRODUCTS = (
    ("Trail running shoe", 8999),
    ("Merino base layer", 5499),
    ("Water bottle, 750 ml", 1999),
    ("Head torch", 3499),
    ("Rain jacket", 12999),
    ("Wool socks, pair", 1299),
)
TEXT = (
    "the order ships from our warehouse within two working days and tracking details "
    "follow by email once the carrier scans the parcel so you can plan a delivery slot"
)
WORDS = tuple(TEXT.split(" "))


# -- documents ---------------------------------------------------------------------------


def order(number: int, *, epoch_ms: bool = False) -> dict[str, Any]:
    """One order as a shop's API returns it: nested, mixed types, no secrets."""
    lines: list[dict[str, Any]] = []
    for index in range(number % 4 + 1):
        title, price = PRODUCTS[(number + index) % len(PRODUCTS)]
        lines.append(
            {
                "sku": f"SKU-{(number * 31 + index) % 100_000:06d}",
                "title": title,
                "quantity": (number + index) % 3 + 1,
                "unit_price": {"amount": price, "currency": "EUR"},
                "discounted": index % 2 == 1,
            }
        )
    subtotal = sum(line["quantity"] * line["unit_price"]["amount"] for line in lines)
    city, country = CITIES[number % len(CITIES)]
    made: dict[str, Any] = {
        "id": f"ord_{number:08d}",
        "created_at": f"2026-11-{number % 28 + 1:02d}T{number % 24:02d}:{number % 60:02d}:00Z",
        "status": ("paid", "shipped", "delivered", "refunded")[number % 4],
        "customer": {
            "id": f"cus_{number * 7919 % 100_000:05d}",
            "name": NAMES[number % len(NAMES)],
            "email": f"customer{number}@example.com",
            "phone": f"+1 415 555 {number % 10_000:04d}",
            "address": {
                "street": f"{number % 200 + 1} High Street",
                "city": city,
                "postcode": f"{number % 90_000 + 10_000}",
                "country": country,
            },
        },
        "lines": lines,
        "totals": {"subtotal": subtotal, "shipping": 499, "total": subtotal + 499},
        "payment": {"method": "card", "brand": "visa", "last4": "4242", "status": "captured"},
        "notes": None,
    }
    if epoch_ms:  # what Date.now() gives: 13 digits, shaped like a card number
        made["created_ms"] = EPOCH_MS + number * 61_003
    return made


def completion(number: int) -> dict[str, Any]:
    """One chat completion as LLM APIs return them: its ``usage`` keys end in ``tokens``."""
    words = [WORDS[(number + index) % len(WORDS)] for index in range(40 + number % 30)]
    prompt = 20 + number % 50
    answer = len(words) * 4 // 3
    return {
        "id": f"chatcmpl-{number:010d}",
        "object": "chat.completion",
        "created": EPOCH_MS // 1000 + number,
        "model": "small-chat-1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": answer,
            "total_tokens": prompt + answer,
        },
    }


def listing(make: Callable[[int], dict[str, Any]], size: int, start: int = 0) -> list[Any]:
    """As many items from ``make`` as fill about ``size`` bytes of compact JSON."""
    items: list[Any] = []
    total = 0
    number = start
    while total < size:
        item = make(number)
        items.append(item)
        total += len(orjson.dumps(item)) + 1
        number += 1
    return items


def planted(orders: list[Any]) -> list[Any]:
    """``orders`` with :data:`PLANTED` secrets in three of them, spread through the
    document (a copy: the clean one is measured too)."""
    copy: list[Any] = orjson.loads(orjson.dumps(orders))
    first, middle, last = copy[len(copy) // 10], copy[len(copy) // 2], copy[-2]
    first["payment"]["card"] = CARD
    middle["customer"]["password"] = "correct horse battery staple"
    last["session"] = {"id_token": JWT}
    return copy


def encoded(items: list[Any]) -> bytes:
    return orjson.dumps({"object": "list", "has_more": False, "data": items})


def form_body(size: int) -> bytes:
    """A form of many plain fields and one password: every pair is decoded and tested."""
    pairs = [b"username=ada%40example.com", b"password=hunter2"]
    number = 0
    total = sum(len(pair) + 1 for pair in pairs)
    while total < size:
        pair = f"field{number}=value+{number}+with+some%20text".encode()
        pairs.append(pair)
        total += len(pair) + 1
        number += 1
    return b"&".join(pairs)


@dataclass(frozen=True, slots=True)
class Documents:
    """The bodies every measurement uses, made once (a few tenths of a second)."""

    orders: bytes
    secrets: bytes
    tokens: bytes
    epoch: bytes
    orders_2: bytes
    secrets_2: bytes
    """Second documents of each kind, for the response bodies: the request and the
    response of an exchange are not the same bytes."""


def documents(size: int) -> Documents:
    orders = listing(order, size)
    orders_2 = listing(order, size, start=len(orders))
    return Documents(
        orders=encoded(orders),
        secrets=encoded(planted(orders)),
        tokens=encoded(listing(completion, size)),
        epoch=encoded(listing(lambda number: order(number, epoch_ms=True), size)),
        orders_2=encoded(orders_2),
        secrets_2=encoded(planted(orders_2)),
    )


# -- micro ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    label: str
    size: int
    path: str
    """Which way the redactor went, and what it replaced."""
    median: float
    p99: float
    """Seconds per call."""


def timed(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Median and p99 seconds per call of each, called in turn round after round (as
    ``bench.overhead`` does), so that a slow stretch of a shared machine lands on every
    case rather than on one; two warm-up rounds first, garbage collector on (the writer
    runs with it)."""
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for round_number in range(rounds + 2):
        for label, call in calls.items():
            started = time.perf_counter()
            call()
            if round_number >= 2:
                samples[label].append(time.perf_counter() - started)
    return {
        label: (statistics.median(times), percentile(times, 99)) for label, times in samples.items()
    }


def json_path(
    redactor: BodyRedactor, label: str, body: bytes, parse: bool, paths: int | None
) -> str:
    """How the redactor treats ``body``, checked against what the case is meant to
    measure: a change in the redactor that moves a document to another path would make
    its row silently measure something else."""
    may = redactor._may_hold_secrets(body)
    result = redactor.redact(body, JSON)
    found = 0 if result is None else len(result.paths)
    if may != parse or (paths is not None and found != paths):
        raise SystemExit(
            f"bench.redaction: {label!r} no longer measures what it says: prefilter "
            f"{'parses' if may else 'skips'} (meant to {'parse' if parse else 'skip'}), "
            f"{found} values replaced (meant {paths})"
        )
    if not may:
        return "prefilter: skipped"
    if result is None:
        return "parsed + walked, nothing found"
    return f"parsed + walked + re-encoded, {found} replaced"


def micro(docs: Documents, calls: int) -> list[Timing]:
    """The 1 MB cases interleaved over ``calls`` rounds, then the small bodies (250 times
    as many calls: they take microseconds)."""
    redactor = BodyRedactor()
    queries = QueryRedactor()
    body = docs.orders
    big: list[tuple[str, int, str, Callable[[], object]]] = [
        (
            "writer's own work, rules off: SHA-256 + zstd",
            len(body),
            "baseline",
            lambda: (hashlib.sha256(body).digest(), packing.pack(body)),
        ),
        (
            "orjson.loads (and freeing it)",
            len(body),
            "reference",
            functools.partial(orjson.loads, body),
        ),
    ]
    json_cases = (
        ("(a) orders, no secrets", docs.orders, False, 0),
        ("(b) orders, 3 secrets planted", docs.secrets, True, PLANTED),
        ('(c) LLM responses, "total_tokens" keys', docs.tokens, True, 0),
        ("(d) orders with epoch-ms timestamps", docs.epoch, True, None),
    )
    for label, document, parse, paths in json_cases:
        path = json_path(redactor, label, document, parse, paths)
        big.append((label, len(document), path, functools.partial(redactor.redact, document, JSON)))
    small: list[tuple[str, int, str, Callable[[], object]]] = []
    form = form_body(len(docs.orders))
    login = b"username=ada%40example.com&password=hunter2&remember=on"
    for label, data, into in (
        ("form body, ~1 MB, 1 password", form, big),
        ("form body, login", login, small),
    ):
        found = redactor.redact(data, FORM)
        replaced = 0 if found is None else len(found.paths)
        path = f"pairs tested, {replaced} replaced"
        into.append((label, len(data), path, functools.partial(redactor.redact, data, FORM)))
    for label, query in (
        ("query string, OAuth callback", "code=4%2F0AX4Xf&state=af0ifjsldkj&scope=openid"),
        ("query string, search", "q=running+shoes&page=2&sort=price_asc&size=44"),
    ):
        path = f"pairs tested, {len(queries(query)[1])} replaced"
        small.append((label, len(query), path, functools.partial(queries, query)))
    times = timed({label: call for label, _, _, call in big}, calls)
    times.update(timed({label: call for label, _, _, call in small}, calls * 250))
    return [Timing(label, size, path, *times[label]) for label, size, path, _ in [*big, *small]]


def duration(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def print_micro(rows: list[Timing], calls: int) -> None:
    base = rows[0].median
    print(
        f"\nMicro: BodyRedactor() (default rules) per call, {calls} interleaved rounds of "
        f"the 1 MB cases ({calls * 250} of the small ones), median and p99 (of {calls}: "
        "the slowest); ratio to the writer's own work on the same body with rules off"
    )
    print("| body | bytes | path | median | p99 | MB/s | ratio to rules off |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for row in rows:
        big = row.size >= CHUNK
        ratio = f"{row.median / base:.2f}x" if big else ""
        throughput = f"{row.size / row.median / 1e6:.0f}" if big else ""
        print(
            f"| {row.label} | {row.size:,} | {row.path} | {duration(row.median)} | "
            f"{duration(row.p99)} | {throughput} | {ratio} |"
        )


# -- pipeline --------------------------------------------------------------------------------


def pieces(body: bytes) -> list[bytes]:
    return [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]


def in_memory(chunks: list[bytes]) -> Body:
    size = sum(len(chunk) for chunk in chunks)
    return Body(size=size, complete=True, chunks=list(chunks), memory_size=size)


def exchange(request: list[bytes], response: list[bytes]) -> Exchange:
    """A finished exchange as the middleware hands it off: in-memory bodies in chunks,
    JSON content types (the headers are what tell the writer a body has rules)."""
    now_ns, mono_ns = time.time_ns(), time.monotonic_ns()
    request_body, response_body = in_memory(request), in_memory(response)
    return Exchange(
        id=new_record_id(),
        stream="bench",
        level=Level.REQUEST_RESPONSE,
        method="POST",
        scheme="http",
        host="bench",
        path="/orders",
        query=b"",
        http_version="1.1",
        client=("127.0.0.1", 5000),
        request_headers=[(b"content-type", b"application/json")],
        started_at_ns=now_ns,
        started_mono_ns=mono_ns,
        status=200,
        response_headers=[(b"content-type", b"application/json")],
        response_started_mono_ns=mono_ns,
        ended_mono_ns=mono_ns,
        request_body=request_body,
        response_body=response_body,
        request_size=request_body.size,
        response_size=response_body.size,
    )


class FullCollections:
    """Times every full (generation 2) garbage collection while it is installed.

    A collection runs on whichever thread's allocation triggers it, holding the GIL for
    as long as it walks every container in the process: when the writer's parse of a
    body triggers one, the event loop waits that long. These pauses explain most of the
    lag maximum with rules on, so each run reports them beside the lag."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((time.perf_counter() - self._started) * 1e3)


@dataclass(frozen=True, slots=True)
class Run:
    label: str
    exchanges: int
    written: int
    seconds: float
    lags: list[float]
    """Milliseconds a 1 ms sleep woke late, from the first hand-off to the last write."""
    windows: list[float]
    """Milliseconds from each hand-off to its record's write."""
    redacted: int
    """Bodies the writer replaced or redacted (a check that the run did what it says)."""
    collections: list[float]
    """Milliseconds each full garbage collection took during the run (any thread)."""

    @property
    def rate(self) -> float:
        return self.written / self.seconds


async def load(
    recorder: TimedRecorder,
    request: list[bytes],
    response: list[bytes],
    count: int,
    seconds: float,
    rate: float | None,
) -> tuple[int, float, list[float]]:
    """Hand off up to ``count`` exchanges within ``seconds`` (at ``rate`` per second, or
    as fast as the recorder takes them), wait for them to be written; how many, how long,
    and the event-loop lags meanwhile."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - before - 0.001) * 1e3)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    sent = 0
    while sent < count and time.perf_counter() - started < seconds:
        if rate is not None:
            delay = started + sent / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        made = exchange(request, response)
        while not recorder.try_submit(made):  # what overflow="block" does
            await recorder.room()
        sent += 1
        await asyncio.sleep(0)
    flushed = await asyncio.to_thread(recorder.flush, 300)
    elapsed = time.perf_counter() - started
    done.set()
    await tick
    if not flushed:
        raise SystemExit("bench.redaction: the spool writer did not finish in 300 s")
    return sent, elapsed, lags


def pipeline(
    root: Path,
    docs: Documents,
    count: int,
    seconds: float,
    rate: float | None,
    prefix: str,
) -> list[Run]:
    """The three variants, one after another, each on its own spool and recorder."""
    variants = (
        ("rules off", None, docs.orders, docs.orders_2),
        ("default rules, no secrets", BodyRedactor(), docs.orders, docs.orders_2),
        ("default rules, 3 secrets per body", BodyRedactor(), docs.secrets, docs.secrets_2),
    )
    runs = []
    for index, (label, redactor, request, response) in enumerate(variants):
        recorder = TimedRecorder(
            root / f"{prefix}-{index}", fsync="off", body_redactor=redactor, service="bench"
        )
        gc.collect()  # each run starts without the previous one's garbage
        with FullCollections() as collections:
            sent, elapsed, lags = asyncio.run(
                load(recorder, pieces(request), pieces(response), count, seconds, rate)
            )
        recorder.shutdown(60)
        runs.append(
            Run(
                label,
                sent,
                recorder.written,
                elapsed,
                lags,
                recorder.windows,
                recorder.bodies_redacted,
                collections.pauses,
            )
        )
    return runs


def print_runs(title: str, runs: list[Run]) -> None:
    base = runs[0]
    print(f"\n{title}")
    print(
        "| variant | exchanges | records/s | vs off | lag p50 (ms) | lag p99 (ms) | "
        "lag max (ms) | p99 vs off | hand-off to write p50/p99 (ms) | bodies redacted | "
        "full GCs, longest (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_p99 = percentile(base.lags, 99)
    for run in runs:
        p99 = percentile(run.lags, 99)
        print(
            f"| {run.label} | {run.written}/{run.exchanges} | {run.rate:.1f} | "
            f"{run.rate / base.rate:.2f}x | {percentile(run.lags, 50):.2f} | {p99:.2f} | "
            f"{max(run.lags, default=float('nan')):.2f} | {p99 / base_p99:.1f}x | "
            f"{percentile(run.windows, 50):.0f} / {percentile(run.windows, 99):.0f} | "
            f"{run.redacted} | {len(run.collections)}, "
            f"{max(run.collections, default=0):.0f} |"
        )


# -- main ------------------------------------------------------------------------------------


def machine() -> Iterator[str]:
    yield (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}, orjson {orjson.__version__}; "
        f"GIL switch interval {sys.getswitchinterval() * 1e3:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=40, help="timed calls per 1 MB case")
    parser.add_argument("--exchanges", type=int, default=200, help="per as-fast-as-possible run")
    parser.add_argument("--seconds", type=float, default=20.0, help="cap per as-fast run")
    parser.add_argument(
        "--rate",
        type=float,
        default=2.0,
        help="exchanges/s of paced runs (below every variant's limit)",
    )
    parser.add_argument("--paced-seconds", type=float, default=10.0, help="length of paced runs")
    parser.add_argument("--body-kib", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few of everything")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.exchanges, args.seconds = 2, 4, 5.0
        args.paced_seconds = min(args.paced_seconds, 2 / args.rate)
    begun = time.perf_counter()
    docs = documents(args.body_kib * 1024)
    rows = micro(docs, args.calls)
    paced_count = max(1, round(args.rate * args.paced_seconds))
    with tempfile.TemporaryDirectory(prefix="asgi-audit-bench-") as scratch:
        root = Path(scratch)
        paced = pipeline(root, docs, paced_count, args.paced_seconds + 5, args.rate, "paced")
        fastest = pipeline(root, docs, args.exchanges, args.seconds, None, "fast")
    megabytes = (len(docs.orders) + len(docs.orders_2)) / 1e6
    for line in machine():
        print(line)
    print_micro(rows, args.calls)
    print(
        f"\nPipeline: exchanges of a {len(docs.orders) / 1e6:.2f} MB JSON request and a "
        f"{len(docs.orders_2) / 1e6:.2f} MB JSON response ({megabytes:.2f} MB per exchange) "
        "handed to a SpoolRecorder (fsync=off) from an asyncio loop in the main thread; lag = "
        "how late a 1 ms sleep wakes on that loop, from the first hand-off to the last write"
    )
    print_runs(f"Paced at {args.rate:g} exchanges/s for {args.paced_seconds:g} s:", paced)
    print_runs(
        f"As fast as the writer takes them (block), {args.exchanges} exchanges "
        f"or {args.seconds:g} s:",
        fastest,
    )
    print(f"\n(whole run: {time.perf_counter() - begun:.0f} s)")


if __name__ == "__main__":
    main()
