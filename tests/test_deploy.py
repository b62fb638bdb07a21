"""The Kubernetes manifests in deploy/k8s/, offline: every object against the Kubernetes schemas of the version
pinned below (`kubernetes-validate` ships them; strict, so a misspelt field is an error), then against each other
and the rest of the repository: Services select pods that exist and name their ports, probes ask
`grpc.health.v1` on the gRPC port, the servers' arguments are ones `loracast` accepts and point at the Services,
Redis is an LRU cache, and a real Prometheus given the pods' labels and annotations scrapes exactly the
coordinators and workers on their metrics ports, under the job names the compose deployment uses.

docker-compose.yml is checked against the Compose Specification by tests/test_system.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import COORDINATOR_JOB, SCRAPE_S, WORKER_JOB, poll, prometheus_program, run_prometheus

from loracast_cli.cli import parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"  # the oldest minor release still maintained upstream; gRPC probes are GA since 1.27
NAMESPACE = "loracast"
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
GRPC_PORTS = {"coordinator": 50051, "worker": 50052}


def _objects() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object of every manifest, in `kubectl apply -f deploy/k8s/` order."""
    return [
        (path.name, obj)
        for path in sorted(K8S.glob("*.yaml"))
        for obj in yaml.safe_load_all(path.read_text())
        if obj is not None
    ]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for _, obj in _objects() if obj["kind"] == kind}


