"""The worker over real gRPC on loopback, with the tiny Llama exported to ONNX.

A scripted Coordinator servicer stands in for the coordinator where faults are injected (a stream cut mid-transfer,
a flipped byte, another base model, a coordinator that is busy or gone); its adapters are random, clearly nonzero
matrices for the tiny model, so the comparison with PyTorch + PEFT means something.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from peft import PeftModel
from support import TOL, hf_model, installed, max_diff, reference_logits, rpc_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from loracast import adapter_format
from loracast.grpc_errors import RETRY_AFTER_MS
from loracast.grpc_security import ClientSecurity, ServerSecurity, open_channel
from loracast.grpc_server import wait_until_serving
from loracast.lora import applied, inject, to_torch
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from loracast_cli import cli
from loracast_cli.launch import LORACAST
from worker import metrics, model_cache, onnx_io
from worker import server as worker_server
from worker.adapter_store import StreamInterrupted, read_installed
from worker.chat import ChatTokenizer
from worker.coordinator_client import CoordinatorClient
from worker.onnx_session import OnnxDecoder

REPO = Path(__file__).resolve().parents[1]
TASK = "Reverse the given list."
PROMPT = "What is the capital of France?"
NEW_TOKENS = 8
WAIT = 60.0


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the exported tiny model, a scriptable coordinator, workers and their clients
# ---------------------------------------------------------------------------------------------------------


def test_the_first_start_exports_in_a_child_process_and_a_changed_model_is_exported_again(tiny_base_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    root = tmp_path / "onnx"
    exported = model_cache.prepare(str(base), root)
    assert exported.parent == root and (exported / model_cache.MODEL_FILE).is_file()
    assert (exported / "tokenizer.json").is_file() and (exported / "chat_template.jinja").is_file()
    assert model_cache.find(str(base), root) == exported
    os.utime(base / "config.json", ns=(1, 1))  # the source model changed: its cached export no longer counts
    assert model_cache.find(str(base), root) is None


def _metadata(graph: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}


def test_an_export_for_another_graph_io_version_is_missing_and_exported_again(
    tiny_base_dir, model_dir, cache_root, tmp_path
):
    root = tmp_path / "onnx"
    shutil.copytree(cache_root / "onnx", root)
    stale = root / model_dir.name
    graph_file = stale / model_cache.MODEL_FILE
    assert model_cache.graph_metadata(graph_file) == _metadata(graph_file)
    assert model_cache.find(str(tiny_base_dir), root) == stale
    graph = onnx.load(str(graph_file))
    onnx.helper.set_model_props(graph, {**_metadata(graph_file), onnx_io.META_VERSION: "0"})
    onnx.save(graph, str(graph_file))

    assert model_cache.find(str(tiny_base_dir), root) is None
    with pytest.raises(model_cache.ModelError, match="graph io version 0, this worker runs version"):
        model_cache.check_exported(stale)
    assert model_cache.export(str(tiny_base_dir), root) == stale
    assert model_cache.find(str(tiny_base_dir), root) == stale
    assert _metadata(graph_file)[onnx_io.META_VERSION] == onnx_io.IO_VERSION


def ask(
    stub: pb_grpc.WorkerStub,
    ref: pb.AdapterRef | None = None,
    prompt: str = PROMPT,
    progress: list[pb.InternalizeProgress] | None = None,
    **fields,
):
    """One Generate call: (Started, the streamed text, Done); checks the order of the events. A document's progress
    events, which come first, go to `progress`."""
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=fields.pop("max_new_tokens", NEW_TOKENS), **fields)
    if ref is not None:
        request.adapter.CopyFrom(ref)
    events = list(stub.Generate(request, timeout=WAIT))
    kinds = [e.WhichOneof("event") for e in events]
    first = kinds.index("started")
    assert set(kinds[:first]) <= {"progress"} and kinds[-1] == "done" and set(kinds[first + 1 : -1]) <= {"token"}, kinds
    if progress is not None:
        progress.extend(e.progress for e in events[:first])
    return events[first].started, "".join(e.token.text for e in events[first + 1 : -1]), events[-1].done


def _count(histogram, **labels) -> float:
    child = histogram.labels(**labels) if labels else histogram
    return next(s.value for m in child.collect() for s in m.samples if s.name.endswith("_count"))


# ---------------------------------------------------------------------------------------------------------
# Generation with adapters
# ---------------------------------------------------------------------------------------------------------


def test_a_tasks_adapter_is_made_fetched_applied_and_then_served_from_the_cache(
    coordinator, start_worker, connect, wires, tmp_path
):
    script, target, _ = coordinator
    adapter_id = script.add(wires["a"], TASK.encode())
    stub = connect(start_worker(coordinator=target))
    before = {
        "hit": metrics.CACHE_HITS._value.get(),
        "miss": metrics.CACHE_MISSES._value.get(),
        "tokens": metrics.GENERATED_TOKENS._value.get(),
        "ttft": _count(metrics.TIME_TO_FIRST_TOKEN),
        "apply": _count(metrics.APPLY_SECONDS, mode="hot_swap"),
        "transfer": _count(metrics.TRANSFER),
    }

    started, text, done = ask(stub, pb.AdapterRef(task=f"  {TASK}\n"))
    assert (started.adapter_id, started.resident) == (adapter_id, False)
    assert text and done.tokens == NEW_TOKENS
    t = done.timings
    assert 0 < t.adapter_fetch_seconds < t.first_token_seconds <= t.total_seconds
    assert t.apply_seconds > 0
    assert [r.offset for r in script.fetches] == [0] and script.described == [f"  {TASK}\n"]
    listed = stub.ListAdapters(pb.ListResidentRequest(), timeout=WAIT)
    assert [(a.adapter_id, a.size_bytes, a.hypernet_version) for a in listed.adapters] == [
        (adapter_id, len(wires["a"].payload), "test-1")
    ]
    assert listed.used_bytes == len(wires["a"].payload) and listed.capacity_bytes == 256 * 2**20

    # The same task again: the local index finds the resident adapter, no coordinator call, no transfer.
    started, again, done = ask(stub, pb.AdapterRef(task=TASK))
    assert (started.adapter_id, started.resident) == (adapter_id, True)
    assert again == text and done.timings.adapter_fetch_seconds == 0
    assert len(script.fetches) == 1 and len(script.described) == 1

    assert metrics.CACHE_HITS._value.get() - before["hit"] == 1
    assert metrics.CACHE_MISSES._value.get() - before["miss"] == 1
    assert metrics.GENERATED_TOKENS._value.get() - before["tokens"] == 2 * NEW_TOKENS
    assert _count(metrics.TIME_TO_FIRST_TOKEN) - before["ttft"] == 2
    assert _count(metrics.APPLY_SECONDS, mode="hot_swap") - before["apply"] == 2
    assert _count(metrics.TRANSFER) - before["transfer"] == 1


def _real_coordinator(
    tmp_path_factory: pytest.TempPathFactory, tiny_t2l: Path, tiny_base_dir: Path, d2l: Path | None
) -> Iterator[str]:
    """A coordinator on the tiny Llama with its T2L, and Doc-to-LoRA from `d2l` (None: none); yields its address."""
    from coordinator.server import CoordinatorConfig
    from coordinator.server import start as start_coordinator

    config = CoordinatorConfig(
        cache_dir=tmp_path_factory.mktemp("coordinator-cache"),
        listen="127.0.0.1:0",
        metrics_port=None,
        t2l_checkpoint=tiny_t2l,
        d2l_checkpoint=d2l,
        base=str(tiny_base_dir),
        budget_seconds=0.0,  # the one pass by default: a request names a budget to be distilled
    )
    running = start_coordinator(config)
    yield f"127.0.0.1:{running.port}"
    running.stop(None)


@pytest.fixture(scope="module")
def real_coordinator(tiny_t2l: Path, tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _real_coordinator(tmp_path_factory, tiny_t2l, tiny_base_dir, None)


@pytest.fixture(scope="module")
def d2l_coordinator(
    tiny_t2l: Path, tiny_d2l: Path, tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from _real_coordinator(tmp_path_factory, tiny_t2l, tiny_base_dir, tiny_d2l)


def test_a_task_end_to_end_through_the_real_coordinator(real_coordinator, start_worker, connect, fingerprint, tmp_path):
    stub = connect(start_worker(coordinator=real_coordinator))
    received = metrics.BYTES_RECEIVED._value.get()
    started, text, done = ask(stub, pb.AdapterRef(task=TASK))
    assert re.fullmatch(r"[0-9a-f]{64}", started.adapter_id) and not started.resident
    assert done.tokens == NEW_TOKENS and 0 < done.timings.adapter_fetch_seconds < done.timings.first_token_seconds
    resident = read_installed(tmp_path / "cache", started.adapter_id, fingerprint)
    assert resident.manifest.provenance["loracast.description_sha256"] == hashlib.sha256(TASK.encode()).hexdigest()
    assert metrics.BYTES_RECEIVED._value.get() - received == resident.manifest.total_size
    listed = stub.ListAdapters(pb.ListResidentRequest(), timeout=WAIT).adapters
    assert [a.adapter_id for a in listed] == [started.adapter_id]

    again, same_text, done = ask(stub, pb.AdapterRef(task=TASK))
    assert (again.adapter_id, again.resident, same_text) == (started.adapter_id, True, text)
    assert done.timings.adapter_fetch_seconds == 0
    assert metrics.BYTES_RECEIVED._value.get() - received == resident.manifest.total_size  # nothing fetched again

    # This coordinator runs no Doc-to-LoRA: its FAILED_PRECONDITION reaches the client as it is.
    request = pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(document=b"The office opens at 8."))
    error = rpc_error(stub.Generate, request, timeout=WAIT)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error.details().startswith("coordinator: ")


def test_a_document_distilled_by_the_real_coordinator_streams_its_progress_before_the_answer(
    d2l_coordinator, start_worker, connect
):
    document = b"Brelna Dostik was born in Kravolo in 1961. She keeps a heron called Mibbin."
    stub = connect(start_worker(coordinator=d2l_coordinator))
    progress: list[pb.InternalizeProgress] = []
    started, text, done = ask(stub, pb.AdapterRef(document=document, budget_seconds=1.0), progress=progress)
    assert not started.resident and text and done.tokens == NEW_TOKENS
    order = [p.phase for i, p in enumerate(progress) if i == 0 or p.phase != progress[i - 1].phase]
    assert order[:3] == ["start", "probes", "teacher"] and order[-1] == "done"
    assert set(order[3:-1]) <= {"teacher", "distill"}  # the teacher's batches and the training steps take turns
    assert progress[0].estimate_seconds == 1.0 and progress[-1].elapsed_seconds >= progress[0].elapsed_seconds
    progress.clear()
    again, _, _ = ask(stub, pb.AdapterRef(document=document, budget_seconds=1.0), progress=progress)
    assert (again.adapter_id, again.resident, progress) == (started.adapter_id, True, [])


def test_a_document_through_the_real_doc_to_lora_is_hot_swapped_and_matches_pytorch(
    d2l_coordinator, start_worker, connect, model_dir, tiny_base_dir, fingerprint, tmp_path
):
    document = " ".join(f"Fact {i}: the lighthouse of Orvel{i} is {i * 9} metres tall." for i in range(5)).encode()
    worker = start_worker(coordinator=d2l_coordinator)
    stub = connect(worker)
    before = {mode: _count(metrics.APPLY_SECONDS, mode=mode) for mode in ("hot_swap", "merged")}
    started, text, done = ask(stub, pb.AdapterRef(document=document))  # no mode asked: hot-swap if it can
    assert text and done.tokens == NEW_TOKENS
    resident = read_installed(tmp_path / "cache", started.adapter_id, fingerprint)
    assert resident.manifest.provenance["loracast.document_sha256"] == hashlib.sha256(document).hexdigest()
    # Doc-to-LoRA adapts down_proj, which the default export takes as LoRA inputs: no session is built for it.
    assert resident.spec.target_modules == ("down_proj",)
    assert "down_proj" in worker.servicer.decoder.target_modules
    assert _count(metrics.APPLY_SECONDS, mode="hot_swap") - before["hot_swap"] == 1
    assert _count(metrics.APPLY_SECONDS, mode="merged") == before["merged"]

    # The received adapter (fp16 on the wire), hot-swapped and merged in ONNX Runtime, vs PyTorch with our LoRA layer.
    prompt = ChatTokenizer(model_dir).encode_chat(PROMPT)
    ids = [*prompt, 8, 300, 41]
    decoder = OnnxDecoder(model_dir / model_cache.MODEL_FILE, intra_op_threads=1)
    merged = decoder.merged(resident.adapter, resident.spec).logits(ids, prefill=len(prompt))
    decoder.set_adapter(resident.adapter, resident.spec)
    got = decoder.logits(ids, prefill=len(prompt))
    model = hf_model(tiny_base_dir)
    wrappers = inject(model, resident.spec)
    with torch.no_grad(), applied(wrappers, to_torch(resident.adapter)):
        want = model(torch.tensor([ids])).logits[0].numpy()
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    diff = max_diff(got, want)
    print(
        f"\nreceived D2L adapter vs PyTorch + loracast.lora: hot-swap {diff:.2e}, merged {max_diff(merged, want):.2e}"
    )
    assert diff < TOL and max_diff(merged, want) < TOL
    assert max_diff(want, reference_logits(tiny_base_dir, None, ids)) > 10 * TOL, "the adapter must matter"
    hf = AutoTokenizer.from_pretrained(tiny_base_dir)
    assert hf.decode(out[0, len(prompt) :], skip_special_tokens=True) == text


def test_hot_swap_and_merged_match_pytorch_peft_with_the_received_adapter(
    coordinator, start_worker, connect, wires, model_dir, tiny_base_dir, fingerprint, tmp_path
):
    script, target, _ = coordinator
    adapter_id = script.add(wires["b"])
    stub = connect(start_worker(coordinator=target))
    _, hot, _ = ask(stub, pb.AdapterRef(adapter_id=adapter_id), mode=pb.HOT_SWAP)
    started, merged, _ = ask(stub, pb.AdapterRef(adapter_id=adapter_id), mode=pb.MERGED)
    assert started.resident and hot == merged
    _, plain, _ = ask(stub)
    assert plain != hot, "the adapter must change the answer"

    # The adapter as the worker received it (fp16 on the wire, verified, decoded), in PyTorch + PEFT.
    received = read_installed(tmp_path / "cache", adapter_id, fingerprint)
    metadata = {adapter_format.META_FINGERPRINT: fingerprint}
    peft_dir = adapter_format.save(tmp_path / "peft", received.adapter, received.spec, "tiny", metadata)
    prompt = ChatTokenizer(model_dir).encode_chat(PROMPT)  # equal to apply_chat_template: test_onnx_session
    ids = [*prompt, 8, 300, 41]
    want = reference_logits(tiny_base_dir, peft_dir, ids)
    decoder = OnnxDecoder(model_dir / model_cache.MODEL_FILE, intra_op_threads=1)
    decoder.set_adapter(received.adapter, received.spec)
    hot_diff = max_diff(decoder.logits(ids, prefill=len(prompt)), want)
    merged_diff = max_diff(decoder.merged(received.adapter, received.spec).logits(ids, prefill=len(prompt)), want)
    print(f"\nreceived adapter vs PEFT: hot-swap {hot_diff:.2e}, merged {merged_diff:.2e}")
    assert hot_diff < TOL and merged_diff < TOL

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), peft_dir).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    hf = AutoTokenizer.from_pretrained(tiny_base_dir)
    assert hf.decode(out[0, len(prompt) :], skip_special_tokens=True) == hot


def test_concurrent_generations_with_different_adapters_each_keep_their_own(coordinator, start_worker, connect, wires):
    script, target, _ = coordinator
    refs = [pb.AdapterRef(adapter_id=script.add(wires[name])) for name in ("a", "b", "c")] + [None]
    stub = connect(start_worker(coordinator=target, max_concurrent_answers=8))
    alone = [ask(stub, ref, max_new_tokens=24)[1] for ref in refs]
    assert len(set(alone)) == len(alone), "each adapter must answer differently for this test to mean anything"
    with futures.ThreadPoolExecutor(8) as pool:
        jobs = [(i, pool.submit(ask, stub, refs[i], max_new_tokens=24)) for i in [0, 1, 2, 3] * 2]
        assert [job.result(WAIT)[1] for _, job in jobs] == [alone[i] for i, _ in jobs]


def test_a_stream_cut_mid_transfer_resumes_from_its_offset(coordinator, start_worker, connect, wires, tmp_path):
    script, target, _ = coordinator
    adapter_id = script.add(wires["c"])
    script.faults = [("cut", 700)]
    stub = connect(start_worker(coordinator=target))
    started, _, _ = ask(stub, pb.AdapterRef(adapter_id=adapter_id))
    assert started.adapter_id == adapter_id
    assert [r.offset for r in script.fetches] == [0, 512]  # two whole chunks arrived before the cut
    payload = (tmp_path / "cache" / "adapters" / adapter_id / "payload.bin").read_bytes()
    assert hashlib.sha256(payload).hexdigest() == wires["c"].manifest.payload_sha256
    assert list((tmp_path / "cache" / "partial").iterdir()) == []


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "scripted"


class _FailingFetch:
    """A FetchAdapter call that sends its manifest, then fails with `code`; records whether it was cancelled."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.messages = iter([pb.AdapterChunk(manifest=pb.AdapterManifest())])
        self.code, self.cancelled = code, False

    def __iter__(self):
        return self

    def __next__(self) -> pb.AdapterChunk:
        message = next(self.messages, None)
        if message is None:
            raise _Failure(self.code)
        return message

    def cancel(self) -> None:
        self.cancelled = True


