"""A fleet of 10,000 edge workers asking for 100,000 adapters, modelled on this repository's measured costs, and a
part of it run for real on loopback to check the model against measurement.

    nice -n 5 .venv/bin/python bench/sim_fleet.py [--workers 10000] [--zipf 1.0] [--loopback-workers 200]

The model (vectorized numpy, seconds): requests arrive as a Poisson stream at `--rate` requests/s, each from a
worker drawn uniformly. A request names (a) a description from a catalog, Zipf-popular, (b) a description never
asked before, or (c) a document from a catalog, Zipf-popular; the catalogs hold 100,000 adapters together. A
worker that holds the adapter answers at once (its cache does not evict at these sizes: checked); otherwise it asks
a coordinator, which finds the adapter in the shared store (a hit), waits for another coordinator's pass of the
same text (a claim waited on), or runs the pass (a miss). Costs, read from bench/results (never typed in here):

- a description's hypernetwork pass, and a cached description's round trip: delivery.json, `coordinator_generation`;
- adapter bytes on the wire (fp16) and in the store (fp32): delivery.json `fetch.payload_bytes`; the manifest's
  bytes: scaling.json's rank sweep at that size; a document's adapter: scaling.json's document sweep at
  `--document-tokens`;
- streaming: delivery.json `fetch.runs["fp16/default_256KiB"]` (loopback, both ends CPU-bound);
- a document's internalization: the default budget d2l_vs_cd.json scores (`lora_cast_seconds`, 60 s per 512
  tokens), a coordinator internalizing one document at a time.

A coordinator is the machine those were measured on (delivery.json `machine.usable_cpus` CPUs); coordinators
needed = busy seconds per second / `--utilization`. Redis memory: every adapter made in the run, fp32 payload plus
manifest; and the store's hit ratio under an LRU bound (Che's approximation, one-off descriptions included) for
the plot. Figures are over the second half of the run (the fleet warm), and the warm-up curve is plotted.

The loopback check runs `--loopback-coordinators` real coordinators (the real base model and the shipped T2L
checkpoint, so the costs are the ones measured above) sharing a real redis-server, and `--loopback-workers`
simulated workers (threads that hold what they fetched, as a worker's cache does) replaying a trace drawn by the
same model, descriptions only (a document costs a minute). Measured: hypernetwork passes, store hits and misses,
claims waited on, bytes per worker, coordinator CPU seconds per request; each against the model's figure for the
same trace.

Writes bench/results/sim_fleet.json and bench/results/sim_fleet.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
GB = 1e9


@dataclass(frozen=True)
class Costs:
    """What the model charges, each read from a benchmark result."""

    t2l_pass_s: float  # a description's hypernetwork pass on the coordinator
    cached_round_trip_s: float  # a description found in the store: GenerateFromDescription's round trip
    t2l_wire_bytes: int  # fp16, what a worker fetches
    t2l_store_bytes: int  # fp32 payload + manifest, what the store holds
    d2l_budget_s: float  # a document's internalization at the default budget
    d2l_wire_bytes: int
    d2l_store_bytes: int
    stream_bytes_per_s: float
    coordinator_cpus: int  # of the machine these were measured on: one coordinator
    sources: dict[str, str]


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def read_costs(document_tokens: int) -> Costs:
    delivery, scaling, d2l = _load("delivery.json"), _load("scaling.json"), _load("d2l_vs_cd.json")
    generation = delivery["coordinator_generation"]
    payload = delivery["fetch"]["payload_bytes"]
    # The manifest of the T2L adapter: the rank-sweep point of its size on the wire (fp16) that the worker
    # hot-swaps, as delivery.json's worker did.
    [t2l_point] = [p for p in scaling["rank_sweep"] if p["wire_bytes"] == payload["fp16"] and p["hot_swap"]]
    [doc_point] = [p for p in scaling["document_sweep"] if p["doc_tokens_target"] == document_tokens]
    manifest = t2l_point["manifest_bytes"]
    return Costs(
        t2l_pass_s=generation["new_generation_seconds"]["median_ms"] / 1000,
        cached_round_trip_s=generation["cached_client_round_trip"]["median_ms"] / 1000,
        t2l_wire_bytes=payload["fp16"],
        t2l_store_bytes=payload["fp32"] + manifest,
        d2l_budget_s=d2l["lora_cast_seconds"] * max(1.0, document_tokens / 512),
        d2l_wire_bytes=doc_point["wire_bytes"],
        d2l_store_bytes=2 * doc_point["wire_bytes"] + manifest,  # wire_bytes are fp16: the store keeps fp32
        stream_bytes_per_s=delivery["fetch"]["runs"]["fp16/default_256KiB"]["bytes_per_s_median"],
        coordinator_cpus=delivery["machine"]["usable_cpus"],
        sources={
            "t2l_pass_s": "delivery.json coordinator_generation.new_generation_seconds.median_ms",
            "cached_round_trip_s": "delivery.json coordinator_generation.cached_client_round_trip.median_ms",
            "t2l_wire_bytes": "delivery.json fetch.payload_bytes.fp16",
            "t2l_store_bytes": "delivery.json fetch.payload_bytes.fp32 + scaling.json rank_sweep manifest_bytes",
            "d2l_budget_s": "d2l_vs_cd.json lora_cast_seconds (the default budget, per 512 tokens)",
            "d2l_wire_bytes": f"scaling.json document_sweep[doc_tokens_target={document_tokens}].wire_bytes",
            "stream_bytes_per_s": "delivery.json fetch.runs['fp16/default_256KiB'].bytes_per_s_median",
            "coordinator_cpus": "delivery.json machine.usable_cpus",
        },
    )


@dataclass(frozen=True)
class Workload:
    workers: int = 10_000
    requests_per_worker: int = 20
    catalog_descriptions: int = 98_000
    catalog_documents: int = 2_000
    zipf: float = 1.0  # popularity of catalog rank k is proportional to k^-zipf
    share_new: float = 0.08  # requests naming a description never asked before
    share_documents: float = 0.02  # requests naming a document
    rate: float = 1000.0  # requests/s, the whole fleet
    seed: int = 0


@dataclass
class Trace:
    """Requests in arrival order: who asked, for which adapter (ids: catalog descriptions, then documents, then
    one-off descriptions), and when."""

    worker: np.ndarray
    adapter: np.ndarray
    document: np.ndarray  # bool
    time: np.ndarray


def zipf_weights(n: int, s: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    return weights / weights.sum()


def draw(w: Workload) -> Trace:
    rng = np.random.default_rng(w.seed)
    n = w.workers * w.requests_per_worker
    kind = rng.choice(3, size=n, p=[1 - w.share_new - w.share_documents, w.share_new, w.share_documents])
    adapter = np.empty(n, dtype=np.int64)
    described = kind == 0
    adapter[described] = rng.choice(
        w.catalog_descriptions, size=described.sum(), p=zipf_weights(w.catalog_descriptions, w.zipf)
    )
    documents = kind == 2
    if w.share_documents > 0:
        adapter[documents] = w.catalog_descriptions + rng.choice(
            w.catalog_documents, size=documents.sum(), p=zipf_weights(w.catalog_documents, w.zipf)
        )
    new = kind == 1
    adapter[new] = w.catalog_descriptions + w.catalog_documents + np.arange(new.sum())
    return Trace(
        worker=rng.integers(0, w.workers, size=n),
        adapter=adapter,
        document=documents,
        time=np.cumsum(rng.exponential(1 / w.rate, size=n)),
    )


def replay(trace: Trace, costs: Costs, warm_from: float = 0.5, utilization: float = 0.7) -> dict[str, Any]:
    """What the fleet does with `trace`: worker and store outcomes, bytes, hypernetwork and coordinator seconds,
    Redis memory. Rates and ratios are over the requests from `warm_from` of the run on."""
    n = len(trace.adapter)
    # A worker asks a coordinator the first time it wants an adapter; later it holds it.
    pair = trace.worker * (trace.adapter.max() + 1) + trace.adapter
    _, first_of_pair = np.unique(pair, return_index=True)
    asks = np.zeros(n, dtype=bool)
    asks[first_of_pair] = True
    # The cluster makes an adapter the first time any worker asks; asks during that pass wait on its claim.
    _, first_of_adapter = np.unique(trace.adapter, return_index=True)
    made = np.zeros(n, dtype=bool)
    made[first_of_adapter] = True
    pass_s = np.where(trace.document, costs.d2l_budget_s, costs.t2l_pass_s)
    first_time = np.full(trace.adapter.max() + 1, np.inf)
    first_time[trace.adapter[first_of_adapter]] = trace.time[first_of_adapter]
    waits = asks & ~made & (trace.time - first_time[trace.adapter] < pass_s)
    hits = asks & ~made & ~waits
    wire = np.where(trace.document, costs.d2l_wire_bytes, costs.t2l_wire_bytes)
    stored = np.where(trace.document, costs.d2l_store_bytes, costs.t2l_store_bytes)

    # Coordinator busy seconds: a pass, or a store round trip; then the stream. A claim's wait costs no CPU.
    stream_s = wire / costs.stream_bytes_per_s
    busy = np.where(made & ~trace.document, costs.t2l_pass_s, costs.cached_round_trip_s) * asks + stream_s * asks
    document_busy = np.where(made & trace.document, costs.d2l_budget_s, 0.0)

    warm = np.arange(n) >= int(warm_from * n)
    span = trace.time[warm][-1] - trace.time[warm][0]
    rate = warm.sum() / span
    lookups = asks[warm].sum()
    per_worker = np.bincount(trace.worker[asks], weights=wire[asks])
    requests_per_worker = np.bincount(trace.worker)

    def per_1000(seconds: np.ndarray) -> float:
        return float(seconds[warm].sum() / span / rate * 1000 / utilization)

    return {
        "requests": int(n),
        "warm_requests": int(warm.sum()),
        "rate_per_s": round(float(rate), 1),
        "distinct_adapters": int(made.sum()),
        "worker_hit_ratio": round(float(1 - asks[warm].mean()), 4),
        "coordinator_lookups": int(asks.sum()),
        "store_hit_ratio": round(float(hits[warm].sum() / lookups), 4),
        "claims_waited_share": round(float(waits[warm].sum() / lookups), 5),
        "passes": {
            "descriptions": int((made & ~trace.document).sum()),
            "documents": int((made & trace.document).sum()),
        },
        "counts": {"hits": int(hits.sum()), "misses": int(made.sum()), "claims_waited": int(waits.sum())},
        "hypernetwork_s_per_adapter": {"description": costs.t2l_pass_s, "document": costs.d2l_budget_s},
        "hypernetwork_s_per_request": round(float((made * pass_s)[warm].sum() / warm.sum()), 5),
        "bytes_per_worker": {
            "mean": round(float(per_worker.mean())),
            "p99": round(float(np.percentile(per_worker, 99))),
            "max": round(float(per_worker.max())),
            "requests_per_worker_max": int(requests_per_worker.max()),
        },
        "coordinators_per_1000_rps": {
            "descriptions": round(per_1000(busy), 3),
            "documents": round(per_1000(document_busy), 1),
            "utilization": utilization,
        },
        "redis_bytes": int(stored[first_of_adapter].sum()),
    }


def lru_hit_ratio(w: Workload, costs: Costs, capacity_bytes: np.ndarray) -> np.ndarray:
    """The store's steady hit ratio under an LRU bound of `capacity_bytes`, by Che's approximation: an adapter
    stays for the characteristic time T after its last use, T set so that what is held fills the bound; one-off
    descriptions take room for T each and are never hit."""
    p_desc = (1 - w.share_new - w.share_documents) * zipf_weights(w.catalog_descriptions, w.zipf)
    p_doc = w.share_documents * zipf_weights(w.catalog_documents, w.zipf)
    p = np.concatenate([p_desc, p_doc]) * w.rate
    size = np.concatenate([np.full(len(p_desc), costs.t2l_store_bytes), np.full(len(p_doc), costs.d2l_store_bytes)])
    new_rate = w.share_new * w.rate

    def held(t: float) -> float:
        return float((size * -np.expm1(-p * t)).sum() + new_rate * t * costs.t2l_store_bytes)

    ratios = []
    for capacity in capacity_bytes:
        lo, hi = 0.0, 1.0
        while held(hi) < capacity and hi < 1e12:
            hi *= 2
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if held(mid) < capacity else (lo, mid)
        ratios.append(float((p * -np.expm1(-p * lo)).sum() / w.rate))
    return np.array(ratios)


def warmup_curve(trace: Trace, points: int = 60) -> tuple[list[int], list[float]]:
    """The store hit ratio of coordinator lookups (waits count as misses) cumulated over the run."""
    pair = trace.worker * (trace.adapter.max() + 1) + trace.adapter
    asks = np.zeros(len(pair), dtype=bool)
    asks[np.unique(pair, return_index=True)[1]] = True
    made = np.zeros(len(pair), dtype=bool)
    made[np.unique(trace.adapter, return_index=True)[1]] = True
    hits = np.cumsum(asks & ~made)
    lookups = np.cumsum(asks)
    at = np.unique(np.geomspace(1000, len(pair), points).astype(int)) - 1
    return [int(i + 1) for i in at], [round(float(hits[i] / lookups[i]), 4) for i in at]


# ---------------------------------------------------------------------------------------------------------
# The loopback check: real coordinators and Redis, simulated workers
# ---------------------------------------------------------------------------------------------------------

COUNTERS = {
    "loracast_store_requests_total": "result",
    "loracast_store_claim_waits_total": None,
    "loracast_adapter_make_seconds_count": None,
    "loracast_adapter_bytes_streamed_total": None,
}


def _scrape(metrics_port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in COUNTERS:
                label = COUNTERS[sample.name]
                name = f"{sample.name}:{sample.labels[label]}" if label else sample.name
                found[name] = found.get(name, 0.0) + sample.value
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cluster(coordinators: int, work: Path) -> Iterator[list[Any]]:
    """A redis-server and `coordinators` coordinators sharing it, on loopback; (process, grpc, metrics port)."""
    from hypernet.checkpoint import DEFAULT_T2L
    from loracast.paths import DEFAULT_BASE
    from loracast_cli.launch import ServerProcess, coordinator_argv

    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("sim_fleet: redis-server is missing: run deploy/system-packages.sh (or apt-get install redis-server)")
    started: list[ServerProcess] = []
    try:
        port = _free_port()
        redis = ServerProcess("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""], work)
        started.append(redis)
        redis.wait_for_line(r".* Ready to accept connections.*", 60)
        servers = []
        for i in range(coordinators):
            argv = coordinator_argv(
                listen="127.0.0.1:0",
                metrics_port=0,
                cache_dir=str(work / f"coordinator-{i}"),
                base=DEFAULT_BASE,
                checkpoint=str(DEFAULT_T2L),
            )
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            process = ServerProcess.loracast(
                f"coordinator-{i}", [*argv, "--store", f"redis://127.0.0.1:{port}/0"], work, env
            )
            started.append(process)
            servers.append(process)
        # Minutes on a loaded machine: loading the base model and the hypernetwork.
        yield [(p, (line := p.wait_ready("coordinator", 1200))["grpc"], int(line["metrics"])) for p in servers]
        for process in reversed(started):
            process.terminate()
    finally:
        for process in started:
            process.kill()


def loopback(w: Workload, costs: Costs, coordinators: int, threads: int) -> dict[str, Any]:
    """Replay a trace of `w` (descriptions only) against a real cluster; the model's figures for the same trace."""
    import grpc
    import psutil
    from tqdm import tqdm

    from loracast.grpc_errors import RETRY_AFTER_MS
    from loracast.grpc_security import open_channel
    from loracast.v1 import loracast_pb2 as pb
    from loracast.v1 import loracast_pb2_grpc as pb_grpc
    from worker.coordinator_client import SERVICE_CONFIG, channel_target

    trace = draw(w)
    received = np.zeros(w.workers)
    fetched = np.zeros(len(trace.adapter), dtype=bool)
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="sim-fleet-") as tmp, cluster(coordinators, Path(tmp)) as servers:
        target = channel_target(",".join(address for _, address, _ in servers))
        channel = open_channel(target, options=[("grpc.service_config", SERVICE_CONFIG)])
        stub = pb_grpc.CoordinatorStub(channel)

        refusals = 0

        def one(text: str) -> int:
            """GenerateFromDescription, then FetchAdapter, as a worker does; a refusal for load is retried after
            the coordinator's `retry-after-ms`, as the worker's callers are told to."""
            nonlocal refusals
            request = pb.GenerateFromDescriptionRequest(description=text, dtype=pb.FLOAT16)
            while True:
                try:
                    manifest = stub.GenerateFromDescription(request, timeout=300).manifest
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    with lock:
                        refusals += 1
                    time.sleep(int(dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_MS, "100")) / 1000)
            fetch = pb.FetchAdapterRequest(adapter_id=manifest.adapter_id, dtype=pb.FLOAT16)
            return sum(len(c.data.data) for c in stub.FetchAdapter(fetch, timeout=300) if c.HasField("data"))

        # Warm-up: each coordinator's first pass pays for lazy initialisation; not part of the trace's counts.
        for i in range(2 * coordinators):
            one(f"Warm-up task {i}: repeat the input.")
        before = [_scrape(m) for _, _, m in servers]
        cpu_before = sum(sum(psutil.Process(p.proc.pid).cpu_times()[:2]) for p, _, _ in servers)
        progress = tqdm(total=len(trace.adapter), desc="loopback requests", unit="req")
        order = np.arange(len(trace.adapter))

        def worker_thread(lane: int) -> None:
            held: set[tuple[int, int]] = set()
            for i in order[trace.worker % threads == lane]:
                worker, adapter = int(trace.worker[i]), int(trace.adapter[i])
                if (worker, adapter) not in held:
                    size = one(f"Fleet task {adapter}: answer the question in the style numbered {adapter}.")
                    held.add((worker, adapter))
                    with lock:
                        received[worker] += size
                        fetched[i] = True
                progress.update()

        start = time.perf_counter()
        with futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker_thread, range(threads)))
        wall = time.perf_counter() - start
        progress.close()
        cpu = sum(sum(psutil.Process(p.proc.pid).cpu_times()[:2]) for p, _, _ in servers) - cpu_before
        after = [_scrape(m) for _, _, m in servers]
        channel.close()
    delta = {k: sum(a.get(k, 0.0) - b.get(k, 0.0) for a, b in zip(after, before, strict=True)) for k in after[0]}
    hits, misses = delta["loracast_store_requests_total:hit"], delta["loracast_store_requests_total:miss"]
    lookups = int(fetched.sum())
    measured = {
        "wall_s": round(wall, 2),
        "refused_and_retried": refusals,
        "lookups_per_s": round(lookups / wall, 1),
        "coordinator_lookups": lookups,
        "passes": int(delta["loracast_adapter_make_seconds_count"]),
        "store_hits": int(hits),
        "store_misses": int(misses),
        "store_hit_ratio": round(hits / (hits + misses), 4),
        "claims_waited": int(delta["loracast_store_claim_waits_total"]),
        "bytes_per_worker_mean": round(float(received.mean())),
        "coordinator_cpu_s_per_lookup": round(cpu / lookups, 5),
        "coordinator_busy_s_per_lookup": round(cpu / lookups / costs.coordinator_cpus, 5),
    }
    # The model on the same trace, its clock the measured pace.
    paced = Trace(trace.worker, trace.adapter, trace.document, trace.time * (wall / trace.time[-1]))
    model = replay(paced, costs, warm_from=0.0)
    busy = costs.t2l_pass_s * model["distinct_adapters"] + costs.cached_round_trip_s * (
        lookups - model["distinct_adapters"]
    )
    busy += lookups * costs.t2l_wire_bytes / costs.stream_bytes_per_s
    predicted = {
        "coordinator_lookups": model["coordinator_lookups"],
        "passes": model["distinct_adapters"],
        "store_hits": model["counts"]["hits"],
        "store_misses": model["counts"]["misses"] + model["counts"]["claims_waited"],
        "store_hit_ratio": model["store_hit_ratio"],
        "claims_waited": model["counts"]["claims_waited"],
        "bytes_per_worker_mean": model["bytes_per_worker"]["mean"],
        "coordinator_busy_s_per_lookup": round(busy / lookups, 5),
    }
    return {
        "workload": asdict(w),
        "coordinators": coordinators,
        "client_threads": threads,
        "store": "redis (a real redis-server on loopback)",
        "measured": measured,
        "model": predicted,
        "busy_measured_over_model": round(
            measured["coordinator_busy_s_per_lookup"] / predicted["coordinator_busy_s_per_lookup"], 2
        ),
    }


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

