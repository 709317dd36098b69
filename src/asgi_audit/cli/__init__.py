"""The cli room: the ``asgi-audit`` command, its exports and the demo.

May import every other room; nothing imports it (the shipper child runs it as a command).
"""

from . import browse, operate, replay, verify
from .main import main

__all__ = ["main"]
del browse, operate, replay, verify  # imported for the commands they register on ``main``
