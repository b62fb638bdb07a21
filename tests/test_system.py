"""The system as operators run it: the coordinator and a worker as processes, asked through the edge client SDK,
scraped by a real Prometheus server; every query of the shipped Grafana dashboard must return data.

Also the deploy files against each other: docker-compose.yml follows the Compose Specification, its `command:`s
are the command lines this test runs, Prometheus scrapes every server it starts, Grafana is provisioned with the
datasource the dashboard names. Docker is not needed: the compose file is checked, not run.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support import COORDINATOR_JOB, SCRAPE_S, WORKER_JOB, Prometheus, poll, prometheus_program, run_prometheus

from edge_client.client import EdgeClient, EdgeError
from loracast_cli.launch import LORACAST, ServerProcess, coordinator_argv, ready_pattern, worker_argv

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "loracast.json"
GRAFANA_DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "loracast.yml"

STARTUP_S = 300.0  # a server's start on a busy 2-core machine: torch import, model load, the worker's ONNX export
GRAFANA_RANGE = "5m"  # stands in for Grafana's $__rate_interval: longer than this whole test, many 1 s scrapes
TASK = "Reverse the given list."
OTHER_TASK = "Write the word in capitals."


def compose_commands() -> dict[str, list[str]]:
    """The commands docker-compose.yml must give its services: the functions above, with the compose hosts."""
    worker = worker_argv(
        listen="0.0.0.0:50052",
        coordinator="coordinator-1:50051,coordinator-2:50051",
        metrics_port=9102,
        cache_dir="/var/lib/loracast/adapters",
        capacity_mb=512,
        base="smollm2",
    )
    coordinator = coordinator_argv(
        listen="0.0.0.0:50051",
        metrics_port=9101,
        cache_dir="/var/lib/loracast/adapters",
        base="smollm2",
        checkpoint="/app/hypernet/checkpoints/t2l.safetensors",
        store="redis://redis:6379/0",
    )
    return {"coordinator-1": coordinator, "coordinator-2": coordinator, "worker-1": worker, "worker-2": worker}


# ---------------------------------------------------------------------------------------------------------
# The deploy files, checked against each other
# ---------------------------------------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _mounts(service: dict) -> dict[str, str]:
    """A compose service's bind mounts: host path (relative to the repository) -> container path."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[os.path.normpath(source)] = target
    return mounts


def test_compose_file_follows_the_compose_specification():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # Spelt "https://json-schema.org/draft-07/schema", which jsonschema does not recognise by itself.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_yaml(COMPOSE_FILE))]
    assert errors == []
    # The schema must be able to fail: a misspelt key is refused.
    assert not validator.is_valid({"services": {"worker": {"image": "x", "comand": ["serve"]}}})


def test_compose_runs_the_command_lines_the_system_test_runs():
    services = _yaml(COMPOSE_FILE)["services"]
    loracast_services = {name for name, service in services.items() if "build" in service}
    assert loracast_services == set(compose_commands())
    for name, argv in compose_commands().items():
        assert services[name]["command"] == argv, name
    # The commands are `loracast` arguments: the image's entry point is the `loracast` command.
    assert re.search(r'^ENTRYPOINT \["[^"]*/bin/loracast"\]$', (ROOT / "Dockerfile").read_text(), re.MULTILINE)


