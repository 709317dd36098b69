"""Settings from keyword arguments, ``ASGI_AUDIT_*`` environment variables and a TOML file.

Arguments win over the environment, which wins over the file (:mod:`.config_file`).
Every value is validated here, once, at construction: a mistake fails with a
:class:`ConfigError` naming the parameter (or variable), what was expected and what
arrived. Unknown ``ASGI_AUDIT_*`` variables (and unknown keys in the file) are errors too,
since a typo in a deployment manifest would otherwise silently change what is audited.

The sink URL's form is checked by a hook the caller passes (the sinks' registry, reached
through the durable path), so that this room never imports a sink.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from ..errors import ConfigError
from .config_file import read_config_file
from .levels import Level
from .policy import Policy, Rule, make_rule
from .tap import OverLimit

Ship = Literal["process", "thread", "off"]
"""Where the shipper runs: a child process, a thread of the app, or elsewhere (a sidecar)."""
FsyncPolicy = Literal["always", "batch", "off"]
"""When the spool writer syncs: every record, every batch window, or never (the kernel)."""
Overflow = Literal["block", "drop"]
"""What a full recorder does to the next exchanges: hold their last message, or drop them."""
Mode = Literal["batch", "blocking", "blocking-strict"]
"""When a response may finish: at once, the record following in the next batch
(``batch``); once its record is in the spool (``blocking``); or, when the record cannot be
written, never: the connection is closed instead (``blocking-strict``)."""
MODES: tuple[Mode, ...] = ("batch", "blocking", "blocking-strict")
SPILL_FOLDER = "spill"
"""Spill files live in this folder of the spool unless ``spill_dir`` says otherwise."""
UNLIMITED = 1 << 62

DEFAULT_SINK_URL = "sqlite:///asgi-audit.db"
DEFAULT_SECRET_HEADERS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-amz-security-token",
    "private-token",
    "x-csrf-token",
)
"""Headers whose values are always redacted (``redact_headers`` adds to them, and
``redact_headers_default=False`` turns them off)."""
RedactUnparseable = Literal["redact", "keep"]
"""What happens to a body that has redaction rules (JSON, form) but does not parse."""

SinkCheck = Callable[[object, str], str]
"""``(url, parameter) -> url``: checks a sink URL's form, raising ConfigError."""

ENV_PREFIX = "ASGI_AUDIT_"

POLICY_KEYS = (
    "rules",
    "routes",
    "methods",
    "exclude",
    "level",
    "statuses",
    "otherwise",
    "sample",
)
"""The settings that make up the policy, replaced together by a higher source."""

DEFAULT_MEMORY_LIMIT = 4 << 20
DEFAULT_BODY_LIMIT = 64 << 20

_ENV_KEYS = {
    "routes": "ROUTES",
    "methods": "METHODS",
    "exclude": "EXCLUDE",
    "level": "LEVEL",
    "statuses": "STATUSES",
    "otherwise": "OTHERWISE",
    "sample": "SAMPLE",
    "memory_limit": "MEMORY_LIMIT",
    "body_limit": "BODY_LIMIT",
    "over_limit": "OVER_LIMIT",
    "overflow": "OVERFLOW",
    "spill_dir": "SPILL_DIR",
    "service": "SERVICE",
    "sink": "SINK",
    "spool": "SPOOL",
    "ship": "SHIP",
    "fsync": "FSYNC",
    "redact_headers": "REDACT_HEADERS",
    "shutdown_timeout": "SHUTDOWN_TIMEOUT",
    "spool_limit": "SPOOL_LIMIT",
    "mode": "MODE",
    "spill_limit": "SPILL_LIMIT",
    "redact_headers_default": "REDACT_HEADERS_DEFAULT",
    "redact_query": "REDACT_QUERY",
    "redact_fields": "REDACT_FIELDS",
    "redact_bodies": "REDACT_BODIES",
    "redact_unparseable": "REDACT_UNPARSEABLE",
    "signing_key": "SIGNING_KEY",
    "checkpoint_interval": "CHECKPOINT_INTERVAL",
    "config": "CONFIG",
    "metrics_port": "METRICS_PORT",
    "trace_events": "TRACE_EVENTS",
}
_LIST_KEYS = frozenset(
    {"routes", "methods", "exclude", "statuses", "redact_headers", "redact_query", "redact_fields"}
)
DEFAULT_SPOOL = "asgi-audit-spool"
_SIZE = re.compile(r"(\d+)\s*([kmg]i?b?|b)?", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
}


