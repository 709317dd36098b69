"""Settings from a TOML file: ``config=`` or ``ASGI_AUDIT_CONFIG``.

A deployment keeps its audit policy beside its manifests rather than in code. The file
holds every keyword setting of the middleware under its own name, and the policy as
ordered ``[[rule]]`` tables (the first that matches an exchange decides):

.. code-block:: toml

    sink = "postgresql://audit@db/audit"
    body_limit = "8MiB"
    level = "None"                       # what no rule matches gets

    [[rule]]
    routes = ["/health", "/metrics"]
    level = "None"

    [[rule]]
    routes = ["/orders/{order_id}", "/payments/*"]
    methods = ["POST", "PUT"]
    statuses = ["2xx", "4xx"]
    otherwise = "Metadata"
    sample = 1.0

Values are checked by the same code as keyword arguments and environment variables, and
fail the same way; an unknown key is an error naming the closest known one, since a typo
would otherwise change what is audited without a word. The file is read once, when the
middleware is built (before the app serves; never on the event loop).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from .policy import Rule, make_rule

RULE_TABLE = "rule"
RULE_KEYS = ("routes", "methods", "level", "statuses", "otherwise", "sample")
MAX_FILE_BYTES = 1 << 20
"""A configuration file larger than this is refused unread: it is not one."""


def read_config_file(path: str | os.PathLike[str], names: Iterable[str]) -> dict[str, Any]:
    """The settings in the TOML file at ``path`` (``names`` are the known settings), with
    its ``[[rule]]`` tables turned into ``rules``."""
    shown = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {shown!r}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError("config", f"{shown!r} is larger than {MAX_FILE_BYTES} bytes")
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("config", f"{shown!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{shown!r} is not valid TOML: {exc}") from None
    return settings_of(document, frozenset(names), shown)


def settings_of(document: Mapping[str, Any], names: frozenset[str], shown: str) -> dict[str, Any]:
    """The settings of a parsed file: top-level keys, and ``rules`` from ``[[rule]]``."""
    settings: dict[str, Any] = {}
    for key, value in document.items():
        if key == RULE_TABLE:
            settings["rules"] = _rules(value, shown)
        elif key in names and key != "config":
            settings[key] = value
        else:
            raise ConfigError(f"{shown}: {key}", _unknown(key, [*names, RULE_TABLE]))
    return settings


def _rules(tables: Any, shown: str) -> list[Rule]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{shown}: rule", "expected [[rule]] tables")
    rules = []
    for number, table in enumerate(tables, 1):
        where = f"{shown}: rule {number}"
        for key in table:
            if key not in RULE_KEYS:
                raise ConfigError(f"{where}: {key}", _unknown(key, RULE_KEYS))
        try:
            rules.append(
                make_rule(
                    table.get("level", "RequestResponse"),
                    routes=table.get("routes"),
                    methods=table.get("methods"),
                    statuses=table.get("statuses"),
                    otherwise=table.get("otherwise", "None"),
                    sample=table.get("sample", 1.0),
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.parameter}", exc.problem) from None
    return rules


def _unknown(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return "unknown setting" + (f"; did you mean {close[0]!r}?" if close else "")
