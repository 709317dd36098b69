"""File sinks' URLs and directories (SQLite, JSON Lines).

File URLs are SQLAlchemy-style: three slashes then a relative path
(``sqlite:///asgi-audit.db``), four for an absolute one (``sqlite:////var/lib/audit.db``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError


def file_path(url: str) -> Path:
    """The path a file sink's URL names; :class:`ConfigError` for any other form."""
    scheme, _, rest = url.partition("://")
    example = f"{scheme}:///relative/path or {scheme}:////absolute/path"
    if "?" in rest or "#" in rest:
        raise ConfigError("sink", f"URL options are not supported (got {url!r}); use {example}")
    if rest in ("", "/"):
        raise ConfigError("sink", f"{url!r} names no path; use {example}")
    if not rest.startswith("/"):
        raise ConfigError("sink", f"expected {example} (got {url!r}: a host, not a path)")
    return Path(rest[1:])


def existing(url: str, path: Path) -> Path:
    """``path`` when it exists: a reader asked for a sink a writer has made."""
    if not path.exists():
        raise ConfigError("sink", f"no sink at {path} (from {url!r})")
    return path


def ensure_directory(directory: Path) -> None:
    """Create ``directory`` (and parents) now, so a bad path fails at start-up, not at ship."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "sink", f"cannot create directory {os.fspath(directory)!r}: {exc.strerror or exc}"
        ) from exc
