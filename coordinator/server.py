"""The coordinator's gRPC server: hypernetworks turn texts into adapters, a content-addressed cache keeps them,
FetchAdapter streams them (protos/loracast/v1/loracast.proto documents every RPC and its errors).

- A text (description, or document and budget) is looked up by its source key in the adapter store first
  (coordinator/adapter_store.py: a local directory, or Redis shared by a cluster of coordinators): the same text
  through the same checkpoint never costs a second pass, across restarts, and concurrent asks for one text
  share one job; across coordinators, a claim in the store lets one of them make it while the others wait.
- A document's job (one pass, then self-distillation for its budget) runs in a thread of its own and streams its
  progress to every call that follows it; when the last of them goes away, the job is cancelled at its next step
  and leaves nothing behind.
- At most `max_concurrent_passes` adapters are made at once (a wait for another coordinator's pass of the same text
  counts as one), and one document at a time (the Doc-to-LoRA maker runs its jobs one after another); one more
  is refused at once with RESOURCE_EXHAUSTED and a `retry-after-ms` trailer, so callers back off instead of
  queueing unseen.
- A call whose deadline leaves less than its budget plus the usual overrun of that kind (for a description: a
  typical pass) is refused with DEADLINE_EXCEEDED before it takes a slot.
- Documents, and the probes and teacher answers made from them, exist only in memory during their job: never
  written to disk, never logged.
"""

from __future__ import annotations

import base64
import binascii
import collections.abc
import functools
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn, Protocol, cast

import grpc
from grpc_health.v1 import health, health_pb2

from coordinator import metrics
from coordinator.adapter_store import Abandoned, AdapterStore, NotCached, StoreUnavailable, source_key, source_of
from coordinator.local_store import LocalStore
from hypernet import checkpoint
from hypernet.makers import MAX_BUDGET_S, DocToLoRAMaker, InputError, TextToLoRAMaker, check_description
from hypernet.self_distill import Cancelled, DistillConfig, Progress
from loracast import adapter_wire, base_model
from loracast.adapter_format import Adapter
from loracast.adapter_wire import WireError
from loracast.errors import ConfigError
from loracast.grpc_errors import MalformedRequest, RequestError, abort
from loracast.grpc_security import ServerSecurity
from loracast.grpc_server import RunningServer, check_listen, create_server, returned, serve, streamed
from loracast.lora_spec import LoraSpec
from loracast.paths import DEFAULT_BASE, cache_root
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
MIN_RETRY_MS = 100  # what a refused caller is told to wait before any pass has been timed
OUTCOMES = ("done", "cancelled", "failed")  # of an internalization, as its metric counts them
_NAMES = {"t2l": "Text-to-LoRA", "d2l": "Doc-to-LoRA"}
DEFAULT_PAGE_SIZE = 100  # ListAdapters
MAX_PAGE_SIZE = 1000
STORE_HEALTH = "loracast.store"  # the grpc.health.v1 service that says whether the adapter store is reachable
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return cache_root() / "coordinator"


@dataclass
class CoordinatorConfig:
    cache_dir: Path = field(default_factory=default_cache_dir)  # the local store's; unused with `store`
    # redis://HOST:PORT/DB: a Redis shared by every coordinator of a cluster; None: the local directory `cache_dir`
    store: str | None = None
    listen: str = "127.0.0.1:50051"  # HOST:PORT; port 0 picks a free one
    metrics_port: int | None = 9464  # 0 picks a free port; None serves no /metrics
    t2l_checkpoint: Path = checkpoint.DEFAULT_T2L
    # Served when the file exists; a path other than the default must exist. None: no Doc-to-LoRA.
    d2l_checkpoint: Path | None = checkpoint.DEFAULT_D2L
    base: str = DEFAULT_BASE  # 'smollm2' or a Hugging Face directory: the checkpoint must match it
    # Hypernetwork passes in flight (a wait for another coordinator's pass of the same text is one); more are
    # refused with RESOURCE_EXHAUSTED
    max_concurrent_passes: int = 2
    max_document_bytes: int = 2**20
    # The budget of a document whose request names none, in seconds (the maker gives a long document more, in
    # proportion to its length); None: the Doc-to-LoRA maker's own default.
    budget_seconds: float | None = None
    # The store's bound in bytes (Redis: one bound for the cluster: give every coordinator the same); None: unbounded
    cache_capacity_bytes: int | None = 4 * 2**30
    security: ServerSecurity = field(default_factory=ServerSecurity)


