"""Redaction: secrets are replaced before anything is written to the spool.

Redaction is a pipeline of small steps, each ``(meta) -> meta`` over the record's
metadata dictionary, run by the recorder thread in order (structlog's processors are the
model): headers, then the query string (:mod:`.redact_query`). Bodies are redacted by
the writer as it reads their bytes (:mod:`.redact_body`), before they are hashed for the
chain and packed, so that the spool never holds a secret in clear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

MARKER = "[REDACTED]"

Metadata = dict[str, Any]
"""A record's metadata as the spool will hold it (see :mod:`.metadata`)."""
Step = Callable[[Metadata], Metadata]
"""One redaction step: takes the record's metadata and returns it with secrets replaced."""


def header_redactor(names: Iterable[str], marker: str = MARKER) -> Step:
    """A step that replaces the values of the named headers (any case) with ``marker``."""
    secret = frozenset(name.lower() for name in names)

    def redact(meta: Metadata) -> Metadata:
        if not secret:
            return meta
        found: set[str] = set()
        for field in ("request_headers", "response_headers", "response_trailers"):
            headers = meta.get(field)
            if not headers:
                continue
            # Most messages carry no secret header: they are only looked at, not copied.
            hits = [at for at, (name, _) in enumerate(headers) if name.lower() in secret]
            if not hits:
                continue
            replaced = list(headers)
            for at in hits:
                name = replaced[at][0]
                found.add(name.lower())
                replaced[at] = (name, marker)
            meta[field] = replaced
        if found:
            meta["redacted_headers"] = sorted(found)
        return meta

    return redact


def query_redactor(redact: Callable[[str], tuple[str, list[str]]]) -> Step:
    """A step that redacts the stored query string with ``redact`` (a
    :class:`~.redact_query.QueryRedactor`), listing the names it replaced."""

    def step(meta: Metadata) -> Metadata:
        query = meta.get("query")
        if query:
            meta["query"], names = redact(query)
            if names:
                meta["redacted_query"] = names
        return meta

    return step


def run_pipeline(steps: Iterable[Step], meta: Metadata) -> Metadata:
    """Apply every step in order."""
    for step in steps:
        meta = step(meta)
    return meta