ASSUMPTIONS = """Assumptions
- {workers:,} workers, {requests_per_worker} requests each, uniformly; Poisson arrivals at {rate:,.0f} requests/s
- 100,000 adapters: {catalog_descriptions:,} descriptions + {catalog_documents:,} documents,
  Zipf popularity, exponent {zipf} (plots: 0.8 / 1.0 / 1.2)
- mix: {share_catalog:.0%} catalog descriptions, {share_new:.0%} new descriptions (one-off),
  {share_documents:.0%} documents ({document_tokens} tokens)
- worker caches keep all they fetch (at most {worker_max_mb:.0f} MB each here; workers hold 512 MB)
- costs read from bench/results: T2L pass {t2l_ms:.1f} ms, store hit round trip {hit_ms:.2f} ms,
  adapter {t2l_mb:.2f} MB fp16 on the wire / {store_mb:.2f} MB fp32 in Redis,
  streaming {stream_mb:.0f} MB/s, document {d2l_s:.0f} s (default budget), {doc_mb:.1f} MB
- a coordinator = the {cpus}-CPU machine measured, at {utilization:.0%} utilization;
  one document internalized at a time per coordinator
- Redis: fp32 payload + manifest per adapter; LRU curve by Che's approximation
- loopback: {loop_coord} real coordinators + redis-server, {loop_workers} simulated workers,
  descriptions only; coordinator busy measured/model: {calibration}"""


