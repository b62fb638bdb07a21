"""The worker's side of the Coordinator service: the one place the worker talks to the coordinator.

It owns the channel and the stub, sends a request's settings (the adapters' dtype, a deadline within the worker's
own), streams a document in and its progress back, and turns the coordinator's failures into the statuses the
Worker service documents. The worker's servicer asks it for adapters and never sees the Coordinator protocol;
resuming an interrupted transfer is the adapter store's job (`worker.adapter_store`), through `fetch_source`, whose
streams say which failures are breaks worth resuming (StreamInterrupted): the store knows no gRPC.

Several coordinators (sharing one Redis store) are one channel: gRPC's round_robin over the healthy ones
(`grpc.health.v1`, service loracast.v1.Coordinator), calls that find one unreachable retried on another (every
Coordinator call is idempotent: adapters are content addressed), and a transfer cut by a coordinator's death
resumed from its offset on the next one, which streams the same bytes from the shared store.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Generator, Iterable, Iterator

import grpc

from loracast.errors import ConfigError
from loracast.grpc_errors import RETRY_AFTER_MS, RequestError
from loracast.grpc_security import ClientSecurity, open_channel
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from worker.adapter_store import ChunkSource, StreamInterrupted

DOCUMENT_CHUNK = 64 * 1024  # bytes per DocumentChunk sent to the coordinator
# A FetchAdapter stream that fails with one of these is resumed from its offset; other codes (NOT_FOUND,
# INVALID_ARGUMENT, a deadline, auth) will not change on a retry and go back to the caller as they are.
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DATA_LOSS,
    }
)
_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": _SERVICE},
        "methodConfig": [
            {
                "name": [{"service": _SERVICE}],
                # A coordinator that died or went away: the call goes to another (before any reply came back).
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def channel_target(coordinators: str) -> str:
    """`--coordinator` as a gRPC target: HOST:PORT, a gRPC target such as dns:///NAME:PORT (every address the name
    has, looked up again as they change), or several HOST:PORT separated by commas (names among them looked up
    once, here: for a changing set, use a DNS name)."""
    addresses = [address.strip() for address in coordinators.split(",") if address.strip()]
    if len(addresses) == 1:
        return addresses[0]
    if not addresses or any("/" in address for address in addresses):
        raise ConfigError(f"--coordinator {coordinators!r}: give HOST:PORT[,HOST:PORT...] or one dns:///NAME:PORT")
    resolved: dict[int, list[str]] = {4: [], 6: []}
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--coordinator: {address!r} is not HOST:PORT")
        try:
            found = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"--coordinator: cannot look up {host}: {exc.strerror or exc}") from None
        for *_, (ip, *_) in found:
            version = ipaddress.ip_address(ip).version
            entry = f"{ip}:{port}" if version == 4 else f"[{ip}]:{port}"
            if entry not in resolved[version]:
                resolved[version].append(entry)
    version = 4 if resolved[4] else 6  # one target holds one address family
    return f"ipv{version}:{','.join(resolved[version])}"


class _FetchStream:
    """A FetchAdapter call as the adapter store reads it: a failure in RESUMABLE is a StreamInterrupted (the store
    resumes from the bytes it has), any other is the call's grpc.RpcError, for `CoordinatorClient.error`."""

    def __init__(self, call: Iterable[pb.AdapterChunk]) -> None:
        self._call = call
        self._chunks = iter(call)

    def __iter__(self) -> _FetchStream:
        return self

    def __next__(self) -> pb.AdapterChunk:
        try:
            return next(self._chunks)
        except grpc.RpcError as exc:
            if exc.code() not in RESUMABLE:
                raise
            raise StreamInterrupted(f"{exc.code().name}: {exc.details()}") from None

    def cancel(self) -> None:
        """Ends the call (the store does after an early exit, so it does not go on streaming)."""
        cancel = getattr(self._call, "cancel", None)
        if cancel is not None:
            cancel()


def _document_chunks(ref: pb.AdapterRef, dtype: int) -> Iterator[pb.DocumentChunk]:
    """The document in DocumentChunks, the request's settings in the first (the only one the coordinator reads)."""
    for offset in range(0, len(ref.document), DOCUMENT_CHUNK):
        chunk = pb.DocumentChunk(data=ref.document[offset : offset + DOCUMENT_CHUNK])
        if offset == 0:
            chunk.dtype = dtype
            if ref.HasField("budget_seconds"):
                chunk.budget_seconds = ref.budget_seconds
        yield chunk


