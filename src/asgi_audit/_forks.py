"""One place that knows about ``fork``: objects owning threads or per-process state reset
themselves in the child.

gunicorn forks its workers from a parent that may have imported (and even used) the app.
A child inherits the parent's objects but none of its threads, so a writer whose thread
lives in the parent would queue records that nobody writes, and an identity computed in the
parent would name the parent's stream. Each such object registers a callback here; the
child runs them right after the fork, and the object starts afresh on its next use. The
callbacks are held weakly: registering never keeps an app alive (test suites build
thousands).
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections.abc import Callable

_lock = threading.Lock()
_callbacks: list[Callable[[], Callable[[], None] | None]] = []


def after_fork(callback: Callable[[], None]) -> None:
    """Run ``callback`` in every child process forked from now on (a bound method is held
    by a weak reference: it is forgotten with its object)."""
    reference: Callable[[], Callable[[], None] | None]
    if inspect.ismethod(callback):
        reference = weakref.WeakMethod(callback)
    else:

        def reference() -> Callable[[], None]:
            return callback

    with _lock:
        _callbacks[:] = [ref for ref in _callbacks if ref() is not None]
        _callbacks.append(reference)


def _in_child() -> None:
    global _lock
    _lock = threading.Lock()  # the parent may have held it while forking
    for reference in list(_callbacks):
        callback = reference()
        if callback is not None:
            callback()


os.register_at_fork(after_in_child=_in_child)