class Maker(Protocol):
    """What the servicer needs of a hypernetwork: TextToLoRAMaker, DocToLoRAMaker."""

    path: Path  # its checkpoint
    fingerprint: str  # of the base model its adapters are for
    spec: LoraSpec  # what Describe reports (for Doc-to-LoRA: the rank per document chunk)

    def make_adapter(self, text: str) -> Adapter: ...

    def spec_for(self, adapter: Adapter) -> LoraSpec: ...  # one adapter's own (Doc-to-LoRA: its rank grows)

    def metadata(self, text: str) -> dict[str, str]: ...


class DocumentMaker(Maker, Protocol):
    """What Doc-to-LoRA adds: an internalization with a budget, progress and cancellation (DocToLoRAMaker)."""

    distill: DistillConfig  # its budget_s: the default budget (per so many document tokens)

    # None: the default for `document`; out of range: InputError
    def budget_for(self, budget_s: float | None, document: str = "") -> float: ...

    def internalize(
        self,
        document: str,
        budget_s: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Adapter: ...  # raises Cancelled once cancelled() is true


@dataclass(frozen=True)
class Hypernet:
    """A loaded hypernetwork as the servicer serves it."""

    kind: str  # "t2l" or "d2l": the `kind` of Describe and of the adapter-making time metric
    maker: Maker
    version: str
    checkpoint_sha256: str  # part of every source key: a retrained checkpoint keeps its version string

    @classmethod
    def of(cls, kind: str, maker: Maker) -> Hypernet:
        digest = hashlib.sha256()
        with open(maker.path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        # The version the maker stamps on its adapters; the text is irrelevant to it.
        version = maker.metadata("")[adapter_wire.META_HYPERNET_VERSION]
        return cls(kind, maker, version, digest.hexdigest())

    def describe(self) -> pb.Hypernetwork:
        spec = self.maker.spec
        return pb.Hypernetwork(
            kind=self.kind,
            hypernet_version=self.version,
            rank=spec.r,
            alpha=spec.alpha,
            target_modules=spec.target_modules,
        )


@dataclass(frozen=True)
class _Made:
    adapter_id: str
    seconds: float | None  # None: found in the cache after all, no hypernetwork ran


class _Job:
    """The making of one adapter, shared by every call that asks for its source while it runs.

    Each call follows it until the call ends: it sees the job's progress from the first event, then its adapter id
    or its error. A job no call follows any more is cancelled as soon as it asks (`cancelled`, polled by an
    internalization between its steps), and from then on no call may join it: nobody ever receives a Cancelled.
    """

    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s  # None: one pass (Text-to-LoRA), not an internalization
        self._changed = threading.Condition()
        self._events: list[pb.InternalizeEvent] = []
        self._followers = 0
        self._cancelled = False
        self._outcome: _Made | BaseException | None = None

    def join(self, context: grpc.ServicerContext) -> bool:
        """Count `context`'s call as a follower until it ends; False if the job is cancelled already."""
        with self._changed:
            if self._cancelled:
                return False
            self._followers += 1
        if not context.add_callback(self._leave):  # the call has ended already
            self._leave()
        return True

    def _leave(self) -> None:
        with self._changed:
            self._followers -= 1
            self._changed.notify_all()  # wakes the follower whose call just ended

    def cancelled(self) -> bool:
        with self._changed:
            self._cancelled = self._cancelled or self._followers == 0
            return self._cancelled

    def wanted(self) -> bool:
        with self._changed:
            return self._followers > 0

    def report(self, progress: Progress) -> None:
        event = pb.InternalizeEvent(
            progress=pb.InternalizeProgress(
                phase=progress.phase,
                step=progress.step,
                probe_loss=progress.probe_loss,
                elapsed_seconds=progress.elapsed_s,
                estimate_seconds=progress.estimate_s,
            )
        )
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()

    def latest(self) -> pb.InternalizeProgress | None:
        with self._changed:
            return self._events[-1].progress if self._events else None

    def remaining_s(self) -> float:
        """Seconds until the job should end, from its latest estimate (its whole budget before the first)."""
        latest = self.latest()
        if latest is None:
            return self.budget_s or 0.0
        return max(0.0, latest.estimate_seconds - latest.elapsed_seconds)

    def end(self, outcome: _Made | BaseException) -> None:
        with self._changed:
            self._outcome = outcome
            self._changed.notify_all()

    def _news_for(self, seen: int, context: grpc.ServicerContext) -> bool:
        """Under the lock: whether a follower that has seen `seen` events has something to act on."""
        return len(self._events) > seen or self._outcome is not None or not context.is_active()

    def follow(self, context: grpc.ServicerContext) -> collections.abc.Generator[pb.InternalizeEvent, None, _Made]:
        """The job's progress events as they come, then its outcome (returned, or its error raised), until
        `context`'s deadline passes or its caller goes away."""
        seen = 0
        while True:
            with self._changed:
                self._changed.wait_for(
                    functools.partial(self._news_for, seen, context),
                    # Without a deadline, time_remaining() is ~9e18 s, more than a thread may wait.
                    timeout=min(max(context.time_remaining(), 0.0), threading.TIMEOUT_MAX),
                )
                events, outcome = self._events[seen:], self._outcome
            seen += len(events)
            yield from events
            # A job ends Abandoned only once its followers have left: this call's own end says why.
            if isinstance(outcome, BaseException) and not isinstance(outcome, Abandoned):
                raise outcome
            if isinstance(outcome, _Made):
                return outcome
            if context.time_remaining() <= 0:
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while this adapter was being made"
                )
            if not context.is_active() or outcome is not None:
                raise RequestError(grpc.StatusCode.CANCELLED, "the caller went away")


# What the coordinator's own errors and its store's answer with (a RequestError carries its status itself).
_STATUSES = MappingProxyType(
    {
        InputError: grpc.StatusCode.INVALID_ARGUMENT,
        WireError: grpc.StatusCode.INVALID_ARGUMENT,
        MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
        NotCached: grpc.StatusCode.NOT_FOUND,
        StoreUnavailable: grpc.StatusCode.UNAVAILABLE,  # a retry may reach a coordinator that holds it
    }
)


def page_token(stamp: int) -> str:
    """The opaque token of the ListAdapters page after the adapter used at `stamp`: it names no coordinator, so
    any coordinator of the store continues the listing (and after a restart too)."""
    return base64.urlsafe_b64encode(f"before:{stamp}".encode()).decode().rstrip("=")


def read_page_token(token: str) -> int:
    try:
        kind, _, stamp = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii").partition(":")
        if kind == "before" and stamp.isdigit():
            return int(stamp)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise RequestError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"page_token {token[:40]!r} is not one a coordinator issued; list from the start",
    )


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    abort(context, exc, metrics.COMPONENT, _STATUSES)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        config: CoordinatorConfig,
        store: AdapterStore,
        hypernets: Iterable[Hypernet],
        base_fingerprint: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config
        self.store = store
        self.hypernets = {net.kind: net for net in hypernets}
        self.base_fingerprint = base_fingerprint
        self._clock = clock
        self._slots = threading.BoundedSemaphore(config.max_concurrent_passes)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified whenever a job ends
        self._pending: dict[str, _Job] = {}  # source key -> its running job, the one a new call may join
        self._running = 0  # jobs not ended yet, those a cancelled job's successor replaced in _pending included
        # kind -> recent seconds making an adapter took beyond its budget (moving average): a pass, for a description
        self._overrun: dict[str, float] = {}
        for kind in self.hypernets:
            metrics.MAKE_SECONDS.labels(kind=kind)  # the series exists (at 0) before the first adapter is made
        if "d2l" in self.hypernets:
            for outcome in OUTCOMES:
                metrics.INTERNALIZATIONS.labels(outcome=outcome)

    def close(self) -> None:
        """Wait for the jobs still running, so that none writes to the store after it is closed. Call it once the
        server has stopped: its calls are gone, so an internalization is cancelled at its next step."""
        with self._lock:
            self._idle.wait_for(lambda: self._running == 0)

    # -- RPCs -------------------------------------------------------------------------------------------------

    def GenerateFromDescription(
        self, request: pb.GenerateFromDescriptionRequest, context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        """Makes (or finds) the adapter of a description; the RPC's name is kept for wire compatibility."""
        try:
            text = check_description(request.description)
            net, dtype = self._hypernet("t2l"), adapter_wire.wire_dtype(request.dtype)
            return returned(self._adapter_for(net, text, None, dtype, context))
        except Exception as exc:
            _abort(context, exc)

    def InternalizeDocument(
        self, request_iterator: Iterator[pb.DocumentChunk], context: grpc.ServicerContext
    ) -> Iterator[pb.InternalizeEvent]:
        try:
            text, dtype, budget = self._read_document(request_iterator)
            net = self._hypernet("d2l")
            budget = cast(DocumentMaker, net.maker).budget_for(budget, text)
            response = yield from self._adapter_for(net, text, budget, dtype, context)
            yield pb.InternalizeEvent(result=response)
        except Exception as exc:
            _abort(context, exc)

    def FetchAdapter(self, request: pb.FetchAdapterRequest, context: grpc.ServicerContext) -> Iterator[pb.AdapterChunk]:
        try:
            chunk_size = adapter_wire.check_chunk_size(request.chunk_size)
            wire = self.store.get(request.adapter_id, request.dtype)
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
            size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            before = read_page_token(request.page_token) if request.page_token else None
            listed = self.store.recent(before, size + 1)  # one more tells whether a next page exists
            adapters = [
                pb.AdapterSummary(
                    adapter_id=m.adapter_id,
                    hypernet_version=m.hypernet_version,
                    source=source_of(m),
                    size_bytes=m.total_size,
                )
                for _, m in listed[:size]
            ]
            next_page_token = page_token(listed[size - 1][0]) if len(listed) > size else ""
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

    # -- making adapters ----------------------------------------------------------------------------------------

    def _hypernet(self, kind: str) -> Hypernet:
        net = self.hypernets.get(kind)
        if net is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"no {_NAMES[kind]} hypernetwork is loaded")
        return net

    def _read_document(self, request_iterator: Iterator[pb.DocumentChunk]) -> tuple[str, int, float | None]:
        """The whole document, checked while it streams in (it stays in memory only), its dtype and the budget it
        asks for (None: the default)."""
        limit = self.config.max_document_bytes
        document, dtype, budget = bytearray(), None, None
        for chunk in request_iterator:
            if dtype is None:
                dtype = adapter_wire.wire_dtype(chunk.dtype)
                budget = chunk.budget_seconds if chunk.HasField("budget_seconds") else None
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
        return text, dtype, budget

    def _adapter_for(
        self, net: Hypernet, text: str, budget: float | None, dtype: int, context: grpc.ServicerContext
    ) -> collections.abc.Generator[pb.InternalizeEvent, None, pb.GenerateResponse]:
        """The adapter of `text` (a document: at `budget`; None: a description's one pass), from the cache or from
        the job this call starts or joins; yields the job's progress on the way."""
        key = source_key(net.kind, net.version, net.checkpoint_sha256, text, budget)
        cached = self.store.find(key, dtype)
        metrics.STORE_REQUESTS.labels(result="miss" if cached is None else "hit").inc()
        if cached is not None:
            metrics.CACHE_HITS.inc()
            return pb.GenerateResponse(manifest=cached.manifest, cached=True)
        with self._lock:
            job = self._pending.get(key)
            joined = job is not None and job.join(context)
            if not joined:  # no job, or a cancelled one: it stops at its next step and a new one takes its place
                self._admit(net, budget, context)
                job = self._pending[key] = _Job(budget)
                self._running += 1
                job.join(context)
        if joined:  # the same text's adapter is being made for another call: share its job
            metrics.CACHE_HITS.inc()
        elif budget is None:  # a pass takes milliseconds: this call's thread runs it
            self._run(job, net, key, text, dtype)
        else:  # an internalization outlives the call that started it while others follow it
            threading.Thread(target=self._run, args=(job, net, key, text, dtype), name="internalize").start()
        made = yield from job.follow(context)
        ran = not joined and made.seconds is not None
        return pb.GenerateResponse(
            manifest=self.store.get(made.adapter_id, dtype).manifest,
            cached=not ran,
            generation_seconds=made.seconds if ran else 0.0,
        )

    def _run(self, job: _Job, net: Hypernet, key: str, text: str, dtype: int) -> None:
        """Make `job`'s adapter and end the job with it, or with the error; then free its slot."""
        try:
            job.end(self._make(job, net, key, text, dtype))
        except BaseException as exc:  # every follower must hear how the job ended
            job.end(exc)
        finally:
            with self._lock:
                if self._pending.get(key) is job:
                    del self._pending[key]
                self._running -= 1
                self._slots.release()
                self._idle.notify_all()

    def _make(self, job: _Job, net: Hypernet, key: str, text: str, dtype: int) -> _Made:
        """The adapter, stored (even when the callers' deadlines have passed meanwhile: a retry is then a hit)."""
        # The claim makes this the one pass of the text cluster-wide; it finds the adapter instead when a job (here,
        # or another coordinator's) has made it since the callers' lookup.
        with self.store.claim(key, dtype, job.cancelled) as claim:
            if claim.found is not None:
                metrics.CACHE_HITS.inc()
                return _Made(claim.found.manifest.adapter_id, None)
            metrics.CACHE_MISSES.inc()
            with metrics.MAKES_IN_FLIGHT.track_inprogress():
                start = self._clock()
                adapter = net.maker.make_adapter(text) if job.budget_s is None else self._internalize(job, net, text)
                seconds = self._clock() - start
            spec, metadata = net.maker.spec_for(adapter), net.maker.metadata(text)
            wire = self.store.put(key, adapter, spec, metadata, dtype)
        metrics.MAKE_SECONDS.labels(kind=net.kind).observe(seconds)
        overrun = max(0.0, seconds - (job.budget_s or 0.0))
        with self._lock:
            previous = self._overrun.get(net.kind)
            self._overrun[net.kind] = overrun if previous is None else 0.7 * previous + 0.3 * overrun
        return _Made(wire.manifest.adapter_id, seconds)

    def _internalize(self, job: _Job, net: Hypernet, text: str) -> Adapter:
        maker = cast(DocumentMaker, net.maker)
        try:
            adapter = maker.internalize(text, job.budget_s, on_progress=job.report, cancelled=job.cancelled)
        except Cancelled:
            metrics.INTERNALIZATIONS.labels(outcome="cancelled").inc()
            raise
        except Exception:
            metrics.INTERNALIZATIONS.labels(outcome="failed").inc()
            raise
        metrics.INTERNALIZATIONS.labels(outcome="done").inc()
        done = job.latest()
        if done is not None:
            metrics.INTERNALIZATION_STEPS.observe(done.step)
            if not math.isnan(done.probe_loss):
                metrics.PROBE_LOSS.observe(done.probe_loss)
        return adapter

    def _admit(self, net: Hypernet, budget: float | None, context: grpc.ServicerContext) -> None:
        """Under the lock: take a pass slot, or refuse (deadline too short, a document already being
        internalized, all slots busy)."""
        overrun = self._overrun.get(net.kind, 0.0)
        expected = (budget or 0.0) + overrun
        remaining = context.time_remaining()
        if remaining <= 0 or remaining < expected:
            what = f"a {_NAMES[net.kind]} pass" if budget is None else f"a {budget:g}-second internalization"
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline leaves {remaining:.2f} s and {what} takes about {expected:.2f} s here: allow more "
                f"time{'' if budget is None else ' or a smaller budget'}",
            )
        if budget is not None:
            # A job nobody waits for any more only holds the maker until its next step: the new one waits.
            running = next((job for job in self._pending.values() if job.budget_s is not None and job.wanted()), None)
            if running is not None:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "another document is being internalized, and documents go one at a time: retry later",
                    retry_after_ms=max(MIN_RETRY_MS, round(1000 * running.remaining_s())),
                )
        if not self._slots.acquire(blocking=False):
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this coordinator already runs {self.config.max_concurrent_passes} passes, its maximum: retry later",
                retry_after_ms=max(MIN_RETRY_MS, round(1000 * overrun)),
            )


