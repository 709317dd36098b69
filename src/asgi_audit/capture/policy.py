"""Which exchanges are audited, and at which level.

A policy is an ordered list of rules; the first rule that matches an exchange decides its
level, as in Kubernetes audit policies. Most exchanges are decided when they arrive, from
the method and path alone. Rules that name route templates (or read ``@audited`` markers)
need the router's verdict, so such exchanges are decided later, at the app's first
``receive()`` or at the response start, once ``scope["route"]`` is filled in. A cheap
prefilter (the literal part of each template) keeps requests that cannot match any of those
rules from being deferred at all.
"""

from __future__ import annotations

import fnmatch
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import ConfigError
from .levels import Level
from .markers import MARKER_ATTRIBUTE, marker_level, markers_in_use
from .routes import literal_prefix

_GLOB_CHARS = frozenset("*?[")
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "QUERY"}
)


class _Pending:
    """Sentinel: the decision needs the route, which is known only after routing."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PENDING"


PENDING: Final = _Pending()


@dataclass(frozen=True, slots=True)
class StatusRange:
    """An inclusive range of status codes, written ``4xx``, ``404`` or ``200-299``."""

    low: int
    high: int
    text: str

    @classmethod
    def parse(cls, value: object, parameter: str) -> StatusRange:
        text = str(value).strip().lower()
        match = re.fullmatch(r"([1-5])xx|([1-5]\d\d)(?:-([1-5]\d\d))?", text)
        if match is None or isinstance(value, bool):
            raise ConfigError(
                parameter, f"expected a status like '4xx', '404' or '200-299' (got {value!r})"
            )
        if match.group(1):
            base = int(match.group(1)) * 100
            return cls(base, base + 99, text)
        low = int(match.group(2))
        high = int(match.group(3) or low)
        if high < low:
            raise ConfigError(parameter, f"range {text!r} ends before it starts")
        return cls(low, high, text)

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and self.low <= status <= self.high


@dataclass(frozen=True)
class Rule:
    """One line of a policy: what it matches and the level it gives.

    ``routes`` holds route templates (``/orders/{order_id}``; one without parameters, such
    as ``/health``, is compared with the path exactly) or path globs (``/admin/*``); empty
    means every route. ``methods`` empty means every method. ``statuses`` narrows the level
    after the response starts: when the status is not listed the exchange gets
    ``otherwise``. ``sample`` keeps that fraction of matching exchanges. ``marked`` makes
    the rule match endpoints carrying an ``@audited`` marker, at the marker's level.
    """

    level: Level = Level.REQUEST_RESPONSE
    routes: tuple[str, ...] = ()
    methods: frozenset[str] = frozenset()
    statuses: tuple[StatusRange, ...] = ()
    otherwise: Level = Level.NONE
    sample: float = 1.0
    marked: bool = False
    _templates: frozenset[str] = field(init=False, repr=False, compare=False)
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _globs: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    ceiling: Level = field(init=False, repr=False, compare=False)
    """The most this rule can keep of an exchange (its status filter may lower it later)."""
    _everything: bool = field(init=False, repr=False, compare=False)
    """Matches every exchange from method and path alone (no methods, routes, markers)."""
    _unsampled: bool = field(init=False, repr=False, compare=False)
    """A match is final without drawing a sample (see :meth:`Policy._final`)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample <= 1.0:
            raise ConfigError("sample", f"must be between 0 and 1 (got {self.sample!r})")
        for method in self.methods:
            if method not in _METHODS:
                raise ConfigError("methods", f"unknown HTTP method {method!r}")
        templates, exact, globs = set(), set(), []
        for route in self.routes:
            if not isinstance(route, str) or not route.startswith("/"):
                raise ConfigError("routes", f"expected a path starting with '/' (got {route!r})")
            if _GLOB_CHARS.intersection(route):
                globs.append(re.compile(fnmatch.translate(route)))
            elif "{" in route:
                templates.add(route)
            else:
                exact.add(route)
        object.__setattr__(self, "_templates", frozenset(templates))
        object.__setattr__(self, "_exact", frozenset(exact))
        object.__setattr__(self, "_prefixes", tuple(sorted({literal_prefix(t) for t in templates})))
        object.__setattr__(self, "_globs", tuple(globs))
        # Worked out once: the middleware asks for these on every request.
        ceiling = max(self.level, self.otherwise) if self.statuses else self.level
        object.__setattr__(self, "ceiling", ceiling)
        object.__setattr__(
            self, "_everything", not self.methods and not self.marked and not self.routes
        )
        object.__setattr__(
            self,
            "_unsampled",
            (self.level is Level.NONE and not self.statuses) or self.sample >= 1.0,
        )

    @property
    def templates(self) -> frozenset[str]:
        """The route templates (with parameters) this rule names."""
        return self._templates | self._exact

    def early(self, method: str, path: str) -> bool | None:
        """Match on method and path alone: True, False, or None when routing must tell."""
        if self.methods and method not in self.methods:
            return False
        if self.marked:
            return None if markers_in_use() else False
        if not self.routes:
            return True
        if path in self._exact:
            return True
        for glob in self._globs:
            if glob.match(path):
                return True
        if self._templates:
            for prefix in self._prefixes:
                if path.startswith(prefix):
                    return None
        return False

    def late(self, method: str, path: str, template: str | None) -> bool:
        """Match once routing has run and ``template`` (or None) is known."""
        verdict = self.early(method, path)
        if verdict is not None:
            return verdict
        return template is not None and template in self._templates

    def level_for_status(self, status: int) -> Level:
        """The level once the response status is known."""
        if not self.statuses:
            return self.level
        for accepted in self.statuses:
            if status in accepted:
                return self.level
        return self.otherwise

    def sampled(self) -> bool:
        return self.sample >= 1.0 or random.random() < self.sample

    def __repr__(self) -> str:
        if self.marked:
            return "marked()" if not self.methods else f"marked(methods={sorted(self.methods)})"
        parts = [repr(self.level)]
        if self.routes:
            parts.append(f"routes={list(self.routes)}")
        if self.methods:
            parts.append(f"methods={sorted(self.methods)}")
        if self.statuses:
            parts.append(f"statuses={[s.text for s in self.statuses]}")
            parts.append(f"otherwise={self.otherwise!r}")
        if self.sample < 1.0:
            parts.append(f"sample={self.sample}")
        name = "exclude" if self.level is Level.NONE and not self.statuses else "audit"
        if name == "exclude":
            parts = parts[1:]
        return f"{name}({', '.join(parts)})"


def make_rule(
    level: object = Level.REQUEST_RESPONSE,
    *,
    routes: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
    statuses: Iterable[object] | None = None,
    otherwise: object = Level.NONE,
    sample: float = 1.0,
) -> Rule:
    """Build a :class:`Rule` from configuration words, validating each parameter."""
    return Rule(
        level=Level.parse(level, "level"),
        routes=tuple(_strings(routes, "routes")),
        methods=frozenset(m.upper() for m in _strings(methods, "methods")),
        statuses=tuple(StatusRange.parse(s, "statuses") for s in (statuses or ())),
        otherwise=Level.parse(otherwise, "otherwise"),
        sample=_fraction(sample),
    )


def _strings(values: Iterable[str] | None, parameter: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        raise ConfigError(parameter, f"expected a list of strings (got the string {values!r})")
    result = list(values)
    for value in result:
        if not isinstance(value, str) or not value:
            raise ConfigError(parameter, f"expected non-empty strings (got {value!r})")
    return result


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError("sample", f"must be a number between 0 and 1 (got {value!r})")
    return float(value)


_MARKED_RULES = {level: Rule(level=level, marked=True) for level in Level}


class Policy:
    """An ordered list of rules and the level for exchanges no rule matches."""

    __slots__ = ("_default_rule", "default", "rules")

    def __init__(self, rules: Sequence[Rule], default: Level = Level.NONE) -> None:
        self.rules = tuple(rules)
        self.default = default
        self._default_rule = Rule(level=default)

    def decide_early(self, method: str, path: str) -> Rule | _Pending:
        """Decide from method and path, or return ``PENDING`` when routing must tell."""
        for rule in self.rules:
            if not rule._everything:
                verdict = rule.early(method, path)
                if verdict is None:
                    return PENDING
                if not verdict:
                    continue
            return rule if rule._unsampled else self._final(rule)
        return self._default_rule

    def decide_late(self, scope: Any, method: str, path: str, template: str | None) -> Rule:
        """Decide once routing has filled in ``scope["route"]``/``scope["endpoint"]``."""
        for rule in self.rules:
            if rule.marked:
                if rule.methods and method not in rule.methods:
                    continue
                level = _marker_of(scope)
                if level is not None:
                    return self._final(_MARKED_RULES[level])
                continue
            if rule.late(method, path, template):
                return self._final(rule)
        return self._default_rule

    def templates(self) -> set[str]:
        """Every template (with or without parameters) the rules name."""
        found: set[str] = set()
        for rule in self.rules:
            found |= rule.templates
        return found

    def _final(self, rule: Rule) -> Rule:
        if rule.level is Level.NONE and not rule.statuses:
            return rule
        return rule if rule.sampled() else self._default_none

    _default_none = Rule(level=Level.NONE)

    def __repr__(self) -> str:
        rules = ", ".join(repr(r) for r in self.rules)
        sep = ", " if rules else ""
        return f"Policy({rules}{sep}default={self.default!r})"


def _marker_of(scope: Any) -> Level | None:
    level = marker_level(scope.get("endpoint"))
    if level is None:
        route = scope.get("route")
        level = marker_level(route)
        if level is None and route is not None:
            level = marker_level(getattr(route, "endpoint", None))
    return level


__all__ = ["PENDING", "MARKER_ATTRIBUTE", "Policy", "Rule", "StatusRange", "make_rule"]
