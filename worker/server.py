"""The worker's gRPC server: generation with adapters from the coordinator, on the base model in ONNX Runtime.

The serving path imports no torch: ONNX Runtime, numpy, tokenizers and grpcio (the one-time export in
`worker.model_cache` is the only place torch is used, and only when no exported model is cached).

How a request's adapter is found (`AdapterRef`):
- task / document: a local index (the text's SHA-256, and a document's budget -> the adapter id the coordinator
  answered before) finds a resident adapter with no network call, so those keep working while the coordinator is
  down; otherwise the coordinator makes (or has cached) it and the worker fetches it. An indexed answer is not
  re-checked with the coordinator (that would cost a round trip per request): an adapter from a retrained
  hypernetwork, or from a changed default budget, replaces it once the old one is evicted.
- A document the coordinator internalizes streams its progress to the caller before `started`; a caller that goes
  away cancels the coordinator call, and with it the internalization if nobody else waits for it.
- adapter_id: resident, else fetched from the coordinator.
Every coordinator call goes through `worker.coordinator_client`, which speaks the Coordinator protocol.
Concurrent generations share one `OnnxDecoder`: hot-swap sets the adapter and starts decoding under one lock
(a generation keeps the adapter it started with), merged sessions are kept in a small LRU. An adapter the graph
cannot hot-swap (a module it was not exported with, or a rank above its maximum; the default export takes both
hypernetworks' modules and ranks) is merged instead, whatever mode was asked for: merging folds any linear at any
rank. The `mode` label of the apply-time metric says which was used.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

import grpc

from loracast import adapter_wire
from loracast.adapter_wire import WireError
from loracast.errors import ConfigError
from loracast.grpc_errors import RequestError, abort
from loracast.grpc_security import ClientSecurity, ServerSecurity
from loracast.grpc_server import RunningServer, check_listen, create_server, returned, serve
from loracast.paths import DEFAULT_BASE
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from worker import metrics, model_cache
from worker.adapter_store import AdapterRejected, AdapterStore, DiskFull, NotResident, Resident, TransferBroken
from worker.chat import ChatTokenizer
from worker.coordinator_client import CoordinatorClient
from worker.onnx_session import OnnxDecoder

SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name
BUSY_RETRY_MS = 500  # what a refused client is told to wait: roughly one short generation
MODES = {pb.APPLY_MODE_UNSPECIFIED: "hot_swap", pb.HOT_SWAP: "hot_swap", pb.MERGED: "merged"}
log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    cache_dir: Path  # the adapter cache (see worker.adapter_store)
    coordinator: str | None = None  # HOST:PORT; None: resident adapters and the base model only
    coordinator_security: ClientSecurity = field(default_factory=ClientSecurity)
    listen: str = "127.0.0.1:50052"
    metrics_port: int | None = 9465  # 0 picks a free port; None serves no /metrics
    capacity_bytes: int = 256 * 2**20
    base: str = DEFAULT_BASE  # 'smollm2' or a Hugging Face directory: its cached ONNX export is used
    model_dir: Path | None = None  # an exported model directory instead of `base` (no export, no torch ever)
    max_new_tokens: int = 512  # the most a request may ask for
    default_new_tokens: int = 128  # when a request says 0
    max_concurrent_answers: int = 2  # Generate calls decoding at once; more are refused with RESOURCE_EXHAUSTED
    merged_sessions: int = 1  # merged-adapter sessions kept (each holds a copy of the model's weights)
    dtype: int = pb.FLOAT16  # of the adapters fetched
    intra_op_threads: int = 0  # ONNX Runtime threads per run; 0: one per physical core
    int8_activations: bool = False  # opt-in, lossy: 4-bit linears with int8 activations (see worker.onnx_session)
    # Seconds for one coordinator call (making an adapter, or a transfer), beyond the budget a document names: a
    # document without one has the coordinator's default budget to fit in this time.
    coordinator_timeout: float = 120.0
    security: ServerSecurity = field(default_factory=ServerSecurity)


# What the adapter store's errors answer with (a RequestError carries its status itself).
_STATUSES = MappingProxyType(
    {
        WireError: grpc.StatusCode.INVALID_ARGUMENT,
        NotResident: grpc.StatusCode.UNAVAILABLE,
        AdapterRejected: grpc.StatusCode.FAILED_PRECONDITION,
        TransferBroken: grpc.StatusCode.UNAVAILABLE,
        DiskFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    abort(context, exc, metrics.COMPONENT, _STATUSES)


def _text_key(kind: str, data: bytes) -> str:
    return f"{kind}:{hashlib.sha256(data).hexdigest()}"


def _document_key(ref: pb.AdapterRef) -> str:
    """Each budget is its own adapter; with none, the coordinator's default (whatever it is) is."""
    budget = repr(ref.budget_seconds) if ref.HasField("budget_seconds") else "default"
    return _text_key(f"document@{budget}", ref.document)


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(
        self,
        config: WorkerConfig,
        decoder: OnnxDecoder,
        tokenizer: ChatTokenizer,
        store: AdapterStore,
        coordinator: CoordinatorClient | None,
    ) -> None:
        self.config = config
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.store = store
        self._coordinator = coordinator
        self._slots = threading.BoundedSemaphore(config.max_concurrent_answers)
        self._swap = threading.Lock()  # set_adapter and the start of generate() happen as one step
        self._merged: OrderedDict[str, OnnxDecoder] = OrderedDict()
        self._merged_lock = threading.Lock()

    # -- RPCs -------------------------------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateEvent]:
        try:
            yield from self._generate(request, context)
        except Exception as exc:
            _abort(context, exc)

    def ListAdapters(self, request: pb.ListResidentRequest, context: grpc.ServicerContext) -> pb.ListResidentResponse:
        resident = self.store.resident()
        return pb.ListResidentResponse(
            adapters=[
                pb.ResidentAdapter(
                    adapter_id=m.adapter_id, size_bytes=m.total_size, hypernet_version=m.hypernet_version
                )
                for m in resident
            ],
            capacity_bytes=self.store.capacity_bytes,
            used_bytes=sum(m.total_size for m in resident),
        )

    def Prefetch(self, request: pb.PrefetchRequest, context: grpc.ServicerContext) -> pb.PrefetchResponse:
        try:
            for ref in request.adapters:
                if ref.WhichOneof("source") is None:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "an adapter reference with nothing set")
                self._check_ref(ref)
            return pb.PrefetchResponse(
                adapter_ids=[returned(self._resolve(ref, context))[0].manifest.adapter_id for ref in request.adapters]
            )
        except Exception as exc:
            _abort(context, exc)

    # -- generation -------------------------------------------------------------------------------------------

    def _check_ref(self, ref: pb.AdapterRef) -> None:
        kind = ref.WhichOneof("source")
        if kind == "task" and not ref.task.strip():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the task description is empty: describe the task")
        if kind == "document" and not ref.document:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the document is empty")
        if kind != "document" and ref.HasField("budget_seconds"):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "budget_seconds is for a document: leave it unset for a task or id"
            )
        if kind == "adapter_id":
            adapter_wire.check_adapter_id(ref.adapter_id)

    def _check(self, request: pb.GenerateRequest) -> int:
        """Refuse what cannot be served before any work; returns the number of tokens to generate at most."""
        if not request.prompt.strip():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty: send the user's message")
        if request.max_new_tokens > self.config.max_new_tokens:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_new_tokens {request.max_new_tokens} is over this worker's limit of {self.config.max_new_tokens}",
            )
        if request.mode not in MODES:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown apply mode {request.mode}")
        if request.HasField("adapter"):
            self._check_ref(request.adapter)
        return request.max_new_tokens or min(self.config.default_new_tokens, self.config.max_new_tokens)

    def _generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateEvent]:
        start = time.perf_counter()
        max_new = self._check(request)
        if not self._slots.acquire(blocking=False):
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this worker already runs {self.config.max_concurrent_answers} generations, its maximum: retry later",
                retry_after_ms=BUSY_RETRY_MS,
            )
        try:
            ref = request.adapter if request.HasField("adapter") and request.adapter.WhichOneof("source") else None
            resident, fetch_seconds = (yield from self._resolve(ref, context)) if ref is not None else (None, 0.0)
            prompt = self.tokenizer.encode_chat(request.prompt)
            applied = time.perf_counter()
            mode = self._mode(resident, MODES[request.mode])
            ids = self._start_decoding(resident, mode, prompt, max_new)
            apply_seconds = time.perf_counter() - applied
            if resident is not None:
                metrics.APPLY_SECONDS.labels(mode=mode).observe(apply_seconds)
            yield pb.GenerateEvent(
                started=pb.GenerateEvent.Started(
                    adapter_id=resident.manifest.adapter_id if resident else "",
                    resident=bool(resident and resident.was_resident),
                )
            )

            count, first_token = 0, 0.0

            def counted() -> Iterator[int]:
                nonlocal count
                last = time.perf_counter()
                for token in ids:
                    now = time.perf_counter()
                    if count:
                        metrics.INTER_TOKEN.observe(now - last)
                    last, count = now, count + 1
                    metrics.GENERATED_TOKENS.inc()
                    yield token
                    if not context.is_active():  # cancelled, or the deadline passed: stop decoding
                        return

            for piece in self.tokenizer.decode_stream(counted()):
                if not first_token:
                    first_token = time.perf_counter() - start
                    metrics.TIME_TO_FIRST_TOKEN.observe(first_token)
                yield pb.GenerateEvent(token=pb.GenerateEvent.Token(text=piece))
            if not context.is_active():
                return
            timings = pb.Timings(
                adapter_fetch_seconds=fetch_seconds,
                apply_seconds=apply_seconds,
                first_token_seconds=first_token,
                total_seconds=time.perf_counter() - start,
            )
            yield pb.GenerateEvent(done=pb.GenerateEvent.Done(tokens=count, timings=timings))
            log.debug(
                "answered with adapter %s (%s): %d tokens in %.2f s",
                resident.manifest.adapter_id[:12] if resident else "none",
                mode,
                count,
                timings.total_seconds,
            )
        finally:
            self._slots.release()

    def _mode(self, resident: Resident | None, asked: str) -> str:
        """The mode an adapter is applied in: the one asked for, or merged when the graph cannot hot-swap it."""
        if resident is None or self.decoder.hot_swap_refusal(resident.adapter, resident.spec) is None:
            return asked
        return "merged"

    def _start_decoding(self, resident: Resident | None, mode: str, prompt: list[int], max_new: int) -> Iterator[int]:
        eos = self.tokenizer.eos_id
        try:
            if resident is not None and mode == "merged":
                return self._merged_decoder(resident).generate(prompt, max_new, eos)
            with self._swap:
                if resident is None:
                    self.decoder.clear_adapter()
                else:
                    self.decoder.set_adapter(resident.adapter, resident.spec)
                return self.decoder.generate(prompt, max_new, eos)
        except ValueError as exc:  # the adapter does not fit this graph (rank, modules, shapes)
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot apply the adapter: {exc}") from None

    def _merged_decoder(self, resident: Resident) -> OnnxDecoder:
        adapter_id = resident.manifest.adapter_id
        with self._merged_lock:
            decoder = self._merged.get(adapter_id)
            if decoder is None:
                decoder = self.decoder.merged(resident.adapter, resident.spec)
                self._merged[adapter_id] = decoder
                while len(self._merged) > self.config.merged_sessions:
                    self._merged.popitem(last=False)
            self._merged.move_to_end(adapter_id)
            return decoder

    # -- adapters from the coordinator ------------------------------------------------------------------------

    def _resolve(
        self, ref: pb.AdapterRef, context: grpc.ServicerContext
    ) -> Generator[pb.GenerateEvent, None, tuple[Resident, float]]:
        """The adapter a reference names, installed, and the seconds spent getting it (0 when resident); yields
        the progress of a document's internalization on the way."""
        start = time.perf_counter()
        kind = ref.WhichOneof("source")
        source = self._coordinator.fetch_source(context) if self._coordinator is not None else None
        try:
            if kind == "adapter_id":
                resident = self.store.ensure(ref.adapter_id, source)
            else:
                # A task or document: the adapter an earlier answer gave if it is resident, else the coordinator's.
                key = _text_key("description", ref.task.strip().encode()) if kind == "task" else _document_key(ref)
                adapter_id = self.store.recall(key)
                if adapter_id is not None:
                    resident = self.store.ensure(adapter_id, source)
                else:
                    if kind == "task":
                        manifest = self._require_coordinator().describe(ref.task, context)
                    else:
                        manifest = yield from self._internalize(ref, context)
                    resident = self.store.ensure(manifest.adapter_id, source, manifest)
                    self.store.remember(key, manifest.adapter_id)
        except grpc.RpcError as exc:  # only a coordinator call raises it
            raise self._require_coordinator().error(exc, context, ref) from None
        return resident, 0.0 if resident.was_resident else time.perf_counter() - start

    def _require_coordinator(self) -> CoordinatorClient:
        if self._coordinator is None:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                "no resident adapter for this request and this worker has no coordinator: start it with --coordinator",
            )
        return self._coordinator

    def _internalize(
        self, ref: pb.AdapterRef, context: grpc.ServicerContext
    ) -> Generator[pb.GenerateEvent, None, pb.AdapterManifest]:
        """The coordinator's internalization of the request's document, its progress passed on as it comes."""
        progress = self._require_coordinator().internalize(ref, context)
        while True:
            try:
                event = next(progress)
            except StopIteration as done:
                return done.value
            yield pb.GenerateEvent(progress=event)


