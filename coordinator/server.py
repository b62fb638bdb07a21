"""The coordinator's gRPC server: hypernetworks turn texts into adapters, a content-addressed cache keeps them,
FetchAdapter streams them (protos/loracast/v1/loracast.proto documents every RPC and its errors).

- A text (description or document) is looked up by its source key first: the same text through the same
  checkpoint never costs a second generation, across restarts, and concurrent asks for one text share one pass.
- At most `max_concurrent` generations run at once; one more is refused at once with RESOURCE_EXHAUSTED and a
  `retry-after-ms` trailer (about one generation's time), so callers back off instead of queueing unseen.
- A call whose deadline leaves less than a typical generation of that kind is refused with DEADLINE_EXCEEDED
  before it takes a slot.
- Documents exist only in memory during their call: never written to disk, never logged.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn, Protocol

import grpc

from coordinator import metrics
from coordinator.adapter_cache import AdapterCache, CacheError, NotCached, PageTokenError, source_key
from hypernet import checkpoint
from hypernet.generate import DocToLoRAGenerator, InputError, TextToLoRAGenerator, check_description
from loracast import adapter_wire, base_model
from loracast.adapter_format import Adapter
from loracast.adapter_wire import WireError
from loracast.grpc_common import (
    ConfigError,
    MalformedRequest,
    RequestError,
    RunningServer,
    ServerSecurity,
    abort,
    check_listen,
    create_server,
    serve,
    streamed,
)
from loracast.lora_spec import LoraSpec
from loracast.paths import DEFAULT_BASE, cache_root
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
MIN_RETRY_MS = 100  # what a refused caller is told to wait before any generation has been timed
_NAMES = {"t2l": "Text-to-LoRA", "d2l": "Doc-to-LoRA"}


def default_cache_dir() -> Path:
    return cache_root() / "coordinator"


@dataclass
class CoordinatorConfig:
    cache_dir: Path = field(default_factory=default_cache_dir)
    listen: str = "127.0.0.1:50051"  # HOST:PORT; port 0 picks a free one
    metrics_port: int | None = 9464  # 0 picks a free port; None serves no /metrics
    t2l_checkpoint: Path = checkpoint.DEFAULT_T2L
    # Served when the file exists; a path other than the default must exist. None: no Doc-to-LoRA.
    d2l_checkpoint: Path | None = checkpoint.DEFAULT_D2L
    base: str = DEFAULT_BASE  # 'smollm2' or a Hugging Face directory: the checkpoint must match it
    max_concurrent: int = 2  # generations in flight; more are refused with RESOURCE_EXHAUSTED
    max_document_bytes: int = 2**20
    cache_capacity_bytes: int | None = 4 * 2**30  # None: unbounded
    security: ServerSecurity = field(default_factory=ServerSecurity)


class Generator(Protocol):
    """What the servicer needs of a hypernetwork: TextToLoRAGenerator, DocToLoRAGenerator."""

    path: Path  # its checkpoint
    fingerprint: str  # of the base model its adapters are for
    spec: LoraSpec  # what Describe reports (for Doc-to-LoRA: the rank per document chunk)

    def generate(self, text: str) -> Adapter: ...

    def spec_for(self, adapter: Adapter) -> LoraSpec: ...  # one adapter's own (Doc-to-LoRA: its rank grows)

    def metadata(self, text: str) -> dict[str, str]: ...


@dataclass(frozen=True)
class Hypernet:
    """A loaded hypernetwork as the servicer serves it."""

    kind: str  # "t2l" or "d2l": the `kind` of Describe and of the generation-time metric
    generator: Generator
    version: str
    checkpoint_sha256: str  # part of every source key: a retrained checkpoint keeps its version string

    @classmethod
    def of(cls, kind: str, generator: Generator) -> Hypernet:
        digest = hashlib.sha256()
        with open(generator.path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        # The version the generator stamps on its adapters; the text is irrelevant to it.
        version = generator.metadata("")[adapter_wire.META_HYPERNET_VERSION]
        return cls(kind, generator, version, digest.hexdigest())

    def describe(self) -> pb.Hypernetwork:
        spec = self.generator.spec
        return pb.Hypernetwork(
            kind=self.kind,
            hypernet_version=self.version,
            rank=spec.r,
            alpha=spec.alpha,
            target_modules=spec.target_modules,
        )


# What the coordinator's own errors answer with (a RequestError carries its status itself).
_STATUSES = MappingProxyType(
    {
        InputError: grpc.StatusCode.INVALID_ARGUMENT,
        WireError: grpc.StatusCode.INVALID_ARGUMENT,
        MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
        NotCached: grpc.StatusCode.NOT_FOUND,
        PageTokenError: grpc.StatusCode.INVALID_ARGUMENT,
    }
)


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    abort(context, exc, metrics.COMPONENT, _STATUSES)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        config: CoordinatorConfig,
        cache: AdapterCache,
        hypernets: Iterable[Hypernet],
        base_fingerprint: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config
        self.cache = cache
        self.hypernets = {net.kind: net for net in hypernets}
        self.base_fingerprint = base_fingerprint
        self._clock = clock
        self._slots = threading.BoundedSemaphore(config.max_concurrent)
        self._lock = threading.Lock()
        self._pending: dict[str, Future[str]] = {}  # source key -> the adapter id its running generation makes
        self._typical: dict[str, float] = {}  # kind -> recent generation seconds (moving average)
        for kind in self.hypernets:
            metrics.GENERATION_SECONDS.labels(kind=kind)  # the series exists (at 0) before the first generation

    # -- RPCs -------------------------------------------------------------------------------------------------

    def GenerateFromDescription(
        self, request: pb.GenerateFromDescriptionRequest, context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        try:
            text = check_description(request.description)
            return self._adapter_for(self._hypernet("t2l"), text, adapter_wire.wire_dtype(request.dtype), context)
        except Exception as exc:
            _abort(context, exc)

    def InternalizeDocument(
        self, request_iterator: Iterator[pb.DocumentChunk], context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        try:
            text, dtype = self._read_document(request_iterator)
            return self._adapter_for(self._hypernet("d2l"), text, dtype, context)
        except Exception as exc:
            _abort(context, exc)

    def FetchAdapter(self, request: pb.FetchAdapterRequest, context: grpc.ServicerContext) -> Iterator[pb.AdapterChunk]:
        try:
            chunk_size = adapter_wire.check_chunk_size(request.chunk_size)
            wire = self.cache.get(request.adapter_id, request.dtype)
            data = adapter_wire.chunks(wire.payload, request.offset, chunk_size)  # checks the offset
            start = self._clock()
            yield pb.AdapterChunk(manifest=wire.manifest)
            end = request.offset
            for chunk in streamed(data, context):
                yield pb.AdapterChunk(data=chunk)
                metrics.BYTES_SENT.inc(len(chunk.data))
                end = chunk.offset + len(chunk.data)
            if end == wire.manifest.total_size:  # a transfer the client abandoned has no meaningful duration
                metrics.TRANSFER.observe(self._clock() - start)
        except Exception as exc:
            _abort(context, exc)

    def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext) -> pb.ListAdaptersResponse:
        try:
            adapters, next_page_token = self.cache.summaries(request.page_size, request.page_token)
            return pb.ListAdaptersResponse(adapters=adapters, next_page_token=next_page_token)
        except Exception as exc:
            _abort(context, exc)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        try:
            return pb.DescribeResponse(
                base_fingerprint=self.base_fingerprint,
                base_name=self.config.base,
                hypernetworks=[net.describe() for net in self.hypernets.values()],
            )
        except Exception as exc:
            _abort(context, exc)

    # -- generation -------------------------------------------------------------------------------------------

    def _hypernet(self, kind: str) -> Hypernet:
        net = self.hypernets.get(kind)
        if net is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"no {_NAMES[kind]} hypernetwork is loaded")
        return net

    def _read_document(self, request_iterator: Iterator[pb.DocumentChunk]) -> tuple[str, int]:
        """The whole document, checked while it streams in; it stays in this call's memory only."""
        limit = self.config.max_document_bytes
        document, dtype = bytearray(), None
        for chunk in request_iterator:
            if dtype is None:
                dtype = adapter_wire.wire_dtype(chunk.dtype)
            if len(document) + len(chunk.data) > limit:  # refuse before holding more than the limit
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"the document is over the {limit}-byte limit: send a shorter one"
                )
            document += chunk.data
        try:
            text = document.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"the document is not UTF-8 text (bad byte at offset {exc.start})"
            ) from None
        if not text.strip():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the document is empty: send its text")
        return text, dtype

    def _adapter_for(self, net: Hypernet, text: str, dtype: int, context: grpc.ServicerContext) -> pb.GenerateResponse:
        key = source_key(net.kind, net.version, net.checkpoint_sha256, text)
        cached = self.cache.find(key, dtype)
        if cached is not None:
            metrics.CACHE_HITS.inc()
            return pb.GenerateResponse(manifest=cached.manifest, cached=True)
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                self._admit(net, context)
                pending = self._pending[key] = Future()
                leading = True
            else:
                leading = False
        if not leading:  # the same text is being generated for another call: share its result
            metrics.CACHE_HITS.inc()
            try:
                # Without a deadline, time_remaining() is ~9e18 s, more than a thread may wait.
                adapter_id = pending.result(timeout=min(context.time_remaining(), threading.TIMEOUT_MAX))
            except FutureTimeout:
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while this adapter was being generated"
                ) from None
            return pb.GenerateResponse(manifest=self.cache.get(adapter_id, dtype).manifest, cached=True)
        try:
            # A generation of this text may have finished between the lookup above and taking the lead.
            wire = self.cache.find(key, dtype)
            if wire is None:
                response = self._generate(net, key, text, dtype)
            else:
                metrics.CACHE_HITS.inc()
                response = pb.GenerateResponse(manifest=wire.manifest, cached=True)
            pending.set_result(response.manifest.adapter_id)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._pending[key]
            self._slots.release()
        return response

    def _generate(self, net: Hypernet, key: str, text: str, dtype: int) -> pb.GenerateResponse:
        """One hypernetwork pass, its adapter cached (even when the caller's deadline has passed meanwhile: its
        retry is then a hit)."""
        metrics.CACHE_MISSES.inc()
        with metrics.IN_FLIGHT.track_inprogress():
            start = self._clock()
            adapter = net.generator.generate(text)
            seconds = self._clock() - start
        wire = self.cache.put(key, adapter, net.generator.spec_for(adapter), net.generator.metadata(text), dtype)
        metrics.GENERATION_SECONDS.labels(kind=net.kind).observe(seconds)
        with self._lock:
            previous = self._typical.get(net.kind)
            self._typical[net.kind] = seconds if previous is None else 0.7 * previous + 0.3 * seconds
        return pb.GenerateResponse(manifest=wire.manifest, cached=False, generation_seconds=seconds)

    def _admit(self, net: Hypernet, context: grpc.ServicerContext) -> None:
        """Under the lock: take a generation slot, or refuse (deadline too short, all slots busy)."""
        typical = self._typical.get(net.kind, 0.0)
        remaining = context.time_remaining()
        if remaining <= 0 or remaining < typical:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline leaves {remaining:.2f} s and a {_NAMES[net.kind]} generation takes about "
                f"{typical:.2f} s here: allow more time",
            )
        if not self._slots.acquire(blocking=False):
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this coordinator already runs {self.config.max_concurrent} generations, its maximum: retry later",
                retry_after_ms=max(MIN_RETRY_MS, round(1000 * typical)),
            )


