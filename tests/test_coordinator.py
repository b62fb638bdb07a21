"""The coordinator over real gRPC on loopback, with a tiny random Llama and a T2L checkpoint trained for it.

Servers run in this process (the hypernetwork loaded once and shared) except in the CLI tests, which run
`loracast coordinator serve` as operators do. Readiness is the health service's SERVING, never a sleep; a blocked
pass is an Event the test releases.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from support import TIMEOUT, Recorder, big_adapter, certificates, describe, fetch, listed, refused, serving, until

from coordinator.adapter_store import NotCached, source_key
from coordinator.local_store import LocalStore
from coordinator.server import MIN_RETRY_MS, CoordinatorConfig, start
from hypernet import checkpoint
from hypernet.makers import MAX_DESCRIPTION_CHARS, DocToLoRAMaker, TextToLoRAMaker
from hypernet.self_distill import PHASES, Cancelled, DistillConfig, Progress
from loracast import adapter_wire
from loracast.adapter_format import META_FINGERPRINT, Adapter, as_float32
from loracast.errors import ConfigError
from loracast.grpc_errors import RETRY_AFTER_MS
from loracast.grpc_security import ClientSecurity, ServerSecurity, open_channel
from loracast.grpc_server import wait_until_serving
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from loracast_cli import cli

LORACAST = Path(sys.executable).with_name("loracast")
TASK = "Reverse the given list."
OTHER_TASK = "Write the word in capitals."
READY = re.compile(r"loracast coordinator ready: grpc=(?P<grpc>\S+:\d+) metrics=http://(?P<metrics>\S+:\d+)/metrics")
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Internalizer(DocToLoRAMaker):
    """The real Doc-to-LoRA maker on the tiny Llama, recording the budget of each internalization and how it
    ended. With `hold` set to a phase, a job waits after reporting that phase until `gate` is set or the job is
    cancelled (its next step then raises Cancelled): the test's moment to cancel, to let a deadline pass or to send
    another call."""

    def __init__(self, path: Path, base, budget_s: float = 2.0, hold: str | None = None) -> None:
        # Short teacher answers leave most of a 2-second budget to training steps (tens of them on 2 busy cores).
        super().__init__(
            path, base, distill=DistillConfig(budget_s=budget_s, max_steps=50, max_new_tokens=8, teacher_share=1.0)
        )
        self.hold, self.gate, self.held = hold, threading.Event(), threading.Event()
        self.budgets: list[float | None] = []
        self.outcomes: list[str] = []

    def internalize(self, document, budget_s=None, on_progress=None, cancelled=None) -> Adapter:
        self.budgets.append(budget_s)

        def progress(p: Progress) -> None:
            on_progress(p)
            if p.phase == self.hold:
                self.held.set()
                deadline = time.monotonic() + TIMEOUT
                while not self.gate.wait(0.01) and not cancelled():
                    assert time.monotonic() < deadline, "the test never let the job go on"

        try:
            adapter = super().internalize(document, budget_s, progress, cancelled)
        except Cancelled:
            self.outcomes.append("cancelled")
            raise
        self.outcomes.append("done")
        return adapter


def document_chunks(*parts: bytes, dtype: int = pb.FLOAT32, budget: float | None = None) -> list[pb.DocumentChunk]:
    """One DocumentChunk per part, the settings in the first only (as the coordinator reads them)."""
    chunks = [pb.DocumentChunk(data=part) for part in parts]
    if chunks:
        chunks[0].dtype = dtype
        if budget is not None:
            chunks[0].budget_seconds = budget
    return chunks


def internalize(
    stub: pb_grpc.CoordinatorStub,
    *parts: bytes,
    dtype: int = pb.FLOAT32,
    budget: float | None = None,
    timeout: float = TIMEOUT,
) -> tuple[list[pb.InternalizeProgress], pb.GenerateResponse]:
    """InternalizeDocument with the document sent as `parts`: its progress events and its result, checking that
    the result comes last and alone."""
    chunks = document_chunks(*parts, dtype=dtype, budget=budget)
    *progress, last = stub.InternalizeDocument(iter(chunks), timeout=timeout)
    assert [e.WhichOneof("event") for e in progress] == ["progress"] * len(progress)
    assert last.WhichOneof("event") == "result"
    return [e.progress for e in progress], last.result


def phases(progress: list[pb.InternalizeProgress]) -> list[str]:
    """The phases in the order they came, each once: PHASES' order, from start to done."""
    seen = [p.phase for p in progress]
    order = [phase for i, phase in enumerate(seen) if i == 0 or phase != seen[i - 1]]
    assert order[0] == "start" and order[-1] == "done" and order == sorted(order, key=PHASES.index), order
    assert len(set(order)) == len(order), order
    return order


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_a_description_made_then_fetched_is_the_makers_adapter(tmp_path: Path, maker: TextToLoRAMaker) -> None:
    recorder = Recorder(maker)
    with serving(tmp_path / "cache", recorder) as (_, stub):
        reply = describe(stub, TASK)
        assert not reply.cached and reply.generation_seconds > 0
        manifest, payload = fetch(stub, reply.manifest.adapter_id)
        assert manifest == reply.manifest
        adapter, spec, metadata = adapter_wire.decode(manifest, payload)
        expected = maker.make_adapter(TASK)
        assert set(adapter) == set(expected) and spec == maker.spec
        assert metadata == maker.metadata(TASK)
        for key, (a, b) in expected.items():  # float32 is bit-exact
            assert np.array_equal(adapter[key][0], as_float32(a)) and np.array_equal(adapter[key][1], as_float32(b))

        # The server's default dtype is FLOAT16: the same adapter (same id), half the bytes, rounded.
        reply16 = describe(stub, TASK, pb.DTYPE_UNSPECIFIED)
        assert reply16.cached and reply16.manifest.dtype == pb.FLOAT16
        assert reply16.manifest.adapter_id == manifest.adapter_id
        manifest16, payload16 = fetch(stub, manifest.adapter_id, pb.DTYPE_UNSPECIFIED)
        assert manifest16 == reply16.manifest and len(payload16) * 2 == len(payload)
        adapter16, _, _ = adapter_wire.decode(manifest16, payload16)
        for key, (a, b) in expected.items():
            np.testing.assert_allclose(adapter16[key][0], as_float32(a), rtol=1e-3, atol=1e-7)
            np.testing.assert_allclose(adapter16[key][1], as_float32(b), rtol=1e-3, atol=1e-7)

        about = stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT)
        assert about.base_fingerprint == maker.fingerprint and about.base_name == "smollm2"
        (t2l,) = about.hypernetworks
        assert (t2l.kind, t2l.rank, tuple(t2l.target_modules)) == ("t2l", spec.r, spec.target_modules)
        assert t2l.hypernet_version == manifest.hypernet_version != ""
        listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters
        assert [(a.adapter_id, a.source, a.size_bytes) for a in listed] == [
            (manifest.adapter_id, "description", len(payload))
        ]
    assert recorder.calls == [TASK]