@dataclass
class RunningWorker(RunningServer):
    servicer: WorkerServicer
    coordinator: CoordinatorClient | None

    def release(self) -> None:
        if self.coordinator is not None:
            self.coordinator.close()


def _check_config(config: WorkerConfig) -> None:
    if config.capacity_bytes <= 0:
        raise ConfigError(f"the adapter cache capacity must be positive, not {config.capacity_bytes} bytes")
    if config.max_concurrent_answers < 1 or config.max_new_tokens < 1 or config.merged_sessions < 1:
        raise ConfigError("max concurrent answers, max new tokens and merged sessions must be at least 1")


def start(config: WorkerConfig) -> RunningWorker:
    """Load the model, reload the adapter cache, and serve; returns once the server is SERVING."""
    _check_config(config)
    host = check_listen(config.listen)
    config.security.credentials()  # unreadable certificates fail now, not after the model has loaded
    coordinator = (
        CoordinatorClient(
            config.coordinator, config.coordinator_security, config.dtype, config.coordinator_timeout, BUSY_RETRY_MS
        )
        if config.coordinator
        else None
    )
    model_dir = model_cache.check_exported(config.model_dir) if config.model_dir else model_cache.prepare(config.base)
    decoder = OnnxDecoder(
        model_dir / model_cache.MODEL_FILE,
        intra_op_threads=config.intra_op_threads,
        int8_activations=config.int8_activations,
    )
    if not decoder.fingerprint:
        raise ConfigError(f"{model_dir} records no base model fingerprint: export it again with `--base`")
    tokenizer = ChatTokenizer(model_dir)
    store = AdapterStore(config.cache_dir, config.capacity_bytes, decoder.fingerprint)
    log.info(
        "model %s (base %s…), %d adapters resident in %s",
        model_dir,
        decoder.fingerprint[:12],
        len(store.resident()),
        config.cache_dir,
    )
    servicer = WorkerServicer(config, decoder, tokenizer, store, coordinator)
    # Threads beyond the generation slots answer ListAdapters, Prefetch and refusals while generations run.
    server = create_server(metrics.COMPONENT, config.security, max_workers=config.max_concurrent_answers + 8)
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    port, health_servicer, metrics_server = serve(
        server, config.listen, config.security, [SERVICE], host, config.metrics_port
    )
    return RunningWorker(
        metrics.COMPONENT,
        server,
        health_servicer,
        host,
        port,
        metrics_server,
        servicer=servicer,
        coordinator=coordinator,
    )
