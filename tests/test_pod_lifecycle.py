"""A pod's life as the kubelet runs it, with real processes and the timings of the
manifests in ``deploy/kubernetes``: the preStop sleep while traffic still arrives,
SIGTERM, and SIGKILL of the whole container when the grace period runs out.

- a stop within the grace period drains: every answered audited exchange is in the store;
- a grace period too short for the sink: what the spool took is shipped by the next
  process on the same spool (a pod restarted on its PersistentVolumeClaim);
- the sidecar: the app stops first, the shipper (a native sidecar) after it; everything
  is stored."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from asgi_audit.cli import main
from asgi_audit.recording.signing import generate
from asgi_audit.recording.spool import streams
from asgi_audit.sinks import Query, open_sink
from asgi_audit.sinks.record import StoredRecord
from processes import (
    ROOT,
    SIGKILL,
    SIGTERM,
    Load,
    environment,
    free_port,
    serving,
    sidecar,
    wait_for,
)
from spooling import spooled_ids

pytestmark = [pytest.mark.server, pytest.mark.deploy, pytest.mark.timeout(300)]

DEPLOY = ROOT / "deploy" / "kubernetes"
IDENTITY = {"POD_NAME": "shop-0", "POD_NAMESPACE": "shop", "NODE_NAME": "node-a"}
"""What the downward API gives the pod (deploy/kubernetes/base/deployment.yaml)."""


@dataclass(frozen=True)
class Timings:
    """The shutdown numbers of a pod, in seconds, as the manifests set them."""

    grace: float
    """terminationGracePeriodSeconds: from the pod's deletion to SIGKILL."""
    pre_stop: float
    shutdown_timeout: float
    """The app's ASGI_AUDIT_SHUTDOWN_TIMEOUT."""


def _yaml(path: Path) -> Any:
    yaml: Any = importlib.import_module("yaml")
    return yaml.safe_load(path.read_text())


def _env(container: Any) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def timings(overlay: str | None = None) -> Timings:
    """The base's timings, or an overlay's where its patch changes them (the sidecar)."""
    pod = _yaml(DEPLOY / "base" / "deployment.yaml")["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    grace = pod["terminationGracePeriodSeconds"]
    shutdown = _env(app)["ASGI_AUDIT_SHUTDOWN_TIMEOUT"]
    if overlay == "sidecar":
        patch = _yaml(DEPLOY / "overlays" / "sidecar" / "shipper.yaml")["spec"]["template"]
        grace = patch["spec"]["terminationGracePeriodSeconds"]
        (patched,) = [c for c in patch["spec"]["containers"] if c["name"] == "app"]
        shutdown = _env(patched)["ASGI_AUDIT_SHUTDOWN_TIMEOUT"]
    return Timings(
        grace=float(grace),
        pre_stop=float(app["lifecycle"]["preStop"]["sleep"]["seconds"]),
        shutdown_timeout=float(shutdown),
    )


@dataclass
class Stop:
    """How a container ended under the kubelet."""

    code: int
    killed: bool
    """SIGKILLed when the grace period ran out."""
    seconds: float
    """From SIGTERM to the exit (or to the kill)."""
    others: int = 0
    """The container's other processes killed with it (the child shipper)."""


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (the rest of its container)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    waiting = [pid]
    while waiting:
        for child in children.get(waiting.pop(), []):
            found.append(child)
            waiting.append(child)
    return found


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def kubelet_stop(
    process: subprocess.Popen[bytes],
    grace: float,
    pre_stop: float = 0.0,
    started: float | None = None,
) -> Stop:
    """Stop a container as the kubelet does: the preStop sleep (the app still serves),
    SIGTERM, and SIGKILL to every process of the container when ``grace``, counted from
    ``started`` (the pod's deletion; default: now), has passed."""
    if started is None:
        started = time.monotonic()
    time.sleep(pre_stop)
    process.send_signal(SIGTERM)
    signalled = time.monotonic()
    try:
        code = process.wait(timeout=max(0.0, started + grace - signalled))
    except subprocess.TimeoutExpired:
        family = descendants(process.pid)  # before the parent goes and they are adopted
        process.kill()
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, SIGKILL)
        code = process.wait(30)
        assert wait_for(lambda: all(gone(pid) for pid in family), timeout=10)
        return Stop(code, True, time.monotonic() - signalled, len(family))
    return Stop(code, False, time.monotonic() - signalled)


def stored(sink: str) -> list[StoredRecord]:
    with closing(open_sink(sink)) as store:
        return list(store.search(Query(limit=None)))


def settings(tmp_path: Path, **extra: str) -> tuple[str, Path, dict[str, str]]:
    sink = f"sqlite:///{tmp_path / 'audit.db'}"
    spool = tmp_path / "spool"
    env = environment(
        ASGI_AUDIT_SINK=sink,
        ASGI_AUDIT_SPOOL=str(spool),
        ASGI_AUDIT_SERVICE="shop",  # the pod's app.kubernetes.io/name label
        **IDENTITY,
        **extra,
    )
    return sink, spool, env