@dataclass
class RunningCoordinator(RunningServer):
    servicer: CoordinatorServicer
    store: AdapterStore

    def release(self) -> None:
        self.servicer.close()
        self.store.close()


def _check_config(config: CoordinatorConfig) -> str:
    """Everything that can be checked before the slow loads; returns the listen host."""
    if config.max_concurrent_passes < 1:
        raise ConfigError(f"max concurrent passes must be at least 1, not {config.max_concurrent_passes}")
    if config.max_document_bytes < 1:
        raise ConfigError(f"the document size limit must be positive, not {config.max_document_bytes} bytes")
    if config.budget_seconds is not None and not 0 <= config.budget_seconds <= MAX_BUDGET_S:
        raise ConfigError(
            f"the default budget must be between 0 and {MAX_BUDGET_S:.0f} seconds, not {config.budget_seconds:g}"
        )
    if config.cache_capacity_bytes is not None and config.cache_capacity_bytes <= 0:
        raise ConfigError(f"the cache capacity must be positive, not {config.cache_capacity_bytes} bytes")
    config.security.credentials()  # reads the certificate files: a missing one fails now
    if config.store is not None:
        from coordinator.redis_store import check_url  # the redis client is imported only when a cluster uses it

        check_url(config.store)
    return check_listen(config.listen)


