"""Redaction: secrets are replaced before anything is written to the spool.

Redaction is a pipeline of small steps, each ``(draft) -> draft`` over the record's
metadata dictionary, run by the recorder thread in order (structlog's processors are the
model). Header redaction is the first step; body redaction (JSON fields, patterns) will be
further steps in the same pipeline, so that the spool never holds a secret in clear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

MARKER = "[REDACTED]"

DEFAULT_SECRET_HEADERS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
)

Draft = dict[str, Any]
Step = Callable[[Draft], Draft]
"""One redaction step: takes the record's metadata and returns it with secrets replaced."""


def header_redactor(names: Iterable[str], marker: str = MARKER) -> Step:
    """A step that replaces the values of the named headers (any case) with ``marker``."""
    secret = frozenset(name.lower() for name in names)

    def redact(draft: Draft) -> Draft:
        if not secret:
            return draft
        found: set[str] = set()
        for field in ("request_headers", "response_headers", "response_trailers"):
            headers = draft.get(field)
            if not headers:
                continue
            replaced = []
            for name, value in headers:
                if name.lower() in secret:
                    found.add(name.lower())
                    value = marker
                replaced.append((name, value))
            draft[field] = replaced
        if found:
            draft["redacted_headers"] = sorted(found)
        return draft

    return redact


def run_pipeline(steps: Iterable[Step], draft: Draft) -> Draft:
    """Apply every step in order."""
    for step in steps:
        draft = step(draft)
    return draft
