"""``asgi-audit replay``: send recorded requests to another server and compare the answers.

Safe by default: only the methods given by ``--methods`` (GET and HEAD unless told) are
sent. A request is skipped, with the reason, when it cannot be sent as it was: its body
was truncated, not kept, or had fields redacted; or a redacted header or query value has
no replacement. Replacements come from ``--header NAME=VALUE``, or, better (argv is
visible to every local user), from the environment: ``--header NAME`` alone, or nothing at
all, reads the variable the curl export names (``Authorization`` → ``$AUTHORIZATION``,
query ``token`` → ``$TOKEN``). Redacted values are never sent as the marker.

Each answer is compared with the record: the status, the headers named by
``--compare-header``, and the body. JSON bodies (both sides parse) are compared
structurally (:mod:`.jsondiff`) with the ``--ignore`` rules, the fields that redaction
replaced in the recorded body ignored as well; other bodies byte for byte after undoing
``gzip``/``deflate``; a recorded body that was truncated by its SHA-256. Exit status 0
when every replayed exchange matches, 1 otherwise (a difference or an error).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_plus, urlsplit

import click
import orjson

from .._urls import mask_url
from ..errors import ConfigError
from ..recording.redact import MARKER
from ..sinks.record import HeaderList, StoredRecord
from .curl import variable_name
from .exports import open_private, printable_json_bytes
from .har import PATH_SAFE, decoded_body, header_value
from .jsondiff import Difference, IgnoreRule, compare
from .main import filters, main, make_query, opened_sink, sink_option
from .terminal import printable

if TYPE_CHECKING:
    import httpx

HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Request headers that belong to one connection (or that the client computes): not resent."""
MAX_BODY = 64 << 20
"""Bytes of a replayed answer kept for comparison; past them, it is compared by digest."""
MAX_SHOWN = 300
"""Characters of a differing value shown in the per-exchange diff (the report keeps more)."""
MAX_REPORTED = 4096
"""Bytes of JSON a differing value may take in the report before it is summarised."""


@dataclass
class Outcome:
    """What happened to one record: ``match``, ``differ``, ``skipped`` or ``error``."""

    record: StoredRecord
    kind: str
    reason: str = ""
    status: int | None = None
    differences: list[Difference] = field(default_factory=list)

    def line(self) -> str:
        """One printable line for the terminal, then the differences, one per line."""
        head = (
            f"{self.kind.upper():7} {printable(self.record.id)} {printable(self.record.method)} "
            f"{printable(self.record.path)}"
        )
        if self.kind == "match":
            return f"{head} {self.status}"
        if self.kind in ("skipped", "error"):
            return f"{head}: {printable(self.reason)}"
        lines = [head]
        for difference in self.differences:
            lines.append(f"    {printable(_describe(difference))}")
        return "\n".join(lines)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.record.id,
            "method": self.record.method,
            "path": self.record.path,
            "route": self.record.route,
            "outcome": self.kind,
            "recorded_status": self.record.status,
            "status": self.status,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.differences:
            out["differences"] = [
                {
                    "path": d.path,
                    "kind": d.kind,
                    "expected": _bounded(d.expected),
                    "actual": _bounded(d.actual),
                }
                for d in self.differences
            ]
        return out


