"""Helpers several test modules use (fixtures they share are in conftest.py): servers started as processes, as
`loracast` runs them, their /metrics, and what a worker's adapter cache holds.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from loracast_cli.launch import ServerProcess, coordinator_argv, worker_argv

STARTUP_S = 180.0  # a server's start on a busy 2-core machine (the coordinator imports torch and loads models)


@dataclass
class Server:
    """A server process that printed its ready line."""

    process: ServerProcess
    address: str  # HOST:PORT of its gRPC service
    metrics_port: int


def server_env(log_dir: Path) -> dict[str, str]:
    return {**os.environ, "LORACAST_CACHE": str(log_dir / "loracast-cache")}


def launch_coordinator(
    log_dir: Path, name: str, *, cache_dir: Path, base_dir: Path, t2l: Path, d2l: Path, listen: str = "127.0.0.1:0"
) -> ServerProcess:
    """A coordinator on the tiny Llama with Text-to-LoRA and Doc-to-LoRA (a document gets the one pass: load, not
    distillation, is the point here); `ready` waits for it."""
    argv = coordinator_argv(
        listen=listen, metrics_port=0, cache_dir=str(cache_dir), base=str(base_dir), checkpoint=str(t2l)
    )
    argv += ["--d2l-checkpoint", str(d2l), "--budget-seconds", "0"]
    return ServerProcess.loracast(name, argv, log_dir, server_env(log_dir))


def worker_command(
    *, model_dir: Path, base_dir: Path, cache_dir: Path, coordinator: str, max_concurrent_answers: int = 2
) -> list[str]:
    """`loracast` arguments of a worker serving the exported tiny Llama with one ONNX Runtime thread."""
    argv = worker_argv(
        listen="127.0.0.1:0",
        coordinator=coordinator,
        metrics_port=0,
        cache_dir=str(cache_dir),
        capacity_mb=64,
        base=str(base_dir),
    )
    return [*argv, "--model", str(model_dir), "--threads", "1", "--max-concurrent-answers", str(max_concurrent_answers)]


def launch_worker(log_dir: Path, name: str, **command: Any) -> ServerProcess:
    return ServerProcess.loracast(name, worker_command(**command), log_dir, server_env(log_dir))


def ready(process: ServerProcess, component: str) -> Server:
    line = process.wait_ready(component, STARTUP_S)
    return Server(process, line["grpc"], int(line["metrics"]))


def scrape(server: Server) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as page:
        text = page.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    return sum(s.value for s in scrape(server) if s.name == name and labels.items() <= s.labels.items())


def installed(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "adapters").iterdir())