def test_a_descriptions_adapter_is_made_once_even_across_restarts(tmp_path: Path, maker: TextToLoRAMaker) -> None:
    cache_dir, recorder = tmp_path / "cache", Recorder(maker)
    with serving(cache_dir, recorder) as (_, stub):
        first = describe(stub, TASK)
        again = describe(stub, f"  {TASK}\n")  # the same task, as typed differently
        assert not first.cached and again.cached and again.generation_seconds == 0
        assert again.manifest == first.manifest
        other = describe(stub, OTHER_TASK)
        assert not other.cached and other.manifest.adapter_id != first.manifest.adapter_id
        ids = [a.adapter_id for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters]
        assert ids == [other.manifest.adapter_id, first.manifest.adapter_id]  # most recent first
        fetch(stub, first.manifest.adapter_id)
        ids = [a.adapter_id for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters]
        assert ids == [first.manifest.adapter_id, other.manifest.adapter_id]
    assert recorder.calls == [TASK, OTHER_TASK]

    restarted = Recorder(maker)
    with serving(cache_dir, restarted) as (_, stub):
        reply = describe(stub, TASK)
        assert reply.cached and reply.manifest == first.manifest
        listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters
        assert {a.adapter_id for a in listed} == {first.manifest.adapter_id, other.manifest.adapter_id}
    assert restarted.calls == []
    assert files_containing(cache_dir, TASK.encode()) == []  # only the description's hash is kept


def test_list_adapters_pages_in_recency_order_with_tokens_that_outlive_a_restart(
    tmp_path: Path, maker: TextToLoRAMaker
) -> None:
    tasks = [f"Task {i}: answer with the word {word}." for i, word in enumerate(["red", "green", "blue", "gold"])]
    with serving(tmp_path / "cache", Recorder(maker)) as (_, stub):
        a, b, c, d = (describe(stub, task).manifest.adapter_id for task in tasks)
        assert listed(stub) == ([d, c, b, a], "")  # the default page holds them all: no next page
        first, token = listed(stub, page_size=2)
        assert first == [d, c] and token
        describe(stub, tasks[1])  # b is used between pages: it moves to the top, the pages read so far stay
        second, token = listed(stub, page_size=2, page_token=token)
        assert second == [a] and token == ""  # b is no longer listed after the token
        assert listed(stub, page_size=2)[0] == [b, d]
        assert listed(stub, page_size=10**6)[0] == [b, d, c, a]  # above the maximum is the maximum
        for bad in ("nonsense", "0123456789abcdef.x", "../0123456789abcdef.1", "YmVmb3JlOng"):  # "before:x"
            error = refused(lambda bad=bad: listed(stub, page_token=bad), grpc.StatusCode.INVALID_ARGUMENT)
            assert "page_token" in error.details()
        after_first = listed(stub, page_size=1)[1]
    with serving(tmp_path / "cache", Recorder(maker)) as (_, stub):
        # A token names no coordinator run: the restarted one (or another sharing the store) continues the listing.
        page, token = listed(stub, page_size=2, page_token=after_first)
        assert page == [d, c] and token
        page, token = listed(stub, page_size=3)
        assert page == [b, d, c] and token  # recency survives the restart
        assert listed(stub, page_size=3, page_token=token) == ([a], "")


