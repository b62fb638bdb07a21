"""Adapter delivery, end to end: a coordinator and a worker as real processes on loopback, asked by description.

    nice -n 5 .venv/bin/python bench/bench_delivery.py [--repeats 20] [--restarts 3]

Runs on the real base model (the worker's cached ONNX export) and the shipped T2L checkpoint; both servers get
fresh adapter caches in a temporary directory, so every description starts cold. Measures, with medians and p90:

1. a new description -> first token on the worker (`repeats` distinct descriptions, none seen before by either
   server): the worker's Done timings and the client's wall time to the first streamed token; target < 1 s;
2. the same description again, its adapter resident: first token and apply time;
3. switching between resident adapters (hot-swap, each request names another one): apply time and first token;
   target < 50 ms; plus the base model with no adapter, the floor every first token stands on;
4. after a worker restart (SIGTERM, started again on the same adapter cache): first token for adapters that
   were resident before, which must come from disk (resident, no fetch; the coordinator's byte and generation
   counters must not move);
5. FetchAdapter straight from the coordinator's stub: fp16 and fp32, the default and the largest chunk size;
6. for context, the coordinator's hypernetwork time for a new description, and a cached one's round trip.

Writes bench/results/delivery.json and prints markdown tables. Both servers are stopped with SIGTERM at the end,
also after an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from edge_client.client import DEFAULT_TIMEOUT, Done, EdgeClient, Started, Timings
from hypernet.checkpoint import DEFAULT_T2L
from hypernet.sni_data import default_data_dir, load_tasks
from loracast.adapter_wire import DEFAULT_CHUNK, MAX_CHUNK
from loracast.grpc_security import open_channel
from loracast.paths import DEFAULT_BASE
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from loracast_cli.launch import ServerProcess, coordinator_argv, worker_argv
from worker import model_cache
from worker.chat import ChatTokenizer

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
PROMPT = "The blender I ordered broke after two days and customer support never answered my emails."
NEW_FIRST_TOKEN_TARGET_S = 1.0
SWITCH_TARGET_S = 0.050
MB = 1e6  # throughput in decimal megabytes per second
# Both servers start on empty adapter caches, so none of these has been seen by them; the dev split's definitions
# (unseen in training) go first, then these everyday tasks.
OWN_DESCRIPTIONS = [
    "Classify the sentiment of a product review as positive or negative. Answer with one word.",
    "Summarize the customer's complaint in one short sentence.",
    "Extract every product name mentioned in the text and list them separated by commas.",
    "Decide whether the message is a complaint, a question or a compliment. Answer with that one word.",
    "Translate the sentence from English into French.",
    "Rewrite the text in a polite, formal tone suitable for a business email.",
    "Given a sentence, count how many words it contains and answer with the number only.",
    "Answer yes if the review mentions delivery or shipping, otherwise answer no.",
    "Write a short, friendly reply from the support team to the customer's message.",
    "Identify the emotion expressed by the writer: anger, joy, sadness, fear or surprise.",
    "List the verbs in the sentence in the order they appear.",
    "Rate how urgent the support ticket is on a scale from 1 (not urgent) to 5 (critical).",
    "Turn the statement into a yes/no question.",
    "Find the main topic of the text and answer with at most three words.",
    "Correct the grammar and spelling mistakes in the sentence and return the corrected sentence.",
    "Decide whether the text contains a request for a refund. Answer True or False.",
]


@dataclass(frozen=True)
class Sample:
    """One Generate call as the client saw it, with the worker's own timings."""

    adapter_id: str
    resident: bool
    tokens: int
    timings: Timings
    client_started: float  # seconds from sending the request to the Started event
    client_first_token: float | None  # seconds to the first streamed text; None when the answer was empty


def _descriptions(count: int) -> list[str]:
    """`count` distinct task descriptions; past the base list, each comes back with a different length limit."""
    data = default_data_dir()
    base = [t.definition for t in load_tasks(data, "dev")] if data is not None else []
    base += OWN_DESCRIPTIONS
    return [
        text if i < len(base) else f"{text} Keep the answer under {5 + i // len(base)} words."
        for i, text in ((i, base[i % len(base)]) for i in range(count))
    ]


