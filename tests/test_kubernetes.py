"""The Kubernetes manifests (``deploy/kubernetes``): every overlay renders with kustomize
(``kubectl kustomize``, offline), every rendered document validates against the API
schemas of every Kubernetes version the README claims (``kubernetes-validate``, strict:
an unknown or misplaced field fails), and the pods have the properties the manifests'
comments promise: unprivileged containers on a read-only root filesystem, a grace period
that covers the whole shutdown, no secret in any manifest, probes, resources, the pod's
identity from the downward API, and a configuration the middleware accepts."""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import pytest

from asgi_audit.capture.record import Identity
from asgi_audit.recording.signing import generate
from processes import ROOT, environment

pytestmark = pytest.mark.deploy

DEPLOY = ROOT / "deploy" / "kubernetes"
VERSIONS = tuple(f"1.{minor}" for minor in range(30, 38))
"""The Kubernetes versions deploy/kubernetes/README.md names: 1.30 (the preStop ``sleep``
action is on by default; native sidecars since 1.29) to 1.37."""
OVERLAYS = ("sqlite", "postgres", "s3", "sidecar")
SINK_FROM_SECRET = ("postgres", "s3", "sidecar")
SECRET_LIKE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
PASSWORD_IN_URL = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
SAMPLE_SINKS = {
    # What the Secrets of deploy/kubernetes/README.md hold (minus the passwords).
    "postgres": "postgresql://audit@postgres.db:5432/audit?table=audit_records&sslmode=require",
    "s3": "s3://audit-bucket/shop?endpoint_url=https://s3.example&region=eu-west-1",
    "sidecar": "postgresql://audit@postgres.db:5432/audit?sslmode=require",
}
WORKLOADS = ("Deployment", "StatefulSet")

Document = dict[str, Any]


def _unavailable(reason: str) -> NoReturn:
    """Skip, with the reason; in CI (CI=true) a missing tool fails the run instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _module(name: str, requirement: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        _unavailable(f"{name} is not installed: pip install '{requirement}' (the test extra)")


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        _unavailable("kubectl is not installed (it renders the kustomize overlays, offline)")
    return found


@functools.cache
def _rendered(overlay: str) -> tuple[Document, ...]:
    yaml = _module("yaml", "PyYAML>=6")
    result = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rendered(overlay: str) -> list[Document]:
    """The overlay's documents, as ``kubectl apply -k`` would send them (a fresh copy)."""
    copied: list[Document] = json.loads(json.dumps(_rendered(overlay)))
    return copied


def workload(documents: list[Document]) -> Document:
    (found,) = [doc for doc in documents if doc["kind"] in WORKLOADS]
    return found


def pod_of(documents: list[Document]) -> Document:
    spec: Document = workload(documents)["spec"]["template"]["spec"]
    return spec


def all_containers(pod: Document) -> list[Document]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def container(pod: Document, name: str) -> Document:
    (found,) = [c for c in all_containers(pod) if c["name"] == name]
    return found


def env_of(item: Document) -> dict[str, Document]:
    return {entry["name"]: entry for entry in item.get("env", [])}


def literal(item: Document, name: str) -> str:
    value: str = env_of(item)[name]["value"]
    return value


def option(command: list[str], name: str) -> str | None:
    """The value after ``name`` in a command line (None: not given)."""
    for index, word in enumerate(command[:-1]):
        if word == name:
            return command[index + 1]
    return None


def shippers(pod: Document) -> list[Document]:
    """The containers running ``asgi-audit ship`` (a sidecar)."""
    return [c for c in all_containers(pod) if c.get("command", [])[:2] == ["asgi-audit", "ship"]]


def mount_holding(item: Document, path: str) -> Document:
    """The volume mount of ``item`` that holds ``path`` (the deepest one)."""
    holding = [
        mount
        for mount in item.get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(mount["mountPath"])
    ]
    assert holding, f"{item['name']}: nothing is mounted at {path} (the root is read-only)"
    deepest: Document = max(holding, key=lambda mount: len(mount["mountPath"]))
    return deepest