def _workloads() -> dict[str, dict[str, Any]]:
    """The workloads by their component label."""
    found = {}
    for _, obj in _objects():
        if obj["kind"] in WORKLOADS:
            found[obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = obj
    return found


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return container


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _schema_errors(obj: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'/'.join(map(str, exc.absolute_path))}: {exc.message}"
    return None


def test_every_manifest_follows_the_kubernetes_schemas():
    objects = _objects()
    assert {obj["kind"] for _, obj in objects} >= {"Namespace", "Deployment", "DaemonSet", "Service", "ConfigMap"}
    errors = {f"{name} {obj['kind']}/{obj['metadata']['name']}": _schema_errors(obj) for name, obj in objects}
    assert {where: error for where, error in errors.items() if error} == {}


@pytest.mark.parametrize(
    "breakage",
    [
        ("a misspelt field", lambda c: c["readinessProbe"].update(perodSeconds=5)),
        ("a port that is not a number", lambda c: c["ports"][0].update(containerPort="grpc")),
        ("a gRPC probe without its port", lambda c: c["livenessProbe"]["grpc"].pop("port")),
    ],
    ids=lambda b: b[0],
)
def test_the_schema_check_refuses_a_broken_manifest(breakage):
    coordinator = json.loads(json.dumps(_workloads()["coordinator"]))
    assert _schema_errors(coordinator) is None
    breakage[1](_container(coordinator))
    assert _schema_errors(coordinator) is not None


def test_every_object_is_in_the_namespace_the_first_file_creates():
    objects = _objects()
    first_name, first = objects[0]
    assert (first["kind"], first["metadata"]["name"]) == ("Namespace", NAMESPACE), first_name
    assert [name for name, obj in objects[1:] if obj["metadata"].get("namespace") != NAMESPACE] == []


def test_services_select_running_pods_and_name_their_ports():
    pods = {
        component: (workload["spec"]["template"]["metadata"]["labels"], _container(workload))
        for component, workload in _workloads().items()
    }
    for name, service in _by_kind("Service").items():
        selector = service["spec"]["selector"]
        matched = [c for c, (labels, _) in pods.items() if selector.items() <= labels.items()]
        assert len(matched) == 1, f"Service {name} selects {matched}"
        ports = {port["name"] for port in pods[matched[0]][1]["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports, name
    for component, workload in _workloads().items():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items(), component


@pytest.mark.parametrize("component", GRPC_PORTS)
def test_servers_are_probed_on_grpc_health_and_run_arguments_loracast_accepts(component):
    container = _container(_workloads()[component])
    args = container["args"]
    parsed = parser().parse_args(args)  # an unknown flag or a bad value exits: the test fails
    assert (parsed.command, args[1]) == (component, "serve")
    port = GRPC_PORTS[component]
    assert _flag(args, "--listen") == f"0.0.0.0:{port}"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": port,
        "metrics": int(_flag(args, "--metrics-port")),
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}, probe
    annotations = _workloads()[component]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": _flag(args, "--metrics-port")}


def test_workers_balance_over_the_headless_coordinator_service_and_coordinators_share_redis():
    services = _by_kind("Service")
    coordinators = services["loracast-coordinator"]
    assert coordinators["spec"]["clusterIP"] == "None"  # DNS answers every pod: the client balances
    [port] = coordinators["spec"]["ports"]
    worker_args = _container(_workloads()["worker"])["args"]
    assert _flag(worker_args, "--coordinator") == (
        f"dns:///loracast-coordinator.{NAMESPACE}.svc.cluster.local:{port['port']}"
    )
    [redis_port] = services["loracast-redis"]["spec"]["ports"]
    coordinator_args = _container(_workloads()["coordinator"])["args"]
    assert _flag(coordinator_args, "--store") == f"redis://loracast-redis:{redis_port['port']}/0"
    assert _workloads()["coordinator"]["spec"]["replicas"] >= 2


def test_redis_never_evicts_by_itself_and_holds_the_stores_bound():
    """The store evicts by its own bound (coordinator/redis_store.py): Redis dropping keys would leave its index
    stale, so `noeviction`, with maxmemory above the coordinators' --capacity-mb and below the pod's limit."""
    conf = dict(
        line.split(maxsplit=1)
        for line in _by_kind("ConfigMap")["loracast-redis"]["data"]["redis.conf"].splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    assert conf["maxmemory-policy"] == "noeviction"
    maxmemory_mb = 1024 * int(conf["maxmemory"].removesuffix("gb"))
    capacity_mb = float(_flag(_container(_workloads()["coordinator"])["args"], "--capacity-mb"))
    limit = _container(_workloads()["redis"])["resources"]["limits"]["memory"]
    assert capacity_mb < maxmemory_mb < int(limit.removesuffix("Mi"))


def _label_name(key: str) -> str:
    """A Kubernetes label or annotation key as Prometheus's discovery spells it in a meta label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _discovered_pods() -> Iterator[dict[str, str]]:
    """The meta labels Prometheus's Kubernetes discovery gives each pod of the manifests (pod IP 127.0.0.x)."""
    for i, workload in enumerate(_workloads().values(), start=1):
        template = workload["spec"]["template"]["metadata"]
        labels = {"__meta_kubernetes_pod_ip": f"127.0.0.{i}", "__meta_kubernetes_pod_name": f"pod-{i}"}
        labels["__meta_kubernetes_pod_node_name"] = "node-1"
        for key, value in template["labels"].items():
            labels[f"__meta_kubernetes_pod_label_{_label_name(key)}"] = value
        for key, value in template.get("annotations", {}).items():
            labels[f"__meta_kubernetes_pod_annotation_{_label_name(key)}"] = value
        yield labels


def test_prometheus_scrapes_the_coordinators_and_workers_and_nothing_else(tmp_path, processes):
    """A real Prometheus runs the ConfigMap's scrape config, each Kubernetes discovery replaced by static targets
    carrying the meta labels discovery would give the manifests' pods (Debian's Prometheus is built without
    Kubernetes discovery); its targets API then shows what it would scrape, under which job."""
    prometheus_binary = prometheus_program("prometheus")
    config = yaml.safe_load(_by_kind("ConfigMap")["loracast-prometheus"]["data"]["prometheus.yml"])
    for job in config["scrape_configs"]:
        [discovery] = job.pop("kubernetes_sd_configs")
        assert (discovery["role"], discovery["namespaces"]["names"]) == ("pod", [NAMESPACE])
        job["static_configs"] = [{"targets": ["discovered:1"], "labels": pod} for pod in _discovered_pods()]
    prometheus, process = run_prometheus(prometheus_binary, config, processes, tmp_path)

    def targets() -> dict[str, Any]:
        found = prometheus.api("targets", state="any")
        return found if len(found["activeTargets"]) + len(found["droppedTargets"]) == len(_workloads()) else {}

    found = poll("every pod discovered", targets, SCRAPE_S, process.stderr)
    pods = {pod["__meta_kubernetes_pod_label_app_kubernetes_io_component"]: pod for pod in _discovered_pods()}
    expected = {
        (f"loracast-{component}", f"{pods[component]['__meta_kubernetes_pod_ip']}:{_flag(args, '--metrics-port')}")
        for component in GRPC_PORTS
        for args in [_container(_workloads()[component])["args"]]
    }
    scraped = {(t["labels"]["job"], t["labels"]["instance"]) for t in found["activeTargets"]}
    assert scraped == expected
    # The same jobs as under docker-compose, so the dashboard and any rule written for one serves the other.
    assert {job for job, _ in scraped} == {COORDINATOR_JOB, WORKER_JOB}
    assert process.terminate() == 0
