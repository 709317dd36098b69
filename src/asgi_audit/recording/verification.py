"""Checking one stream's chain and checkpoints: what ``asgi-audit verify`` concludes.

Given what a sink holds of a stream (each record's sequence number, link and recomputed
digest, and the stream's checkpoints), :func:`verify_stream` tells apart what tampering
leaves behind from what a crash or the writer's own failures leave behind, and names the
sequence numbers:

* *modified*: a record's digest is not what the next record (or a checkpoint's head)
  recorded for it: a field or a stored byte changed;
* *removed*: a sequence number inside the chain is missing and the writer did not report
  it lost;
* *reordered*: a record links to a record other than its predecessor;
* *inserted*: a record no chain or checkpoint accounts for: a second record under one
  sequence number, one without a chain, one past a final checkpoint, one of a stream
  without checkpoints (a made-up stream);
* checkpoints *missing*, *modified* (broken links between them), *unsigned* or signed
  with a bad or another key when a public key is given.

Not tampering, and said so: a stream whose last checkpoint is not final ended in a crash
(or is still running): the records after that checkpoint are chained but no signature
covers them yet (a failure only with ``strict``); records the writer lost (numbered, never
written) are listed by its next checkpoint.

It works on summaries (:class:`RecordSummary`), so that a verifier never holds bodies: the
caller computes each record's digest with :func:`summarize` as it reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .chain import (
    CHECKPOINT_TYPE,
    RETENTION_STREAM,
    RETENTION_TYPE,
    checkpoint_digest,
    record_digest,
    seq_ranges,
    signed_content,
)
from .signing import Verifier

MAX_LISTED = 50
"""Problems of one kind listed per stream; the rest are counted."""


@dataclass(frozen=True, slots=True)
class RecordSummary:
    """What verification needs of one stored record."""

    id: str
    seq: int | None
    prev: str | None
    digest: str
    chained: bool


def summarize(
    meta: Mapping[str, Any], request: bytes | None, response: bytes | None
) -> RecordSummary:
    """A record's summary from its stored metadata (``StoredRecord.metadata()``) and its
    stored body bytes (None when none are stored), whose digests are computed here, never
    taken from the record."""
    form = dict(meta)
    for name, data in (("request_body", request), ("response_body", response)):
        body = form.get(name)
        if body is not None:
            body = dict(body)
            body["stored_sha256"] = None if data is None else hashlib.sha256(data).hexdigest()
            form[name] = body
    seq = meta.get("seq")
    return RecordSummary(
        id=str(meta.get("id")),
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        prev=meta.get("chain_prev"),
        digest=record_digest(form),
        chained=meta.get("chain") is not None,
    )


@dataclass(slots=True)
class Finding:
    kind: str
    detail: str
    seqs: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail, "seqs": self.seqs}


@dataclass(slots=True)
class StreamReport:
    """One stream's verdict: ``problems`` fail verification, ``notes`` do not."""

    stream: str
    records: int = 0
    checkpoints: int = 0
    signed: int = 0
    last_seq: int = 0
    final: bool = False
    problems: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "ok": self.ok,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "signed_checkpoints": self.signed,
            "last_seq": self.last_seq,
            "final": self.final,
            "problems": [finding.as_dict() for finding in self.problems],
            "notes": [finding.as_dict() for finding in self.notes],
        }


def ranges(seqs: Iterable[int]) -> str:
    """``1-3, 7`` for [1, 2, 3, 7] (at most MAX_LISTED ranges, then a count)."""
    parts = [f"{low}" if low == high else f"{low}-{high}" for low, high in seq_ranges(seqs)]
    if len(parts) > MAX_LISTED:
        return ", ".join(parts[:MAX_LISTED]) + f", … ({len(parts) - MAX_LISTED} more ranges)"
    return ", ".join(parts)