def volume(documents: list[Document], name: str) -> Document:
    """The pod volume, or the StatefulSet's claim template, called ``name``."""
    pod = pod_of(documents)
    found: list[Document] = [v for v in pod.get("volumes", []) if v["name"] == name]
    templates = workload(documents)["spec"].get("volumeClaimTemplates", [])
    found += [{"name": name, "claim": t} for t in templates if t["metadata"]["name"] == name]
    assert len(found) == 1, f"volume {name}: {found}"
    return found[0]


_SIZE = re.compile(r"(\d+)\s*(Ki|Mi|Gi|Ti)?B?")
_UNITS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def size(text: str) -> int:
    """``2Gi`` (Kubernetes) or ``1536MiB`` (asgi-audit) in bytes."""
    matched = _SIZE.fullmatch(text)
    assert matched, text
    return int(matched[1]) * _UNITS[matched[2]]


def strings(node: object) -> Iterator[str]:
    """Every string (keys and values) of a document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def from_secret(item: Document, name: str) -> Document:
    """The ``secretKeyRef`` that variable ``name`` of ``item`` comes from."""
    entry = env_of(item).get(name)
    assert entry is not None, f"{item['name']}: no {name}"
    assert "value" not in entry, f"{item['name']}: {name} is written in the manifest"
    reference: Document = entry["valueFrom"]["secretKeyRef"]
    return reference


@pytest.fixture(scope="module")
def kubernetes_validate() -> Any:
    return _module("kubernetes_validate", "kubernetes-validate>=1.37")


# -- the schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_every_claimed_version(
    overlay: str, kubernetes_validate: Any
) -> None:
    documents = rendered(overlay)
    assert {doc["kind"] for doc in documents} >= {"ConfigMap", "Service"}
    errors: list[str] = []
    for version in VERSIONS:
        for doc in documents:
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            try:
                checked = kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                errors.append(f"{version} {name}: {path}: {exc.message}")
            except Exception as exc:  # no schema for the version or the kind
                message = getattr(exc, "message", exc)
                errors.append(f"{version} {name}: {type(exc).__name__}: {message}")
            else:
                assert checked == version, f"{version} checked against {checked}'s schema"
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_an_unknown_field(kubernetes_validate: Any) -> None:
    """The check above would see a misspelt field (``readOnlyRootFileSystem``)."""
    documents = rendered("postgres")
    context = container(pod_of(documents), "app")["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(workload(documents), VERSIONS[0], strict=True)


# -- the pod -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_unprivileged_on_a_read_only_root(overlay: str) -> None:
    pod = pod_of(rendered(overlay))
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] > 0 and context["runAsGroup"] > 0 and context["fsGroup"] > 0
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # no ASGI_AUDIT_SERVICE_HOST from a Service
    for item in all_containers(pod):
        own = item["securityContext"]
        effective = {**context, **own}
        assert effective["runAsNonRoot"] is True, item["name"]
        assert effective["runAsUser"] > 0, item["name"]
        assert own["readOnlyRootFilesystem"] is True, item["name"]
        assert own["allowPrivilegeEscalation"] is False, item["name"]
        assert own["capabilities"] == {"drop": ["ALL"]}, item["name"]
        assert not own.get("privileged", False), item["name"]
        # What it writes is on volumes: /tmp, and the spool for whoever touches it.
        assert mount_holding(item, "/tmp")["mountPath"] == "/tmp"
        assert not mount_holding(item, "/tmp").get("readOnly", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_resources(overlay: str) -> None:
    pod = pod_of(rendered(overlay))
    for item in all_containers(pod):
        resources = item["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), item["name"]
        assert "memory" in resources["limits"], item["name"]
        assert size(resources["requests"]["memory"]) <= size(resources["limits"]["memory"])
        ports = {port["name"] for port in item.get("ports", [])}
        if not ports:
            continue  # the shipper sidecar serves nothing
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert item[probe]["httpGet"]["path"] == "/health", (item["name"], probe)
            assert item[probe]["httpGet"]["port"] in ports, (item["name"], probe)
    app = container(pod, "app")
    liveness = app["livenessProbe"]
    patience = liveness["periodSeconds"] * liveness["failureThreshold"]
    assert patience > pod["terminationGracePeriodSeconds"], "liveness kills a slow drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_and_the_whole_shutdown(overlay: str) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + uvicorn's graceful shutdown +
    ASGI_AUDIT_SHUTDOWN_TIMEOUT (+ the sidecar's --drain-seconds, which starts only once
    the app has exited), with a margin; the arithmetic is in the manifests' comments."""
    pod = pod_of(rendered(overlay))
    app = container(pod, "app")
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = option(app["command"], "--timeout-graceful-shutdown")
    assert graceful is not None, "without it uvicorn waits for requests without a bound"
    shutdown_timeout = float(literal(app, "ASGI_AUDIT_SHUTDOWN_TIMEOUT"))
    assert grace >= shutdown_timeout + pre_stop
    drains = [option(shipper["command"], "--drain-seconds") for shipper in shippers(pod)]
    assert None not in drains, "the shipper's drain must be explicit (it is in the sum)"
    needed = pre_stop + float(graceful) + shutdown_timeout + sum(float(d or 0) for d in drains)
    assert grace >= needed + 2, f"grace {grace} s, shutdown needs {needed} s, no margin"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_identity_from_the_downward_api(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pod = pod_of(rendered(overlay))
    app = container(pod, "app")
    fields = {
        name: entry["valueFrom"]["fieldRef"]["fieldPath"]
        for name, entry in env_of(app).items()
        if "fieldRef" in entry.get("valueFrom", {})
    }
    assert fields == {
        "ASGI_AUDIT_SERVICE": "metadata.labels['app.kubernetes.io/name']",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "NODE_NAME": "spec.nodeName",
    }
    labels = workload(rendered(overlay))["spec"]["template"]["metadata"]["labels"]
    assert re.fullmatch(r"[A-Za-z0-9._-]+", labels["app.kubernetes.io/name"])
    # The names are the ones the recorder reads.
    for name, path in fields.items():
        monkeypatch.setenv(name, path)
    identity = Identity.current("shop")
    assert (identity.pod, identity.namespace, identity.node) == (
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_spool_is_on_a_volume_within_its_limit(overlay: str) -> None:
    documents = rendered(overlay)
    pod = pod_of(documents)
    app = container(pod, "app")
    spool = literal(app, "ASGI_AUDIT_SPOOL")
    mount = mount_holding(app, spool)
    assert not mount.get("readOnly", False)
    held = volume(documents, mount["name"])
    if overlay == "sqlite":
        capacity = held["claim"]["spec"]["resources"]["requests"]["storage"]
    else:
        capacity = held["emptyDir"]["sizeLimit"]  # past it the kubelet evicts the pod
    assert size(literal(app, "ASGI_AUDIT_SPOOL_LIMIT")) < size(capacity)
    for shipper in shippers(pod):
        assert option(shipper["command"], "--spool") == spool
        assert mount_holding(shipper, spool) == mount  # the same volume, the same path


def test_sqlite_keeps_database_and_spool_on_the_pods_own_claim() -> None:
    documents = rendered("sqlite")
    stateful = workload(documents)
    assert stateful["kind"] == "StatefulSet"
    assert not [doc for doc in documents if doc["kind"] == "Deployment"]
    pod = pod_of(documents)
    app = container(pod, "app")
    sink = literal(app, "ASGI_AUDIT_SINK")
    assert sink.startswith("sqlite:////")
    database = sink.removeprefix("sqlite:///")
    spool = literal(app, "ASGI_AUDIT_SPOOL")
    claim = mount_holding(app, spool)
    assert mount_holding(app, database) == claim
    assert "claim" in volume(documents, claim["name"])  # a volumeClaimTemplate, per pod
    retention = stateful["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (governing,) = [
        doc
        for doc in documents
        if doc["kind"] == "Service" and doc["metadata"]["name"] == stateful["spec"]["serviceName"]
    ]
    assert governing["spec"]["clusterIP"] == "None"


def test_the_sidecar_is_native_and_outlives_the_app() -> None:
    """The shipper is an init container with ``restartPolicy: Always`` (Kubernetes 1.29+):
    started before the app, signalled only after the app has exited. It has no preStop
    hook, which could only make it stop sooner; the app does not ship."""
    pod = pod_of(rendered("sidecar"))
    (shipper,) = shippers(pod)
    assert shipper in pod["initContainers"] and shipper not in pod["containers"]
    assert shipper["restartPolicy"] == "Always"
    assert "preStop" not in shipper.get("lifecycle", {})
    app = container(pod, "app")
    assert literal(app, "ASGI_AUDIT_SHIP") == "off"
    assert "ASGI_AUDIT_SINK" not in env_of(app)  # only the shipper holds the sink
    for overlay in ("sqlite", "postgres", "s3"):
        assert not shippers(pod_of(rendered(overlay)))
        assert "ASGI_AUDIT_SHIP" not in env_of(container(pod_of(rendered(overlay)), "app"))


# -- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_in_any_rendered_manifest(overlay: str) -> None:
    documents = rendered(overlay)
    assert not [doc for doc in documents if doc["kind"] == "Secret"], "Secrets are made by hand"
    for text in (s for doc in documents for s in strings(doc)):
        assert "-----BEGIN" not in text, "a key in a manifest"
        assert not PASSWORD_IN_URL.search(text), f"a password in a URL: {text!r}"
    pod = pod_of(documents)
    for item in all_containers(pod):
        words = [*item.get("command", []), *item.get("args", [])]
        assert "--sink" not in words, f"{item['name']}: a sink URL on the command line"
        for name, entry in env_of(item).items():
            if SECRET_LIKE.search(name):
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{item['name']}: {name}"
    for config in (doc for doc in documents if doc["kind"] == "ConfigMap"):
        for text in config["data"].values():
            assert "sink" not in tomllib.loads(text), "the sink belongs to the environment"


@pytest.mark.parametrize("overlay", SINK_FROM_SECRET)
def test_the_sink_url_comes_from_a_secret(overlay: str) -> None:
    pod = pod_of(rendered(overlay))
    (ships,) = shippers(pod) or [container(pod, "app")]
    reference = from_secret(ships, "ASGI_AUDIT_SINK")
    assert reference["key"] == "url"
    if overlay == "postgres":
        assert from_secret(ships, "PGPASSWORD")["name"] == reference["name"]
    if overlay == "s3":
        assert from_secret(ships, "AWS_ACCESS_KEY_ID")["name"] == reference["name"]
        assert from_secret(ships, "AWS_SECRET_ACCESS_KEY")["name"] == reference["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_signing_key_is_a_secret_mounted_as_a_file(overlay: str) -> None:
    documents = rendered(overlay)
    app = container(pod_of(documents), "app")
    path = PurePosixPath(literal(app, "ASGI_AUDIT_SIGNING_KEY"))
    mount = mount_holding(app, str(path))
    assert mount.get("readOnly") is True
    secret = volume(documents, mount["name"])["secret"]
    assert secret["secretName"] == "asgi-audit-signing-key"
    assert {"key": "signing.pem", "path": path.name} in secret["items"]
    assert secret["defaultMode"] & 0o007 == 0, "others may not read the key"


# -- the app's configuration ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_middleware_accepts_the_pods_configuration(overlay: str, tmp_path: Path) -> None:
    """The ConfigMap's audit.toml and the container's environment (downward API and
    Secrets filled in as the kubelet would) build the middleware around examples/shop.py,
    as ``asgi-audit run`` does in the pod: no unknown setting, no route the app lacks."""
    documents = rendered(overlay)
    pod = pod_of(documents)
    app = container(pod, "app")
    config_path = option(app["command"], "--config")
    assert config_path is not None
    mount = mount_holding(app, config_path)
    map_name = volume(documents, mount["name"])["configMap"]["name"]
    (config,) = [doc for doc in documents if doc["metadata"]["name"] == map_name]
    key = str(PurePosixPath(config_path).relative_to(mount["mountPath"]))
    (tmp_path / "audit.toml").write_text(config["data"][key])
    private, _ = generate()
    (tmp_path / "signing.pem").write_bytes(private)
    filled = {
        "POD_NAME": "shop-0",
        "POD_NAMESPACE": "shop",
        "NODE_NAME": "node-a",
        "ASGI_AUDIT_SERVICE": workload(documents)["spec"]["template"]["metadata"]["labels"][
            "app.kubernetes.io/name"
        ],
        "ASGI_AUDIT_SINK": SAMPLE_SINKS.get(overlay, ""),
        "PGPASSWORD": "from-the-secret",
        "AWS_ACCESS_KEY_ID": "from-the-secret",
        "AWS_SECRET_ACCESS_KEY": "from-the-secret",
    }
    env = environment(ASGI_AUDIT_CONFIG=str(tmp_path / "audit.toml"))
    for name, entry in env_of(app).items():
        env[name] = entry["value"] if "value" in entry else filled[name]
    env["ASGI_AUDIT_SIGNING_KEY"] = str(tmp_path / "signing.pem")  # the Secret's file
    env["ASGI_AUDIT_SPOOL"] = str(tmp_path / "spool")  # untouched: building opens nothing
    check = (
        "import json; from asgi_audit import AuditMiddleware; from examples.shop import app\n"
        "m = AuditMiddleware(app); s = m.settings\n"
        "print(json.dumps({'service': s.service, 'sink': s.sink, 'ship': s.ship,"
        " 'shutdown_timeout': s.shutdown_timeout, 'policy': repr(m.policy)}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["service"] == "shop"
    assert settings["shutdown_timeout"] == float(literal(app, "ASGI_AUDIT_SHUTDOWN_TIMEOUT"))
    assert settings["ship"] == ("off" if overlay == "sidecar" else "process")
    assert "/orders/{order_id}" in settings["policy"]
    if overlay == "sqlite":
        assert settings["sink"] == literal(app, "ASGI_AUDIT_SINK")
    elif overlay != "sidecar":
        assert settings["sink"] == SAMPLE_SINKS[overlay]


def test_the_service_reaches_the_app() -> None:
    for overlay in OVERLAYS:
        documents = rendered(overlay)
        labels = workload(documents)["spec"]["template"]["metadata"]["labels"]
        ports = {port["name"] for port in container(pod_of(documents), "app")["ports"]}
        (service,) = [
            doc
            for doc in documents
            if doc["kind"] == "Service" and doc["spec"].get("clusterIP") != "None"
        ]
        assert service["spec"]["selector"].items() <= labels.items()
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_served_where_the_service_points(overlay: str) -> None:
    """The Service's ``metrics`` port reaches a container port of that name, and the
    process serving it (the app's child shipper, or the sidecar) is told the same port."""
    documents = rendered(overlay)
    [service] = [
        doc
        for doc in documents
        if doc["kind"] == "Service"
        and doc["spec"].get("type") != "None"
        and doc["spec"].get("clusterIP") != "None"
    ]
    [port] = [p for p in service["spec"]["ports"] if p["name"] == "metrics"]
    pod = pod_of(documents)
    serving = shippers(pod) or [container(pod, "app")]
    for item in serving:
        declared = {p["name"]: p["containerPort"] for p in item.get("ports", [])}
        if item["name"] == "app":
            assert declared["metrics"] == 9464 == port["port"]
        assert literal(item, "ASGI_AUDIT_METRICS_PORT") == "9464"


def test_the_servicemonitor_component_selects_the_service(tmp_path: Path) -> None:
    yaml = _module("yaml", "PyYAML>=6")
    overlay = tmp_path / "monitored"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY / "overlays" / "postgres", overlay)],
                "components": [os.path.relpath(DEPLOY / "components" / "servicemonitor", overlay)],
            }
        )
    )
    result = subprocess.run(
        [_kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    [monitor] = [doc for doc in documents if doc["kind"] == "ServiceMonitor"]
    [service] = [doc for doc in documents if doc["kind"] == "Service"]
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
