"""A fresh uvicorn worker that records what its event loop does while it serves its first
audited requests: process starts, directories, locks, syncs, files opened, directories
listed. Prints one JSON object (the watched calls of each request) and exits.

    python tests/apps/loop_probe.py SPOOL SINK_URL --lifespan on|off --requests N

Run as its own process: an audit hook cannot be removed once added.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from asgi_audit import AuditMiddleware
from asgi_audit._types import Receive, Scope, Send

WATCHED = {
    "subprocess.Popen",
    "os.posix_spawn",
    "os.fork",
    "os.exec",
    "os.mkdir",
    "fcntl.flock",
    "fcntl.lockf",
    "open",
    "os.listdir",
    "os.scandir",
    "os.rename",
    "os.remove",
    "os.truncate",
}


class Probe:
    """Collects the watched calls made on the loop's thread while a request is served."""

    def __init__(self) -> None:
        self.loop_thread: int | None = None
        self.current: list[str] | None = None
        self.requests: list[list[str]] = []

    def note(self, event: str, detail: str) -> None:
        if self.current is not None and threading.get_ident() == self.loop_thread:
            self.current.append(f"{event} {detail}"[:300])

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event in WATCHED:
            self.note(event, repr(args))

    def wrap_sync(self, name: str) -> None:
        original: Callable[[int], None] = getattr(os, name)

        def synced(fd: int) -> None:
            self.note(f"os.{name}", str(fd))
            original(fd)

        setattr(os, name, synced)


probe = Probe()
sys.addaudithook(probe.audit)
probe.wrap_sync("fsync")
probe.wrap_sync("fdatasync")


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def watched(app: AuditMiddleware) -> Callable[[Scope, Receive, Send], Any]:
    """Watch the loop from the moment a request arrives until its response is sent and
    its exchange handed off (the middleware returns)."""

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        probe.loop_thread = threading.get_ident()
        probe.current = []
        try:
            await app(scope, receive, send)
        finally:
            probe.requests.append(probe.current)
            probe.current = None

    return outer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spool")
    parser.add_argument("sink")
    parser.add_argument("--lifespan", choices=["on", "off"], default="on")
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args()
    audited = AuditMiddleware(echo, spool=args.spool, sink=args.sink, environ={})
    config = uvicorn.Config(
        watched(audited), host="127.0.0.1", port=0, lifespan=args.lifespan, log_level="error"
    )
    server = uvicorn.Server(config)
    done = threading.Event()

    def client() -> None:
        try:
            while not server.started:
                threading.Event().wait(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for number in range(args.requests):
                connection.request("POST", "/orders", body=b"x" * (1000 * (number + 1)))
                response = connection.getresponse()
                assert response.read() == b"x" * (1000 * (number + 1))
            connection.close()
        finally:
            done.set()
            server.should_exit = True

    threading.Thread(target=client, daemon=True).start()
    server.run()
    done.wait(30)
    print(json.dumps({"requests": probe.requests}))


if __name__ == "__main__":
    main()
