"""A cluster on loopback: 3 coordinators sharing 1 Redis, 6 workers each given all 3 coordinators, 24 clients.

600 requests over 150 distinct descriptions (each asked 4 times, by clients that ask it at about the same moment
through different workers, so different coordinators see it at once) must cost exactly 150 hypernetwork passes
cluster-wide, while one coordinator is SIGKILLed mid-run and Redis is restarted mid-run. Every request ends
answered, or refused with RESOURCE_EXHAUSTED (and a retry hint, which the client honours a bounded number of times);
every adapter is fetched back and verified (size, SHA-256, content id).

Real processes where they prove something: the coordinator that is killed, and redis-server. The other two
coordinators and the workers run in this process on loopback, as tests/test_coordinator.py and tests/test_worker.py
run theirs. The figures observed (passes, claim waits, p50/p99) are printed (`pytest -s`) and recorded as test
properties (`--junitxml`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from support import STARTUP_S, Recorder, RedisServer, Server, loopback_worker, ready

from coordinator.redis_store import WRITES
from coordinator.server import CoordinatorConfig
from coordinator.server import start as start_coordinator
from edge_client.client import Answer, EdgeClient, EdgeError
from loracast import adapter_wire
from loracast.errors import ConfigError
from loracast.grpc_security import open_channel
from loracast.grpc_server import wait_until_serving
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from loracast_cli.launch import ServerProcess, coordinator_argv
from worker import server as worker_server
from worker.coordinator_client import channel_target

COORDINATORS, WORKERS, CLIENTS = 3, 6, 24
DESCRIPTIONS, ASKS = 150, 4  # 600 requests
KILL_AFTER, RESTART_REDIS_AFTER = 150, 300  # answers before the coordinator process is killed / Redis restarted
ATTEMPTS = 60  # per request: the first call and more after refusals (a dead coordinator's claims last 5 s)
CALL_DEADLINE = 60.0
RUN_DEADLINE = 300.0  # the whole run; well under a minute on an idle 2-core machine
PASSES_IN_FLIGHT = 8  # per coordinator: a wait for another coordinator's pass holds one


def _descriptions() -> list[str]:
    return [f"Task {i}: answer every question with the number {i}." for i in range(DESCRIPTIONS)]


def _plan(rng: random.Random) -> list[str]:
    """The requests in the order clients take them: a description's asks side by side, so that they run at once."""
    order = _descriptions()
    rng.shuffle(order)
    return [description for description in order for _ in range(ASKS)]


class Run:
    """The shared queue of requests, what came of each, and the moments the faults are injected."""

    def __init__(self, requests: list[str]) -> None:
        self.requests = list(reversed(requests))
        self.lock = threading.Condition()
        self.answered: list[tuple[str, Answer, float]] = []  # description, answer, seconds (backoff included)
        self.refused: list[tuple[str, EdgeError]] = []  # requests refused on every attempt
        self.failed: list[tuple[str, EdgeError]] = []
        self.refusals = 0  # refused calls, retried or not

    def take(self) -> str | None:
        with self.lock:
            return self.requests.pop() if self.requests else None

    def done(self, description: str, outcome: Answer | EdgeError, seconds: float, refusals: int) -> None:
        with self.lock:
            self.refusals += refusals
            if isinstance(outcome, Answer):
                self.answered.append((description, outcome, seconds))
            elif outcome.code == "RESOURCE_EXHAUSTED":
                self.refused.append((description, outcome))
            else:
                self.failed.append((description, outcome))
            self.lock.notify_all()

    def wait_for_answers(self, count: int) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.answered) >= count or not self.requests, RUN_DEADLINE)