def test_fetch_resumes_from_an_offset(tmp_path: Path, maker: TextToLoRAMaker) -> None:
    with serving(tmp_path / "cache", Recorder(maker)) as (running, stub):
        metadata = {
            META_FINGERPRINT: maker.fingerprint,
            adapter_wire.META_HYPERNET_VERSION: "t2l-test",
            "loracast.description_sha256": "0" * 64,
        }
        key = source_key("t2l", "t2l-test", "0" * 64, "a big adapter")
        adapter = big_adapter(np.random.default_rng(0))
        wire = running.store.put(key, adapter, LoraSpec(("q_proj",)), metadata, pb.FLOAT32)
        adapter_id, chunk = wire.manifest.adapter_id, adapter_wire.MIN_CHUNK
        for dtype in (pb.FLOAT32, pb.FLOAT16):
            request = pb.FetchAdapterRequest(adapter_id=adapter_id, dtype=dtype, chunk_size=chunk)
            call = stub.FetchAdapter(request, timeout=TIMEOUT)
            manifest, received = next(call).manifest, b""
            for _ in range(3):  # then the connection "breaks"
                data = next(call).data
                assert data.offset == len(received) and len(data.data) == chunk
                received += data.data
            call.cancel()
            assert len(received) < manifest.total_size

            resumed_manifest, rest = fetch(stub, adapter_id, dtype, offset=len(received), chunk_size=chunk)
            assert resumed_manifest == manifest
            payload = received + rest
            assert hashlib.sha256(payload).hexdigest() == manifest.payload_sha256
            adapter_wire.decode(manifest, payload)  # verifies size, SHA-256 and the content id

            at_end, nothing = fetch(stub, adapter_id, dtype, offset=manifest.total_size)
            assert at_end == manifest and nothing == b""


def _put_small(cache: LocalStore, seed: int) -> tuple[str, str]:
    """Store a 4 KiB adapter; returns its id and source key."""
    rng = np.random.default_rng(seed)
    adapter = {(0, "q_proj"): (rng.standard_normal((8, 64), np.float32), rng.standard_normal((64, 8), np.float32))}
    metadata = {META_FINGERPRINT: "f" * 64, "loracast.description_sha256": f"{seed:064x}"}
    key = source_key("t2l", "t2l-test", "0" * 64, f"task {seed}")
    return cache.put(key, adapter, LoraSpec(("q_proj",)), metadata, pb.FLOAT32).manifest.adapter_id, key


def test_cache_evicts_least_recently_used_and_drops_damaged_files(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = LocalStore(root)
    a, _ = _put_small(cache, 0)
    _, one = cache.stats()
    cache.close()

    cache = LocalStore(root, capacity_bytes=2 * one)  # reopened: `a` is still there
    b, b_key = _put_small(cache, 1)
    assert cache.get(a, pb.FLOAT16).manifest.adapter_id == a  # `a` is now the most recently used
    c, _ = _put_small(cache, 2)
    assert [m.adapter_id for _, m in cache.recent(None, 10)] == [c, a] and cache.stats() == (2, 2 * one)
    assert not (root / "adapters" / f"{b}.adapter").exists() and cache.find(b_key, pb.FLOAT32) is None
    with pytest.raises(NotCached):
        cache.get(b, pb.FLOAT32)
    with pytest.raises(adapter_wire.WireError):
        cache.get("../../etc/passwd", pb.FLOAT32)

    damaged = root / "adapters" / f"{a}.adapter"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(data)
    with pytest.raises(NotCached):
        cache.get(a, pb.FLOAT32)
    assert not damaged.exists()

    truncated = root / "adapters" / f"{c}.adapter"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    (root / "adapters" / f".{c}.adapter.x1y2.tmp").write_bytes(b"half a write")
    cache.close()
    cache = LocalStore(root)
    assert cache.recent(None, 10) == [] and list((root / "adapters").iterdir()) == []
    cache.close()


def test_malformed_requests_are_invalid_and_unknown_ids_not_found(tmp_path: Path, maker: TextToLoRAMaker) -> None:
    recorder = Recorder(maker)
    with serving(tmp_path / "cache", recorder) as (_, stub):
        for description in ("", "  \n\t ", "x" * (MAX_DESCRIPTION_CHARS + 1)):
            refused(lambda d=description: describe(stub, d), grpc.StatusCode.INVALID_ARGUMENT)
        refused(lambda: describe(stub, TASK, dtype=7), grpc.StatusCode.INVALID_ARGUMENT)

        manifest = describe(stub, TASK).manifest
        adapter_id = manifest.adapter_id
        for request in (
            pb.FetchAdapterRequest(adapter_id="../../etc/passwd"),
            pb.FetchAdapterRequest(adapter_id=adapter_id.upper()),
            pb.FetchAdapterRequest(adapter_id=adapter_id, dtype=pb.FLOAT32, offset=manifest.total_size + 1),
            pb.FetchAdapterRequest(adapter_id=adapter_id, chunk_size=adapter_wire.MIN_CHUNK - 1),
            pb.FetchAdapterRequest(adapter_id=adapter_id, chunk_size=adapter_wire.MAX_CHUNK + 1),
            pb.FetchAdapterRequest(adapter_id=adapter_id, dtype=7),
        ):
            error = refused(lambda r=request: stub.FetchAdapter(r, timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT)
            assert error.details()
        error = refused(
            lambda: stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id="0" * 64), timeout=TIMEOUT),
            grpc.StatusCode.NOT_FOUND,
        )
        assert "0" * 64 in error.details()
    assert recorder.calls == [TASK]