def _wants_d2l(config: CoordinatorConfig) -> bool:
    """Whether `config` asks for Doc-to-LoRA: a named checkpoint must load, the default one only once it is shipped."""
    path = config.d2l_checkpoint
    return path is not None and (Path(path) != checkpoint.DEFAULT_D2L or checkpoint.DEFAULT_D2L.is_file())


def load_hypernets(
    config: CoordinatorConfig, t2l: Maker | None = None, d2l: DocumentMaker | None = None
) -> tuple[list[Hypernet], str]:
    """The hypernetworks of `config`, checked against its base model, and that base's fingerprint: Text-to-LoRA
    (`t2l` when given, else its checkpoint) and Doc-to-LoRA (`d2l` when given, else its checkpoint when `config`
    asks for it), with `config`'s default budget."""
    # The base model is loaded, not just named, to verify the checkpoints were trained for it, and Doc-to-LoRA
    # encodes documents with it: one copy in memory serves both.
    load_d2l = d2l is None and _wants_d2l(config)
    base = base_model.load(config.base) if t2l is None or load_d2l else None
    if t2l is None:
        t2l = TextToLoRAMaker(config.t2l_checkpoint, base)
    nets = [Hypernet.of("t2l", t2l)]
    if load_d2l and Path(config.d2l_checkpoint) == checkpoint.DEFAULT_D2L:
        # The shipped checkpoint serves the default base only; with another base, documents are simply not
        # served (a checkpoint named on the command line must fit, and fails the start otherwise).
        trained_for = checkpoint.read_metadata(checkpoint.DEFAULT_D2L).get("base_fingerprint")
        if trained_for != base.fingerprint:
            log.warning("the shipped Doc-to-LoRA checkpoint is for another base: documents are not served")
            load_d2l = False
    if load_d2l:
        d2l = DocToLoRAMaker(config.d2l_checkpoint, base)
    if d2l is not None:
        if config.budget_seconds is not None:
            d2l.distill = replace(d2l.distill, budget_s=config.budget_seconds)
        nets.append(Hypernet.of("d2l", d2l))
    return nets, t2l.fingerprint