@dataclass
class RunningCoordinator(RunningServer):
    servicer: CoordinatorServicer
    cache: AdapterCache

    def release(self) -> None:
        self.cache.close()


def _check_config(config: CoordinatorConfig) -> str:
    """Everything that can be checked before the slow loads; returns the listen host."""
    if config.max_concurrent < 1:
        raise ConfigError(f"max concurrent generations must be at least 1, not {config.max_concurrent}")
    if config.max_document_bytes < 1:
        raise ConfigError(f"the document size limit must be positive, not {config.max_document_bytes} bytes")
    if config.cache_capacity_bytes is not None and config.cache_capacity_bytes <= 0:
        raise ConfigError(f"the cache capacity must be positive, not {config.cache_capacity_bytes} bytes")
    config.security.credentials()  # reads the certificate files: a missing one fails now
    return check_listen(config.listen)


def _wants_d2l(config: CoordinatorConfig) -> bool:
    """Whether `config` asks for Doc-to-LoRA: a named checkpoint must load, the default one only once it is shipped."""
    path = config.d2l_checkpoint
    return path is not None and (Path(path) != checkpoint.DEFAULT_D2L or checkpoint.DEFAULT_D2L.is_file())


def load_hypernets(config: CoordinatorConfig, t2l: Generator | None = None) -> tuple[list[Hypernet], str]:
    """The hypernetworks of `config`, checked against its base model, and that base's fingerprint: Text-to-LoRA
    (`t2l` when given, else its checkpoint) and Doc-to-LoRA when `config` asks for it."""
    # The base model is loaded, not just named, to verify the checkpoints were trained for it, and Doc-to-LoRA
    # encodes documents with it: one copy in memory serves both.
    d2l = _wants_d2l(config)
    base = base_model.load(config.base) if t2l is None or d2l else None
    if t2l is None:
        t2l = TextToLoRAGenerator(config.t2l_checkpoint, base)
    nets = [Hypernet.of("t2l", t2l)]
    if d2l and Path(config.d2l_checkpoint) == checkpoint.DEFAULT_D2L:
        # The shipped checkpoint serves the default base only; with another base, documents are simply not
        # served (a checkpoint named on the command line must fit, and fails the start otherwise).
        trained_for = checkpoint.read_metadata(checkpoint.DEFAULT_D2L).get("base_fingerprint")
        if trained_for != base.fingerprint:
            print("the shipped Doc-to-LoRA checkpoint is for another base: documents are not served", file=sys.stderr)
            d2l = False
    if d2l:
        nets.append(Hypernet.of("d2l", DocToLoRAGenerator(config.d2l_checkpoint, base)))
    return nets, t2l.fingerprint