def test_sigterm_after_prestop_drains_within_the_grace_period(tmp_path: Path) -> None:
    """Deleted under load, with the base's timings: traffic goes on through the preStop
    sleep and until the app stops listening; the app exits well within the grace period,
    having delivered its spool; every exchange a client saw answered is stored, once,
    with the pod's identity."""
    pod = timings()
    sink, spool, env = settings(tmp_path, ASGI_AUDIT_SHUTDOWN_TIMEOUT=str(pod.shutdown_timeout))
    with serving(env) as server:
        assert server.process is not None
        load = Load(server.url, total=100_000, threads=4, seconds=90)
        running = load.start()
        assert wait_for(lambda: len(load.completed) >= 200, timeout=60)
        stop = kubelet_stop(server.process, pod.grace, pod.pre_stop)
        load.stopped.set()
        running.join()
    records = stored(sink)
    ids = Counter(r.correlation_id for r in records)
    print(
        f"\nanswered {len(load.completed)}, stored {len(ids)}, exit {stop.code} "
        f"{stop.seconds:.2f} s after SIGTERM "
        f"(grace {pod.grace:.0f} s, preStop {pod.pre_stop:.0f} s)"
    )
    assert not stop.killed, f"still running {pod.grace - pod.pre_stop:.0f} s after SIGTERM"
    assert stop.code in (0, -SIGTERM)  # uvicorn re-raises the signal it handled
    assert len(load.completed) >= 200
    assert load.completed <= set(ids), f"lost {len(load.completed - set(ids))}"
    assert max(ids.values()) == 1
    assert not any(stream.segments() for stream in streams(spool)), "left in the spool"
    assert {(r.service, r.pod, r.namespace, r.node) for r in records} == {
        ("shop", "shop-0", "shop", "node-a")
    }


def test_grace_too_short_the_next_pod_on_the_same_spool_ships_it(tmp_path: Path) -> None:
    """The store is unavailable, so the stopping app waits for its shipper (up to the
    manifests' shutdown_timeout) and the grace period, too short, ends in SIGKILL of the
    app and its shipper. The spool has every answered exchange; a new process on the same
    spool (the pod restarted on its PersistentVolumeClaim) delivers all of them."""
    pod = timings()
    grace, pre_stop = 5.0, 1.0
    assert grace - pre_stop < pod.shutdown_timeout  # short: the kill comes mid-drain
    sink, spool, env = settings(tmp_path, ASGI_AUDIT_SHUTDOWN_TIMEOUT=str(pod.shutdown_timeout))
    open_sink(sink).close()  # the database, so that it can be locked
    blocker = sqlite3.connect(tmp_path / "audit.db", timeout=0)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # the store is down for the whole first pod
        with serving(env) as server:
            assert server.process is not None
            load = Load(server.url, total=100_000, threads=4, seconds=90)
            running = load.start()
            assert wait_for(lambda: len(load.completed) >= 200, timeout=60)
            stop = kubelet_stop(server.process, grace, pre_stop)
            load.stopped.set()
            running.join()
    finally:
        blocker.rollback()
        blocker.close()
    in_spool = Counter(spooled_ids(spool, "correlation_id"))
    before = Counter(r.correlation_id for r in stored(sink))
    assert stop.killed and stop.code == -SIGKILL
    assert stop.others >= 1, "the child shipper dies with the app, as in its container"
    assert not before, "the store was locked: nothing could be delivered"
    assert load.completed <= set(in_spool), "the spool lacks answered exchanges"
    with serving(env) as server:  # the restarted pod: same spool, same store
        delivered = wait_for(lambda: set(in_spool) <= {r.correlation_id for r in stored(sink)}, 60)
        server.signal(SIGTERM)
        server.wait(60)
    after = Counter(r.correlation_id for r in stored(sink))
    print(
        f"\nanswered {len(load.completed)}, in the spool at the kill {len(in_spool)}, "
        f"stored at the kill {len(before)}, stored after the restart {len(after)}"
    )
    assert delivered, f"not delivered: {len(set(in_spool) - set(after))}"
    assert set(after) == set(in_spool)
    assert max(after.values()) == 1
    assert not any(stream.segments() for stream in streams(spool))


