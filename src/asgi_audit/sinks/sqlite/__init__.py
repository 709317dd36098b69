"""``sqlite:///path.db``: the embedded default sink (registry hooks).

The registry imports this package when the middleware is built, to check the URL
(:func:`check_url`); that must not load :mod:`sqlite3`, which only the shipper and the
CLI need, so the sink itself (:mod:`.sink`) is imported by :func:`open_url` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._urls import mask_url
from ...errors import ConfigError
from ..files import existing, file_path

if TYPE_CHECKING:
    from .sink import SqliteSink


def check_url(url: str) -> None:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
    file_path(url)


def open_url(url: str, *, create: bool = True) -> SqliteSink:
    """The sink at the URL's path; readers (``create=False``) need the file to exist."""
    path = file_path(url)
    if not create:
        existing(url, path)
    if path.is_dir():
        raise ConfigError("sink", f"{mask_url(url)!r} names a directory; expected a database file")
    from .sink import SqliteSink

    return SqliteSink(path)
