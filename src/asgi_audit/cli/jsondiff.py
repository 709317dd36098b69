"""Structural comparison of two JSON documents, with ignore rules for volatile fields.

Replay compares what a release answers with what was recorded; timestamps, generated ids
and the like differ on every call and must not count. An ignore rule is a small JSONPath:

* ``$.created_at``: one member of the top object (``$`` may be left out);
* ``$.items[0].id``, ``$.items[*].id``: an element, or every element, of an array;
* ``$..updated_at``: that member at any depth; ``$.meta.*``: every member of ``meta``;
* ``$['odd.name']``: a member whose name has dots or brackets.

A rule that matches a node ignores everything under it. Differences are reported with the
same notation (``$.items[3].price``), one per node that differs: changed, missing in the
new document, or added by it. Objects compare by member (order ignored), arrays by
position, numbers by value (``1`` equals ``1.0``, as JSON does not tell them apart).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

Segment = str | int
"""One step of a concrete path: an object member's name or an array index."""

_ANY = "*"
_DEEP = ".."
_TOKEN = re.compile(
    r"""
    \.\.(?=\[) (?P<deep>)                  # .. before [
    | \.(?=\.[A-Za-z_*]) (?P<deep_name>)    # the first dot of ..name or ..*
    | \.(?P<name>[A-Za-z_][\w-]*|\*)       # .name or .*
    | \[(?P<index>\d+|\*)\]                # [3] or [*]
    | \[(?P<quote>['"])(?P<quoted>(?:\\.|(?!(?P=quote)).)*)(?P=quote)\]   # ['name']
    """,
    re.VERBOSE,
)
MAX_RULE = 1000
"""Characters in one rule: they come from the command line, and are parsed once each."""


@dataclass(frozen=True)
class Difference:
    """One node that differs: ``kind`` is ``changed``, ``missing`` or ``added``."""

    path: str
    kind: str
    expected: Any = None
    actual: Any = None


class IgnoreRule:
    """One parsed ignore rule (see the module docstring)."""

    __slots__ = ("_steps", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_RULE:
            raise ConfigError(
                "--ignore", f"expected a JSONPath such as $.created_at or $..id (got {text!r:.80})"
            )
        self.text = text
        source = text.strip()
        if source.startswith("$"):
            source = source[1:]
        elif not source.startswith((".", "[")):
            source = "." + source  # "created_at" and "items[0]" mean "$.created_at"...
        steps: list[Segment | tuple[str]] = []
        at = 0
        while at < len(source):
            match = _TOKEN.match(source, at)
            if match is None:
                raise ConfigError(
                    "--ignore",
                    f"cannot read {text!r:.80} from {source[at:]!r:.40} on; "
                    "use $.name, $.list[0], $.list[*], $..name or $['odd name']",
                )
            at = match.end()
            if match["deep"] is not None or match["deep_name"] is not None:
                steps.append((_DEEP,))
            elif match["name"] is not None:
                steps.append(match["name"])
            elif match["index"] is not None:
                steps.append(_ANY if match["index"] == "*" else int(match["index"]))
            else:
                steps.append(re.sub(r"\\(.)", r"\1", match["quoted"]))
        if not steps:
            raise ConfigError("--ignore", f"{text!r:.80} would ignore the whole document")
        self._steps = tuple(steps)

    def matches(self, path: Sequence[Segment]) -> bool:
        """Whether the node at ``path`` is one this rule names."""
        return _match(self._steps, 0, path, 0)

    def __repr__(self) -> str:
        return f"IgnoreRule({self.text!r})"


def _match(steps: Sequence[Segment | tuple[str]], s: int, path: Sequence[Segment], p: int) -> bool:
    while s < len(steps):
        step = steps[s]
        if isinstance(step, tuple):  # ".." : the next step may match at any depth below
            return any(_match(steps, s + 1, path, q) for q in range(p, len(path)))
        if p >= len(path):
            return False
        segment = path[p]
        if step == _ANY:
            pass
        elif isinstance(step, int):
            if not isinstance(segment, int) or segment != step:
                return False
        elif step != segment:
            return False
        s += 1
        p += 1
    return p == len(path)


def format_path(path: Sequence[Segment]) -> str:
    """``$.items[3]['odd.name']``: the notation of the rules."""
    out = ["$"]
    for segment in path:
        if isinstance(segment, int):
            out.append(f"[{segment}]")
        elif re.fullmatch(r"[A-Za-z_][\w-]*", segment):
            out.append(f".{segment}")
        else:
            escaped = segment.replace("\\", "\\\\").replace("'", "\\'")
            out.append(f"['{escaped}']")
    return "".join(out)


def compare(expected: Any, actual: Any, ignore: Sequence[IgnoreRule] = ()) -> list[Difference]:
    """The differences between two parsed JSON documents, outside the ignored nodes."""
    return list(_walk(expected, actual, [], ignore))


def _ignored(path: list[Segment], ignore: Sequence[IgnoreRule]) -> bool:
    return any(rule.matches(path) for rule in ignore)


def _walk(
    expected: Any, actual: Any, path: list[Segment], ignore: Sequence[IgnoreRule]
) -> Iterator[Difference]:
    if path and _ignored(path, ignore):
        return
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key, value in expected.items():
            path.append(key)
            if key in actual:
                yield from _walk(value, actual[key], path, ignore)
            elif not _ignored(path, ignore):
                yield Difference(format_path(path), "missing", expected=value)
            path.pop()
        for key, value in actual.items():
            if key not in expected:
                path.append(key)
                if not _ignored(path, ignore):
                    yield Difference(format_path(path), "added", actual=value)
                path.pop()
        return
    if isinstance(expected, list) and isinstance(actual, list):
        for index in range(max(len(expected), len(actual))):
            path.append(index)
            if index >= len(actual):
                if not _ignored(path, ignore):
                    yield Difference(format_path(path), "missing", expected=expected[index])
            elif index >= len(expected):
                if not _ignored(path, ignore):
                    yield Difference(format_path(path), "added", actual=actual[index])
            else:
                yield from _walk(expected[index], actual[index], path, ignore)
            path.pop()
        return
    if not _same_scalar(expected, actual):
        yield Difference(format_path(path), "changed", expected=expected, actual=actual)


def _same_scalar(expected: Any, actual: Any) -> bool:
    numbers = (int, float)
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, numbers) and isinstance(actual, numbers):
        return expected == actual
    return type(expected) is type(actual) and bool(expected == actual)