@dataclass(frozen=True)
class Plan:
    """What to send for one record."""

    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Replayer:
    """Sends records to ``target`` and compares; thread-safe (one shared HTTP client)."""

    def __init__(
        self,
        target: str,
        *,
        methods: Iterable[str] = ("GET", "HEAD"),
        headers: Sequence[str] = (),
        ignore: Sequence[str] = (),
        compare_headers: Sequence[str] = ("content-type",),
        timeout: float = 30.0,
        environ: dict[str, str] | None = None,
    ) -> None:
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                "--target", f"expected an http:// or https:// URL (got {target!r:.100})"
            )
        if parts.query or parts.fragment:
            raise ConfigError("--target", "a base URL, without query or fragment")
        self.target = target.rstrip("/")
        self.methods = frozenset(method.strip().upper() for method in methods if method.strip())
        if not self.methods:
            raise ConfigError("--methods", "name at least one method (GET,HEAD)")
        self.environ = dict(os.environ if environ is None else environ)
        self.overrides = self._overrides(headers)
        self.ignore = [IgnoreRule(rule) for rule in ignore]
        self.compare_headers = [name.strip().lower() for name in compare_headers if name.strip()]
        self.timeout = timeout
        self._client: httpx.Client | None = None

    def _overrides(self, headers: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for text in headers:
            name, equals, value = text.partition("=")
            name = name.strip()
            if not name or any(c in name for c in " \t:\r\n"):
                raise ConfigError(
                    "--header", f"expected NAME=VALUE or NAME (got the name {name!r:.60})"
                )
            if not equals:
                variable = variable_name(name)
                if variable not in self.environ:
                    raise ConfigError("--header", f"{name}: set ${variable} to its value")
                value = self.environ[variable]
            if any(c in value for c in "\r\n\0"):
                raise ConfigError("--header", f"{name}: the value holds a line break or NUL")
            found[name.lower()] = value
        return found

    def __enter__(self) -> Replayer:
        import httpx

        self._client = httpx.Client(timeout=self.timeout, follow_redirects=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def plan(self, record: StoredRecord) -> Plan | str:
        """What to send, or why not."""
        if record.method.upper() not in self.methods:
            methods = ", ".join(sorted(self.methods))
            return f"method {record.method} not replayed (--methods {methods})"
        body = record.request_body
        data = b""
        if body is not None and body.data is not None:
            if body.truncated:
                return f"request body truncated ({len(body.data)} of {body.size} bytes stored)"
            if body.unparseable:
                return "request body not kept (redaction rules, unparseable)"
            if body.redacted:
                return "request body has redacted fields: " + ", ".join(body.redacted[:5])
            data = body.data
        elif record.request_size:
            return f"request body of {record.request_size} bytes not kept"
        headers: list[tuple[bytes, bytes]] = []
        redacted = set(record.redacted_headers)
        for name, value in record.request_headers:
            lowered = name.lower()
            if lowered in HOP_BY_HOP or lowered in self.overrides:
                continue
            if lowered in redacted:
                variable = variable_name(name)
                if variable not in self.environ:
                    return f"header {name} was redacted: give --header {name} or set ${variable}"
                value = self.environ[variable]
            headers.append((name.encode("latin-1"), value.encode("latin-1", "replace")))
        for name, value in self.overrides.items():
            headers.append((name.encode("latin-1"), value.encode("latin-1", "replace")))
        query = self._query(record)
        if query is None:
            names = ", ".join(record.redacted_query)
            return f"query value redacted ({names}): set " + ", ".join(
                f"${variable_name(name)}" for name in record.redacted_query
            )
        url = self.target + quote(record.path, safe=PATH_SAFE)
        return Plan(record.method, f"{url}?{query}" if query else url, headers, data)

    def _query(self, record: StoredRecord) -> str | None:
        if not record.redacted_query:
            return record.query
        secret = {name.lower() for name in record.redacted_query}
        pairs = []
        for pair in record.query.split("&"):
            name, equals, value = pair.partition("=")
            if equals and value and unquote_plus(name).lower() in secret:
                variable = variable_name(unquote_plus(name))
                if variable not in self.environ:
                    return None
                pair = f"{name}={self.environ[variable]}"
            pairs.append(pair)
        return "&".join(pairs)

    def replay(self, record: StoredRecord) -> Outcome:
        planned = self.plan(record)
        if isinstance(planned, str):
            return Outcome(record, "skipped", planned)
        import httpx

        assert self._client is not None, "use the Replayer as a context manager"
        try:
            request = self._client.build_request(
                planned.method, planned.url, headers=planned.headers, content=planned.body
            )
            response = self._client.send(request, stream=True)
            try:
                digest = hashlib.sha256()
                kept = bytearray()
                for chunk in response.iter_raw():
                    digest.update(chunk)
                    if len(kept) < MAX_BODY:
                        kept += chunk[: MAX_BODY - len(kept)]
                size = response.num_bytes_downloaded
            finally:
                response.close()
        except httpx.HTTPError as exc:
            return Outcome(record, "error", f"{type(exc).__name__}: {exc}")
        answer = _Answer(
            response.status_code,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw],
            bytes(kept),
            size,
            digest.hexdigest(),
        )
        differences = self.differences(record, answer)
        return Outcome(record, "differ" if differences else "match", "", answer.status, differences)

    def differences(self, record: StoredRecord, answer: _Answer) -> list[Difference]:
        found: list[Difference] = []
        if record.status != answer.status:
            found.append(Difference("status", "changed", record.status, answer.status))
        redacted = set(record.redacted_headers)
        for name in self.compare_headers:
            if name in redacted:
                continue
            before = _joined(record.response_headers, name)
            after = _joined(answer.headers, name)
            if before != after:
                found.append(Difference(f"header {name}", "changed", before, after))
        if record.method.upper() == "HEAD":
            return found
        body = record.response_body
        if body is None or body.data is None or body.unparseable:
            return found  # nothing recorded to compare the body with
        if body.truncated or answer.size > len(answer.body):
            if body.sha256 != answer.sha256:
                found.append(
                    Difference(
                        "body", "changed", f"sha256 {body.sha256}", f"sha256 {answer.sha256}"
                    )
                )
            return found
        expected = decoded_body(
            body.data, header_value(record.response_headers, "content-encoding")
        )
        actual = decoded_body(answer.body, header_value(answer.headers, "content-encoding"))
        try:
            before, after = orjson.loads(expected), orjson.loads(actual)
        except orjson.JSONDecodeError:
            if expected != actual:
                found.append(
                    Difference("body", "changed", f"{len(expected)} bytes", f"{len(actual)} bytes")
                )
            return found
        rules = [*self.ignore, *_redaction_rules(body.redacted)]
        found.extend(d for d in compare(before, after, rules) if d.expected != MARKER)
        return found


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: HeaderList
    body: bytes
    size: int
    sha256: str


def run(replayer: Replayer, records: Iterable[StoredRecord], concurrency: int) -> Iterator[Outcome]:
    """Outcomes in record order, ``concurrency`` requests in flight at most."""
    iterator = iter(records)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="replay") as pool:
        while True:
            window = list(islice(iterator, concurrency * 4))
            if not window:
                return
            yield from pool.map(replayer.replay, window)


