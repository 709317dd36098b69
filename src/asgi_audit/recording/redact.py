"""Redaction: secrets are replaced before anything is written to the spool.

Redaction is a pipeline of small steps, each ``(meta) -> meta`` over the record's
metadata dictionary, run by the recorder thread in order (structlog's processors are the
model). Header redaction is the first step; body redaction (JSON fields, patterns) will be
further steps in the same pipeline, so that the spool never holds a secret in clear.
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
            replaced = []
            for name, value in headers:
                if name.lower() in secret:
                    found.add(name.lower())
                    value = marker
                replaced.append((name, value))
            meta[field] = replaced
        if found:
            meta["redacted_headers"] = sorted(found)
        return meta

    return redact


def run_pipeline(steps: Iterable[Step], meta: Metadata) -> Metadata:
    """Apply every step in order."""
    for step in steps:
        meta = step(meta)
    return meta