def _ask(client: EdgeClient, max_new_tokens: int, **adapter: str) -> Sample:
    # EdgeClient.ask reports only the worker's timings; the stream gives the client's view of the first token.
    start = time.perf_counter()
    started: Started | None = None
    done: Done | None = None
    started_at, first = 0.0, None
    for event in client.stream(PROMPT, max_new_tokens=max_new_tokens, timeout=DEFAULT_TIMEOUT, **adapter):
        now = time.perf_counter() - start
        if isinstance(event, Started):
            started, started_at = event, now
        elif isinstance(event, Done):
            done = event
        elif first is None:
            first = now
    if started is None or done is None:
        raise RuntimeError("the worker ended an answer without its started and done messages")
    return Sample(started.adapter_id, started.resident, done.tokens, done.timings, started_at, first)


def _fetch(stub: pb_grpc.CoordinatorStub, adapter_id: str, dtype: int, chunk_size: int) -> tuple[float, float, int]:
    """One full FetchAdapter: (seconds to the last byte, seconds to the manifest, payload bytes), verified."""
    request = pb.FetchAdapterRequest(adapter_id=adapter_id, dtype=dtype, chunk_size=chunk_size)
    parts: list[bytes] = []
    manifest: pb.AdapterManifest | None = None
    start = time.perf_counter()
    manifest_at = 0.0
    for message in stub.FetchAdapter(request, timeout=60):
        if message.WhichOneof("part") == "manifest":
            manifest, manifest_at = message.manifest, time.perf_counter() - start
        else:
            parts.append(message.data.data)
    seconds = time.perf_counter() - start
    payload = b"".join(parts)  # checked after the clock stops: a receiver's own hashing is not transfer time
    if manifest is None or len(payload) != manifest.total_size:
        raise RuntimeError(
            f"FetchAdapter sent {len(payload)} bytes, its manifest says {manifest and manifest.total_size}"
        )
    if hashlib.sha256(payload).hexdigest() != manifest.payload_sha256:
        raise RuntimeError("FetchAdapter's payload fails its SHA-256")
    return seconds, manifest_at, len(payload)


def _coordinator_counters(metrics_port: str) -> dict[str, float]:
    """Bytes streamed and hypernetwork passes so far: both stay put while a worker serves from its own disk."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counters = {"bytes_streamed": 0.0, "generations": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "loracast_adapter_bytes_streamed_total" and s.labels.get("component") == "coordinator":
                counters["bytes_streamed"] += s.value
            elif s.name == "loracast_adapter_make_seconds_count":
                counters["generations"] += s.value
    return counters


def _prompt_tokens(base: str) -> int | None:
    """The prompt's length in tokens after the chat template: the prefill every first token includes."""
    model_dir = model_cache.find(base)
    return len(ChatTokenizer(model_dir).encode_chat(PROMPT)) if model_dir is not None else None


def _stats(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    ordered = sorted(xs)
    p90 = statistics.quantiles(ordered, n=10, method="inclusive")[-1] if len(ordered) > 1 else ordered[0]
    return {
        "n": len(ordered),
        "median_ms": round(1000 * statistics.median(ordered), 2),
        "p90_ms": round(1000 * p90, 2),
        "min_ms": round(1000 * ordered[0], 2),
        "max_ms": round(1000 * ordered[-1], 2),
    }


def _summary(samples: list[Sample]) -> dict[str, Any]:
    answered = [s for s in samples if s.client_first_token is not None]
    return {
        "client_first_token": _stats([s.client_first_token for s in answered]),
        "worker_first_token": _stats([s.timings.first_token_seconds for s in answered]),
        "client_started": _stats([s.client_started for s in samples]),
        "adapter_fetch": _stats([s.timings.adapter_fetch_seconds for s in samples]),
        "apply": _stats([s.timings.apply_seconds for s in samples]),
        "requests": len(samples),
        "resident": sum(s.resident for s in samples),
        "fetched_nothing": sum(s.timings.adapter_fetch_seconds == 0 for s in samples),
        "empty_answers": len(samples) - len(answered),  # no first token to time: left out of the first-token figures
    }


def _target(target_s: float, judged_on: str, **figures: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"target_ms": round(1000 * target_s, 1), "judged_on": judged_on}
    for name, stats in figures.items():
        out[name] = {
            "median_ms": stats.get("median_ms"),
            "p90_ms": stats.get("p90_ms"),
            "met_median": stats.get("n", 0) > 0 and stats["median_ms"] < 1000 * target_s,
            "met_p90": stats.get("n", 0) > 0 and stats["p90_ms"] < 1000 * target_s,
        }
    return out


def _machine() -> dict[str, Any]:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "physical_cores": psutil.cpu_count(logical=False),
        "processor": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "nice": os.nice(0),
        "commit": git("rev-parse", "HEAD"),
        # The servers run from this working tree: edits not yet committed are part of what was measured.
        "uncommitted_changes": git("diff", "--name-only", "HEAD").splitlines(),
    }