@dataclass(frozen=True)
class Settings:
    """Validated configuration of one middleware."""

    policy: Policy
    memory_limit: int
    body_limit: int | None
    over_limit: OverLimit
    overflow: Overflow
    spill_dir: str
    service: str
    sink: str
    spool: str
    ship: Ship
    fsync: FsyncPolicy
    redact_headers: tuple[str, ...]
    shutdown_timeout: float
    spool_limit: int | None
    mode: Mode = "batch"
    spill_limit: int | None = None
    """Bytes that spill files may hold at once; None: a quarter of the spill folder's
    free space, measured when the first body spills."""
    redact_query: tuple[str, ...] = ()
    """Query parameter names redacted besides the default ones (lower case)."""
    redact_fields: tuple[str, ...] = ()
    """JSON paths (``card.number``, ``**.ssn``) and form fields redacted in bodies,
    besides the default secret names, card numbers and JWTs."""
    redact_bodies: bool = True
    """Whether the default body rules (secret names, card numbers, JWTs) apply."""
    redact_unparseable: RedactUnparseable = "redact"
    signing_key: str | None = field(default=None, repr=False)
    """The Ed25519 private key that signs checkpoints: a PEM file's path, or PEM text
    (never shown)."""
    checkpoint_interval: float = 60.0
    metrics_address: tuple[str, int] | None = None
    """Where the shipper serves ``/metrics`` (``metrics_port``: ``PORT`` or ``HOST:PORT``);
    None: not served."""
    trace_events: bool = False
    """Add an event to the current OpenTelemetry span for each audited exchange."""


def load_settings(
    arguments: Mapping[str, Any],
    environ: Mapping[str, str],
    check_sink: SinkCheck,
) -> Settings:
    """Merge ``arguments`` (None means "not given") over the environment over the
    configuration file (``config``, or ``ASGI_AUDIT_CONFIG``) and validate; ``check_sink``
    checks the sink URL (the sinks' registry, passed in by the caller).

    The policy is one setting: a source that says anything of it (``rules``, ``routes``,
    ``methods``, ``exclude``, ``level``, ``statuses``, ``otherwise``, ``sample``) replaces
    what the sources below it said of it, rather than mixing with it."""
    environment = _from_environment(environ)
    given = {k: v for k, v in arguments.items() if v is not None}
    path = given.pop("config", None) or environment.pop("config", None)
    environment.pop("config", None)
    layers = [read_config_file(path, _ENV_KEYS) if path else {}, environment, given]
    merged: dict[str, Any] = {}
    for layer in layers:
        if any(key in layer for key in POLICY_KEYS):
            for key in POLICY_KEYS:
                merged.pop(key, None)
        merged.update(layer)
    rules = merged.pop("rules", None)
    spool = os.fspath(merged.get("spool", DEFAULT_SPOOL))
    return Settings(
        policy=_policy(merged, rules),
        memory_limit=_size(merged.get("memory_limit", DEFAULT_MEMORY_LIMIT), "memory_limit"),
        body_limit=_optional_size(merged.get("body_limit", DEFAULT_BODY_LIMIT), "body_limit"),
        over_limit=cast(
            OverLimit,
            _choice(merged.get("over_limit", "truncate"), "over_limit", ("truncate", "skip_body")),
        ),
        overflow=cast(
            Overflow, _choice(merged.get("overflow", "block"), "overflow", ("block", "drop"))
        ),
        spill_dir=_directory(merged.get("spill_dir")) or os.path.join(spool, SPILL_FOLDER),
        service=_service(merged.get("service", "asgi")),
        sink=check_sink(merged.get("sink", DEFAULT_SINK_URL), _name("sink", arguments)),
        spool=spool,
        ship=cast(
            Ship, _choice(merged.get("ship", "process"), "ship", ("process", "thread", "off"))
        ),
        fsync=cast(
            FsyncPolicy, _choice(merged.get("fsync", "batch"), "fsync", ("always", "batch", "off"))
        ),
        redact_headers=_redacted_headers(
            merged.get("redact_headers", ()), merged.get("redact_headers_default", True)
        ),
        shutdown_timeout=_seconds(merged.get("shutdown_timeout", 20.0), "shutdown_timeout"),
        spool_limit=_optional_size(merged.get("spool_limit", "unlimited"), "spool_limit"),
        mode=cast(Mode, _choice(merged.get("mode", "batch"), "mode", MODES)),
        spill_limit=_spill_limit(merged.get("spill_limit", "auto")),
        redact_query=_query_names(merged.get("redact_query", ())),
        redact_fields=_field_paths(merged.get("redact_fields", ())),
        redact_bodies=_flag(merged.get("redact_bodies", True), "redact_bodies"),
        redact_unparseable=cast(
            RedactUnparseable,
            _choice(
                merged.get("redact_unparseable", "redact"),
                "redact_unparseable",
                ("redact", "keep"),
            ),
        ),
        signing_key=_signing_key(merged.get("signing_key")),
        checkpoint_interval=_interval(merged.get("checkpoint_interval", 60.0)),
        metrics_address=(
            None if merged.get("metrics_port") is None else metrics_address(merged["metrics_port"])
        ),
        trace_events=_flag(merged.get("trace_events", False), "trace_events"),
    )


