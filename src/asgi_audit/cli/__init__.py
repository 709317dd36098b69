"""The cli room: the ``asgi-audit`` command, its exports, replay, the viewer and the demo.

May import every other room; nothing imports it (the shipper child runs it as a command).
"""

# imported for the commands they register on ``main`` (the viewer's imports no Starlette)
from . import browse, config, operate, replay, run, verify
from .main import main
from .viewer import command as viewer_command

__all__ = ["main"]
del browse, config, operate, replay, run, verify, viewer_command