class _Context:
    def time_remaining(self) -> float:
        return WAIT


@pytest.mark.parametrize(
    ("code", "resumed"), [(grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.DATA_LOSS, True),
                          (grpc.StatusCode.NOT_FOUND, False), (grpc.StatusCode.DEADLINE_EXCEEDED, False)]
)  # fmt: skip
def test_the_coordinator_client_tells_the_store_which_fetch_failures_to_resume(code, resumed):
    """The adapter store knows no gRPC: a FetchAdapter failure a retry may mend reaches it as StreamInterrupted,
    any other as the call's RpcError (for the servicer's status), and the store's early exit cancels the call."""
    client = CoordinatorClient("127.0.0.1:1", ClientSecurity(), pb.FLOAT16, WAIT, busy_retry_ms=1000)
    try:
        call = _FailingFetch(code)
        client._stub = type("Stub", (), {"FetchAdapter": lambda self, request, timeout: call})()
        stream = iter(client.fetch_source(_Context())("a" * 64, 0))
        assert next(stream).HasField("manifest")
        with pytest.raises(StreamInterrupted if resumed else grpc.RpcError) as info:
            next(stream)
        assert resumed or info.value.code() == code
        stream.cancel()
        assert call.cancelled
    finally:
        client.close()


def test_a_corrupted_chunk_is_detected_and_never_applied(coordinator, start_worker, connect, wires, tmp_path):
    script, target, _ = coordinator
    adapter_id = script.add(wires["c"])
    script.faults = ["flip", "flip"]
    stub = connect(start_worker(coordinator=target))
    error = rpc_error(stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(adapter_id=adapter_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "SHA-256" in error.details()
    assert [r.offset for r in script.fetches] == [0, 0]  # fetched once more from scratch, corrupt again
    assert stub.ListAdapters(pb.ListResidentRequest(), timeout=WAIT).adapters == []
    assert installed(tmp_path / "cache") == [] and list((tmp_path / "cache" / "partial").iterdir()) == []

    script.faults = ["flip"]  # corrupt once: the second transfer installs it
    started, _, _ = ask(stub, pb.AdapterRef(adapter_id=adapter_id))
    assert started.adapter_id == adapter_id and installed(tmp_path / "cache") == [adapter_id]


def test_an_adapter_for_another_base_model_is_refused_before_any_data(
    coordinator, start_worker, connect, wires, tmp_path
):
    script, target, _ = coordinator
    script.add(wires["other-base"], b"Made for another model.")
    stub = connect(start_worker(coordinator=target))
    error = rpc_error(
        stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(task="Made for another model."))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "base model" in error.details()
    assert script.fetches == []
    assert installed(tmp_path / "cache") == [] and list((tmp_path / "cache" / "partial").iterdir()) == []


def test_documents_are_forwarded_in_chunks_and_never_stored(coordinator, start_worker, connect, wires, tmp_path):
    script, target, _ = coordinator
    document = ("The office opens at 8:00. " * 6000).encode()  # ~150 KiB: three chunks
    adapter_id = script.add(wires["a"], document)
    stub = connect(start_worker(coordinator=target))
    started, _, _ = ask(stub, pb.AdapterRef(document=document))
    assert started.adapter_id == adapter_id
    assert script.documents == [(3, pb.FLOAT16, None)]
    assert ask(stub, pb.AdapterRef(document=document))[0].resident and len(script.documents) == 1
    for path in (tmp_path / "cache").rglob("*"):
        assert not path.is_file() or b"office opens" not in path.read_bytes(), path


def test_a_documents_budget_goes_to_the_coordinator_and_its_progress_comes_back_first(
    coordinator, start_worker, connect, wires
):
    script, target, _ = coordinator
    document = b"The office opens at 8:00."
    adapter_id = script.add(wires["a"], document)
    stub = connect(start_worker(coordinator=target))
    progress: list[pb.InternalizeProgress] = []
    started, _, _ = ask(stub, pb.AdapterRef(document=document, budget_seconds=2.5), progress=progress)
    assert started.adapter_id == adapter_id and [p.phase for p in progress] == ["start", "done"]
    assert progress[0].estimate_seconds == 2.5
    assert script.documents == [(1, pb.FLOAT16, 2.5)]
    # Each budget is its own adapter: another one (or none, the coordinator's default) asks the coordinator again.
    progress.clear()
    assert ask(stub, pb.AdapterRef(document=document, budget_seconds=2.5), progress=progress)[0].resident
    assert progress == []
    # With no budget the coordinator's default applies, which grows with the document: the worker does not cut the
    # call at its own coordinator timeout (120 s) but lets the caller's deadline decide.
    list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(document=document)), timeout=1000))
    assert script.document_deadlines[-1] > 900
    assert script.document_deadlines[0] < 130  # a budget of 2.5 s: the worker's own timeout plus the budget
    ask(stub, pb.AdapterRef(document=document, budget_seconds=0.0))
    assert script.documents == [(1, pb.FLOAT16, 2.5), (1, pb.FLOAT16, None), (1, pb.FLOAT16, 0.0)]
    prefetch = pb.PrefetchRequest(adapters=[pb.AdapterRef(document=document, budget_seconds=9.0)])
    assert list(stub.Prefetch(prefetch, timeout=WAIT).adapter_ids) == [adapter_id]
    assert script.documents[-1] == (1, pb.FLOAT16, 9.0)

    for ref in (pb.AdapterRef(task=TASK, budget_seconds=1.0), pb.AdapterRef(adapter_id=adapter_id, budget_seconds=1.0)):
        error = rpc_error(stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=ref), timeout=WAIT)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "for a document" in error.details()