def start(
    config: CoordinatorConfig,
    t2l: Generator | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> RunningCoordinator:
    """Load the hypernetworks (`t2l` replaces the Text-to-LoRA checkpoint), open the cache, serve; returns once the
    server is SERVING.

    Raises ConfigError for anything in `config` that cannot work, CheckpointError / BaseModelError for models.
    """
    host = _check_config(config)
    nets, fingerprint = load_hypernets(config, t2l)
    try:
        cache = AdapterCache(config.cache_dir, config.cache_capacity_bytes)
    except CacheError as exc:
        raise ConfigError(str(exc)) from exc
    metrics.CACHED_ADAPTERS.set_function(lambda: len(cache.entries()))
    metrics.CACHED_BYTES.set_function(lambda: cache.size_bytes)
    servicer = CoordinatorServicer(config, cache, nets, fingerprint, clock)
    # Threads beyond the generation slots answer fetches, lists and refusals while generations run.
    server = create_server(metrics.COMPONENT, config.security, max_workers=config.max_concurrent + 8)
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    try:
        port, health_servicer, metrics_server = serve(
            server, config.listen, config.security, [SERVICE], host, config.metrics_port
        )
    except ConfigError:
        cache.close()
        raise
    return RunningCoordinator(
        metrics.COMPONENT, server, health_servicer, host, port, metrics_server, servicer=servicer, cache=cache
    )
