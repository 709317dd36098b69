"""``postgresql://user@host:5432/db?table=audit_records`` (registry hooks).

The registry imports this package when the middleware is built, in the application's
process, to check the URL: that must not import psycopg or psycopg_pool, which only the
shipper and the CLI need. So :func:`check_url` is :mod:`.url`'s (pure Python; the driver is
found, not imported), and the sink (:mod:`.sink`, with the layout and the reasons for
it) is imported by :func:`open_url` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import ConfigError
from .url import MISSING_DRIVER, check_url

if TYPE_CHECKING:
    from .sink import PostgresSink

__all__ = ["check_url", "open_url"]


def open_url(url: str, *, create: bool = True) -> PostgresSink:
    """The sink; readers (``create=False``) connect now, so a missing table or an
    unreachable server is one clear error before any work starts."""
    try:
        from .sink import open_postgres
    except ImportError as exc:
        raise ConfigError("sink", f"{MISSING_DRIVER} ({exc})") from None
    return open_postgres(url, create=create)
