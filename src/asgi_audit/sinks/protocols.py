"""What every sink is: a :class:`BatchWriter` for the shipper, and queries for the CLI.

A sink receives batches of :class:`~asgi_audit.sinks.record.StoredRecord` from the shipper.
``write_batch`` must be idempotent by record id (delivery is at least once: a batch may
arrive again after a crash or a retry, and the sink must end up with one copy) and must
return only once the batch is durable in the sink. Raising means "not stored", in one of
two ways the shipper tells apart: :class:`~asgi_audit.errors.RecordRefused` when the sink
will never take what some records hold (the shipper quarantines them: those the refusal's
``ids`` name, or those it finds by splitting the batch), any other exception when it
cannot store now (the shipper retries the same batch later). A refusal must leave the
sink as it was (nothing of the batch stored, connections usable). See
:mod:`asgi_audit.sinks.refusal`.
The same object answers the CLI's queries (:class:`Sink`), and keeps the streams'
checkpoints beside the records (:class:`CheckpointStore`): what makes the trail
tamper-evident is worth nothing if it lives somewhere else than the records it vouches for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .record import StoredRecord


@dataclass(frozen=True, slots=True)
class Query:
    """Filters of ``asgi-audit ls`` and friends; None means "any"."""

    since_ns: int | None = None
    """Exchanges that started at or after this wall-clock time (ns since the epoch)."""
    until_ns: int | None = None
    """Exchanges that started before this time."""
    route: str | None = None
    method: str | None = None
    status_low: int | None = None
    status_high: int | None = None
    """Inclusive status range (``4xx`` is 400..499)."""
    correlation_id: str | None = None
    stream: str | None = None
    """Only the records of this stream (one writer process), matched exactly."""
    limit: int | None = 100
    newest_first: bool = True
    with_bodies: bool = False
    """When False, results carry bodies with ``data=None`` (sizes, digests and flags kept),
    so a listing never loads megabytes of body; :meth:`Sink.get` returns the bytes."""


@runtime_checkable
class BatchWriter(Protocol):
    """The part of a sink the shipper uses: where it delivers records."""

    def write_batch(self, records: Sequence[StoredRecord]) -> None:
        """Store ``records`` durably; a record whose id is already stored is skipped.
        :class:`~asgi_audit.errors.RecordRefused` when records can never be stored (see
        the module docstring); anything else raised is retried.

        A sink class that sets ``keeps_packed = True`` stores bodies through
        :func:`asgi_audit.sinks.record.kept_bytes`: it may then be given bodies whose
        ``data`` is None and whose ``packed`` holds them zstd-packed, as the spool did."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


@runtime_checkable
class CheckpointStore(Protocol):
    """Where a sink keeps the streams' checkpoints, beside their records.

    Each stream (one writer process) chains its records by ``(stream, seq)`` and now and
    then writes a checkpoint: a JSON object with at least ``"stream"`` (a non-empty
    string), ``"index"`` (an integer from 1) and ``"at_ns"`` (an integer, wall time in ns).
    The sink keeps it as an opaque object (what else it holds, signatures included, is the
    checkpoint format's business) and gives back a dict equal to what was written, which
    is what lets ``verify`` check a signature over it. A checkpoint without those keys, of
    the wrong types, or that JSON cannot give back equal (a tuple, a key that is not a
    string, NaN) is refused with :class:`~asgi_audit.errors.RecordRefused`, and nothing of
    that call is stored (see :mod:`asgi_audit.sinks.checkpoint_rows`)."""

    def write_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> None:
        """Store checkpoints durably (returns only once durable, like write_batch);
        idempotent by (stream, index): the first copy stays."""
        ...

    def checkpoints(self, stream: str | None = None) -> Iterator[dict[str, Any]]:
        """Checkpoints (of one stream, or all), ordered by (stream, index)."""
        ...


@runtime_checkable
class Sink(BatchWriter, CheckpointStore, Protocol):
    """A sink: takes batches and checkpoints from the shipper and answers the CLI's
    queries over them (what :func:`~asgi_audit.sinks.open_sink` returns)."""

    def search(self, query: Query) -> Iterator[StoredRecord]:
        """Records matching ``query``, ordered by start time (then id)."""
        ...

    def get(self, record_id: str) -> StoredRecord | None:
        """One record with its bodies, or None."""
        ...

    def count(self) -> int:
        """How many records the sink holds."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...
