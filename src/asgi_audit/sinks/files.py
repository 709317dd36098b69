"""File sinks' URLs and directories (SQLite, JSON Lines).

File URLs are SQLAlchemy-style: three slashes then a relative path
(``sqlite:///asgi-audit.db``), four for an absolute one (``sqlite:////var/lib/audit.db``).

Modes. Audit records hold request and response bodies (personal data, tokens in
payloads), so what a file sink makes is its owner's alone: directories 0700, files 0600,
whatever the process umask. The modes are given when each file or directory is made
(``os.open``/``os.mkdir`` with the mode, then ``chmod`` to it exactly, since a umask can
only take bits away and the process may have an odd one), never by changing the umask,
which is process-wide while other threads create files. What exists already is left as
its owner set it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._urls import mask_url
from ..errors import ConfigError

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def file_path(url: str) -> Path:
    """The path a file sink's URL names; :class:`ConfigError` for any other form."""
    scheme, _, rest = url.partition("://")
    example = f"{scheme}:///relative/path or {scheme}:////absolute/path"
    shown = mask_url(url)
    if "?" in rest or "#" in rest:
        raise ConfigError("sink", f"URL options are not supported (got {shown!r}); use {example}")
    if rest in ("", "/"):
        raise ConfigError("sink", f"{shown!r} names no path; use {example}")
    if not rest.startswith("/"):
        raise ConfigError("sink", f"expected {example} (got {shown!r}: a host, not a path)")
    return Path(rest[1:])


def existing(url: str, path: Path) -> Path:
    """``path`` when it exists: a reader asked for a sink a writer has made."""
    if not path.exists():
        raise ConfigError("sink", f"no sink at {path} (from {mask_url(url)!r})")
    return path


def ensure_directory(directory: Path) -> None:
    """Create ``directory`` (and missing parents, each 0700) now, so a bad path fails at
    start-up, not at ship."""
    missing: list[Path] = []
    here = directory
    while not os.path.lexists(here) and here.parent != here:
        missing.append(here)
        here = here.parent
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path, DIRECTORY_MODE)
            except FileExistsError:
                if not path.is_dir():  # made meanwhile, by someone else, as a file
                    raise
                continue
            os.chmod(path, DIRECTORY_MODE)
        if not directory.is_dir():
            raise NotADirectoryError(20, "Not a directory", os.fspath(directory))
    except OSError as exc:
        raise ConfigError(
            "sink", f"cannot create directory {os.fspath(directory)!r}: {exc.strerror or exc}"
        ) from exc


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; whether it was created.
    OSError when it cannot be."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return True