def _refusal_or(exc: grpc.RpcError, elapsed: float, timeout: float) -> grpc.RpcError | RequestError:
    """What a failed call for an adapter to be made stands for. Before the call's own deadline, DEADLINE_EXCEEDED
    is the coordinator's refusal to make an adapter the time left is too short for, and its message says how much to
    allow: no sign of a coordinator that cannot be reached."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < timeout:
        return RequestError(exc.code(), f"coordinator: {exc.details()}")
    return exc


# A document sent without a budget gets the coordinator's default, which grows with its length (at most an hour):
# the worker cannot know it, so it allows the most; the caller's own deadline still bounds the call.
DEFAULT_BUDGET_ALLOWANCE_S = 3600.0


class CoordinatorClient:
    """A channel to the coordinators at `target` (see `channel_target`). Each call takes the worker's own call
    (`context`): the coordinator call ends within its deadline, and within `timeout` seconds (plus a document's
    budget). A coordinator that refuses for load without saying when to retry is passed on with `busy_retry_ms`,
    the worker's own advice."""

    def __init__(self, target: str, security: ClientSecurity, dtype: int, timeout: float, busy_retry_ms: int) -> None:
        self.target = target
        self.dtype = dtype  # of the adapters fetched
        self.timeout = timeout
        self.busy_retry_ms = busy_retry_ms
        self._channel = open_channel(channel_target(target), security, [("grpc.service_config", SERVICE_CONFIG)])
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _timeout(self, context: grpc.ServicerContext, budget_s: float = 0.0) -> float:
        return min(context.time_remaining(), self.timeout + budget_s)

    def fetch_source(self, context: grpc.ServicerContext) -> ChunkSource:
        """FetchAdapter from an offset, as the adapter store asks for it."""

        def fetch(adapter_id: str, offset: int) -> _FetchStream:
            request = pb.FetchAdapterRequest(adapter_id=adapter_id, dtype=self.dtype, offset=offset)
            return _FetchStream(self._stub.FetchAdapter(request, timeout=self._timeout(context)))

        return fetch

    def describe(self, task: str, context: grpc.ServicerContext) -> pb.AdapterManifest:
        """The manifest of the adapter the coordinator makes (or has cached) for a task description."""
        request = pb.GenerateFromDescriptionRequest(description=task, dtype=self.dtype)
        timeout, start = self._timeout(context), time.perf_counter()
        try:
            return self._stub.GenerateFromDescription(request, timeout=timeout).manifest
        except grpc.RpcError as exc:
            raise _refusal_or(exc, time.perf_counter() - start, timeout) from None

    def internalize(
        self, ref: pb.AdapterRef, context: grpc.ServicerContext
    ) -> Generator[pb.InternalizeProgress, None, pb.AdapterManifest]:
        """Forward the document in chunks (it stays in memory, never on disk or in a log), yield its progress, and
        return its adapter's manifest."""
        budget = ref.budget_seconds if ref.HasField("budget_seconds") else DEFAULT_BUDGET_ALLOWANCE_S
        timeout, start = self._timeout(context, budget), time.perf_counter()
        call = self._stub.InternalizeDocument(_document_chunks(ref, self.dtype), timeout=timeout)
        # Our caller going away ends the coordinator call too, which cancels a job nobody else waits for.
        if not context.add_callback(call.cancel):
            call.cancel()
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "result":
                    return event.result.manifest
                if kind == "progress":  # an event added to the contract later is skipped
                    yield event.progress
        except grpc.RpcError as exc:
            raise _refusal_or(exc, time.perf_counter() - start, timeout) from None
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "the coordinator ended the document stream without its adapter")

    def error(self, exc: grpc.RpcError, context: grpc.ServicerContext, ref: pb.AdapterRef) -> RequestError:
        """The worker's documented status for a failed coordinator call."""
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.NOT_FOUND and ref.WhichOneof("source") == "adapter_id":
            return RequestError(
                code, f"adapter {ref.adapter_id[:12]}… is neither resident nor known to the coordinator"
            )
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
            return RequestError(code, f"coordinator: {details}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"coordinator: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            after = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_MS, "")
            retry_ms = int(after) if after.isdigit() and int(after) > 0 else self.busy_retry_ms
            return RequestError(code, f"coordinator: {details}", retry_after_ms=retry_ms)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and context.time_remaining() <= 0:
            return RequestError(code, "the deadline passed while the adapter was being fetched")
        return RequestError(
            grpc.StatusCode.UNAVAILABLE,
            f"the adapter is not resident and the coordinator at {self.target} cannot be reached "
            f"({code.name}: {details})",
        )