def _client(target: str, run: Run, seed: int) -> None:
    rng = random.Random(seed)
    with EdgeClient(target) as client:
        while (description := run.take()) is not None:
            start, refusals = time.perf_counter(), 0
            for attempt in range(ATTEMPTS):
                try:
                    outcome: Answer | EdgeError = client.ask(
                        "What is the number?", task=description, max_new_tokens=2, timeout=CALL_DEADLINE
                    )
                except EdgeError as exc:
                    outcome = exc
                    if exc.code != "RESOURCE_EXHAUSTED" or exc.retry_after_ms is None or attempt == ATTEMPTS - 1:
                        break
                    refusals += 1
                    # The backoff the refusal asked for (jittered, so refused clients do not return in step).
                    time.sleep(exc.retry_after_ms / 1000 * (1 + rng.random()))
                else:
                    break
            run.done(description, outcome, time.perf_counter() - start, refusals)


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_three_coordinators_make_each_text_once_through_a_kill_and_a_redis_restart(
    tiny_base_dir: Path, tiny_t2l: Path, maker, model_dir: Path, tmp_path: Path, record_property
) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    env = {**os.environ, "LORACAST_CACHE": str(tmp_path / "loracast-cache")}
    argv = coordinator_argv(
        listen="127.0.0.1:0",
        metrics_port=0,
        cache_dir=str(tmp_path / "unused"),
        base=str(tiny_base_dir),
        checkpoint=str(tiny_t2l),
        store=redis_server.url,
    )
    argv += ["--max-concurrent-passes", str(PASSES_IN_FLIGHT)]
    doomed_process = ServerProcess.loracast("coordinator-0", argv, tmp_path, env)
    recorders = [Recorder(maker) for _ in range(COORDINATORS - 1)]
    coordinators, workers, pool = [], [], None
    try:
        for i, recorder in enumerate(recorders, 1):
            config = CoordinatorConfig(
                cache_dir=tmp_path / f"unused-{i}",
                store=redis_server.url,
                listen="127.0.0.1:0",
                metrics_port=None,
                d2l_checkpoint=None,
                max_concurrent_passes=PASSES_IN_FLIGHT,
            )
            coordinators.append(start_coordinator(config, recorder))
        doomed: Server = ready(doomed_process, "coordinator")
        addresses = ",".join([doomed.address, *(f"127.0.0.1:{c.port}" for c in coordinators)])
        for i in range(WORKERS):
            config = loopback_worker(
                tmp_path / f"worker-{i}", model_dir, coordinator=addresses, max_new_tokens=8, max_concurrent_answers=4
            )
            workers.append(worker_server.start(config))
        for worker in workers:
            with open_channel(f"127.0.0.1:{worker.port}") as channel:
                wait_until_serving(channel, STARTUP_S)
        waits_before = _counter("loracast_store_claim_waits_total")

        run = Run(_plan(random.Random(0)))
        pool = futures.ThreadPoolExecutor(CLIENTS)
        started = time.perf_counter()
        clients = [pool.submit(_client, f"127.0.0.1:{workers[c % WORKERS].port}", run, c) for c in range(CLIENTS)]
        run.wait_for_answers(KILL_AFTER)
        doomed_process.proc.send_signal(signal.SIGKILL)
        run.wait_for_answers(RESTART_REDIS_AFTER)
        redis_server.restart()
        hung = futures.wait(clients, timeout=RUN_DEADLINE).not_done
        wall = time.perf_counter() - started
        assert not hung, f"{len(hung)} of {CLIENTS} clients still waiting after {RUN_DEADLINE:.0f} s"
        for client in clients:
            client.result()  # a client's own exception fails the test here

        latencies = [seconds for _, _, seconds in run.answered]
        p50, p99 = np.percentile(latencies, [50, 99])
        passes = int(redis_server.client().get(WRITES) or 0)
        survivors_passes = [len(r.calls) for r in recorders]
        report = {
            "requests": DESCRIPTIONS * ASKS,
            "answered": len(run.answered),
            "refused": len(run.refused),
            "refused_calls": run.refusals,
            "passes_cluster_wide": passes,
            "passes_by_surviving_coordinators": survivors_passes,
            "passes_by_killed_coordinator": passes - sum(survivors_passes),
            "claim_waits_on_surviving_coordinators": _counter("loracast_store_claim_waits_total") - waits_before,
            "request_seconds": {"p50": round(float(p50), 3), "p99": round(float(p99), 3)},
            "wall_seconds": round(wall, 1),
        }
        for key, value in report.items():
            record_property(key, value)
        print(f"\ncluster: {json.dumps(report)}")

        assert run.failed == [], "requests neither answered nor refused with RESOURCE_EXHAUSTED"
        assert len(run.answered) + len(run.refused) == DESCRIPTIONS * ASKS
        # One adapter per description, whichever worker and coordinator served it; every description answered.
        ids: dict[str, set[str]] = {}
        for description, answer, _ in run.answered:
            ids.setdefault(description, set()).add(answer.adapter_id)
        assert set(ids) == set(_descriptions()) and all(len(seen) == 1 for seen in ids.values())
        # Exactly one pass per text, cluster-wide: the store's writes count every finished pass; the survivors'
        # own records show no text made twice.
        assert passes == DESCRIPTIONS
        made_by_survivors = [text for recorder in recorders for text in recorder.calls]
        assert len(made_by_survivors) == len(set(made_by_survivors))

        # Nothing lost: every adapter is in the store, whole, and its bytes hash to its id.
        with open_channel(f"127.0.0.1:{coordinators[0].port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            listed = stub.ListAdapters(pb.ListAdaptersRequest(page_size=1000), timeout=CALL_DEADLINE).adapters
            assert {a.adapter_id for a in listed} == {adapter_id for seen in ids.values() for adapter_id in seen}
            for adapter in listed:
                request = pb.FetchAdapterRequest(adapter_id=adapter.adapter_id, dtype=pb.FLOAT16)
                first, *rest = stub.FetchAdapter(request, timeout=CALL_DEADLINE)
                payload = b"".join(message.data.data for message in rest)
                adapter_wire.decode(first.manifest, payload)  # size, SHA-256 and content id, or WireError
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.stop(None)
        for coordinator in coordinators:
            coordinator.stop(None)
        doomed_process.kill()
        redis_server.stop(signal.SIGKILL)


def test_several_coordinator_addresses_are_one_balanced_target_and_a_bad_one_a_clear_error() -> None:
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("dns:///coordinators:50051") == "dns:///coordinators:50051"  # gRPC looks it up, again
    assert channel_target("127.0.0.1:50051, localhost:50052") == "ipv4:127.0.0.1:50051,127.0.0.1:50052"
    with pytest.raises(ConfigError, match="'nonsense' is not HOST:PORT"):
        channel_target("127.0.0.1:50051,nonsense")
    with pytest.raises(ConfigError, match=r"cannot look up no-such-host\.invalid"):
        channel_target("127.0.0.1:50051,no-such-host.invalid:50051")
