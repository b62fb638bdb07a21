"""Load: 32 edge clients at once on one coordinator and two workers, all real processes on loopback with the tiny
random Llama. Every request must end answered, or refused with RESOURCE_EXHAUSTED and a retry-after hint: none
lost, none hung (every call has a deadline, and the whole run one more).

The 128 requests name their adapter by task description, by document (Doc-to-LoRA) or by the id of an adapter
the coordinator has cached but no worker holds yet. Two answer slots per worker and two pass slots on the coordinator
make refusals certain; a client honours a refusal's hint and tries again, a bounded number of times, as the SDK's
callers are told to. The workers' own per-RPC counters must account for exactly the calls the clients saw.

The numbers (answered / refused, latency percentiles) are printed (`pytest -s`), recorded as test properties
(`--junitxml`) and written to load.json in the test's tmp directory.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from support import D2L_DOCS, STARTUP_S, Server, launch_coordinator, launch_worker, ready, scrape

from edge_client.client import Answer, EdgeClient, EdgeError
from loracast.grpc_security import open_channel
from loracast.grpc_server import wait_until_serving
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc

CLIENTS, REQUESTS_PER_CLIENT = 32, 4
ATTEMPTS = 8  # per request: the first call and up to seven more after refusals
CALL_DEADLINE = 120.0  # one Generate call: a tiny-model answer takes well under a second, starved ones 30 s
RUN_DEADLINE = 300.0  # the whole run: under a minute even on a starved machine
NEW_TOKENS = 4
PROMPT = "[1, 2, 3]"
TASKS = ("Reverse the given list.", "Write the word in capitals.", "Classify the sentiment as positive or negative.")
CACHED_TASK = "Sort the numbers in ascending order."  # made before the load: its id is asked for by id
DOCUMENTS = tuple(doc.text.encode() for doc in D2L_DOCS)


def make_adapter(coordinator: Server, description: str) -> str:
    """Has the coordinator make (and cache) the adapter of a description, no worker involved; its id."""
    with open_channel(coordinator.address) as channel:
        wait_until_serving(channel, STARTUP_S)
        request = pb.GenerateFromDescriptionRequest(description=description)
        response = pb_grpc.CoordinatorStub(channel).GenerateFromDescription(request, timeout=CALL_DEADLINE)
    return response.manifest.adapter_id


@pytest.fixture(scope="module")
def load_system(
    tiny_base_dir: Path, tiny_t2l: Path, tiny_d2l: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, list[Server], str]]:
    """One coordinator, two workers; and the id of an adapter the coordinator has cached and no worker holds."""
    root = tmp_path_factory.mktemp("load")
    launched = [
        launch_coordinator(
            root, "coordinator", cache_dir=root / "coordinator", base_dir=tiny_base_dir, t2l=tiny_t2l, d2l=tiny_d2l
        )
    ]
    try:
        coordinator = ready(launched[0], "coordinator")
        for i in range(2):  # both start at once
            command = dict(model_dir=model_dir, base_dir=tiny_base_dir, coordinator=coordinator.address)
            launched.append(launch_worker(root, f"worker-{i}", cache_dir=root / f"worker-{i}", **command))
        workers = [ready(process, "worker") for process in launched[1:]]
        yield coordinator, workers, make_adapter(coordinator, CACHED_TASK)
    finally:
        for process in launched:
            process.kill()


# ---------------------------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: its attempts (status, seconds), and the answer or the last error."""

    kind: str  # "task", "document" or "adapter_id": the EdgeClient.ask keyword
    source: int  # which task, document or id
    attempts: list[tuple[str, float]] = field(default_factory=list)
    refusals: list[EdgeError] = field(default_factory=list)  # the RESOURCE_EXHAUSTED calls among them
    answer: Answer | None = None
    error: EdgeError | None = None
    seconds: float = 0.0  # from the first call to the last answer or error, backoff included

    @property
    def result(self) -> str:
        if self.answer is not None:
            return "answered"
        if self.error is not None and self.error.code == "RESOURCE_EXHAUSTED" and self.error.retry_after_ms:
            return "refused"
        return "failed"