class _Verdict:
    def __init__(self, report: StreamReport) -> None:
        self.report = report

    def problem(self, kind: str, detail: str, seqs: Iterable[int] = ()) -> None:
        self.report.problems.append(Finding(kind, detail, sorted(set(seqs))[:MAX_LISTED]))

    def note(self, kind: str, detail: str, seqs: Iterable[int] = ()) -> None:
        self.report.notes.append(Finding(kind, detail, sorted(set(seqs))[:MAX_LISTED]))


def verify_stream(
    stream: str,
    records: Iterable[RecordSummary],
    checkpoints: Iterable[Mapping[str, Any]],
    verifier: Verifier | None = None,
    *,
    strict: bool = False,
    retained: frozenset[int] | set[int] = frozenset(),
) -> StreamReport:
    """The verdict on one stream (see the module docstring); ``retained`` are the sequence
    numbers a trusted retention marker says were removed (:func:`retention_removals`)."""
    report = StreamReport(stream)
    verdict = _Verdict(report)
    marks = _checkpoints(list(checkpoints), verifier, verdict)
    by_seq: dict[int, list[RecordSummary]] = {}
    for record in records:
        report.records += 1
        if record.seq is None or not record.chained:
            verdict.problem("inserted", f"record {record.id} carries no chain")
            continue
        by_seq.setdefault(record.seq, []).append(record)
    chain = _choose(by_seq, marks, verdict)
    _links(chain, marks, verdict)
    _coverage(chain, marks, verdict, strict, retained)
    report.last_seq = max(chain, default=0)
    return report


@dataclass(slots=True)
class _Marks:
    """What the checkpoints say."""

    heads: dict[int, str] = field(default_factory=dict)
    """Chain head after a sequence number, as a checkpoint recorded it."""
    covered: int = 0
    """The last sequence number a checkpoint covers."""
    lost: set[int] = field(default_factory=set)
    lost_more: int = 0
    final: bool = False
    any: bool = False


def _checkpoints(
    found: list[Mapping[str, Any]], verifier: Verifier | None, verdict: _Verdict
) -> _Marks:
    report = verdict.report
    marks = _Marks()
    by_index = _indexed(found, CHECKPOINT_TYPE, verdict, "checkpoint", "checkpoint")
    report.checkpoints = len(by_index)
    if not by_index:
        return marks
    marks.any = True
    unsigned: list[int] = []
    unchecked = 0
    previous: Mapping[str, Any] | None = None
    for index in sorted(by_index):
        checkpoint = by_index[index]
        signed = _signature(checkpoint, verifier, verdict, f"checkpoint {index}", "checkpoint")
        if signed == "unsigned":
            unsigned.append(index)
        elif signed == "unchecked":
            unchecked += 1
        elif signed == "good":
            report.signed += 1
        if previous is not None and previous.get("index") == index - 1:
            if checkpoint.get("previous") != checkpoint_digest(previous):
                verdict.problem(
                    "checkpoint-modified",
                    f"checkpoint {index - 1} is not the one checkpoint {index} follows",
                )
            if checkpoint.get("first_seq") != _int(previous.get("last_seq")) + 1:
                verdict.problem(
                    "checkpoint-modified",
                    f"checkpoints {index - 1} and {index} do not cover adjacent records",
                )
        elif index == 1 and checkpoint.get("previous") is not None:
            verdict.problem("checkpoint-modified", "checkpoint 1 follows another")
        last_seq = _int(checkpoint.get("last_seq"))
        head = checkpoint.get("head")
        if last_seq >= 1 and isinstance(head, str):
            marks.heads[last_seq] = head
        marks.covered = max(marks.covered, last_seq)
        marks.lost.update(_expanded(checkpoint.get("lost")))
        marks.lost_more += _int(checkpoint.get("lost_more"))
        marks.final = marks.final or checkpoint.get("final") is True
        previous = checkpoint
    report.final = marks.final
    if unsigned:
        text = f"checkpoints {ranges(unsigned)} are not signed"
        if verifier is not None:
            verdict.problem("checkpoint-unsigned", text)
        else:
            verdict.note("unsigned", text + " (no signing key was configured)")
    if unchecked:
        verdict.note("signatures-not-checked", f"{unchecked} signatures not checked: no public key")
    return marks