def _redaction_rules(paths: Sequence[str]) -> list[IgnoreRule]:
    rules = []
    for path in paths:
        try:
            rules.append(IgnoreRule(path))
        except ConfigError:
            continue  # an odd key: the marker value is ignored anyway
    return rules


def _joined(headers: HeaderList, name: str) -> str | None:
    values = [value for key, value in headers if key.lower() == name]
    return ", ".join(values) if values else None


def _describe(difference: Difference) -> str:
    if difference.kind == "missing":
        return f"{difference.path}: missing (was {_shown(difference.expected)})"
    if difference.kind == "added":
        return f"{difference.path}: added ({_shown(difference.actual)})"
    return f"{difference.path}: {_shown(difference.expected)} -> {_shown(difference.actual)}"


def _shown(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def _bounded(value: Any) -> Any:
    try:
        size = len(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError):
        return repr(value)[:MAX_REPORTED]
    if size <= MAX_REPORTED:
        return value
    return f"<{type(value).__name__} of {size} bytes of JSON>"


@main.command("replay")
@sink_option
@filters
@click.option("--target", required=True, help="Base URL to send to (http://127.0.0.1:8000).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many records.")
@click.option(
    "--methods",
    default="GET,HEAD",
    show_default=True,
    help="Comma-separated methods that may be sent; others are skipped.",
)
@click.option(
    "--ignore",
    multiple=True,
    metavar="JSONPATH",
    help="A volatile JSON field not compared ($.created_at, $..id, $.items[*].ts); repeatable.",
)
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar="NAME[=VALUE]",
    help="Sent instead of the recorded header (needed for redacted ones); NAME alone reads "
    "$NAME (upper case, '_' for '-'): prefer that for secrets. Repeatable.",
)
@click.option(
    "--compare-header",
    multiple=True,
    default=("content-type",),
    show_default=True,
    help="Response header compared with the recorded one; repeatable.",
)
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1))
@click.option(
    "--report",
    type=click.Path(dir_okay=False, writable=True),
    help="Write every outcome as JSON to this file (readable by you only).",
)
def replay_command(
    sink: str,
    target: str,
    limit: int | None,
    methods: str,
    ignore: tuple[str, ...],
    headers: tuple[str, ...],
    compare_header: tuple[str, ...],
    concurrency: int,
    timeout: float,
    report: str | None,
    **options: Any,
) -> None:
    """Send recorded requests to --target and compare status, headers and bodies.

    Only --methods are sent (GET and HEAD by default). Exits 0 when every replayed
    exchange matches, 1 when one differs or fails."""
    try:
        replayer = Replayer(
            target,
            methods=methods.split(","),
            headers=headers,
            ignore=ignore,
            compare_headers=compare_header,
            timeout=timeout,
        )
    except ConfigError as exc:
        raise click.UsageError(printable(str(exc))) from exc
    try:
        import httpx  # noqa: F401
    except ImportError as exc:
        raise click.ClickException("replay needs httpx: pip install 'asgi-audit[replay]'") from exc
    counts = dict.fromkeys(("match", "differ", "skipped", "error"), 0)
    outcomes: list[dict[str, Any]] = []
    query = make_query(limit=limit, newest_first=False, with_bodies=True, **options)
    with opened_sink(sink) as opened, replayer:
        for outcome in run(replayer, opened.search(query), concurrency):
            counts[outcome.kind] += 1
            click.echo(outcome.line())
            if report is not None:
                outcomes.append(outcome.report())
    replayed = counts["match"] + counts["differ"] + counts["error"]
    summary = (
        f"replayed {replayed}: {counts['match']} match, {counts['differ']} differ, "
        f"{counts['error']} failed; {counts['skipped']} skipped"
    )
    click.echo(summary)
    if report is not None:
        document = {
            "target": mask_url(target),
            "summary": {"replayed": replayed, **counts},
            "exchanges": outcomes,
        }
        try:
            with open_private(report) as out:
                out.write(printable_json_bytes(document) + b"\n")
        except OSError as exc:
            raise click.ClickException(
                f"cannot write {printable(report)}: {printable(exc.strerror or str(exc))}"
            ) from exc
    if not replayed:
        click.echo("nothing was replayed: check the filters and --methods", err=True)
    if counts["differ"] or counts["error"]:
        raise SystemExit(1)