def plan(cached_id: str) -> list[list[tuple[str, int, str | bytes]]]:
    """Each client's requests (kind, source index, source), the kinds interleaved across clients."""
    sources = {"task": TASKS, "document": DOCUMENTS, "adapter_id": (cached_id,)}
    kinds = list(sources)
    requests = []
    for i in range(CLIENTS * REQUESTS_PER_CLIENT):
        kind = kinds[i % len(kinds)]
        index = (i // len(kinds)) % len(sources[kind])
        requests.append((kind, index, sources[kind][index]))
    return [requests[c::CLIENTS] for c in range(CLIENTS)]


def _request(client: EdgeClient, kind: str, index: int, source: str | bytes, rng: random.Random) -> Outcome:
    outcome = Outcome(kind, index)
    start = time.perf_counter()
    for _ in range(ATTEMPTS):
        called = time.perf_counter()
        try:
            outcome.answer = client.ask(PROMPT, max_new_tokens=NEW_TOKENS, timeout=CALL_DEADLINE, **{kind: source})
        except EdgeError as exc:
            outcome.attempts.append((exc.code, time.perf_counter() - called))
            outcome.error = exc
            if outcome.result != "refused":
                break
            outcome.refusals.append(exc)
            if len(outcome.attempts) == ATTEMPTS:
                break
            # The client's backoff the refusal asked for (jittered, so refused clients do not return in step).
            time.sleep(exc.retry_after_ms / 1000 * (1 + rng.random()))
        else:
            outcome.attempts.append(("OK", time.perf_counter() - called))
            outcome.error = None
            break
    outcome.seconds = time.perf_counter() - start
    return outcome


def _client(
    target: str, requests: list[tuple[str, int, str | bytes]], seed: int, go: threading.Barrier
) -> list[Outcome]:
    rng = random.Random(seed)
    with EdgeClient(target) as client:
        go.wait(CALL_DEADLINE)  # all clients start together
        return [_request(client, kind, index, source, rng) for kind, index, source in requests]


def _refuser(refusal: EdgeError) -> str:
    return "coordinator" if refusal.message.startswith("coordinator: ") else "worker"


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4)}


def _generate_codes(workers: list[Server]) -> Counter:
    """The workers' Generate calls by status code, from their own /metrics."""
    codes: Counter = Counter()
    for worker in workers:
        for s in scrape(worker):
            if s.name == "loracast_rpc_total" and s.labels["method"] == "Generate":
                codes[s.labels["code"]] += s.value
    return codes


def test_32_clients_are_each_answered_or_refused_with_a_retry_hint(load_system, tmp_path, record_property):
    _, workers, cached_id = load_system
    requests = plan(cached_id)
    before = _generate_codes(workers)
    go = threading.Barrier(CLIENTS)
    pool = futures.ThreadPoolExecutor(CLIENTS)
    started = time.perf_counter()
    jobs = [pool.submit(_client, workers[c % 2].address, requests[c], c, go) for c in range(CLIENTS)]
    hung = futures.wait(jobs, timeout=RUN_DEADLINE).not_done
    pool.shutdown(wait=not hung, cancel_futures=True)  # a hung client must not hang the test too
    wall = time.perf_counter() - started
    assert not hung, f"{len(hung)} of {CLIENTS} clients still waiting after {RUN_DEADLINE:.0f} s"
    outcomes = [outcome for job in jobs for outcome in job.result()]

    results = Counter(o.result for o in outcomes)
    attempts = Counter(code for o in outcomes for code, _ in o.attempts)
    answered = [o for o in outcomes if o.answer is not None]
    report = {
        "clients": CLIENTS,
        "requests": len(outcomes),
        "answered": results["answered"],
        "refused": results["refused"],
        "failed": results["failed"],
        "calls": dict(attempts),
        # The worker's own refusals, and the coordinator's passed on ("coordinator: ..."), each with its hint.
        "refused_calls_by": dict(Counter(_refuser(e) for o in outcomes for e in o.refusals)),
        "retry_after_ms": sorted({e.retry_after_ms for o in outcomes for e in o.refusals}),
        "answered_by_kind": dict(Counter(o.kind for o in answered)),
        "call_seconds": _percentiles([s for o in outcomes for code, s in o.attempts if code == "OK"]),
        "request_seconds": _percentiles([o.seconds for o in answered]),
        "first_token_seconds": _percentiles([o.answer.timings.first_token_seconds for o in answered]),
        "wall_seconds": round(wall, 2),
    }
    (tmp_path / "load.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        record_property(key, value)
    print(f"\nload: {json.dumps(report)}\n(written to {tmp_path / 'load.json'})")

    failed = [(o.kind, o.source, o.error) for o in outcomes if o.result == "failed"]
    assert failed == [], "requests neither answered nor refused with a retry hint"
    assert len(outcomes) == CLIENTS * REQUESTS_PER_CLIENT == results["answered"] + results["refused"]
    assert set(attempts) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert attempts["RESOURCE_EXHAUSTED"] > 0, "32 clients on 4 generation slots were never refused: no load"
    assert set(report["answered_by_kind"]) == {"task", "document", "adapter_id"}

    # Under load every answer is still the right one: one adapter and one greedy text per source, on both workers.
    by_source: dict[tuple[str, int], set[tuple[str, str]]] = {}
    for o in answered:
        assert o.answer.tokens >= 1 and o.answer.adapter_id
        by_source.setdefault((o.kind, o.source), set()).add((o.answer.adapter_id, o.answer.text))
    assert {key: len(seen) for key, seen in by_source.items()} == dict.fromkeys(by_source, 1)
    [(by_id, _)] = by_source["adapter_id", 0]
    assert by_id == cached_id

    # The workers counted exactly the calls the clients saw: nothing lost in between.
    after = _generate_codes(workers)
    assert {code: after[code] - before[code] for code in after if after[code] != before[code]} == dict(attempts)