def plot(path: Path, runs: dict[str, Any], curves: dict[str, Any], lru: dict[str, Any], notes: str) -> None:
    from loracast.plots import figure

    with figure(path, 2, 2, figsize=(13, 9)) as axes:
        warm, bound, coordinators, text = axes.flat
        for zipf, (x, y) in curves.items():
            warm.plot(x, y, label=f"Zipf {zipf}")
        if "loopback" in runs:
            measured = runs["loopback"]["measured"]
            n = runs["loopback"]["workload"]["workers"] * runs["loopback"]["workload"]["requests_per_worker"]
            warm.scatter([n], [measured["store_hit_ratio"]], color="black", zorder=3, label="loopback, measured")
            warm.scatter(
                [n],
                [runs["loopback"]["model"]["store_hit_ratio"]],
                marker="x",
                color="red",
                zorder=3,
                label="loopback, model",
            )
        warm.set(
            xscale="log",
            xlabel="requests so far (fleet)",
            ylabel="store hit ratio (cumulative)",
            title="Fleet warm-up: shared store hit ratio",
            ylim=(0, 1),
        )
        warm.legend()
        for zipf, (mb, ratio) in lru.items():
            bound.plot(mb, ratio, label=f"Zipf {zipf}")
        bound.set(
            xscale="log",
            xlabel="Redis store bound (MB)",
            ylabel="steady store hit ratio (LRU)",
            title="Hit ratio against Redis memory",
            ylim=(0, 1),
        )
        bound.legend()
        zipfs = sorted(runs["by_zipf"])
        desc = [runs["by_zipf"][z]["coordinators_per_1000_rps"]["descriptions"] for z in zipfs]
        docs = [runs["by_zipf"][z]["coordinators_per_1000_rps"]["documents"] for z in zipfs]
        coordinators.plot([float(z) for z in zipfs], desc, marker="o", label="descriptions (T2L)")
        coordinators.plot([float(z) for z in zipfs], docs, marker="s", label="documents (D2L, CPU, default budget)")
        coordinators.set(
            yscale="log",
            xlabel="Zipf exponent",
            ylabel="coordinators per 1,000 requests/s",
            title="Coordinators needed (warm fleet)",
        )
        coordinators.legend()
        text.axis("off")
        text.text(0, 1, notes, va="top", ha="left", family="monospace", fontsize=8.5)


