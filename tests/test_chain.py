"""The hash chain and its checkpoints, and what verification concludes from them, on
records built the way the writer builds them (no sink: see test_verify for stores)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_audit.recording.chain import (
    StreamChain,
    _is_own_form,
    canonical,
    checkpoint_digest,
    record_digest,
    record_form,
)
from asgi_audit.recording.metadata import exchange_metadata
from asgi_audit.recording.signing import Signer, generate, load_signer, load_verifier
from asgi_audit.recording.verification import StreamReport, summarize, verify_stream
from spooling import exchange

STREAM = "orders.7.1764556800000000000"


@dataclass
class Trail:
    """One stream as a sink would hold it: records (meta + stored bytes) and checkpoints."""

    records: list[tuple[dict[str, Any], bytes | None, bytes | None]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def verify(self, signer: Signer | None = None, *, strict: bool = False) -> StreamReport:
        verifier = None if signer is None else load_verifier(signer.public_pem())
        summaries = [summarize(meta, req, resp) for meta, req, resp in self.records]
        return verify_stream(STREAM, summaries, self.checkpoints, verifier, strict=strict)


def body_meta(data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    return {
        "size": len(data),
        "sha256": digest,
        "stored": True,
        "stored_sha256": digest,
        "truncated": False,
        "complete": True,
        "sent_path": None,
        "redacted": [],
        "unparseable": False,
    }


def build(count: int, *, every: int = 3, signer: Signer | None = None, final: bool = True) -> Trail:
    """``count`` records, a checkpoint at the start, after every ``every`` records and
    (``final``) at the end, as the writer makes them."""
    chain = StreamChain(STREAM, "orders", signer=signer)
    trail = Trail()
    trail.checkpoints.append(chain.checkpoint(at_ns=1))
    for seq in range(1, count + 1):
        request = f'{{"order": {seq}}}'.encode()
        response = f'{{"id": {seq}}}'.encode()
        meta: dict[str, Any] = {
            "schema": 1,
            "id": f"id-{seq:04}",
            "stream": STREAM,
            "method": "POST",
            "path": f"/orders/{seq}",
            "query": "",
            "started_at_ns": 1000 + seq,
            "status": 201,
            "request_headers": [("content-type", "application/json")],
            "redacted_headers": [],
            "request_body": body_meta(request),
            "response_body": body_meta(response),
        }
        chain.link(meta, seq)
        trail.records.append((meta, request, response))
        if seq % every == 0 and seq != count:
            trail.checkpoints.append(chain.checkpoint(at_ns=10 + seq))
    if final:
        trail.checkpoints.append(chain.checkpoint(at_ns=10_000, final=True))
    return trail


def kinds(report: StreamReport) -> set[str]:
    return {finding.kind for finding in report.problems}


def seqs(report: StreamReport) -> set[int]:
    return {seq for finding in report.problems for seq in finding.seqs}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return load_signer(generate()[0])


def test_untouched_stream_verifies_with_its_signatures(signer: Signer) -> None:
    trail = build(10, signer=signer)
    report = trail.verify(signer)
    assert report.ok, report.problems
    assert (report.records, report.checkpoints, report.signed, report.last_seq) == (10, 5, 5, 10)
    assert report.final and not report.notes


def test_unsigned_stream_verifies_and_says_it_is_unsigned() -> None:
    report = build(4).verify()
    assert report.ok
    assert [note.kind for note in report.notes] == ["unsigned"]
    # An auditor holding a public key does not accept unsigned checkpoints.
    other = load_signer(generate()[0])
    assert "checkpoint-unsigned" in kinds(build(4).verify(other))


def test_a_changed_body_byte_is_named_by_seq(signer: Signer) -> None:
    trail = build(6, signer=signer)
    meta, request, response = trail.records[3]
    assert request is not None
    trail.records[3] = (meta, request[:-2] + b"X}", response)
    report = trail.verify(signer)
    assert kinds(report) == {"modified"}
    assert seqs(report) == {4}


def test_a_changed_metadata_field_is_named_by_seq(signer: Signer) -> None:
    trail = build(6, signer=signer)
    trail.records[5][0]["status"] = 200  # the last record: caught by the final head
    report = trail.verify(signer)
    assert kinds(report) == {"modified"} and seqs(report) == {6}


def test_a_deleted_record_is_removed(signer: Signer) -> None:
    trail = build(6, signer=signer)
    del trail.records[1]
    report = trail.verify(signer)
    assert kinds(report) == {"removed"} and seqs(report) == {2}


def test_the_last_record_deleted_is_removed(signer: Signer) -> None:
    trail = build(6, signer=signer)
    del trail.records[-1]
    assert seqs(trail.verify(signer)) == {6}


def test_two_swapped_records_are_caught(signer: Signer) -> None:
    trail = build(6, signer=signer)
    first, second = trail.records[1][0], trail.records[2][0]
    first["seq"], second["seq"] = second["seq"], first["seq"]
    report = trail.verify(signer)
    assert not report.ok
    assert seqs(report) & {2, 3}


def test_records_linked_out_of_order_are_reordered(signer: Signer) -> None:
    """Records renumbered consistently (each still a valid chain link) are reordered."""
    trail = build(6, signer=signer)
    # seq 5 claims to follow seq 3 (its chain_prev points at 3's digest).
    trail.records[4][0]["chain_prev"] = record_digest(trail.records[2][0])
    report = trail.verify(signer)
    assert "reordered" in kinds(report)


def test_an_inserted_record_with_a_fresh_id_is_caught(signer: Signer) -> None:
    trail = build(6, signer=signer)
    forged = copy.deepcopy(trail.records[2])
    forged[0]["id"] = "forged"
    trail.records.append(forged)
    report = trail.verify(signer)
    assert "inserted" in kinds(report) and seqs(report) == {3}


def test_a_record_past_the_final_checkpoint_is_inserted(signer: Signer) -> None:
    trail = build(3, signer=signer)
    meta = copy.deepcopy(trail.records[-1][0])
    meta.update(id="late", seq=4, chain_prev=record_digest(trail.records[-1][0]))
    trail.records.append((meta, b"{}", b"{}"))
    assert "inserted" in kinds(trail.verify(signer))


def test_records_without_a_chain_are_inserted(signer: Signer) -> None:
    trail = build(2, signer=signer)
    meta = copy.deepcopy(trail.records[0][0])
    meta.pop("chain")
    meta["id"] = "unchained"
    trail.records.append((meta, b"{}", b"{}"))
    assert "inserted" in kinds(trail.verify(signer))


def test_a_made_up_stream_without_checkpoints_fails() -> None:
    trail = build(3)
    trail.checkpoints.clear()
    report = trail.verify()
    assert "inserted" in kinds(report)


def test_a_deleted_checkpoint_is_missing(signer: Signer) -> None:
    trail = build(9, signer=signer)
    del trail.checkpoints[1]
    report = trail.verify(signer)
    assert "checkpoint-missing" in kinds(report)


def test_an_altered_signature_is_bad(signer: Signer) -> None:
    trail = build(6, signer=signer)
    checkpoint = trail.checkpoints[1]
    signature = checkpoint["signature"]
    checkpoint["signature"] = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert "checkpoint-bad-signature" in kinds(trail.verify(signer))


def test_a_checkpoint_rewritten_without_the_key_is_caught(signer: Signer) -> None:
    """Someone who rewrites a record and re-chains everything after it must rewrite the
    heads of the checkpoints, whose signatures then fail."""
    trail = build(6, signer=signer)
    trail.records[5][0]["status"] = 500
    trail.checkpoints[-1]["head"] = record_digest(trail.records[5][0])
    assert "checkpoint-bad-signature" in kinds(trail.verify(signer))


def test_another_key_is_not_accepted(signer: Signer) -> None:
    other = load_signer(generate()[0])
    assert "checkpoint-wrong-key" in kinds(build(3, signer=other).verify(signer))


def test_a_crash_is_reported_but_not_called_tampering(signer: Signer) -> None:
    trail = build(7, signer=signer, final=False)  # checkpoints at 0, 3, 6; seq 7 uncovered
    report = trail.verify(signer)
    assert report.ok and not report.final
    [note] = report.notes
    assert note.kind == "no-final-checkpoint" and note.seqs == [7]
    assert "no-final-checkpoint" in kinds(trail.verify(signer, strict=True))


def test_records_the_writer_lost_are_noted_not_failed(signer: Signer) -> None:
    chain = StreamChain(STREAM, "orders", signer=signer)
    trail = Trail(checkpoints=[chain.checkpoint(at_ns=1)])
    for seq in (1, 2, 3):
        meta: dict[str, Any] = {"id": f"r{seq}", "stream": STREAM}
        chain.link(meta, seq)
        if seq == 2:
            chain.lose(2)
        else:
            trail.records.append((meta, None, None))
    trail.checkpoints.append(chain.checkpoint(at_ns=2, final=True))
    report = trail.verify(signer)
    assert report.ok, report.problems
    assert [note.kind for note in report.notes] == ["lost"]


def test_an_idle_stream_still_checkpoints_and_verifies(signer: Signer) -> None:
    chain = StreamChain(STREAM, "orders", signer=signer)
    trail = Trail(checkpoints=[chain.checkpoint(at_ns=i) for i in range(1, 4)])
    assert [c["count"] for c in trail.checkpoints] == [0, 0, 0]
    assert trail.verify(signer).ok
    assert trail.checkpoints[2]["previous"] == checkpoint_digest(trail.checkpoints[1])


TAMPERINGS = (
    "body",
    "field",
    "delete",
    "swap",
    "insert",
    "delete-checkpoint",
    "signature",
    "reseq",
)


@settings(max_examples=120, deadline=None)
@given(
    count=st.integers(min_value=3, max_value=25),
    every=st.integers(min_value=1, max_value=6),
    tampering=st.sampled_from(TAMPERINGS),
    data=st.data(),
)
def test_every_generated_tampering_is_detected(
    count: int, every: int, tampering: str, data: st.DataObject
) -> None:
    trail = build(count, every=every, signer=SIGNER)
    assert trail.verify(SIGNER).ok
    index = data.draw(st.integers(min_value=0, max_value=count - 1), label="record")
    meta, request, response = trail.records[index]
    if tampering == "body":
        assert request is not None
        offset = data.draw(st.integers(min_value=0, max_value=len(request) - 1), label="byte")
        flipped = bytes([request[offset] ^ 0x01])
        trail.records[index] = (meta, request[:offset] + flipped + request[offset + 1 :], response)
    elif tampering == "field":
        name = data.draw(st.sampled_from(["status", "path", "started_at_ns", "method"]))
        meta[name] = f"{meta[name]}-changed"
    elif tampering == "delete":
        del trail.records[index]
    elif tampering == "swap":
        other = data.draw(
            st.integers(min_value=0, max_value=count - 1).filter(lambda i: i != index)
        )
        meta["seq"], trail.records[other][0]["seq"] = trail.records[other][0]["seq"], meta["seq"]
    elif tampering == "insert":
        forged = copy.deepcopy(meta)
        forged["id"] = "forged"
        forged["status"] = 418
        trail.records.insert(index, (forged, request, response))
    elif tampering == "delete-checkpoint":
        # Any checkpoint but the newest: deleting only the newest looks like a crash (see
        # docs/architecture.md), which a verifier without an outside anchor cannot tell.
        which = data.draw(st.integers(min_value=0, max_value=len(trail.checkpoints) - 2))
        del trail.checkpoints[which]
    elif tampering == "signature":
        which = data.draw(st.integers(min_value=0, max_value=len(trail.checkpoints) - 1))
        trail.checkpoints[which]["signature"] = SIGNER.sign(b"something else")
    elif tampering == "reseq":
        meta["seq"] = count + 5
    report = trail.verify(SIGNER)
    assert not report.ok, tampering
    if tampering in ("body", "field", "delete", "swap", "insert", "reseq"):
        assert seqs(report), report.problems  # names the records


SIGNER = load_signer(generate()[0])


def test_signing_keys_never_show_and_bad_keys_fail_clearly(tmp_path: Any) -> None:
    from asgi_audit.errors import ConfigError

    private, public = generate()
    path = tmp_path / "key.pem"
    path.write_bytes(private)
    signer = load_signer(str(path))
    assert private.decode() not in repr(signer)
    assert signer.key_id == load_verifier(public).key_id == load_signer(private.decode()).key_id
    with pytest.raises(ConfigError, match="Ed25519 private key in PEM") as caught:
        load_signer(public)
    assert "BEGIN" not in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read the key file"):
        load_signer(str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError) as hidden:
        load_signer("c2VjcmV0LWtleS1ieXRlcw==")
    assert "c2VjcmV0" not in str(hidden.value)


def _slow_digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record_form(meta))).hexdigest()


def test_the_writers_metadata_is_hashed_as_it_is_and_alike() -> None:
    """The writer's metadata is its own canonical form: hashed without building the
    form again, to the same digest; anything else goes through the form."""
    meta = exchange_metadata(exchange(b'{"a": 1}', b"ok"))
    meta.update(seq=1, chain=1, chain_prev=None)
    assert _is_own_form(meta)
    assert record_digest(meta) == _slow_digest(meta)
    changes: tuple[Callable[[dict[str, Any]], object], ...] = (
        lambda m: m.update(packed=["request"]),  # a key the form leaves out
        lambda m: m.pop("pod"),  # a field missing: null in the form
        lambda m: m.update(redacted_headers=("authorization",)),  # a tuple: a list there
        lambda m: m["request_body"].update(skipped=True),
        lambda m: m["response_body"].update(unparseable=0),
    )
    for change in changes:
        other = copy.deepcopy(meta)
        change(other)
        assert not _is_own_form(other)
        assert record_digest(other) == _slow_digest(other)