def test_a_caller_that_goes_away_cancels_the_coordinators_internalization(coordinator, start_worker, connect, wires):
    script, target, _ = coordinator
    document = b"The office opens at 8:00."
    script.add(wires["a"], document)
    script.gate = threading.Event()
    stub = connect(start_worker(coordinator=target))
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(document=document)), timeout=WAIT)
    assert next(call).progress.phase == "start"  # forwarded while the coordinator still works
    assert script.entered.wait(WAIT)
    call.cancel()
    assert script.abandoned.wait(WAIT)


def test_prefetch_installs_in_request_order_and_stops_at_the_first_failure(
    coordinator, start_worker, connect, wires, tmp_path
):
    script, target, _ = coordinator
    a, b = script.add(wires["a"], TASK.encode()), script.add(wires["b"])
    stub = connect(start_worker(coordinator=target))
    refs = [pb.AdapterRef(task=TASK), pb.AdapterRef(adapter_id=b)]
    assert list(stub.Prefetch(pb.PrefetchRequest(adapters=refs), timeout=WAIT).adapter_ids) == [a, b]
    assert [x.adapter_id for x in stub.ListAdapters(pb.ListResidentRequest(), timeout=WAIT).adapters] == [b, a]

    missing = pb.AdapterRef(adapter_id="d" * 64)
    error = rpc_error(stub.Prefetch, pb.PrefetchRequest(adapters=[missing, pb.AdapterRef(adapter_id=b)]), timeout=WAIT)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "neither resident nor known" in error.details()
    error = rpc_error(stub.Prefetch, pb.PrefetchRequest(adapters=[pb.AdapterRef()]), timeout=WAIT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------------------------------
# The cache across restarts and without the coordinator
# ---------------------------------------------------------------------------------------------------------


def test_a_restarted_worker_serves_its_cache_while_the_coordinator_is_down(
    coordinator, start_worker, connect, wires, tmp_path
):
    script, target, coordinator_server = coordinator
    a = script.add(wires["a"], TASK.encode())
    b = script.add(wires["b"])
    first = start_worker(coordinator=target)
    _, text, _ = ask(connect(first), pb.AdapterRef(task=TASK))
    first.stop(None)
    coordinator_server.stop(None).wait()

    stub = connect(start_worker(coordinator=target))
    started, again, _ = ask(stub, pb.AdapterRef(task=TASK))
    assert (started.adapter_id, started.resident, again) == (a, True, text)
    assert ask(stub, pb.AdapterRef(adapter_id=a))[0].resident
    assert len(script.described) == 1 and len(script.fetches) == 1

    for ref in (pb.AdapterRef(adapter_id=b), pb.AdapterRef(task="A task nobody asked for before.")):
        error = rpc_error(stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=ref), timeout=WAIT)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()

    lone = connect(start_worker(coordinator=None, cache_dir=tmp_path / "cache"))  # no coordinator configured
    assert ask(lone, pb.AdapterRef(task=TASK))[0].adapter_id == a
    error = rpc_error(lone.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(adapter_id=b)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_a_coordinator_that_does_not_answer_is_unavailable_and_its_deadline_refusal_passed_on(
    coordinator, start_worker, connect, wires
):
    script, target, _ = coordinator
    script.add(wires["a"], TASK.encode())
    stub = connect(start_worker(coordinator=target, coordinator_timeout=0.5))
    error = rpc_error(stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(task="no time")))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert error.details() == "coordinator: making this adapter takes longer: allow more time"

    script.gate = threading.Event()  # making the adapter hangs past the worker's limit on a coordinator call
    error = rpc_error(stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(task=TASK)), timeout=WAIT)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert "cannot be reached" in error.details()


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------