def _signature(
    signed: Mapping[str, Any], verifier: Verifier | None, verdict: _Verdict, name: str, kind: str
) -> str:
    """``unsigned``, ``unchecked`` (no public key), ``good``, or ``bad`` (a problem)."""
    signature = signed.get("signature")
    if signature is None:
        return "unsigned"
    if verifier is None:
        return "unchecked"
    if signed.get("key_id") != verifier.key_id:
        verdict.problem(
            f"{kind}-wrong-key",
            f"{name} is signed by key {signed.get('key_id')!s:.20}, not by {verifier.key_id}",
        )
        return "bad"
    if not verifier.verify(str(signature), signed_content(signed)):
        verdict.problem(f"{kind}-bad-signature", f"{name} has a bad signature")
        return "bad"
    return "good"


def retention_removals(
    markers: Iterable[Mapping[str, Any]], verifier: Verifier | None
) -> tuple[StreamReport, dict[str, set[int]]]:
    """The retention markers' own verdict (chained, signed), and the records they say were
    removed, by stream: only markers that verify count, so a forged marker cannot excuse
    a deletion when a public key is given."""
    report = StreamReport(RETENTION_STREAM)
    verdict = _Verdict(report)
    removed: dict[str, set[int]] = {}
    by_index = _indexed(markers, RETENTION_TYPE, verdict, "retention-marker", "retention marker")
    report.checkpoints = len(by_index)
    unsigned = 0
    for index in sorted(by_index):
        marker = by_index[index]
        found = _signature(marker, verifier, verdict, f"retention marker {index}", "retention")
        before = by_index.get(index - 1)
        if before is not None and marker.get("previous") != checkpoint_digest(before):
            verdict.problem(
                "retention-marker-modified",
                f"retention marker {index - 1} is not the one marker {index} follows",
            )
        if found == "bad" or (found == "unsigned" and verifier is not None):
            if found == "unsigned":
                verdict.problem("retention-unsigned", f"retention marker {index} is not signed")
            continue  # its removals do not count
        unsigned += found == "unsigned"
        report.signed += found == "good"
        for stream, spans in dict(marker.get("removed") or {}).items():
            removed.setdefault(str(stream), set()).update(_expanded(spans))
    if unsigned:
        verdict.note("unsigned", f"{unsigned} retention markers are not signed")
    return report, removed


def _indexed(
    found: Iterable[Mapping[str, Any]], kind: str, verdict: _Verdict, problem: str, noun: str
) -> dict[int, Mapping[str, Any]]:
    """Checkpoints (or retention markers) of ``kind`` by index, the first copy of each;
    one of another form, and indexes missing below the highest, are problems."""
    by_index: dict[int, Mapping[str, Any]] = {}
    for item in found:
        index = item.get("index")
        if item.get("type") != kind or not isinstance(index, int):
            verdict.problem(f"{problem}-invalid", f"a {noun} of an unknown form")
            continue
        by_index.setdefault(index, item)
    missing = [i for i in range(1, max(by_index, default=0) + 1) if i not in by_index]
    if missing:
        verdict.problem(f"{problem}-missing", f"{noun}s {ranges(missing)} are missing")
    return by_index


def _expanded(spans: Any) -> set[int]:
    """The sequence numbers of ``[[first, last], ...]`` (as :func:`seq_ranges` makes)."""
    seqs: set[int] = set()
    for span in spans or []:
        if isinstance(span, list) and len(span) == 2:
            seqs.update(range(_int(span[0]), _int(span[1]) + 1))
    return seqs


