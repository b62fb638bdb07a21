"""The adapter store seam: the local directory and Redis keep the same contract; Redis claims give one pass per text
across coordinators; an outage degrades to serving alone and recovers by itself.

Redis is a real `redis-server` (Debian's, installed by deploy/system-packages.sh) started here on a free port and
waited on with PING; coordinators run in this process on loopback, as in tests/test_coordinator.py.
"""

from __future__ import annotations

import functools
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from support import TIMEOUT, Recorder, RedisServer, describe, fetch, listed, refused, serving

from coordinator.adapter_store import Abandoned, AdapterStore, NotCached, StoreUnavailable, source_key
from coordinator.local_store import LocalStore
from coordinator.redis_store import RedisStore, check_url
from coordinator.server import STORE_HEALTH
from loracast import adapter_wire
from loracast.adapter_format import META_FINGERPRINT
from loracast.errors import ConfigError
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


def _small(seed: int) -> tuple[str, dict, LoraSpec, dict[str, str]]:
    """A 4 KiB adapter's source key, tensors, spec and metadata."""
    rng = np.random.default_rng(seed)
    adapter = {(0, "q_proj"): (rng.standard_normal((8, 64), np.float32), rng.standard_normal((64, 8), np.float32))}
    metadata = {META_FINGERPRINT: "f" * 64, "loracast.description_sha256": f"{seed:064x}"}
    return source_key("t2l", "t2l-test", "0" * 64, f"task {seed}"), adapter, LoraSpec(("q_proj",)), metadata


def _put(store: AdapterStore, seed: int) -> str:
    key, adapter, spec, metadata = _small(seed)
    return store.put(key, adapter, spec, metadata, pb.FLOAT32).manifest.adapter_id


def _never() -> bool:
    return False


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_both_stores_find_list_and_evict_alike(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    def open_store(capacity: int | None = None) -> AdapterStore:
        if backend == "local":
            return LocalStore(tmp_path / "store", capacity)
        return RedisStore(request.getfixturevalue("redis_server").url, capacity)

    probe = open_store()
    _put(probe, 0)
    _, one = probe.stats()
    probe.close()
    if backend == "redis":  # starts empty again, to count from there
        request.getfixturevalue("redis_server").client().flushall()
    else:
        shutil.rmtree(tmp_path / "store")

    store = open_store(capacity=2 * one)
    a, b = _put(store, 0), _put(store, 1)
    assert store.get(a, pb.FLOAT32).manifest.adapter_id == a  # `a` is now the most recently used
    fp16 = store.get(a, pb.FLOAT16)
    assert fp16.manifest.dtype == pb.FLOAT16 and adapter_wire.content_id(fp16.manifest) == a  # same id, other bytes
    c = _put(store, 2)  # over capacity: `b`, the least recently used, goes
    listing = store.recent(None, 10)
    assert [m.adapter_id for _, m in listing] == [c, a] and store.stats() == (2, 2 * one)
    assert store.recent(listing[0][0], 10) == listing[1:]  # a stamp is a page boundary
    assert (
        store.find(_small(1)[0], pb.FLOAT32) is None and store.find(_small(2)[0], pb.FLOAT32).manifest.adapter_id == c
    )
    with pytest.raises(NotCached):
        store.get(b, pb.FLOAT32)
    with pytest.raises(adapter_wire.WireError):
        store.get("../../etc/passwd", pb.FLOAT32)
    with store.claim(_small(2)[0], pb.FLOAT32, _never) as claim:  # made already: nothing to make
        assert claim.found is not None and claim.found.manifest.adapter_id == c
    with store.claim(_small(3)[0], pb.FLOAT32, _never) as claim:
        assert claim.found is None and not claim.waited
    store.close()


def _waits() -> float:
    return REGISTRY.get_sample_value("loracast_store_claim_waits_total")


def test_a_claim_lets_one_coordinator_make_a_text_while_another_waits_for_it(redis_server: RedisServer) -> None:
    first, second = RedisStore(redis_server.url), RedisStore(redis_server.url)
    key, adapter, spec, metadata = _small(7)
    made, seen = threading.Event(), []

    def other() -> None:
        with second.claim(key, pb.FLOAT32, _never) as claim:
            seen.append(claim)

    with first.claim(key, pb.FLOAT32, _never) as claim:
        assert claim.found is None
        waits = _waits()
        waiter = threading.Thread(target=other)
        waiter.start()
        while _waits() == waits:  # the other coordinator found the claim and waits
            assert waiter.is_alive()
            made.wait(0.01)
        wire = first.put(key, adapter, spec, metadata, pb.FLOAT32)
    waiter.join(TIMEOUT)
    [claim] = seen
    assert claim.waited and claim.found.manifest.adapter_id == wire.manifest.adapter_id
    assert first.writes() == 1  # one pass cluster-wide
    first.close()
    second.close()


def test_a_dead_coordinators_claim_expires_and_is_taken_over(redis_server: RedisServer) -> None:
    dying = RedisStore(redis_server.url, claim_ttl_s=0.5)
    survivor = RedisStore(redis_server.url, claim_ttl_s=0.5)
    key = _small(8)[0]
    holding = dying.claim(key, pb.FLOAT32, _never)
    assert holding.__enter__().found is None
    dying.close()  # it stops renewing and never releases: as if killed mid-pass
    with survivor.claim(key, pb.FLOAT32, _never) as claim:
        assert claim.waited and claim.found is None  # the survivor makes it
    stuck = RedisStore(redis_server.url)  # its claim outlives the test
    other_key = _small(9)[0]
    held = stuck.claim(other_key, pb.FLOAT32, _never)
    assert held.__enter__().found is None
    stuck.close()
    calls = iter([False, True])  # the callers give up while it waits
    with pytest.raises(Abandoned), survivor.claim(other_key, pb.FLOAT32, lambda: next(calls)):
        pass
    survivor.close()


def test_an_outage_degrades_to_serving_alone_and_recovers_by_itself(redis_server: RedisServer) -> None:
    store, other = RedisStore(redis_server.url), RedisStore(redis_server.url)
    states: dict[str, list[bool]] = {"store": [], "other": []}
    changed = threading.Condition()

    def on_change(name: str, up: bool) -> None:
        with changed:
            states[name].append(up)
            changed.notify_all()

    store.watch(functools.partial(on_change, "store"))
    other.watch(functools.partial(on_change, "other"))
    errors = REGISTRY.get_sample_value("loracast_store_errors_total", {"backend": "redis"}) or 0.0
    redis_server.stop(signal.SIGKILL)
    key, adapter, spec, metadata = _small(9)
    wire = store.put(key, adapter, spec, metadata, pb.FLOAT32)  # made while Redis is down: held here
    adapter_id = wire.manifest.adapter_id
    with changed:
        assert changed.wait_for(lambda: states["store"][-1] is False, TIMEOUT)
    assert REGISTRY.get_sample_value("loracast_store_errors_total", {"backend": "redis"}) > errors
    assert store.find(key, pb.FLOAT16).manifest.adapter_id == adapter_id  # served from this process
    assert store.get(adapter_id, pb.FLOAT32).payload == wire.payload
    with pytest.raises(StoreUnavailable):  # unknown here, and Redis cannot say: not a NOT_FOUND
        other.get(adapter_id, pb.FLOAT32)
    with store.claim(_small(10)[0], pb.FLOAT32, _never) as claim:  # no claim without Redis: made alone
        assert claim.found is None

    redis_server.start()
    with changed:
        assert changed.wait_for(lambda: states["store"][-1] is states["other"][-1] is True, TIMEOUT)
    assert states == {"store": [True, False, True], "other": [True, False, True]}
    assert other.find(key, pb.FLOAT32).manifest.adapter_id == adapter_id  # written once Redis was back
    store.close()
    other.close()


def test_a_malformed_store_url_is_a_configuration_error() -> None:
    for url in ("localhost:6379", "http://127.0.0.1:6379/0", "redis://127.0.0.1:6379/x"):
        with pytest.raises(ConfigError, match="redis://HOST:PORT/DB"):
            check_url(url)


def _store_health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=STORE_HEALTH), timeout=TIMEOUT).status


