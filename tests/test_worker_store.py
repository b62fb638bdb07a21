"""The worker's adapter cache on disk: verified, resumable installs, an LRU bounded in bytes, restarts.

No model and no gRPC: adapters are random matrices on the wire format, and the coordinator's FetchAdapter stream is
a generator that can break, corrupt or misbehave on demand, raising what the coordinator client raises for a break
(StreamInterrupted); which gRPC failures are breaks is the client's to say (tests/test_worker.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from loracast import adapter_wire
from loracast.adapter_format import META_FINGERPRINT
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb
from worker import adapter_store, metrics, server
from worker.adapter_store import (
    AdapterRejected,
    AdapterStore,
    NotResident,
    StoreError,
    StreamInterrupted,
    TransferBroken,
)

FINGERPRINT = "f" * 64
SPEC = LoraSpec(("q_proj", "v_proj"), r=4, alpha=8.0)
CHUNK = 512


def wire_adapter(seed: int, fingerprint: str = FINGERPRINT) -> adapter_wire.WireAdapter:
    """A random adapter of 2 layers (q: 64 -> 64, v: 64 -> 32), fp16 on the wire: 3,584 payload bytes."""
    rng = np.random.default_rng(seed)
    outs = {"q_proj": 64, "v_proj": 32}
    adapter = {
        (layer, module): (rng.standard_normal((SPEC.r, 64)), rng.standard_normal((out, SPEC.r)))
        for layer in range(2)
        for module, out in outs.items()
    }
    return adapter_wire.encode(adapter, SPEC, {META_FINGERPRINT: fingerprint, "loracast.hypernet_version": "t-1"})


class NoSuchAdapter(Exception):
    """What a source raises for an adapter it does not have (the coordinator client: a NOT_FOUND RpcError)."""


class Source:
    """A FetchAdapter stream for one adapter, recording the offsets asked for. `faults` is consumed one per call:
    ('cut', n) breaks after n bytes, 'down' fails at once, 'flip' corrupts one byte, 'skip' leaves
    out the second chunk, 'long' sends one chunk too many; None behaves."""

    def __init__(self, wire: adapter_wire.WireAdapter, faults: list | None = None) -> None:
        self.wire = wire
        self.faults = list(faults or [])
        self.offsets: list[int] = []
        self.data_messages = 0

    def __call__(self, adapter_id: str, offset: int):
        self.offsets.append(offset)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "down":
            raise StreamInterrupted("UNAVAILABLE: connection refused")
        if adapter_id != self.wire.manifest.adapter_id:
            raise NoSuchAdapter(adapter_id)
        yield pb.AdapterChunk(manifest=self.wire.manifest)
        chunks = list(adapter_wire.chunks(self.wire.payload, offset, CHUNK))
        if fault == "skip":
            del chunks[1]
        if fault == "long":
            chunks.append(pb.DataChunk(offset=len(self.wire.payload), data=b"x"))
        sent = 0
        for chunk in chunks:
            data = chunk.data
            if isinstance(fault, tuple) and sent + len(data) > fault[1]:
                raise StreamInterrupted("UNAVAILABLE: stream cut")
            if fault == "flip":
                data, fault = bytes([data[0] ^ 1]) + data[1:], None
            sent += len(data)
            self.data_messages += 1
            yield pb.AdapterChunk(data=pb.DataChunk(offset=chunk.offset, data=data))


def files(root: Path, folder: str) -> list[str]:
    return sorted(p.name for p in (root / folder).iterdir())


def test_install_verifies_then_moves_into_place_and_survives_a_restart(tmp_path):
    wire = wire_adapter(1)
    adapter_id = wire.manifest.adapter_id
    store = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    hits, misses = metrics.CACHE_HITS._value.get(), metrics.CACHE_MISSES._value.get()
    received = metrics.BYTES_RECEIVED._value.get()
    source = Source(wire)

    got = store.ensure(adapter_id, source, wire.manifest)
    assert not got.was_resident and source.offsets == [0]
    want, _, _ = adapter_wire.decode(wire.manifest, wire.payload)
    assert got.adapter.keys() == want.keys()
    assert all(np.array_equal(got.adapter[k][i], want[k][i]) for k in want for i in (0, 1))
    assert files(tmp_path, "adapters") == [adapter_id] and files(tmp_path, "partial") == []
    assert (tmp_path / "adapters" / adapter_id / "payload.bin").read_bytes() == wire.payload
    assert metrics.BYTES_RECEIVED._value.get() - received == len(wire.payload)
    assert metrics.RESIDENT_ADAPTERS._value.get() == 1
    assert metrics.RESIDENT_BYTES._value.get() == len(wire.payload)

    again = store.ensure(adapter_id, source)
    assert again.was_resident and source.offsets == [0]  # no second transfer
    assert (metrics.CACHE_HITS._value.get() - hits, metrics.CACHE_MISSES._value.get() - misses) == (1, 1)

    restarted = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    assert [m.adapter_id for m in restarted.resident()] == [adapter_id]
    assert restarted.ensure(adapter_id, None).was_resident


def test_a_broken_stream_resumes_from_the_bytes_already_received(tmp_path):
    wire = wire_adapter(2)
    source = Source(wire, [("cut", 1200), "skip", None])
    got = AdapterStore(tmp_path, 10**6, FINGERPRINT).ensure(wire.manifest.adapter_id, source)
    # 1200 bytes cut to whole chunks: 1024 arrived; then the second chunk went missing, so 512 more were kept.
    assert source.offsets == [0, 1024, 1536]
    assert (tmp_path / "adapters" / got.manifest.adapter_id / "payload.bin").read_bytes() == wire.payload


def test_an_interrupted_transfer_is_resumed_after_a_restart(tmp_path):
    wire = wire_adapter(3)
    adapter_id = wire.manifest.adapter_id
    store = AdapterStore(tmp_path, 10**6, FINGERPRINT, retries=2)
    dead = Source(wire, [("cut", 1100), "down", "down"])
    with pytest.raises(TransferBroken, match="resume"):
        store.ensure(adapter_id, dead)
    assert dead.offsets == [0, 1024, 1024]
    assert files(tmp_path, "partial") == [f"{adapter_id}.manifest", f"{adapter_id}.part"]
    assert store.resident() == []

    source = Source(wire)
    got = AdapterStore(tmp_path, 10**6, FINGERPRINT).ensure(adapter_id, source)
    assert source.offsets == [1024] and not got.was_resident
    assert files(tmp_path, "partial") == []


def test_a_corrupt_payload_is_fetched_once_more_then_refused_and_never_installed(tmp_path):
    wire = wire_adapter(4)
    adapter_id = wire.manifest.adapter_id
    store = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    source = Source(wire, ["flip"])
    assert not store.ensure(adapter_id, source).was_resident
    assert source.offsets == [0, 0]

    other = wire_adapter(5)
    always = Source(other, ["flip", "flip"])
    with pytest.raises(AdapterRejected, match="SHA-256"):
        store.ensure(other.manifest.adapter_id, always)
    assert always.offsets == [0, 0]
    assert [m.adapter_id for m in store.resident()] == [adapter_id]
    assert files(tmp_path, "adapters") == [adapter_id]
    assert files(tmp_path, "partial") == []


def test_too_many_bytes_are_not_trusted(tmp_path):
    wire = wire_adapter(6)
    source = Source(wire, ["long"])
    AdapterStore(tmp_path, 10**6, FINGERPRINT).ensure(wire.manifest.adapter_id, source)
    assert source.offsets == [0, 0]


def test_another_base_models_adapter_is_refused_before_any_data(tmp_path):
    wire = wire_adapter(7, fingerprint="0" * 64)
    adapter_id = wire.manifest.adapter_id
    store = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    source = Source(wire)
    with pytest.raises(AdapterRejected, match="base model"):
        store.ensure(adapter_id, source, wire.manifest)  # the manifest from GenerateFromDescription
    assert source.offsets == []
    with pytest.raises(AdapterRejected):
        store.ensure(adapter_id, source)  # by id: the stream's own manifest is checked first
    assert source.data_messages == 0
    assert files(tmp_path, "adapters") == [] and files(tmp_path, "partial") == []


def test_the_cache_evicts_the_least_recently_used_adapters_to_stay_within_its_bytes(tmp_path):
    a, b, c = (wire_adapter(seed) for seed in (10, 11, 12))
    size = len(a.payload)
    store = AdapterStore(tmp_path, int(2.5 * size), FINGERPRINT)
    for wire in (a, b):
        store.ensure(wire.manifest.adapter_id, Source(wire))
    store.ensure(a.manifest.adapter_id, None)  # a is now more recently used than b
    store.ensure(c.manifest.adapter_id, Source(c))
    order = [c.manifest.adapter_id, a.manifest.adapter_id]
    assert [m.adapter_id for m in store.resident()] == order
    assert files(tmp_path, "adapters") == sorted(order)
    assert store.get(b.manifest.adapter_id) is None

    # The order survives a restart; a smaller capacity evicts down to it.
    assert [m.adapter_id for m in AdapterStore(tmp_path, int(2.5 * size), FINGERPRINT).resident()] == order
    assert [m.adapter_id for m in AdapterStore(tmp_path, size, FINGERPRINT).resident()] == order[:1]

    with pytest.raises(AdapterRejected, match="capacity"):
        AdapterStore(tmp_path, size - 1, FINGERPRINT).ensure(a.manifest.adapter_id, Source(a), a.manifest)


def test_startup_drops_torn_and_damaged_files(tmp_path):
    good, damaged = wire_adapter(20), wire_adapter(21)
    store = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    for wire in (good, damaged):
        store.ensure(wire.manifest.adapter_id, Source(wire))
    payload = tmp_path / "adapters" / damaged.manifest.adapter_id / "payload.bin"
    payload.write_bytes(b"\0" + payload.read_bytes()[1:])
    (tmp_path / "partial" / f"{'a' * 64}.staging").mkdir()
    (tmp_path / "partial" / f"{'b' * 64}.part").write_bytes(b"no manifest beside it")
    (tmp_path / "partial" / ".x.tmp1").write_bytes(b"")
    (tmp_path / f".{adapter_store.SOURCES}.5e3f09a1.tmp").write_bytes(b'{"torn')  # the index, mid-write
    (tmp_path / "adapters" / "not-an-id").mkdir()

    restarted = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    assert [m.adapter_id for m in restarted.resident()] == [good.manifest.adapter_id]
    assert files(tmp_path, "adapters") == [good.manifest.adapter_id]
    assert files(tmp_path, "partial") == []
    assert not list(tmp_path.glob(".*.tmp"))
    assert AdapterStore(tmp_path, 10**6, "e" * 64).resident() == []  # another base: nothing usable


def test_ids_are_checked_before_any_path_is_built(tmp_path):
    store = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    with pytest.raises(adapter_wire.WireError):
        store.ensure("../../etc/passwd", Source(wire_adapter(30)))
    with pytest.raises(adapter_wire.WireError):
        adapter_store.read_installed(tmp_path, "../adapters", FINGERPRINT)


def test_a_missing_adapter_is_reported_as_it_is(tmp_path):
    store = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    with pytest.raises(NoSuchAdapter):
        store.ensure("c" * 64, Source(wire_adapter(31)))
    with pytest.raises(NotResident):
        store.ensure("c" * 64, None)


class _SpyEvent(threading.Event):
    def __init__(self, waiting: threading.Event) -> None:
        super().__init__()
        self.waiting = waiting

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_concurrent_requests_for_one_adapter_share_one_transfer(tmp_path, monkeypatch):
    wire = wire_adapter(40)
    adapter_id = wire.manifest.adapter_id
    store = AdapterStore(tmp_path, 10**6, FINGERPRINT)
    waiting, release = threading.Event(), threading.Event()

    class SpyTransfer(adapter_store._Transfer):
        def __init__(self) -> None:
            super().__init__()
            self.done = _SpyEvent(waiting)

    monkeypatch.setattr(adapter_store, "_Transfer", SpyTransfer)
    source = Source(wire)

    def gated(adapter_id: str, offset: int):
        release.wait(30)
        yield from source(adapter_id, offset)

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", store.ensure(adapter_id, gated)))
    first.start()
    waiting_thread = threading.Thread(target=lambda: results.setdefault("second", store.ensure(adapter_id, gated)))
    waiting_thread.start()
    assert waiting.wait(30), "the second request never waited on the first one's transfer"
    release.set()
    first.join(30)
    waiting_thread.join(30)
    assert source.offsets == [0]
    assert results["first"] is results["second"]


def test_the_source_index_remembers_resident_adapters_only(tmp_path):
    a, b = wire_adapter(50), wire_adapter(51)
    store = AdapterStore(tmp_path, int(1.5 * len(a.payload)), FINGERPRINT)
    store.ensure(a.manifest.adapter_id, Source(a))
    store.remember("description:x", a.manifest.adapter_id)
    assert AdapterStore(tmp_path, 10**6, FINGERPRINT).recall("description:x") == a.manifest.adapter_id
    store.ensure(b.manifest.adapter_id, Source(b))  # evicts a
    assert store.recall("description:x") is None


def test_every_kind_of_store_error_has_its_status_in_the_servicers_table():
    kinds = set(StoreError.__subclasses__())
    assert kinds and kinds <= set(server._STATUSES), kinds - set(server._STATUSES)  # else it answers INTERNAL