def test_too_many_passes_are_refused_with_retry_after(tmp_path: Path, maker: TextToLoRAMaker) -> None:
    gate = threading.Event()
    recorder = Recorder(maker, gate=gate)
    with serving(tmp_path / "cache", recorder, max_concurrent_passes=1) as (_, stub):
        request = pb.GenerateFromDescriptionRequest(description=TASK, dtype=pb.FLOAT32)
        first = stub.GenerateFromDescription.future(request, timeout=TIMEOUT)
        assert recorder.started.wait(TIMEOUT)
        assert REGISTRY.get_sample_value("loracast_adapter_makes_in_flight") == 1

        error = refused(lambda: describe(stub, OTHER_TASK), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert int(dict(error.trailing_metadata())[RETRY_AFTER_MS]) >= MIN_RETRY_MS
        # The same description joins the running pass instead of being refused; it counts as a cache hit
        # as soon as it waits. No deadline on this call: the wait must cope with an unbounded one.
        hits = {"component": "coordinator", "result": "hit"}
        hits_before = REGISTRY.get_sample_value("loracast_adapter_cache_requests_total", hits)
        same = stub.GenerateFromDescription.future(request)
        until(lambda: REGISTRY.get_sample_value("loracast_adapter_cache_requests_total", hits) > hits_before)
        gate.set()
        made, shared = first.result(timeout=TIMEOUT), same.result(timeout=TIMEOUT)
        assert not made.cached and shared.cached and shared.manifest == made.manifest

        assert not describe(stub, OTHER_TASK).cached  # the slot is free again
        assert REGISTRY.get_sample_value("loracast_adapter_makes_in_flight") == 0
    assert recorder.calls == [TASK, OTHER_TASK]


def test_a_deadline_shorter_than_a_pass_is_refused_up_front(tmp_path: Path, maker: TextToLoRAMaker) -> None:
    now = [1000.0]

    def thirty_seconds_pass() -> None:
        now[0] += 30.0

    recorder = Recorder(maker, after=thirty_seconds_pass)
    with serving(tmp_path / "cache", recorder, clock=lambda: now[0]) as (_, stub):
        assert describe(stub, TASK).generation_seconds == 30.0
        error = refused(lambda: describe(stub, OTHER_TASK, timeout=10.0), grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "allow more time" in error.details()  # the server's refusal, not the client's own timer
        assert describe(stub, TASK, timeout=10.0).cached  # a cached adapter needs no time to be made
    assert recorder.calls == [TASK]


def test_documents_are_checked_and_never_kept(
    tmp_path: Path, maker: TextToLoRAMaker, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = "MARKER-5f2e: the vault code is 4711"
    document = f"Übersicht. {marker}. Straße.".encode()
    cache_dir = tmp_path / "cache"
    unshipped = tmp_path / "d2l.safetensors"  # the default Doc-to-LoRA checkpoint, not there: no D2L, no error
    monkeypatch.setattr(checkpoint, "DEFAULT_D2L", unshipped)
    with serving(cache_dir, Recorder(maker), max_document_bytes=1000, d2l_checkpoint=unshipped) as (_, stub):
        about = stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT)
        assert [net.kind for net in about.hypernetworks] == ["t2l"]
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        assert "empty" in refused(lambda: internalize(stub), invalid).details()
        assert "empty" in refused(lambda: internalize(stub, b""), invalid).details()
        assert "empty" in refused(lambda: internalize(stub, b" \n\t "), invalid).details()
        assert "UTF-8" in refused(lambda: internalize(stub, b"fine so far \xff\xfe"), invalid).details()
        assert "limit" in refused(lambda: internalize(stub, *[b"a" * 400] * 3), invalid).details()
        refused(lambda: internalize(stub, document, dtype=7), invalid)
        # Valid, with a character split across two chunks: checked whole, then no hypernetwork to take it.
        error = refused(lambda: internalize(stub, document[:1], document[1:]), grpc.StatusCode.FAILED_PRECONDITION)
        assert error.details() == "no Doc-to-LoRA hypernetwork is loaded"
    assert files_containing(tmp_path, marker.encode()) == []
    out, err = capfd.readouterr()
    assert marker not in out and marker not in err


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_document_streams_its_progress_then_its_adapter_made_once_per_budget_and_never_kept(
    tmp_path: Path,
    maker: TextToLoRAMaker,
    tiny_d2l: Path,
    tiny_base,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "MARKER-7c3a"
    document = " ".join(f"Fact {i}: the lighthouse of Orvel{i} is {i * 9} metres tall." for i in range(5))
    document += f" The vault code is {marker}."
    d2l = Internalizer(tiny_d2l, tiny_base, budget_s=5.0)  # the maker's default, replaced by the config's
    before = {
        "made": _count("loracast_adapter_make_seconds_count", kind="d2l"),
        "done": _count("loracast_internalizations_total", outcome="done"),
        "steps": _count("loracast_internalization_steps_count"),
        "losses": _count("loracast_internalization_probe_loss_count"),
    }
    with serving(tmp_path / "cache", Recorder(maker), d2l=d2l, budget_seconds=2.0) as (_, stub):
        about = {net.kind: net for net in stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT).hypernetworks}
        assert set(about) == {"t2l", "d2l"}
        assert (about["d2l"].hypernet_version, about["d2l"].rank) == ("d2l-1", d2l.spec.r)
        assert tuple(about["d2l"].target_modules) == ("down_proj",)

        # Budget 0: the hypernetwork's one pass alone, bit-exact with the maker's.
        progress, one_pass = internalize(stub, document.encode(), budget=0.0)
        assert phases(progress) == ["start", "done"]
        assert not one_pass.cached and one_pass.generation_seconds > 0
        manifest, payload = fetch(stub, one_pass.manifest.adapter_id)
        adapter, spec, metadata = adapter_wire.decode(manifest, payload)
        expected = d2l.make_adapter(document)
        want = d2l.spec_for(expected)
        assert spec.r == want.r > d2l.spec.r  # several chunks: the rank grows with the document
        assert (spec.target_modules, spec.use_rslora) == (want.target_modules, want.use_rslora)
        assert spec.alpha == pytest.approx(want.alpha)  # the manifest holds alpha as a float32
        assert metadata == d2l.metadata(document)
        assert metadata["loracast.document_sha256"] == hashlib.sha256(document.encode()).hexdigest()
        assert set(adapter) == set(expected)
        for key, (a, b) in expected.items():  # float32 is bit-exact
            assert np.array_equal(adapter[key][0], as_float32(a)) and np.array_equal(adapter[key][1], as_float32(b))

        # No budget named: the coordinator's default (2 s, from its config), distilled: another adapter.
        progress, distilled = internalize(stub, document.encode())
        assert phases(progress) == ["start", "probes", "teacher", "distill", "done"]
        assert progress[0].estimate_seconds == 2.0 and math.isnan(progress[0].probe_loss)
        done = progress[-1]
        assert done.step > 0 and done.step == max(p.step for p in progress) and not math.isnan(done.probe_loss)
        assert done.estimate_seconds == done.elapsed_seconds >= max(p.elapsed_seconds for p in progress)
        assert not distilled.cached and distilled.manifest.adapter_id != one_pass.manifest.adapter_id

        # Asked again at the same budget (named this time), the cache answers: the result alone, no job.
        for budget, made in ((2.0, distilled), (0.0, one_pass), (None, distilled)):
            progress, again = internalize(stub, document.encode(), budget=budget)
            assert progress == [] and again.cached and again.generation_seconds == 0
            assert again.manifest == made.manifest
        assert d2l.budgets == [0.0, 2.0] and d2l.outcomes == ["done", "done"]

        for budget in (-1.0, 3601.0, math.nan):
            error = refused(lambda b=budget: internalize(stub, document.encode(), budget=b), INVALID)
            assert "budget must be between 0 and 3600 seconds" in error.details()
        listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters
        assert {(a.adapter_id, a.source) for a in listed} == {
            (one_pass.manifest.adapter_id, "document"),
            (distilled.manifest.adapter_id, "document"),
        }
    assert d2l.budgets == [0.0, 2.0]
    assert _count("loracast_adapter_make_seconds_count", kind="d2l") == before["made"] + 2
    assert _count("loracast_internalizations_total", outcome="done") == before["done"] + 2
    assert _count("loracast_internalization_steps_count") == before["steps"] + 2
    assert _count("loracast_internalization_probe_loss_count") == before["losses"] + 1  # the one pass has none
    assert files_containing(tmp_path, marker.encode()) == []
    out, err = capfd.readouterr()
    assert marker not in out and marker not in err and marker not in caplog.text


def _finished_calls() -> float:
    return _count("loracast_rpc_duration_seconds_count", component="coordinator", method="InternalizeDocument")


def test_callers_of_one_document_and_budget_share_one_job_and_its_progress(
    tmp_path: Path, maker: TextToLoRAMaker, tiny_d2l: Path, tiny_base
) -> None:
    d2l = Internalizer(tiny_d2l, tiny_base, budget_s=1.0, hold="probes")
    document = b"The magic number of Zarvik is 48213."
    with serving(tmp_path / "cache", Recorder(maker), d2l=d2l) as (_, stub):
        first = stub.InternalizeDocument(iter(document_chunks(document)), timeout=TIMEOUT)
        assert d2l.held.wait(TIMEOUT)
        hits = _count("loracast_adapter_cache_requests_total", component="coordinator", result="hit")
        second = stub.InternalizeDocument(iter(document_chunks(document, budget=1.0)), timeout=TIMEOUT)
        # The joiner sees the job's progress from its start.
        seen = [next(second) for _ in range(2)]
        assert [e.progress.phase for e in seen] == ["start", "probes"]
        assert _count("loracast_adapter_cache_requests_total", component="coordinator", result="hit") == hits + 1

        # Another document meanwhile: refused, documents go one at a time, with a hint of when to retry.
        error = refused(lambda: internalize(stub, b"Another document.", budget=0.0), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "one at a time" in error.details() and int(dict(error.trailing_metadata())[RETRY_AFTER_MS]) > 0

        d2l.gate.set()
        made, shared = list(first), seen + list(second)
        assert [e.WhichOneof("event") for e in (made[-1], shared[-1])] == ["result", "result"]
        assert phases([e.progress for e in made[:-1]]) == phases([e.progress for e in shared[:-1]])
        assert not made[-1].result.cached and shared[-1].result.cached
        assert shared[-1].result.manifest == made[-1].result.manifest
    assert d2l.budgets == [1.0] and d2l.outcomes == ["done"]


def test_the_job_is_cancelled_when_its_last_caller_goes_away_and_leaves_nothing(
    tmp_path: Path, maker: TextToLoRAMaker, tiny_d2l: Path, tiny_base
) -> None:
    d2l = Internalizer(tiny_d2l, tiny_base, budget_s=1.0, hold="probes")
    document = b"The magic number of Zarvik is 48213."
    with serving(tmp_path / "cache", Recorder(maker), d2l=d2l) as (_, stub):
        # Two callers, one leaves: the job goes on for the other.
        leaving = stub.InternalizeDocument(iter(document_chunks(document)), timeout=TIMEOUT)
        assert d2l.held.wait(TIMEOUT)
        staying = stub.InternalizeDocument(iter(document_chunks(document)), timeout=TIMEOUT)
        assert next(staying).progress.phase == "start"
        finished = _finished_calls()
        leaving.cancel()
        until(lambda: _finished_calls() == finished + 1)  # the coordinator has seen it go
        d2l.gate.set()
        assert list(staying)[-1].result.manifest.adapter_id
        assert d2l.outcomes == ["done"]

        # The only caller leaves: the job stops at its next step and nothing is cached.
        d2l.gate.clear()
        d2l.held.clear()
        before = _count("loracast_internalizations_total", outcome="cancelled")
        alone = stub.InternalizeDocument(iter(document_chunks(document, budget=2.0)), timeout=TIMEOUT)
        assert d2l.held.wait(TIMEOUT)
        alone.cancel()
        until(lambda: len(d2l.outcomes) == 2)
        assert d2l.outcomes == ["done", "cancelled"]
        until(lambda: _count("loracast_internalizations_total", outcome="cancelled") == before + 1)
        assert len(stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters) == 1

        # Asked again, the document makes a new job, which runs to its end.
        d2l.gate.set()
        progress, reply = internalize(stub, document, budget=2.0)
        assert not reply.cached and phases(progress)[-1] == "done"
    assert d2l.budgets == [1.0, 2.0, 2.0] and d2l.outcomes == ["done", "cancelled", "done"]


def test_stopping_the_coordinator_cancels_its_jobs_and_waits_for_them(
    tmp_path: Path, maker: TextToLoRAMaker, tiny_d2l: Path, tiny_base
) -> None:
    d2l = Internalizer(tiny_d2l, tiny_base, budget_s=1.0, hold="probes")
    config = CoordinatorConfig(cache_dir=tmp_path / "cache", listen="127.0.0.1:0", metrics_port=None)
    running = start(config, Recorder(maker), d2l=d2l)
    with open_channel(f"127.0.0.1:{running.port}") as channel:  # open beyond the stop: the server ends the call
        wait_until_serving(channel, timeout=TIMEOUT)
        call = pb_grpc.CoordinatorStub(channel).InternalizeDocument(iter(document_chunks(b"A doc.")), timeout=TIMEOUT)
        assert d2l.held.wait(TIMEOUT)
        running.stop(None)
        assert d2l.outcomes == ["cancelled"]  # ended before stop returned: nothing writes to the closed cache
        refused(lambda: list(call), grpc.StatusCode.UNAVAILABLE)


def test_a_deadline_cancels_the_job_and_caches_nothing(
    tmp_path: Path, maker: TextToLoRAMaker, tiny_d2l: Path, tiny_base
) -> None:
    d2l = Internalizer(tiny_d2l, tiny_base, budget_s=1.0, hold="probes")
    document = b"The magic number of Zarvik is 48213."
    with serving(tmp_path / "cache", Recorder(maker), d2l=d2l) as (running, stub):
        # A deadline shorter than the budget: refused up front, no job.
        error = refused(lambda: internalize(stub, document, timeout=0.5), grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "allow more time or a smaller budget" in error.details()
        assert d2l.budgets == []

        # Long enough to start, then it passes while the job is held: the job is cancelled, nothing is kept.
        refused(lambda: internalize(stub, document, timeout=3.0), grpc.StatusCode.DEADLINE_EXCEEDED)
        assert d2l.held.is_set()
        until(lambda: len(d2l.outcomes) == 1)
        assert d2l.outcomes == ["cancelled"]
        assert stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters == []
        assert running.store.stats() == (0, 0)


def test_bearer_tokens(tmp_path: Path, maker: TextToLoRAMaker) -> None:
    security = ServerSecurity(tokens=frozenset({"s3cret", "other-client"}))
    # serving() waits on health over a channel without a token: health needs none.
    with serving(tmp_path / "cache", Recorder(maker), security=security) as (running, no_token):
        target = f"127.0.0.1:{running.port}"
        refused(lambda: no_token.Describe(pb.DescribeRequest(), timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED)
        with open_channel(target, ClientSecurity(token="wrong")) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            refused(lambda: stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED)
            refused(lambda: describe(stub, TASK), grpc.StatusCode.UNAUTHENTICATED)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with open_channel(target, ClientSecurity(token="s3cret")) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            assert stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT).hypernetworks
            assert not describe(stub, TASK).cached


def _describes(target: str, client: ClientSecurity | None) -> bool:
    """Whether Describe succeeds; a refused handshake surfaces as UNAVAILABLE."""
    with open_channel(target, client) as channel:
        try:
            pb_grpc.CoordinatorStub(channel).Describe(pb.DescribeRequest(), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            return False
    return True


def test_tls_and_mutual_tls(tmp_path: Path, maker: TextToLoRAMaker) -> None:
    certs = certificates(tmp_path / "pki")
    tls = ServerSecurity(tls_cert=certs["server.pem"], tls_key=certs["server.key"])
    tls_client = ClientSecurity(tls_ca=certs["ca.pem"])
    with serving(tmp_path / "cache-tls", Recorder(maker), tls_client, security=tls) as (running, stub):
        assert stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT).hypernetworks
        assert not _describes(f"127.0.0.1:{running.port}", None)  # plaintext

    mutual = ServerSecurity(tls_cert=certs["server.pem"], tls_key=certs["server.key"], client_ca=certs["ca.pem"])
    with_cert = ClientSecurity(tls_ca=certs["ca.pem"], client_cert=certs["client.pem"], client_key=certs["client.key"])
    with serving(tmp_path / "cache-mtls", Recorder(maker), with_cert, security=mutual) as (running, stub):
        assert not describe(stub, TASK).cached
        target = f"127.0.0.1:{running.port}"
        assert not _describes(target, tls_client)  # TLS, but no client certificate
        assert not _describes(target, None)


def test_start_refuses_configurations_that_cannot_work(
    tmp_path: Path, maker: TextToLoRAMaker, tiny_base_dir: Path
) -> None:
    cache_dir = tmp_path / "cache"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            start(CoordinatorConfig(cache_dir=cache_dir, listen=f"127.0.0.1:{port}", metrics_port=None), maker)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        start(CoordinatorConfig(cache_dir=cache_dir, listen="50051", metrics_port=None), maker)
    with pytest.raises(ConfigError, match="at least 1"):
        start(CoordinatorConfig(cache_dir=cache_dir, listen="127.0.0.1:0", max_concurrent_passes=0), maker)
    with pytest.raises(ConfigError, match="default budget must be between 0 and 3600 seconds, not 5000"):
        start(CoordinatorConfig(cache_dir=cache_dir, listen="127.0.0.1:0", budget_seconds=5000.0), maker)
    missing = ServerSecurity(tls_cert=tmp_path / "missing.pem", tls_key=tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="cannot read"):
        start(CoordinatorConfig(cache_dir=cache_dir, listen="127.0.0.1:0", security=missing), maker)
    with serving(cache_dir, Recorder(maker)), pytest.raises(ConfigError, match="another coordinator"):
        start(CoordinatorConfig(cache_dir=cache_dir, listen="127.0.0.1:0", metrics_port=None), maker)
    # A Doc-to-LoRA checkpoint named explicitly must load (only the default may be absent: no D2L then).
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    for d2l, message in ((tmp_path / "none.safetensors", "does not exist"), (corrupt, "corrupt")):
        config = CoordinatorConfig(
            cache_dir=cache_dir, listen="127.0.0.1:0", base=str(tiny_base_dir), d2l_checkpoint=d2l
        )
        with pytest.raises(checkpoint.CheckpointError, match=message):
            start(config, maker)


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_cli_serves_until_sigterm_with_metrics(tmp_path: Path, tiny_t2l: Path, tiny_base_dir: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("\n  cli-token  \n")
    argv = [str(LORACAST), "coordinator", "serve", "--listen", "127.0.0.1:0", "--metrics-port", "0",
            "--cache-dir", str(tmp_path / "cache"), "--checkpoint", str(tiny_t2l), "--base", str(tiny_base_dir),
            "--token-file", str(token_file)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=300)
        ready = READY.fullmatch(line.strip())
        assert ready, f"no ready line: {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        with open_channel(ready["grpc"], ClientSecurity(token="cli-token")) as channel:
            wait_until_serving(channel, timeout=TIMEOUT)
            stub = pb_grpc.CoordinatorStub(channel)
            reply = describe(stub, TASK)
            _, payload = fetch(stub, reply.manifest.adapter_id)
        with urllib.request.urlopen(f"http://{ready['metrics']}/metrics", timeout=TIMEOUT) as response:
            text = response.read().decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0
        assert process.stdout.read() == ""  # the ready line was the only one
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()
        process.wait()
    coordinator = ("component", "coordinator")
    samples = _samples(text)
    assert samples[("loracast_adapter_make_seconds_count", frozenset({("kind", "t2l")}))] == 1
    assert samples[("loracast_adapter_cache_requests_total", frozenset({coordinator, ("result", "miss")}))] == 1
    assert samples[("loracast_adapter_cache_requests_total", frozenset({coordinator, ("result", "hit")}))] == 0
    assert samples[("loracast_adapter_bytes_streamed_total", frozenset({coordinator}))] == len(payload)
    assert samples[("loracast_adapter_transfer_seconds_count", frozenset({coordinator}))] == 1
    assert samples[("loracast_adapter_makes_in_flight", frozenset())] == 0
    assert samples[("loracast_coordinator_cached_adapters", frozenset())] == 1
    rpc = frozenset({coordinator, ("method", "GenerateFromDescription"), ("code", "OK")})
    assert samples[("loracast_rpc_total", rpc)] == 1
    assert reply.manifest.adapter_id not in text and TASK not in text


def test_cli_budget_flag_is_the_default_budget_in_seconds(capsys: pytest.CaptureFixture) -> None:
    parser = cli.parser()
    assert parser.parse_args(["coordinator", "serve", "--budget-seconds", "0.5"]).budget_seconds == 0.5
    assert parser.parse_args(["coordinator", "serve"]).budget_seconds is None  # the maker's own default
    with pytest.raises(SystemExit):
        parser.parse_args(["coordinator", "serve", "--budget-seconds", "soon"])
    assert "expected a number of seconds, got 'soon'" in capsys.readouterr().err


def test_cli_bad_configuration_is_one_line_and_status_2(tmp_path: Path, tiny_base_dir: Path, tiny_t2l: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        tiny = ["--checkpoint", str(tiny_t2l), "--base", str(tiny_base_dir)]
        cases = {
            "cannot read the TLS": ["--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(tmp_path / "no.key")],
            "cannot listen": ["--listen", f"127.0.0.1:{port}"],
            "does not exist": ["--checkpoint", str(tmp_path / "none.safetensors"), "--base", str(tiny_base_dir)],
            "train one with `loracast train d2l`": ["--d2l-checkpoint", str(tmp_path / "no-d2l.safetensors"), *tiny],
            "holds no token": ["--token-file", str(tmp_path / "empty-tokens")],
        }
        (tmp_path / "empty-tokens").write_text("\n  \n")
        base = [str(LORACAST), "coordinator", "serve", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                "--cache-dir", str(tmp_path / "c")]  # fmt: skip
        processes = {
            expected: subprocess.Popen([*base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for expected, args in cases.items()
        }
        for expected, process in processes.items():
            out, err = process.communicate(timeout=300)
            assert process.returncode == 2 and out == "", (expected, out, err)
            (line,) = err.splitlines()
            assert line.startswith("loracast: error: ") and expected in line, line
