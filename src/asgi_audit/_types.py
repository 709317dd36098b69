"""ASGI type aliases shared by the middleware and its helpers.

Kept loose (``MutableMapping[str, Any]``) on purpose: servers and frameworks pass plain
dicts and add their own keys, and a TypedDict per message would reject extensions that the
middleware must forward untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