def test_sidecar_stops_after_the_app_and_delivers_everything(tmp_path: Path) -> None:
    """The sidecar overlay: the app with ASGI_AUDIT_SHIP=off, `asgi-audit ship` beside it
    on the shared spool. Deleted under load, with the store down from that moment: the app
    gets preStop and SIGTERM first and exits with its last records still in the spool; the
    shipper, a native sidecar, gets SIGTERM only once the app has exited, and its drain
    delivers them when the store comes back, within the same grace period."""
    pod = timings("sidecar")
    sink, spool, env = settings(
        tmp_path, ASGI_AUDIT_SHIP="off", ASGI_AUDIT_SHUTDOWN_TIMEOUT=str(pod.shutdown_timeout)
    )
    with sidecar(spool, sink) as shipper, serving(env) as server:  # the sidecar starts first
        assert server.process is not None
        load = Load(server.url, total=100_000, threads=4, seconds=90)
        running = load.start()
        assert wait_for(lambda: len(load.completed) >= 200, timeout=60)
        blocker = sqlite3.connect(tmp_path / "audit.db", timeout=30, check_same_thread=False)
        try:
            blocker.execute("BEGIN EXCLUSIVE")  # the store is down from the deletion on
            deleted = time.monotonic()
            app = kubelet_stop(server.process, pod.grace, pod.pre_stop, started=deleted)
            load.stopped.set()
            running.join()
            (at_app_exit,) = blocker.execute("SELECT COUNT(*) FROM records").fetchone()
            back = threading.Timer(1.0, blocker.rollback)  # 1 s into the shipper's drain
            back.start()
            shipped = kubelet_stop(shipper, pod.grace, started=deleted)
            back.join()
        finally:
            blocker.close()
    ids = Counter(r.correlation_id for r in stored(sink))
    print(
        f"\nanswered {len(load.completed)}, stored when the app exited {at_app_exit}, "
        f"stored after the sidecar {len(ids)}; app exit {app.seconds:.2f} s after SIGTERM, "
        f"sidecar exit {shipped.seconds:.2f} s after its SIGTERM (grace {pod.grace:.0f} s)"
    )
    assert not app.killed and app.code in (0, -SIGTERM)
    assert at_app_exit < len(load.completed), "the app's last records wait for the shipper"
    assert not shipped.killed and shipped.code == 0, "0: the spool was delivered"
    assert time.monotonic() - deleted < pod.grace
    assert load.completed <= set(ids), f"lost {len(load.completed - set(ids))}"
    assert max(ids.values()) == 1
    assert not any(stream.segments() for stream in streams(spool))


def test_the_pods_own_command_serves_audits_and_stops(tmp_path: Path) -> None:
    """The base's container as written: its command (``asgi-audit run --config ...
    --timeout-graceful-shutdown 5``), its environment and the ConfigMap's audit.toml, with
    the mounted paths moved under ``tmp_path``, the port to a free one, and the sqlite
    overlay's sink. The policy audits what it says, signs the checkpoints with the
    mounted key, and the kubelet's stop ends in a clean exit and a verified trail."""
    pod = _yaml(DEPLOY / "base" / "deployment.yaml")["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    command: list[str] = list(app["command"])
    assert command[:2] == ["asgi-audit", "run"]
    moved = {
        "--config": str(DEPLOY / "base" / "audit.toml"),  # what the ConfigMap holds
        "--host": "127.0.0.1",
        "--port": str(free_port()),
    }
    for index, word in enumerate(command[:-1]):
        if word in moved:
            command[index + 1] = moved[word]
    private, public = generate()
    key = tmp_path / "signing.pem"
    key.write_bytes(private)
    key.chmod(0o400)
    (tmp_path / "audit.pub").write_bytes(public)
    sink = f"sqlite:///{tmp_path / 'audit.db'}"
    env = environment(**_env(app), ASGI_AUDIT_SERVICE="shop", **IDENTITY)
    env.update(
        ASGI_AUDIT_SPOOL=str(tmp_path / "spool"),
        ASGI_AUDIT_SIGNING_KEY=str(key),
        ASGI_AUDIT_SINK=sink,
    )
    url = f"http://127.0.0.1:{moved['--port']}"
    process = subprocess.Popen(
        [sys.executable, "-m", "asgi_audit", *command[1:]], env=env, cwd=ROOT
    )
    try:
        assert wait_for(lambda: _healthy(url), timeout=30), "the pod never got ready"
        with httpx.Client(base_url=url, timeout=10) as client:
            order = {"lines": [{"sku": "tea", "count": 2}]}
            posted = client.post("/orders/7", json=order, headers={"x-request-id": "put-7"})
            read = client.get("/orders/7", headers={"x-request-id": "get-7"})
        assert posted.status_code == 200 and read.status_code == 200
        stop = kubelet_stop(process, pod["terminationGracePeriodSeconds"], 0.0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    assert not stop.killed and stop.code in (0, -SIGTERM)
    records = {r.correlation_id: r for r in stored(sink)}
    assert set(records) == {"put-7", "get-7"}, "the probes' /health is not audited"
    put, get = records["put-7"], records["get-7"]
    assert (put.level, put.route, put.service, put.pod) == (
        "RequestResponse",
        "/orders/{order_id}",
        "shop",
        "shop-0",
    )
    assert put.request_body is not None and put.response_body is not None
    assert put.request_body.sha256 == hashlib.sha256(posted.request.content).hexdigest()
    assert put.response_body.sha256 == hashlib.sha256(posted.content).hexdigest()
    assert get.level == "Metadata" and get.response_body is None
    verified = CliRunner().invoke(
        main, ["verify", "--sink", sink, "--public-key", str(tmp_path / "audit.pub"), "--strict"]
    )
    assert verified.exit_code == 0, verified.output


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