def test_prometheus_scrapes_every_server_compose_starts():
    commands = compose_commands()
    config = _yaml(PROMETHEUS_CONFIG)
    targets = {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        COORDINATOR_JOB: [
            f"{name}:{_flag(commands[name], '--metrics-port')}" for name in ("coordinator-1", "coordinator-2")
        ],
        WORKER_JOB: [f"{name}:{_flag(commands[name], '--metrics-port')}" for name in ("worker-1", "worker-2")],
    }
    prometheus = _yaml(COMPOSE_FILE)["services"]["prometheus"]
    assert _mounts(prometheus)["deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    promtool = [prometheus_program("promtool"), "check", "config", str(PROMETHEUS_CONFIG)]
    check = subprocess.run(promtool, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_grafana_is_provisioned_with_the_datasource_and_dashboard():
    services = _yaml(COMPOSE_FILE)["services"]
    mounts = _mounts(services["grafana"])
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    [datasource] = _yaml(GRAFANA_DATASOURCES)["datasources"]
    assert "--web.listen-address" not in " ".join(services["prometheus"]["command"])  # so the default port, 9090
    assert (datasource["type"], datasource["url"]) == ("prometheus", "http://prometheus:9090")
    assert datasource["jsonData"]["timeInterval"] == _yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    [provider] = _yaml(GRAFANA_DASHBOARDS)["providers"]
    assert mounts["deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    named = {json.dumps(node["datasource"], sort_keys=True) for node in _walk(dashboard) if "datasource" in node}
    assert named == {json.dumps({"type": "prometheus", "uid": datasource["uid"]}, sort_keys=True)}
    assert len(dashboard_expressions()) >= 10


# ---------------------------------------------------------------------------------------------------------
# The system test
# ---------------------------------------------------------------------------------------------------------


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard, Grafana's variables replaced by a concrete range."""
    found = []
    for panel in _walk(json.loads(DASHBOARD.read_text())):
        for target in panel.get("targets", []):
            expr = re.sub(r"\$__(rate_interval|interval|range)\b", GRAFANA_RANGE, target["expr"])
            assert "$" not in expr, f"{panel['title']}: a Grafana variable this test cannot fill in: {expr}"
            found.append((panel["title"], expr))
    return found


def _start_prometheus(
    binary: str, processes: list[ServerProcess], tmp_path: Path, targets: dict[str, list[str]]
) -> Prometheus:
    # The shipped scrape config, pointed at this test's ports and scraping every second.
    config = _yaml(PROMETHEUS_CONFIG)
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return run_prometheus(binary, config, processes, tmp_path)[0]


def _series_with_values(prometheus: Prometheus, expr: str) -> list[float]:
    return [float(series["value"][1]) for series in prometheus.query(expr)]


def _value(prometheus: Prometheus, expr: str) -> float:
    values = _series_with_values(prometheus, expr)
    assert len(values) == 1, (expr, values)
    return values[0]


def _raw_samples(prometheus: Prometheus) -> dict[str, list]:
    """What Prometheus stored for a few series the failing quantiles and ratios read, to tell a missed scrape
    from an evaluation problem when the check above fails (it has, rarely, in full CI runs only)."""
    series = ("loracast_time_to_first_token_seconds_count", "loracast_adapter_cache_requests_total", "up")
    return {name: prometheus.api("query", query=f"{name}[5m]")["result"] for name in series} | {
        "time": prometheus.api("query", query="time()")["result"]
    }


def test_system_asks_are_served_measured_and_every_dashboard_query_has_data(
    tiny_base_dir, tiny_t2l, tmp_path, processes
):
    prometheus_binary = prometheus_program("prometheus")  # before minutes of server start-up
    env = {**os.environ, "LORACAST_CACHE": str(tmp_path / "cache")}
    coordinator = ServerProcess(
        "coordinator",
        [
            str(LORACAST),
            *coordinator_argv(
                listen="127.0.0.1:0",
                metrics_port=0,
                cache_dir=str(tmp_path / "coordinator-adapters"),
                base=str(tiny_base_dir),
                checkpoint=str(tiny_t2l),
            ),
        ],
        tmp_path,
        env,
    )
    processes.append(coordinator)
    coordinator_ready = coordinator.wait_for_line(ready_pattern("coordinator"), STARTUP_S)
    worker = ServerProcess(
        "worker",
        [
            str(LORACAST),
            *worker_argv(
                listen="127.0.0.1:0",
                coordinator=coordinator_ready["grpc"],
                metrics_port=0,
                cache_dir=str(tmp_path / "worker-adapters"),
                capacity_mb=64,
                base=str(tiny_base_dir),
            ),
        ],
        tmp_path,
        env,
    )
    processes.append(worker)
    worker_ready = worker.wait_for_line(ready_pattern("worker"), STARTUP_S)

    prometheus = _start_prometheus(
        prometheus_binary,
        processes,
        tmp_path,
        {
            COORDINATOR_JOB: [f"127.0.0.1:{coordinator_ready['metrics']}"],
            WORKER_JOB: [f"127.0.0.1:{worker_ready['metrics']}"],
        },
    )
    jobs = {COORDINATOR_JOB, WORKER_JOB}

    def scraped_after(moment: float) -> None:
        poll("both servers up and scraped", lambda: prometheus.scraped_since(moment, jobs), SCRAPE_S)

    def round_one_scraped(tokens: int) -> bool:
        counts = {
            "sum(loracast_generated_tokens_total)": tokens,
            "sum(loracast_adapter_make_seconds_count)": 1,
            'sum(loracast_rpc_total{component="worker",code="INVALID_ARGUMENT"})': 1,
        }
        return all(_series_with_values(prometheus, expr) == [value] for expr, value in counts.items())

    # Asks in two rounds with a scrape between them, so that the series the first round created grow in the
    # second: rates and quantiles then have real values, not just series. Each round sends one bad request.
    refusals = []
    with EdgeClient(worker_ready["grpc"]) as client:
        scraped_after(time.time())
        first = client.ask("[1, 2, 3]", task=TASK, max_new_tokens=4)
        with pytest.raises(EdgeError) as refused:
            client.ask("[1]", task="   ")
        refusals.append(refused.value)
        # Not just a scrape: one that holds the first round (a server books a request after its answer is sent).
        poll("the first round scraped", lambda: round_one_scraped(first.tokens), SCRAPE_S)
        again = client.ask("[4, 5, 6]", task=TASK, max_new_tokens=4)
        other = client.ask("cat", task=OTHER_TASK, max_new_tokens=4, mode="merged")
        with pytest.raises(EdgeError) as refused:
            client.ask("[1]", task="   ")
        refusals.append(refused.value)
    assert first.adapter_id and not first.resident and first.tokens >= 1
    assert (again.adapter_id, again.resident) == (first.adapter_id, True)
    assert other.adapter_id not in ("", first.adapter_id)
    assert first.timings.adapter_fetch_seconds > 0 and again.timings.adapter_fetch_seconds == 0
    assert 0 < first.timings.first_token_seconds <= first.timings.total_seconds
    assert [r.code for r in refusals] == ["INVALID_ARGUMENT"] * 2
    # Twice: a rate needs two samples of a series, and the second round may have created some.
    scraped_after(time.time())
    scraped_after(time.time())

    # What the asks did, as Prometheus saw it.
    assert _value(prometheus, "sum(loracast_generated_tokens_total)") == first.tokens + again.tokens + other.tokens
    assert _value(prometheus, 'sum(loracast_rpc_total{component="worker",code="INVALID_ARGUMENT"})') == 2
    assert _value(prometheus, 'sum(loracast_adapter_cache_requests_total{component="worker",result="hit"})') >= 1
    assert _value(prometheus, "sum(loracast_adapter_make_seconds_count)") == 2

    expressions = dashboard_expressions()
    empty = [(title, expr) for title, expr in expressions if not prometheus.query(expr)]
    assert empty == [], "dashboard queries that return no series"

    # Data, not just series: every query has at least one real number (a quantile of nothing is NaN). Polled:
    # the last scrape's samples may reach queries a moment after its timestamp does.
    def without_number() -> list[tuple[str, str]]:
        return [
            (title, expr)
            for title, expr in expressions
            if not any(math.isfinite(v) for v in _series_with_values(prometheus, expr))
        ]

    def polled_without_number() -> list[tuple[str, str]]:
        deadline = time.monotonic() + 15.0
        while (missing := without_number()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return missing

    if polled_without_number():
        # Seen in about 1 of 5 full CI runs: Prometheus 2.42's stored history then starts after the second round
        # (every series flat at its final value) although its queries had shown the first round between the
        # rounds, so no rate has an increase to show. One more round after a scrape gives the stored history one.
        warnings.warn(
            f"no rate in Prometheus's history after two rounds; raw samples: {_raw_samples(prometheus)}", stacklevel=1
        )
        with EdgeClient(worker_ready["grpc"]) as client:  # new descriptions: made, streamed and applied anew
            client.ask("[7, 8, 9]", task=f"{TASK} Keep the order.", max_new_tokens=4)
            client.ask("dog", task=f"{OTHER_TASK} One word.", max_new_tokens=4, mode="merged")
        scraped_after(time.time())
        scraped_after(time.time())
    no_number = polled_without_number()
    assert no_number == [], f"dashboard queries whose every series is NaN; raw samples: {_raw_samples(prometheus)}"

    for process in (worker, coordinator):
        assert process.terminate() == 0, f"{process.name} exit code\n{process.stderr()}"