INVALID = {
    "empty prompt": pb.GenerateRequest(prompt=""),
    "blank prompt": pb.GenerateRequest(prompt=" \n\t"),
    "blank task": pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(task="  ")),
    "empty document": pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(document=b"")),
    "too many tokens": pb.GenerateRequest(prompt=PROMPT, max_new_tokens=65),
    "bad adapter id": pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(adapter_id="../../etc/passwd")),
    "unknown mode": pb.GenerateRequest(prompt=PROMPT, mode=7),
    "coordinator says": pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(task="x" * 200)),
}


def test_invalid_requests_are_refused_with_invalid_argument(coordinator, start_worker, connect):
    _, target, _ = coordinator
    stub = connect(start_worker(coordinator=target))
    for name, request in INVALID.items():
        error = rpc_error(stub.Generate, request, timeout=WAIT)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
        assert "\n" not in error.details() and "Traceback" not in error.details()
    error = rpc_error(stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(adapter_id="e" * 64)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_saturated_worker_refuses_with_resource_exhausted_and_retry_after(coordinator, start_worker, connect, wires):
    script, target, _ = coordinator
    script.add(wires["a"], TASK.encode())
    script.gate = threading.Event()
    stub = connect(start_worker(coordinator=target, max_concurrent_answers=1))
    with futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(ask, stub, pb.AdapterRef(task=TASK))
        assert script.entered.wait(WAIT)  # the first generation holds the only slot, waiting on the coordinator
        error = rpc_error(stub.Generate, pb.GenerateRequest(prompt=PROMPT), timeout=WAIT)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(error.trailing_metadata())[RETRY_AFTER_MS] == str(worker_server.BUSY_RETRY_MS)
        script.gate.set()
        assert first.result(WAIT)[2].tokens == NEW_TOKENS
    assert ask(stub)[2].tokens == NEW_TOKENS  # the slot is free again

    # The coordinator's own RESOURCE_EXHAUSTED goes back to the client with its retry-after.
    error = rpc_error(stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterRef(task="busy")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())[RETRY_AFTER_MS] == "1234"


def test_a_bug_is_internal_with_one_line_for_the_client_and_the_traceback_in_the_log(
    start_worker, connect, caplog, monkeypatch
):
    worker = start_worker()

    def broken(user: str) -> list[int]:
        raise RuntimeError("secret detail\nsecond line")

    monkeypatch.setattr(worker.servicer.tokenizer, "encode_chat", broken)
    error = rpc_error(connect(worker).Generate, pb.GenerateRequest(prompt=PROMPT), timeout=WAIT)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error in the worker (RuntimeError); see its log"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "loracast.grpc_errors" and "worker" in record.getMessage()
    assert "Traceback" in caplog.text and "secret detail" in caplog.text


class _EndlessDecoder:
    """Stands in for the OnnxDecoder: one token, then one more each time the server is known to have seen the
    call end, up to max_new_tokens; records how many tokens were taken and when decoding was closed."""

    def __init__(self, token: int, call_ended: threading.Event) -> None:
        self.token, self.call_ended = token, call_ended
        self.taken, self.closed = 0, threading.Event()

    def clear_adapter(self) -> None:
        pass

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> Iterator[int]:
        try:
            for _ in range(max_new_tokens):
                if self.taken:
                    assert self.call_ended.wait(WAIT)
                self.taken += 1
                yield self.token
        finally:
            self.closed.set()


def test_decoding_stops_when_the_client_cancels(start_worker, connect, model_dir):
    worker = start_worker()
    call_ended = threading.Event()
    decoder = _EndlessDecoder(ChatTokenizer(model_dir).encode(" word")[0], call_ended)
    worker.servicer.decoder = decoder
    generate = worker.servicer._generate

    def observed(request, context):
        context.add_callback(call_ended.set)
        return generate(request, context)

    worker.servicer._generate = observed
    call = connect(worker).Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=64), timeout=WAIT)
    assert next(call).WhichOneof("event") == "started" and next(call).WhichOneof("event") == "token"
    call.cancel()
    assert decoder.closed.wait(WAIT), "the worker kept decoding for a client that had gone"
    assert decoder.taken <= 2