def start(
    config: CoordinatorConfig,
    t2l: Maker | None = None,
    *,
    d2l: DocumentMaker | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> RunningCoordinator:
    """Load the hypernetworks (`t2l` and `d2l` replace the checkpoints), open the cache, serve; returns once the
    server is SERVING.

    Raises ConfigError for anything in `config` that cannot work, CheckpointError / BaseModelError for models.
    """
    host = _check_config(config)
    nets, fingerprint = load_hypernets(config, t2l, d2l)
    if config.store is None:
        store: AdapterStore = LocalStore(config.cache_dir, config.cache_capacity_bytes)
    else:
        from coordinator.redis_store import RedisStore

        store = RedisStore(config.store, config.cache_capacity_bytes)
    metrics.STORE_ERRORS.labels(backend=store.backend)  # the series exists (at 0) before the first error
    metrics.CACHED_ADAPTERS.set_function(lambda: store.stats()[0])
    metrics.CACHED_BYTES.set_function(lambda: store.stats()[1])
    servicer = CoordinatorServicer(config, store, nets, fingerprint, clock)
    # Threads beyond the pass slots answer fetches, lists and refusals while adapters are made.
    server = create_server(metrics.COMPONENT, config.security, max_workers=config.max_concurrent_passes + 8)
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    try:
        port, health_servicer, metrics_server = serve(
            server, config.listen, config.security, [SERVICE], host, config.metrics_port
        )
    except ConfigError:
        store.close()
        raise
    # The store's reachability is its own health service: a coordinator whose store is down still serves (it makes
    # adapters, without sharing them), so the Coordinator service stays SERVING for the workers' load balancing.
    store.watch(functools.partial(_report_store, health_servicer))
    return RunningCoordinator(
        metrics.COMPONENT, server, health_servicer, host, port, metrics_server, servicer=servicer, store=store
    )


def _report_store(health_servicer: health.HealthServicer, up: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
    health_servicer.set(STORE_HEALTH, status)
    metrics.STORE_UP.set(1 if up else 0)