class Servers:
    """The coordinator and the worker as processes; everything started is stopped by `stop_all`."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.started: list[ServerProcess] = []
        self.exit_codes: dict[str, int | str] = {}
        self.coordinator_grpc = self.coordinator_metrics = ""
        self.worker: ServerProcess | None = None
        self.worker_grpc = ""
        self.worker_starts = 0  # names each worker process apart: its log file and its exit code

    def start_coordinator(self) -> float:
        argv = coordinator_argv(
            listen="127.0.0.1:0",
            metrics_port=0,
            cache_dir=str(self.root / "coordinator"),
            base=self.args.base,
            checkpoint=str(self.args.checkpoint),
        )
        start = time.perf_counter()
        process = ServerProcess.loracast("coordinator", argv, self.root)
        self.started.append(process)
        ready = process.wait_ready("coordinator", self.args.startup_timeout)
        self.coordinator_grpc, self.coordinator_metrics = ready["grpc"], ready["metrics"]
        return time.perf_counter() - start

    def start_worker(self) -> float:
        argv = worker_argv(
            listen="127.0.0.1:0",
            coordinator=self.coordinator_grpc,
            metrics_port=0,
            cache_dir=str(self.root / "worker"),  # the same directory on every start: a restart keeps its adapters
            capacity_mb=256,
            base=self.args.base,
        )
        start = time.perf_counter()
        self.worker = ServerProcess.loracast(f"worker-{self.worker_starts}", argv, self.root)
        self.worker_starts += 1
        self.started.append(self.worker)
        self.worker_grpc = self.worker.wait_ready("worker", self.args.startup_timeout)["grpc"]
        return time.perf_counter() - start

    def stop(self, process: ServerProcess) -> float:
        start = time.perf_counter()
        try:
            self.exit_codes[process.name] = process.terminate()
        finally:
            self.started.remove(process)
        return time.perf_counter() - start

    def stop_all(self) -> None:
        """SIGTERM every server still running, workers first; one that will not stop does not keep the others up."""
        for process in reversed(list(self.started)):
            try:
                self.stop(process)
            except Exception as exc:
                self.exit_codes[process.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                process.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} stderr (end) ---\n{p.stderr()}" for p in self.started)


def _phase(desc: str, total: int, loads: dict[str, float]) -> tqdm:
    # The machine is shared: the load when each phase starts tells a reader which figures other work may have hit.
    loads[desc] = round(os.getloadavg()[0], 2)
    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True)


def run(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    n = args.repeats
    # One extra warms the worker (first ONNX run, first coordinator pass, channel setup) before anything is timed.
    texts = _descriptions(1 + 2 * n)
    warm_text, worker_texts, coordinator_texts = texts[0], texts[1 : 1 + n], texts[1 + n :]
    out: dict[str, Any] = {}
    loads: dict[str, float] = {}
    out["load_average_1min_at_phase_start"] = loads

    print("starting the coordinator (loads the base model and the T2L hypernetwork) ...", flush=True)
    out["coordinator_start_s"] = round(servers.start_coordinator(), 2)
    print(f"coordinator on {servers.coordinator_grpc}; starting a worker (cached ONNX export) ...", flush=True)
    out["worker_start_s"] = round(servers.start_worker(), 2)
    print(f"worker on {servers.worker_grpc}", flush=True)

    with EdgeClient(servers.worker_grpc) as client:
        warm = _ask(client, args.max_new_tokens, task=warm_text)
        out["warm_up_request"] = {
            "client_first_token_ms": warm.client_first_token and round(1000 * warm.client_first_token, 2),
            "worker_timings_ms": {
                k.removesuffix("_seconds"): round(1000 * v, 2) for k, v in asdict(warm.timings).items()
            },
        }

        # 1 and 2 interleaved: a new description, then the same again, so machine load hits both alike.
        new, again = [], []
        with _phase("1+2 new description, then again", 2 * n, loads) as bar:
            for text in worker_texts:
                new.append(_ask(client, args.max_new_tokens, task=text))
                bar.update()
                again.append(_ask(client, args.max_new_tokens, task=text))
                bar.update()
        for first, second in zip(new, again, strict=True):
            if first.resident or not second.resident or first.adapter_id != second.adapter_id:
                raise RuntimeError(
                    f"adapter {first.adapter_id[:12]}: resident {first.resident}, then {second.resident}"
                )
        ids = [s.adapter_id for s in new]
        if len(set(ids)) != len(ids):
            raise RuntimeError("two distinct descriptions gave the same adapter: the 'new' figures would be hits")
        out["new_description"] = _summary(new)
        out["same_description_again"] = _summary(again)

        # 3: rounds of [adapter, another adapter, base model], so load from other processes on the machine hits
        # switches and the base-model floor alike; only the second adapter of a round (it follows another adapter,
        # not the base model) counts as a switch.
        pool = ids[: args.switch_adapters]
        switches, base = [], []
        with _phase("3 switch resident adapters / base model", 3 * n, loads) as bar:
            for r in range(n):
                _ask(client, args.max_new_tokens, adapter_id=pool[(2 * r) % len(pool)])
                bar.update()
                switches.append(_ask(client, args.max_new_tokens, adapter_id=pool[(2 * r + 1) % len(pool)]))
                bar.update()
                base.append(_ask(client, args.max_new_tokens))
                bar.update()
        if not all(s.resident for s in switches):
            raise RuntimeError("an adapter of the switching pool was not resident")
        out["switch_resident"] = {"adapters_in_rotation": len(pool), **_summary(switches)}
        out["base_model"] = _summary(base)

    # 4: the worker restarts on its adapter cache; adapters resident before must come from its disk.
    before = _coordinator_counters(servers.coordinator_metrics)
    restart_texts = worker_texts[: args.switch_adapters]
    first_after, all_after, stop_s, start_s = [], [], [], []
    with _phase("4 worker restarts", args.restarts * len(restart_texts), loads) as bar:
        for _ in range(args.restarts):
            assert servers.worker is not None
            stop_s.append(servers.stop(servers.worker))
            start_s.append(servers.start_worker())
            with EdgeClient(servers.worker_grpc) as client:
                for j, text in enumerate(restart_texts):
                    sample = _ask(client, args.max_new_tokens, task=text)
                    (first_after if j == 0 else all_after).append(sample)
                    bar.update()
    after = _coordinator_counters(servers.coordinator_metrics)
    everything = first_after + all_after
    out["after_restart"] = {
        "restarts": args.restarts,
        "first_request_after_restart": _summary(first_after),
        "every_request_after_restart": _summary(everything),
        "worker_stop": _stats(stop_s),
        "worker_start_to_ready": _stats(start_s),
        "all_from_disk": all(s.resident and s.timings.adapter_fetch_seconds == 0 for s in everything),
        "coordinator_bytes_streamed_during": after["bytes_streamed"] - before["bytes_streamed"],
        "coordinator_generations_during": after["generations"] - before["generations"],
    }
    if not out["after_restart"]["all_from_disk"] or after != before:
        raise RuntimeError(f"after a restart an adapter came from the coordinator: {before} -> {after}")

    channel = open_channel(servers.coordinator_grpc)
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        out["fetch"] = _throughput(stub, ids[0], n, loads)
        out["coordinator_generation"] = _coordinator_generation(stub, coordinator_texts, loads)
    finally:
        channel.close()
    return out


def _throughput(
    stub: pb_grpc.CoordinatorStub, adapter_id: str, repeats: int, loads: dict[str, float]
) -> dict[str, Any]:
    configs = [
        (dtype_name, dtype, chunk_name, chunk)
        for dtype_name, dtype in (("fp16", pb.FLOAT16), ("fp32", pb.FLOAT32))
        for chunk_name, chunk in (
            (f"default_{DEFAULT_CHUNK // 1024}KiB", 0),
            (f"max_{MAX_CHUNK // 1024}KiB", MAX_CHUNK),
        )
    ]
    sizes = {name: _fetch(stub, adapter_id, dtype, 0)[2] for name, dtype, _, _ in configs}  # also warms the reads
    raw = sizes["fp32"]  # the adapter as generated: float32, bit-exact
    seconds: dict[tuple[str, str], list[float]] = {(d, c): [] for d, _, c, _ in configs}
    to_manifest: dict[tuple[str, str], list[float]] = {(d, c): [] for d, _, c, _ in configs}
    with _phase("5 FetchAdapter", repeats * len(configs), loads) as bar:
        for r in range(repeats):
            for dtype_name, dtype, chunk_name, chunk in configs[r % len(configs) :] + configs[: r % len(configs)]:
                s, m, _ = _fetch(stub, adapter_id, dtype, chunk)
                seconds[dtype_name, chunk_name].append(s)
                to_manifest[dtype_name, chunk_name].append(m)
                bar.update()
    runs = {}
    for (dtype_name, chunk_name), xs in seconds.items():
        median, size = statistics.median(xs), sizes[dtype_name]
        runs[f"{dtype_name}/{chunk_name}"] = {
            "payload_bytes": size,
            "seconds": _stats(xs),
            "to_manifest": _stats(to_manifest[dtype_name, chunk_name]),
            "bytes_per_s_median": round(size / median),
            "MB_per_s_median": round(size / median / MB, 1),
            "MB_per_s_at_p90_time": round(size / (_stats(xs)["p90_ms"] / 1000) / MB, 1),
            "raw_adapter_MB_per_s_median": round(raw / median / MB, 1),  # float32 adapter bytes delivered per s
        }
    return {
        "adapter_id": adapter_id,
        "payload_bytes": sizes,
        "raw_adapter_bytes": raw,
        "fp16_vs_fp32_bytes": round(sizes["fp16"] / raw, 3),
        "runs": runs,
    }


def _coordinator_generation(stub: pb_grpc.CoordinatorStub, texts: list[str], loads: dict[str, float]) -> dict[str, Any]:
    generation, new_wall, cached_wall = [], [], []

    def call(text: str) -> tuple[pb.GenerateResponse, float]:
        start = time.perf_counter()
        reply = stub.GenerateFromDescription(pb.GenerateFromDescriptionRequest(description=text), timeout=120)
        return reply, time.perf_counter() - start

    with _phase("6 coordinator generation, then cached", 2 * len(texts), loads) as bar:
        for text in texts:
            reply, wall = call(text)
            if reply.cached:
                raise RuntimeError("a description meant to be new was already in the coordinator's cache")
            generation.append(reply.generation_seconds)
            new_wall.append(wall)
            bar.update()
            reply, wall = call(text)
            if not reply.cached or reply.generation_seconds != 0:
                raise RuntimeError("the same description again was not answered from the cache")
            cached_wall.append(wall)
            bar.update()
    return {
        "new_generation_seconds": _stats(generation),
        "new_client_round_trip": _stats(new_wall),
        "cached_client_round_trip": _stats(cached_wall),
    }


def _row(name: str, stats: dict[str, float], target: str = "", met: str = "") -> str:
    median, p90 = stats.get("median_ms", "-"), stats.get("p90_ms", "-")
    return f"| {name} | {median} | {p90} | {stats.get('n', 0)} | {target} | {met} |"


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def _met(target: dict[str, Any]) -> str:
    return f"{_yes(target['met_median'])} / {_yes(target['met_p90'])}"


def table(result: dict[str, Any]) -> str:
    new, again, switch = result["new_description"], result["same_description_again"], result["switch_resident"]
    restart, base, gen = result["after_restart"], result["base_model"], result["coordinator_generation"]
    t_new = result["targets"]["new_adapter_first_token"]
    t_switch = result["targets"]["switch_resident"]
    lines = [
        "| measurement | median ms | p90 ms | n | target | met (median / p90) |",
        "|---|---|---|---|---|---|",
        _row(
            "1 new description: first token, client",
            new["client_first_token"],
            "< 1000 ms",
            _met(t_new["client"]),
        ),
        _row("1 new description: first token, worker", new["worker_first_token"]),
        _row("1 new description: adapter fetch (generate + stream + install)", new["adapter_fetch"]),
        _row("1 new description: apply", new["apply"]),
        _row("2 same description again: first token, client", again["client_first_token"]),
        _row("2 same description again: first token, worker", again["worker_first_token"]),
        _row("2 same description again: apply", again["apply"]),
        _row(
            f"3 switch between {switch['adapters_in_rotation']} resident adapters: apply",
            switch["apply"],
            "< 50 ms",
            _met(t_switch["apply"]),
        ),
        _row(
            "3 switch: first token, client",
            switch["client_first_token"],
            "(< 50 ms)",
            _met(t_switch["client_first_token"]),
        ),
        _row("3 switch: first token, worker", switch["worker_first_token"]),
        _row(
            "3 switch: request to Started (resolve + verify + apply), client",
            switch["client_started"],
            "(< 50 ms)",
            _met(t_switch["client_started"]),
        ),
        _row("base model, no adapter: first token, client", base["client_first_token"]),
        _row("base model, no adapter: first token, worker", base["worker_first_token"]),
        _row(
            "4 after worker restart: first request, first token, client",
            restart["first_request_after_restart"]["client_first_token"],
        ),
        _row(
            "4 after restart: every request, first token, client",
            restart["every_request_after_restart"]["client_first_token"],
        ),
        _row(
            "4 after restart: every request, first token, worker",
            restart["every_request_after_restart"]["worker_first_token"],
        ),
        _row("4 worker start to ready line", restart["worker_start_to_ready"]),
        _row("6 coordinator: new description, hypernetwork", gen["new_generation_seconds"]),
        _row("6 coordinator: new description, round trip", gen["new_client_round_trip"]),
        _row("6 coordinator: cached description, round trip", gen["cached_client_round_trip"]),
        "",
        f"4: {restart['every_request_after_restart']['resident']}/{restart['every_request_after_restart']['requests']}"
        f" requests after {restart['restarts']} restarts served from the worker's disk (resident, fetch 0 s); "
        f"coordinator bytes streamed meanwhile: {restart['coordinator_bytes_streamed_during']:.0f}, "
        f"generations: {restart['coordinator_generations_during']:.0f}",
        "",
        "| 5 FetchAdapter | payload bytes | median ms | p90 ms | MB/s (median) | raw fp32 adapter MB/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in result["fetch"]["runs"].items():
        lines.append(
            f"| {name} | {run['payload_bytes']} | {run['seconds']['median_ms']} | {run['seconds']['p90_ms']} | "
            f"{run['MB_per_s_median']} | {run['raw_adapter_MB_per_s_median']} |"
        )
    sizes = result["fetch"]["payload_bytes"]
    lines.append(f"\nadapter payload: fp16 {sizes['fp16']} bytes, fp32 {sizes['fp32']} bytes (raw adapter)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="new descriptions, and samples of every other figure")
    p.add_argument("--restarts", type=int, default=3, help="worker restarts in measurement 4")
    p.add_argument("--switch-adapters", type=int, default=4, help="resident adapters rotated through in 3 and 4")
    p.add_argument("--max-new-tokens", type=int, default=8, help="per request: only the first token is timed")
    p.add_argument("--base", default=DEFAULT_BASE, help="'smollm2' or a Hugging Face model directory")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_T2L)
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to get ready")
    args = p.parse_args()
    if args.repeats < 2 or args.restarts < 1 or not 2 <= args.switch_adapters <= args.repeats:
        p.error("need --repeats >= 2, --restarts >= 1 and 2 <= --switch-adapters <= --repeats")

    load_before = os.getloadavg()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loracast-bench-delivery-") as tmp:
        servers = Servers(args, Path(tmp))
        try:
            measured = run(args, servers)
        except BaseException:
            print(servers.logs(), file=sys.stderr)
            raise
        finally:
            servers.stop_all()
    new, switch = measured["new_description"], measured["switch_resident"]
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": args.base,
        "checkpoint": os.path.relpath(args.checkpoint.resolve(), REPO),
        "machine": _machine(),
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "setup": {
            "transport": "loopback, insecure gRPC; coordinator and worker as `loracast ... serve` processes",
            "worker": "hot-swap, adapters fetched as fp16, ONNX Runtime threads: one per core (default)",
            "prompt": PROMPT,
            "prompt_tokens": _prompt_tokens(args.base),
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "caches": "fresh temporary adapter caches for both servers; the default ONNX export cache",
        },
        "targets": {
            "new_adapter_first_token": _target(
                NEW_FIRST_TOKEN_TARGET_S,
                "client: what the user waits for, from sending the request to the first streamed token",
                client=new["client_first_token"],
                worker=new["worker_first_token"],
            ),
            "switch_resident": _target(
                SWITCH_TARGET_S,
                # A switch is what changes between adapters; the prefill after it costs the same with no adapter
                # (compare base_model), so first-token figures are reported against the target for context only.
                "apply: the worker's apply_seconds (hot-swap); client_started adds resolving and verifying it",
                apply=switch["apply"],
                client_started=switch["client_started"],
                client_first_token=switch["client_first_token"],
                worker_first_token=switch["worker_first_token"],
            ),
        },
        **measured,
        "server_exit_codes": servers.exit_codes,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "delivery.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{result['machine']['logical_cpus']} CPUs, 1-min load average before {load_before[0]:.2f}, "
        f"repeats {args.repeats}\n"
    )
    print(table(result))
    print(f"\nwrote {RESULTS / 'delivery.json'}")


if __name__ == "__main__":
    main()