def test_with_tokens_configured_unauthenticated_calls_are_refused(start_worker, connect):
    worker = start_worker(security=ServerSecurity(tokens=frozenset({"s3cret"})))
    for token in (None, "wrong"):
        error = rpc_error(connect(worker, token).ListAdapters, pb.ListResidentRequest(), timeout=WAIT)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert connect(worker, "s3cret").ListAdapters(pb.ListResidentRequest(), timeout=WAIT).capacity_bytes > 0


# ---------------------------------------------------------------------------------------------------------
# The command line and the torch-free serving path
# ---------------------------------------------------------------------------------------------------------


def _cli(cache_root: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "LORACAST_CACHE": str(cache_root)}
    return subprocess.Popen([str(LORACAST), "worker", *args], cwd=REPO, env=env, text=True, **kwargs)


def _mapped_files(pid: int) -> str:
    """The shared libraries and files a running process has mapped: an imported torch shows as torch/lib/*.so."""
    return Path(f"/proc/{pid}/maps").read_text()


def test_cli_serve_prints_its_ready_line_and_exits_0_on_sigterm(model_dir, tiny_base_dir, cache_root, tmp_path):
    args = ["serve", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--base", str(tiny_base_dir)]
    process = _cli(cache_root, *args, "--cache-dir", str(tmp_path), "--threads", "1", stdout=subprocess.PIPE)
    try:
        line = process.stdout.readline()
        ready = re.fullmatch(
            r"loracast worker ready: grpc=127\.0\.0\.1:(\d+) metrics=http://127\.0\.0\.1:(\d+)/metrics\n", line
        )
        assert ready, line
        with open_channel(f"127.0.0.1:{ready[1]}") as channel:
            wait_until_serving(channel)
            assert ask(pb_grpc.WorkerStub(channel))[2].tokens == NEW_TOKENS
        with urllib.request.urlopen(f"http://127.0.0.1:{ready[2]}/metrics", timeout=WAIT) as page:
            text = page.read().decode()
        assert f"loracast_generated_tokens_total {float(NEW_TOKENS)}" in text
        assert 'loracast_rpc_total{code="OK",component="worker",method="Generate"} 1.0' in text
        mapped = _mapped_files(process.pid)
        assert "onnxruntime" in mapped and "libtorch" not in mapped, "`loracast worker serve` loaded torch"
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    "args",
    [
        ["--capacity-mb", "0"],
        ["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"],
        ["--token-file", "/nonexistent"],
        ["--listen", "localhost"],
        ["--base", "/nope"],
        ["--cache-dir", "/dev/null"],  # fails only when the adapter store creates its directories
    ],
)
def test_cli_bad_configuration_is_one_line_and_exit_2(args, model_dir, cache_root, tmp_path):
    model = [] if "--base" in args else ["--model", str(model_dir)]  # never the default base: that would export it
    process = _cli(
        cache_root,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-port",
        "0",
        "--cache-dir",
        str(tmp_path),
        *model,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = process.communicate(timeout=WAIT)
    assert process.returncode == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("loracast: error: "), err


def test_worker_export_writes_a_model_plain_onnxruntime_runs(
    coordinator, start_worker, connect, wires, model_dir, fingerprint, tmp_path, capsys
):
    script, target, _ = coordinator
    adapter_id = script.add(wires["b"])
    stub = connect(start_worker(coordinator=target))
    ask(stub, pb.AdapterRef(adapter_id=adapter_id))
    out = tmp_path / "merged.onnx"
    base_args = ["--model", str(model_dir), "--cache-dir", str(tmp_path / "cache")]
    # The 12 digits its own output shows stand for the adapter, as the other ids a user sees do.
    assert cli.main(["worker", "export", "--adapter", adapter_id[:12], "--out", str(out), *base_args]) == 0
    assert f"adapter {adapter_id[:12]}… merged" in capsys.readouterr().out

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert not any(name.startswith("lora") for name in names)
    ids = [1, 2, 3, 4]
    past = session.get_inputs()[3].shape
    feed = {
        onnx_io.INPUT_IDS: np.array([ids], np.int64),
        onnx_io.ATTENTION_MASK: np.ones((1, len(ids)), np.int64),
        onnx_io.POSITION_IDS: np.arange(len(ids), dtype=np.int64)[None],
    }
    feed.update({name: np.zeros((1, past[1], 0, past[3]), np.float32) for name in names[3:]})
    logits = session.run([onnx_io.LOGITS], feed)[0][0]
    received = read_installed(tmp_path / "cache", adapter_id, fingerprint)
    decoder = OnnxDecoder(model_dir / model_cache.MODEL_FILE, intra_op_threads=1)
    assert max_diff(logits, decoder.merged(received.adapter, received.spec).logits(ids)) < TOL

    assert cli.main(["worker", "export", "--adapter", "f" * 64, "--out", str(tmp_path / "x.onnx"), *base_args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loracast: error: adapter ffff") and "not resident" in err and len(err.splitlines()) == 1
    assert cli.main(["worker", "export", "--adapter", "ffff", "--out", str(tmp_path / "x.onnx"), *base_args]) == 2
    assert capsys.readouterr().err == (
        f"loracast: error: no adapter in {tmp_path / 'cache'} starts with ffff: fetch it first (Prefetch, or one "
        "Generate)\n"
    )
    assert cli.main(["worker", "export", "--adapter", adapter_id, "--out", str(tmp_path), *base_args]) == 2
    err = capsys.readouterr().err
    assert err == f"loracast: error: cannot write --out {tmp_path}: Is a directory: give a writable file path\n"


NO_TORCH = """
import re, resource, sys
from pathlib import Path
from loracast.grpc_security import open_channel
from loracast.grpc_server import wait_until_serving
from loracast.v1 import loracast_pb2 as pb, loracast_pb2_grpc as pb_grpc
from worker.server import WorkerConfig, start

model_dir, cache_dir, adapter_id = sys.argv[1:4]
worker = start(WorkerConfig(cache_dir=Path(cache_dir), model_dir=Path(model_dir), listen="127.0.0.1:0",
                            metrics_port=None, intra_op_threads=1))
with open_channel(f"127.0.0.1:{worker.port}") as channel:
    wait_until_serving(channel)
    stub = pb_grpc.WorkerStub(channel)
    for mode in (pb.HOT_SWAP, pb.MERGED):
        ref = pb.AdapterRef(adapter_id=adapter_id)
        request = pb.GenerateRequest(prompt="Hi", max_new_tokens=4, mode=mode, adapter=ref)
        events = list(stub.Generate(request, timeout=60))
        assert events[0].started.resident and events[-1].done.tokens == 4, events
worker.stop(None)
assert "torch" not in sys.modules, "torch was imported"
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_the_serving_path_imports_no_torch(coordinator, start_worker, connect, wires, model_dir, tmp_path):
    script, target, _ = coordinator
    adapter_id = script.add(wires["a"])
    worker = start_worker(coordinator=target)
    ask(connect(worker), pb.AdapterRef(adapter_id=adapter_id))
    worker.stop(None)
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(model_dir), str(tmp_path / "cache"), adapter_id],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    print(f"\nworker serving the tiny model without torch: {result.stdout.strip()}")


def test_int8_activations_is_opt_in_and_reaches_the_decoder(start_worker):
    """`worker serve --int8-activations` -> WorkerConfig -> OnnxDecoder (and its merged sessions); off by default."""
    serve = ["worker", "serve", "--model", "m"]
    assert not cli.parser().parse_args(serve).int8_activations
    assert cli.parser().parse_args([*serve, "--int8-activations"]).int8_activations
    assert not start_worker().servicer.decoder.int8_activations
    decoder = start_worker(int8_activations=True).servicer.decoder
    assert decoder.int8_activations
    out, k = decoder._base_weights({"q_proj"})[onnx_io.weight_name(0, "q_proj")].shape
    adapter = {(0, "q_proj"): (np.zeros((1, k), np.float32), np.zeros((out, 1), np.float32))}
    assert decoder.merged(adapter, LoraSpec(("q_proj",), r=1, alpha=1.0)).int8_activations
