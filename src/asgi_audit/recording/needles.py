"""Whether a body could hold a secret, from its bytes alone: the redaction prefilter.

Every JSON body with rules is asked before it may be parsed, so this is paid on every
audited exchange. Asked one ``needle in folded`` at a time, eight secret names, a JWT's
start, an escape and a card-number shape cost a case fold and eleven passes over the
bytes (~11 ms per MB, ~15 µs per kB, with the GIL held). Hyperscan (Intel's multi-pattern
matcher, the ``hyperscan`` wheel) answers all of them in one vectorised pass over the
bytes as they are (~0.6 ms per MB, ~2 µs per kB). Where its wheel does not install, the
passes remain: the same answers, slower.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["FOLD", "Prefilter", "accelerated"]

FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
FOLD_DELETED = b"_-."
"""How names are compared: ASCII lower case, and without these (``api_key`` = ``apikey``)."""

_SKIPPED = rb"[_.\-]*"

Shape = tuple[bytes, Callable[[bytes], bool]]
"""A shape to look for in the body as it is: a Hyperscan (PCRE-style) expression, and the
same test in Python for where Hyperscan is not installed."""


def _hyperscan() -> Any | None:
    try:
        import hyperscan
    except ImportError:  # no wheel for this platform: the plain passes answer
        return None
    return hyperscan


def accelerated() -> bool:
    """Whether the one-pass matcher is available here."""
    return _hyperscan() is not None


def _folded_pattern(needle: bytes) -> bytes:
    """An expression matching wherever ``needle`` occurs in the body once folded: each
    of its bytes, with any of :data:`FOLD_DELETED` between them (the match is caseless)."""
    return _SKIPPED.join(re.escape(bytes([byte])) for byte in needle)


class _NeverRaised(Exception):
    """Stands for Hyperscan's ScanTerminated when Hyperscan is not used."""


class Prefilter:
    """Answers "does any needle occur in the body once folded, or any shape in it as it
    is?" (a yes only means the body must be looked at closely).

    ``needles`` are folded already (lower case, none of :data:`FOLD_DELETED`). Thread-safe:
    each thread scans with a scratch space of its own (the writer scans a record's two
    large bodies on two threads at once)."""

    __slots__ = ("_database", "_hyperscan", "_local", "_terminated", "needles", "shapes")

    def __init__(
        self, needles: Iterable[bytes], shapes: Sequence[Shape] = (), *, accelerate: bool = True
    ) -> None:
        self.needles = tuple(sorted(set(needles)))
        self.shapes = tuple(shapes)
        for needle in self.needles:
            if not needle or needle != needle.translate(FOLD, FOLD_DELETED):
                raise ValueError(f"needle {needle!r} is empty or not folded")
        self._local = threading.local()
        self._database: Any | None = None
        self._terminated: type[BaseException] = _NeverRaised
        hyperscan = self._hyperscan = _hyperscan() if accelerate else None
        expressions = [_folded_pattern(needle) for needle in self.needles]
        flags = [hyperscan.HS_FLAG_CASELESS] * len(expressions) if hyperscan else []
        expressions += [expression for expression, _ in self.shapes]
        if hyperscan is not None and expressions:
            flags += [0] * len(self.shapes)
            single = hyperscan.HS_FLAG_SINGLEMATCH
            database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            database.compile(
                expressions=expressions,
                ids=list(range(len(expressions))),
                elements=len(expressions),
                flags=[flag | single for flag in flags],
            )
            self._database = database
            self._terminated = hyperscan.ScanTerminated

    def __repr__(self) -> str:
        shapes = [expression for expression, _ in self.shapes]
        return f"Prefilter(needles={list(self.needles)!r}, shapes={shapes!r})"

    def found_in(self, body: bytes) -> bool:
        database = self._database
        if database is None:
            folded = body.translate(FOLD, FOLD_DELETED)
            return any(needle in folded for needle in self.needles) or any(
                test(body) for _, test in self.shapes
            )
        if not body:
            return False
        found: list[int] = []

        def matched(ident: int, start: int, end: int, flags: int, context: object) -> bool:
            found.append(ident)
            return True  # one is enough: stop the scan

        # The handler stops the scan at the first match, which Hyperscan reports by
        # raising ScanTerminated.
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            hyperscan = self._hyperscan
            assert hyperscan is not None  # it compiled the database
            scratch = self._local.scratch = hyperscan.Scratch(database)
        with contextlib.suppress(self._terminated):
            database.scan(body, match_event_handler=matched, scratch=scratch)
        return bool(found)