def metrics_address(value: object) -> tuple[str, int]:
    """``PORT`` (every address) or ``HOST:PORT``, as ``metrics_port`` /
    ``ASGI_AUDIT_METRICS_PORT`` give it."""
    text = str(value).strip()
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if isinstance(value, bool) or not 0 < number < 65536:
        raise ConfigError("metrics_port", f"expected a port or HOST:PORT (got {text!r:.60})")
    return (host.strip("[]") or "0.0.0.0"), number


def _redacted_headers(value: Any, defaults: Any) -> tuple[str, ...]:
    """The default secret headers (unless turned off) and the ones given, once each."""
    if value is False:  # the earlier way of turning redaction off
        value, defaults = (), False
    names = list(DEFAULT_SECRET_HEADERS) if _flag(defaults, "redact_headers_default") else []
    names.extend(_header_names(value))
    return tuple(dict.fromkeys(names))


def _flag(value: Any, parameter: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(parameter, f"expected true or false (got {value!r})")


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _query_names(value: Any) -> tuple[str, ...]:
    names = _list(value, "redact_query")
    for name in names:
        if not isinstance(name, str) or not name or "&" in name or "=" in name:
            raise ConfigError("redact_query", f"not a query parameter name: {name!r}")
    return tuple(name.lower() for name in names)


_FIELD_SEGMENT = re.compile(r"\*\*|\*|[^.*]+")


def _field_paths(value: Any) -> tuple[str, ...]:
    """Dotted JSON paths: key segments, ``*`` (one key) and ``**`` (any depth)."""
    paths = _list(value, "redact_fields")
    for path in paths:
        if (
            not isinstance(path, str)
            or not path
            or not all(_FIELD_SEGMENT.fullmatch(segment) for segment in path.split("."))
        ):
            raise ConfigError(
                "redact_fields",
                f"expected a dotted path such as 'card.number' or '**.ssn' (got {path!r})",
            )
    return tuple(paths)


def _signing_key(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | os.PathLike):
        raise ConfigError("signing_key", "expected the path of a PEM file, or PEM text")
    return os.fspath(value)


def _interval(value: Any) -> float:
    seconds = _seconds(value, "checkpoint_interval")
    if seconds <= 0:
        raise ConfigError("checkpoint_interval", f"must be more than 0 seconds (got {value!r})")
    return seconds


def _spill_limit(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    limit = _optional_size(value, "spill_limit")
    return UNLIMITED if limit is None else limit


def _name(key: str, arguments: Mapping[str, Any]) -> str:
    return key if arguments.get(key) is not None else ENV_PREFIX + _ENV_KEYS[key]


def _header_names(value: Any) -> tuple[str, ...]:
    if value is False:
        return ()
    names = _list(value, "redact_headers")
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ConfigError("redact_headers", f"not a header name: {name!r}")
    return tuple(name.lower() for name in names)


def _seconds(value: Any, parameter: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(parameter, f"expected seconds (got {value!r})") from None
    if seconds < 0 or isinstance(value, bool):
        raise ConfigError(parameter, f"expected a non-negative number of seconds (got {value!r})")
    return seconds


_SERVICE_LINKS = re.compile(r"ASGI_AUDIT_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\w+)?)")
"""What Kubernetes injects into every container of a namespace with a Service named
``asgi-audit`` (``ASGI_AUDIT_SERVICE_HOST``, ``ASGI_AUDIT_PORT_8000_TCP_ADDR``...): not
settings, and no reason for a pod to fail at start."""


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    by_variable = {ENV_PREFIX + suffix: key for key, suffix in _ENV_KEYS.items()}
    found: dict[str, Any] = {}
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX) or _SERVICE_LINKS.fullmatch(variable):
            continue
        key = by_variable.get(variable)
        if key is None:
            close = difflib.get_close_matches(variable, by_variable, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(variable, f"unknown asgi-audit setting{hint}")
        found[key] = _split(value) if key in _LIST_KEYS else value
    return found


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _policy(merged: dict[str, Any], rules: Sequence[Rule] | None) -> Policy:
    if rules is not None:
        clash = sorted(
            k for k in ("routes", "methods", "exclude", "statuses", "sample") if k in merged
        )
        if clash:
            raise ConfigError("rules", f"replaces {', '.join(clash)}; give one or the other")
        for rule in rules:
            if not isinstance(rule, Rule):
                raise ConfigError("rules", f"expected Rule objects (got {rule!r})")
        return Policy(rules, Level.parse(merged.get("level", "None"), "level"))
    level = Level.parse(merged.get("level", Level.REQUEST_RESPONSE), "level")
    built: list[Rule] = []
    exclude = merged.get("exclude")
    if exclude:
        built.append(make_rule(Level.NONE, routes=_list(exclude, "exclude")))
    routes = merged.get("routes")
    methods = merged.get("methods")
    narrowed = routes is not None or methods is not None
    if narrowed:  # with everything audited already, markers would only defer decisions
        built.append(Rule(level=Level.REQUEST_RESPONSE, marked=True))
    if not narrowed or routes or methods:
        built.append(
            make_rule(
                level,
                routes=_list(routes, "routes") or None,
                methods=_list(methods, "methods") or None,
                statuses=merged.get("statuses"),
                otherwise=merged.get("otherwise", Level.NONE),
                sample=_fraction(merged.get("sample", 1.0)),
            )
        )
    return Policy(built, Level.NONE)


def _list(value: Any, parameter: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(parameter, f"expected a list of strings (got {value!r})")
    return list(value)


def _fraction(value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(
                "sample", f"must be a number between 0 and 1 (got {value!r})"
            ) from None
    return cast(float, value)


def _size(value: Any, parameter: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(parameter, f"expected a byte count (got {value!r})")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(parameter, f"must not be negative (got {value})")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    raise ConfigError(parameter, f"expected a byte count such as 1048576 or '4MiB' (got {value!r})")


def _optional_size(value: Any, parameter: str) -> int | None:
    if isinstance(value, str) and value.strip().lower() in {"none", "unlimited"}:
        return None
    return _size(value, parameter)


def _choice(value: Any, parameter: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(parameter, f"must be one of {options} (got {value!r})")
    return str(value)


def _directory(value: Any) -> str | None:
    if value is None:
        return None
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise ConfigError("spill_dir", f"is not an existing directory (got {path!r})")
    return str(path)


def _service(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise ConfigError(
            "service", f"expected a name of letters, digits, '.', '_', '-' (got {value!r})"
        )
    return value


def check_routes(policy: Policy, declared: set[str] | None) -> None:
    """Fail when a rule names a template the app does not declare (when that is known)."""
    if not declared:
        return
    for rule in policy.rules:
        parameter = "exclude" if rule.level is Level.NONE and not rule.statuses else "routes"
        for template in sorted(rule.templates):
            if template not in declared:
                close = difflib.get_close_matches(template, declared, n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ConfigError(parameter, f"{template!r} is not a route of this app{hint}")