def _choose(
    by_seq: dict[int, list[RecordSummary]], marks: _Marks, verdict: _Verdict
) -> dict[int, RecordSummary]:
    """One record per sequence number: where several claim one, the one the chain links
    to stays, the others are inserted."""
    chain: dict[int, RecordSummary] = {}
    for seq in sorted(by_seq):
        claims = by_seq[seq]
        if len(claims) == 1:
            chain[seq] = claims[0]
            continue
        after = by_seq.get(seq + 1, [])
        wanted = {record.prev for record in after}
        head = marks.heads.get(seq)
        before = chain.get(seq - 1)
        best = max(
            claims,
            key=lambda r: (
                r.digest in wanted or r.digest == head,
                before is not None and r.prev == before.digest,
            ),
        )
        chain[seq] = best
        for record in claims:
            if record is not best:
                verdict.problem("inserted", f"record {record.id} repeats seq {seq}", [seq])
    return chain


def _links(chain: dict[int, RecordSummary], marks: _Marks, verdict: _Verdict) -> None:
    by_digest = {record.digest: seq for seq, record in chain.items()}
    modified: set[int] = set()
    reordered: set[int] = set()
    for seq, record in chain.items():
        if seq == 1:
            if record.prev is not None:
                modified.add(seq)
            continue
        before = chain.get(seq - 1)
        if before is None or record.prev == before.digest:
            continue
        linked = by_digest.get(record.prev or "")
        if linked is not None and linked != seq - 1:
            reordered.add(seq)
        else:
            modified.add(_culprit(chain, marks, seq))
    for seq, head in marks.heads.items():
        covered = chain.get(seq)
        if covered is not None and covered.digest != head:
            modified.add(seq)
    if modified:
        verdict.problem(
            "modified", f"records changed since they were written: seq {ranges(modified)}", modified
        )
    if reordered:
        verdict.problem(
            "reordered",
            f"records out of their place in the chain: seq {ranges(reordered)}",
            reordered,
        )


def _culprit(chain: dict[int, RecordSummary], marks: _Marks, seq: int) -> int:
    """Which record changed when ``seq``'s link to ``seq - 1`` is broken: ``seq - 1``
    when ``seq`` itself is vouched for (by its successor's link or a checkpoint's head),
    ``seq`` when nothing vouches for it but a successor exists that should."""
    record = chain[seq]
    after = chain.get(seq + 1)
    head = marks.heads.get(seq)
    if (after is not None and after.prev == record.digest) or head == record.digest:
        return seq - 1
    if after is not None or head is not None:
        return seq
    return seq - 1


def _coverage(
    chain: dict[int, RecordSummary],
    marks: _Marks,
    verdict: _Verdict,
    strict: bool,
    retained: frozenset[int] | set[int],
) -> None:
    top = max(max(chain, default=0), marks.covered)
    absent = [seq for seq in range(1, top + 1) if seq not in chain]
    lost = [seq for seq in absent if seq in marks.lost]
    expired = [seq for seq in absent if seq in retained and seq not in marks.lost]
    removed = [seq for seq in absent if seq not in marks.lost and seq not in retained]
    if expired:
        verdict.note("retention", f"records removed by retention: seq {ranges(expired)}")
    if removed:
        verdict.problem(
            "removed", f"records missing from the chain: seq {ranges(removed)}", removed
        )
    if lost or marks.lost_more:
        more = f" and {marks.lost_more} more" if marks.lost_more else ""
        verdict.note(
            "lost", f"records the writer lost (not written): seq {ranges(lost)}{more}", lost
        )
    if chain and not marks.any:
        verdict.problem(
            "inserted", f"{len(chain)} records of a stream without any checkpoint", list(chain)
        )
        return
    tail = [seq for seq in chain if seq > marks.covered]
    if marks.final:
        if tail:
            verdict.problem(
                "inserted", f"records past the final checkpoint: seq {ranges(tail)}", tail
            )
        return
    if not marks.any:
        return
    text = "the stream ended without a final checkpoint (a crash, or it is still running)"
    if tail:
        text += f"; {len(tail)} records after the last checkpoint are chained but not signed"
    (verdict.problem if strict else verdict.note)("no-final-checkpoint", text, tail)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