def table(result: dict[str, Any]) -> str:
    fleet = result["fleet"]
    per_adapter = fleet["hypernetwork_s_per_adapter"]
    rows = [
        ("store hit ratio (coordinator lookups, warm)", f"{fleet['store_hit_ratio']:.1%}"),
        ("worker-resident share of requests (warm)", f"{fleet['worker_hit_ratio']:.1%}"),
        ("claims waited on (share of lookups)", f"{fleet['claims_waited_share']:.2%}"),
        (
            "hypernetwork s per adapter: description / document",
            f"{per_adapter['description'] * 1000:.1f} ms / {per_adapter['document']:.0f} s",
        ),
        ("hypernetwork s per request (warm)", f"{fleet['hypernetwork_s_per_request']:.3f} s"),
        (
            "bytes per worker: mean / p99",
            f"{fleet['bytes_per_worker']['mean'] / 1e6:.1f} MB / {fleet['bytes_per_worker']['p99'] / 1e6:.1f} MB",
        ),
        (
            "coordinators per 1,000 requests/s: descriptions",
            f"{fleet['coordinators_per_1000_rps']['descriptions']:.2f}",
        ),
        (
            "coordinators per 1,000 requests/s: documents (CPU)",
            f"{fleet['coordinators_per_1000_rps']['documents']:.0f}",
        ),
        ("Redis memory, every adapter of the run", f"{fleet['redis_bytes'] / GB:.1f} GB"),
        (
            f"steady store hit ratio with a {fleet['redis_bound_mb']:.0f} MB Redis bound (LRU)",
            f"{fleet['store_hit_ratio_at_bound']:.1%}",
        ),
    ]
    if "loopback" in result:
        m, p = result["loopback"]["measured"], result["loopback"]["model"]
        rows += [
            ("loopback: passes, measured / model", f"{m['passes']} / {p['passes']}"),
            ("loopback: store hit ratio, measured / model", f"{m['store_hit_ratio']:.1%} / {p['store_hit_ratio']:.1%}"),
            (
                "loopback: coordinator busy ms per lookup, measured / model",
                f"{m['coordinator_busy_s_per_lookup'] * 1000:.1f} / {p['coordinator_busy_s_per_lookup'] * 1000:.1f}",
            ),
        ]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = Workload()
    ap.add_argument("--workers", type=int, default=default.workers)
    ap.add_argument("--requests-per-worker", type=int, default=default.requests_per_worker)
    ap.add_argument("--zipf", type=float, default=default.zipf, help="popularity exponent of the headline figures")
    ap.add_argument("--rate", type=float, default=default.rate, help="fleet requests/s")
    ap.add_argument("--share-new", type=float, default=default.share_new)
    ap.add_argument("--share-documents", type=float, default=default.share_documents)
    ap.add_argument("--document-tokens", type=int, default=512, help="a document's length (scaling.json's points)")
    ap.add_argument("--redis-bound-mb", type=float, default=2048, help="the store bound deploy/k8s gives")
    ap.add_argument("--utilization", type=float, default=0.7, help="of a coordinator, when sizing the fleet")
    ap.add_argument("--loopback-workers", type=int, default=200, help="0: no loopback run")
    ap.add_argument("--loopback-requests-per-worker", type=int, default=4)
    ap.add_argument("--loopback-catalog", type=int, default=1000, help="descriptions in the loopback's catalog")
    ap.add_argument("--loopback-coordinators", type=int, default=2)
    ap.add_argument("--loopback-threads", type=int, default=8, help="simulated workers' requests in flight at once")
    ap.add_argument("--json", type=Path, default=RESULTS / "sim_fleet.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "sim_fleet.png")
    args = ap.parse_args()

    started = time.perf_counter()
    costs = read_costs(args.document_tokens)
    workload = Workload(
        workers=args.workers,
        requests_per_worker=args.requests_per_worker,
        zipf=args.zipf,
        rate=args.rate,
        share_new=args.share_new,
        share_documents=args.share_documents,
    )
    by_zipf, curves, lru = {}, {}, {}
    bounds_mb = np.geomspace(64, 262_144, 25)
    for zipf in sorted({0.8, 1.0, 1.2, args.zipf}):
        w = Workload(**{**asdict(workload), "zipf": zipf})
        trace = draw(w)
        by_zipf[str(zipf)] = replay(trace, costs, utilization=args.utilization)
        curves[str(zipf)] = warmup_curve(trace)
        lru[str(zipf)] = (bounds_mb.round(1).tolist(), lru_hit_ratio(w, costs, bounds_mb * 1e6).round(4).tolist())
    fleet = by_zipf[str(args.zipf)]
    [fleet["store_hit_ratio_at_bound"]] = lru_hit_ratio(workload, costs, np.array([args.redis_bound_mb * 1e6])).round(4)
    fleet["redis_bound_mb"] = args.redis_bound_mb
    model_s = time.perf_counter() - started
    worker_mb = fleet["bytes_per_worker"]["max"] / 1e6
    assert worker_mb < 512, "a worker would evict: the model assumes it keeps what it fetched"

    result: dict[str, Any] = {
        "command": " ".join(["python", "bench/sim_fleet.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workload": asdict(workload),
        "document_tokens": args.document_tokens,
        "costs": asdict(costs),
        "fleet": fleet,
        "by_zipf": by_zipf,
        "warmup_curves": {z: {"requests": x, "store_hit_ratio": y} for z, (x, y) in curves.items()},
        "lru_hit_ratio": {z: {"bound_mb": x, "store_hit_ratio": y} for z, (x, y) in lru.items()},
        "model_seconds": round(model_s, 2),
    }
    if args.loopback_workers:
        small = Workload(
            workers=args.loopback_workers,
            requests_per_worker=args.loopback_requests_per_worker,
            catalog_descriptions=args.loopback_catalog,
            catalog_documents=0,
            zipf=args.zipf,
            share_new=args.share_new,
            share_documents=0.0,
        )
        result["loopback"] = loopback(small, costs, args.loopback_coordinators, args.loopback_threads)
    notes = ASSUMPTIONS.format(
        **asdict(workload),
        share_catalog=1 - workload.share_new - workload.share_documents,
        document_tokens=args.document_tokens,
        worker_max_mb=worker_mb,
        t2l_ms=costs.t2l_pass_s * 1000,
        hit_ms=costs.cached_round_trip_s * 1000,
        t2l_mb=costs.t2l_wire_bytes / 1e6,
        store_mb=costs.t2l_store_bytes / 1e6,
        stream_mb=costs.stream_bytes_per_s / 1e6,
        d2l_s=costs.d2l_budget_s,
        doc_mb=costs.d2l_wire_bytes / 1e6,
        cpus=costs.coordinator_cpus,
        utilization=args.utilization,
        loop_coord=args.loopback_coordinators,
        loop_workers=args.loopback_workers,
        calibration=f"{result['loopback']['busy_measured_over_model']}x" if "loopback" in result else "not run",
    )
    result["assumptions"] = notes
    plot(
        args.plot,
        {"by_zipf": by_zipf, **({"loopback": result["loopback"]} if "loopback" in result else {})},
        curves,
        lru,
        notes,
    )
    result["table"] = table(result)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    from loracast.paths import write_json

    write_json(result, args.json)
    print(result["table"])
    print(f"model: {model_s:.1f} s; wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
