"""``asgi-audit verify`` and ``asgi-audit keys generate``: prove a trail, and make the key
that signs it.

Verification reads the sink twice: a listing without bodies finds the streams (a forged
record may name a stream no checkpoint knows), then each stream is read with its bodies,
one page at a time, and reduced to summaries (sequence number, link, digest recomputed from
the stored bytes): memory holds one stream's summaries, never its bodies. The verdicts are
:mod:`asgi_audit.recording.verification`'s.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click
import orjson

from ..errors import AuditError
from ..recording import signing
from ..recording.chain import RETENTION_STREAM
from ..recording.verification import (
    StreamReport,
    retention_removals,
    summarize,
    verify_stream,
)
from ..sinks import Query, Sink
from ..sinks.record import StoredRecord
from .main import TimeParam, main, opened_sink, sink_option
from .terminal import printable

PROGRESS_SECONDS = 5.0


@main.command()
@sink_option
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, exists=True),
    help="The Ed25519 public key (PEM) whose signatures count; without it, signatures "
    "are reported as not checked.",
)
@click.option(
    "--since", type=TimeParam(), help="Only streams with records or checkpoints from then."
)
@click.option("--until", type=TimeParam(), help="Only streams with records or checkpoints before.")
@click.option("--stream", "only", multiple=True, help="Only this stream (repeatable).")
@click.option(
    "--strict",
    is_flag=True,
    help="Fail on a stream that ended without a final checkpoint (a crash) too.",
)
@click.option("--json", "as_json", is_flag=True, help="A JSON report on standard output.")
def verify(
    sink: str,
    public_key: str | None,
    since: int | None,
    until: int | None,
    only: tuple[str, ...],
    strict: bool,
    as_json: bool,
) -> None:
    """Check the hash chains and signed checkpoints of every stream: records modified,
    removed, reordered or inserted, checkpoints missing or badly signed. Exits 0 only
    when everything verifies (1 otherwise)."""
    verifier = None
    if public_key is not None:
        try:
            verifier = signing.load_verifier(public_key, "--public-key")
        except AuditError as exc:
            raise click.UsageError(str(exc)) from None
    reports: list[StreamReport] = []
    with opened_sink(sink) as store:
        progress = _Progress()
        markers = list(store.checkpoints(RETENTION_STREAM))
        removed: dict[str, set[int]] = {}
        if markers:
            marked, removed = retention_removals(markers, verifier)
            reports.append(marked)
        names = _streams(store, since, until, set(only))
        for name in names:
            summaries = [
                summarize(record.metadata(), *_bodies(record))
                for record in progress.counted(_records(store, name))
            ]
            checkpoints = list(store.checkpoints(name))
            reports.append(
                verify_stream(
                    name,
                    summaries,
                    checkpoints,
                    verifier,
                    strict=strict,
                    retained=removed.get(name, set()),
                )
            )
        progress.done()
    failed = [report for report in reports if not report.ok]
    if as_json:
        document = {
            "ok": not failed,
            "streams": [report.as_dict() for report in reports],
            "public_key": None if verifier is None else verifier.key_id,
        }
        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    else:
        _print(reports, verifier is not None)
    if failed:
        sys.exit(1)


def _streams(store: Sink, since: int | None, until: int | None, only: set[str]) -> list[str]:
    """Every stream with records or checkpoints (in the window, when one is given)."""
    found: set[str] = set()
    for checkpoint in store.checkpoints():
        at = checkpoint.get("at_ns")
        if isinstance(at, int) and (since is None or at >= since) and (until is None or at < until):
            found.add(str(checkpoint.get("stream")))
    query = Query(since_ns=since, until_ns=until, limit=None, newest_first=False)
    for record in store.search(query):
        found.add(record.stream)
    found.discard(RETENTION_STREAM)  # retention markers: checked on their own
    if only:
        found &= only
    return sorted(found)


def _records(store: Sink, stream: str) -> Any:
    query = Query(stream=stream, limit=None, newest_first=False, with_bodies=True)
    return store.search(query)


def _bodies(record: StoredRecord) -> tuple[bytes | None, bytes | None]:
    """The stored bytes of each body (None where none are stored)."""
    found: list[bytes | None] = []
    for body in (record.request_body, record.response_body):
        found.append(None if body is None or not body.stored else body.data)
    return found[0], found[1]


class _Progress:
    """A line on standard error every few seconds while records are read."""

    def __init__(self) -> None:
        self.count = 0
        self.started = self.shown = time.monotonic()
        self.visible = sys.stderr.isatty()

    def counted(self, records: Any) -> Any:
        for record in records:
            self.count += 1
            now = time.monotonic()
            if now - self.shown >= PROGRESS_SECONDS:
                self.shown = now
                click.echo(f"verified {self.count} records…", err=True)
            yield record

    def done(self) -> None:
        if time.monotonic() - self.started >= PROGRESS_SECONDS:
            click.echo(f"verified {self.count} records", err=True)


def _print(reports: list[StreamReport], checked: bool) -> None:
    if not reports:
        click.echo("no records and no checkpoints to verify")
        return
    for report in reports:
        verdict = "OK  " if report.ok else "FAIL"
        ending = "final checkpoint" if report.final else "no final checkpoint"
        if report.stream == RETENTION_STREAM:
            click.echo(
                f"{verdict} retention markers: {report.checkpoints} ({report.signed} "
                f"signature{'' if report.signed == 1 else 's'} verified)"
            )
        else:
            click.echo(
                f"{verdict} {printable(report.stream)}: {report.records} records, "
                f"{report.checkpoints} checkpoints ({report.signed} signature"
                f"{'' if report.signed == 1 else 's'} verified), last seq {report.last_seq}, "
                f"{ending}"
            )
        for finding in report.problems:
            click.echo(f"  {finding.kind}: {printable(finding.detail)}")
        for finding in report.notes:
            click.echo(f"  note: {printable(finding.detail)}")
    failed = sum(1 for report in reports if not report.ok)
    summary = f"{len(reports)} streams, {failed} failed"
    if not checked:
        summary += " (signatures not checked: give --public-key)"
    click.echo(summary)


@main.group()
def keys() -> None:
    """The Ed25519 key pair that signs checkpoints."""


@keys.command("generate")
@click.option(
    "--private",
    "private_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the private key (PEM, mode 0600; refused if it exists).",
)
@click.option(
    "--public",
    "public_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the public key (PEM), for `asgi-audit verify --public-key`.",
)
def generate(private_path: str, public_path: str) -> None:
    """Make a new key pair. Give the private key to the service (signing_key=, or
    ASGI_AUDIT_SIGNING_KEY; a Secret in Kubernetes) and keep the public key with the
    auditors."""
    private, public = signing.generate()
    for path, data, mode in ((private_path, private, 0o600), (public_path, public, 0o644)):
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            raise click.ClickException(f"{printable(path)} exists; not overwritten") from None
        except OSError as exc:
            raise click.ClickException(
                f"cannot write {printable(path)}: {printable(exc.strerror or str(exc))}"
            ) from None
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
    key_id = signing.load_verifier(public, "public key").key_id
    click.echo(
        f"wrote {printable(private_path)} (private) and {printable(public_path)} (key id {key_id})"
    )