def test_coordinators_sharing_redis_make_each_text_once_and_page_for_each_other(
    tmp_path: Path, maker, redis_server: RedisServer
) -> None:
    tasks = [f"Task {i}: answer with the word {word}." for i, word in enumerate(["red", "green", "blue"])]
    one, two = Recorder(maker), Recorder(maker)
    with (
        serving(tmp_path / "a", one, store=redis_server.url) as (first, a),
        serving(tmp_path / "b", two, store=redis_server.url) as (second, b),
    ):
        assert _store_health(first.port) == _store_health(second.port) == health_pb2.HealthCheckResponse.SERVING
        made = [describe(stub, task).manifest.adapter_id for stub, task in zip((a, b, a), tasks, strict=True)]
        for stub in (a, b):  # each text again, on both coordinators: no second pass anywhere
            assert [describe(stub, task).manifest.adapter_id for task in tasks] == made
        assert sorted(one.calls + two.calls) == sorted(tasks)
        first_page, token = listed(a, page_size=2)
        assert first_page == made[::-1][:2] and listed(b, page_size=2, page_token=token) == ([made[0]], "")
        manifest, payload = fetch(b, made[0])  # made by `a`, streamed by `b`
        adapter_wire.decode(manifest, payload)
        assert not (tmp_path / "a").exists()  # the local directory is not used with a store
        refused(lambda: fetch(b, "0" * 64), grpc.StatusCode.NOT_FOUND)


def _store_health_becomes(port: int, status: int) -> None:
    """Block on the coordinator's health Watch stream until the store's service reports `status` (no polling)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=STORE_HEALTH), timeout=TIMEOUT
        )
        try:
            assert any(reply.status == status for reply in watch)
        finally:
            watch.cancel()


def test_a_coordinator_whose_redis_is_down_still_makes_adapters_and_says_so(
    tmp_path: Path, maker, redis_server: RedisServer
) -> None:
    recorder = Recorder(maker)
    with serving(tmp_path / "unused", recorder, store=redis_server.url) as (running, stub):
        describe(stub, "Task one: answer with the word red.")
        redis_server.stop(signal.SIGKILL)
        made = describe(stub, "Task two: answer with the word green.")  # adapters are still made without the store
        _store_health_becomes(running.port, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert REGISTRY.get_sample_value("loracast_store_up") == 0
        manifest, payload = fetch(stub, made.manifest.adapter_id)  # held by this coordinator meanwhile
        adapter_wire.decode(manifest, payload)
        redis_server.start()
        _store_health_becomes(running.port, health_pb2.HealthCheckResponse.SERVING)  # no restart of its own
        assert REGISTRY.get_sample_value("loracast_store_up") == 1
        assert describe(stub, "Task two: answer with the word green.").cached
        assert len(recorder.calls) == 2
