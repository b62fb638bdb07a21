"""What the coordinator and the worker share as gRPC servers: the bearer-token check, per-RPC metrics, health,
reflection, /metrics, and the lifecycle from start to drain.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server

from loracast.errors import ConfigError
from loracast.grpc_errors import MalformedRequest
from loracast.grpc_security import CHANNEL_OPTIONS, ServerSecurity

HEALTH_SERVICE = health.SERVICE_NAME
T = TypeVar("T")
log = logging.getLogger(__name__)

RPC_TOTAL = Counter("loracast_rpc_total", "Finished RPCs by gRPC status code", ["component", "method", "code"])
RPC_SECONDS = Histogram(
    "loracast_rpc_duration_seconds",
    "Request latency: from the call's arrival to its last response message",
    ["component", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


@dataclass(frozen=True)
class _Unparsed:
    """What a request that does not parse becomes: gRPC itself would answer INTERNAL, which the proto calls a bug."""

    reason: str


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name


class _ServerInterceptor(grpc.ServerInterceptor):
    """Bearer-token check and per-RPC metrics (labels: the method name and status code, never request data)."""

    def __init__(self, component: str, tokens: frozenset[str]) -> None:
        self.component = component
        self.tokens = tokens

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        handler = _parsed(handler, method)
        if self.tokens and not details.method.startswith(f"/{HEALTH_SERVICE}/"):
            sent = dict(details.invocation_metadata or ()).get("authorization", "")
            if not sent.startswith("Bearer "):
                handler = _refusal(handler, "send `authorization: Bearer <token>` metadata")
            elif sent.removeprefix("Bearer ") not in self.tokens:
                handler = _refusal(handler, "the bearer token is not valid")
        return self._measured(handler, method)

    def _measured(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kind = _kind(handler)
        behavior = getattr(handler, kind)
        labels = (self.component, method)

        def finish(context, start: float, failed: bool) -> None:
            RPC_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            RPC_TOTAL.labels(*labels, _code_name(context, failed)).inc()

        if kind.endswith("_stream"):

            def streaming(request, context):
                start, failed = time.perf_counter(), True
                try:
                    yield from behavior(request, context)
                    failed = False
                finally:
                    finish(context, start, failed)

            return _rebuild(handler, kind, streaming)

        def unary(request, context):
            start, failed = time.perf_counter(), True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                finish(context, start, failed)

        return _rebuild(handler, kind, unary)


def _parsed(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The handler with requests that do not parse (bytes that are not protobuf, a string field that is not UTF-8)
    refused with INVALID_ARGUMENT: a client's mistake, not the server's."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler

    def lenient(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Unparsed(f"the {method} request does not parse: {exc}")

    kind = _kind(handler)
    behavior = getattr(handler, kind)
    if kind.startswith("unary_"):

        def unary(request, context):
            if isinstance(request, _Unparsed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return behavior(request, context)

        checked = unary
    else:

        def parsed_stream(requests: Iterator) -> Iterator:
            for request in requests:
                if isinstance(request, _Unparsed):
                    raise MalformedRequest(request.reason)
                yield request

        def stream(request_iterator, context):
            return behavior(parsed_stream(request_iterator), context)

        checked = stream
    return _rebuild(handler, kind, checked, lenient)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def refuse(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _rebuild(handler, _kind(handler), refuse)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return kind
    raise ValueError("a gRPC handler with no behavior")


def _rebuild(
    handler: grpc.RpcMethodHandler, kind: str, behavior: Callable, deserializer: Callable | None = None
) -> grpc.RpcMethodHandler:
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, deserializer or handler.request_deserializer, handler.response_serializer)


def create_server(component: str, security: ServerSecurity, max_workers: int = 16) -> grpc.Server:
    """A gRPC server with auth and metrics interceptors; add servicers, then `start_serving`."""
    from concurrent import futures

    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=component),
        interceptors=[_ServerInterceptor(component, security.tokens)],
        # Without this, gRPC binds a port another server already listens on, and the two split its traffic.
        options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_workers * 4,
    )


def check_listen(listen: str) -> str:
    """Refuse a malformed HOST:PORT, or a port another process holds, before a slow model load; returns HOST."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {listen!r}: give HOST:PORT (port 0 picks a free one)")
    if int(port):
        try:
            for family, kind, proto, _, address in socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    return host


@dataclass
class RunningServer:
    """A started server: gRPC with health on `port`, Prometheus /metrics on `metrics_port` (None: off).

    The coordinator and the worker extend it with what they hold; `release` frees that after the server stopped.
    """

    component: str
    server: grpc.Server
    health: health.HealthServicer
    host: str
    port: int
    metrics_server: ThreadingHTTPServer | None

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.server_port

    def ready_line(self) -> str:
        metrics_url = f"http://{self.host}:{self.metrics_port}/metrics" if self.metrics_server is not None else "off"
        return f"loracast {self.component} ready: grpc={self.host}:{self.port} metrics={metrics_url}"

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace` seconds, then release ports and resources."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.release()

    def release(self) -> None:
        """What the component holds beyond its ports (a cache, a channel)."""


def serve(
    server: grpc.Server,
    listen: str,
    security: ServerSecurity,
    service_names: Iterable[str],
    host: str,
    metrics_port: int | None,
) -> tuple[int, health.HealthServicer, ThreadingHTTPServer | None]:
    """`start_serving`, then /metrics on `metrics_port` of `host` (None: none); a failure leaves nothing running."""
    port, health_servicer = start_serving(server, listen, security, service_names)
    if metrics_port is None:
        return port, health_servicer, None
    try:
        return port, health_servicer, start_metrics(metrics_port, host)
    except ConfigError:
        server.stop(None)
        raise


def start_serving(
    server: grpc.Server, listen: str, security: ServerSecurity, service_names: Iterable[str]
) -> tuple[int, health.HealthServicer]:
    """Health and reflection for `service_names`, bind `listen` (port 0 picks one), start; returns the port."""
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    credentials = security.credentials()
    try:
        port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {listen}: the address is taken or invalid")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return port, health_servicer


def start_metrics(port: int, host: str) -> ThreadingHTTPServer:
    """Serve /metrics for Prometheus on `port` (0 picks one) of `host`; the caller shuts the server down."""
    try:
        server, _ = start_http_server(port, addr=host.strip("[]"))
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on port {port}: {exc.strerror}") from exc
    return server


def wait_for_signal(ready_line: str, stop: Callable[[float], None], grace: float = 5.0) -> None:
    """Print one ready line to stdout (what a launcher waits for), serve until SIGTERM or SIGINT, then `stop(grace)`
    (the server's own drain)."""
    signalled = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: signalled.set())
    print(ready_line, flush=True)
    signalled.wait()
    log.info("stopping: calls in flight have %.0f s to finish", grace)
    stop(grace)
    log.info("stopped")


def wait_until_serving(channel: grpc.Channel, timeout: float = 60.0) -> None:
    """Block until the server behind `channel` reports SERVING on its health Watch stream (no polling, no sleeps)."""
    grpc.channel_ready_future(channel).result(timeout=timeout)
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=timeout)
    try:
        for reply in call:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    finally:
        call.cancel()
    raise TimeoutError("the server closed its health stream before it was SERVING")


def streamed(iterator: Iterator, context: grpc.ServicerContext) -> Iterator:
    """Stop a server stream as soon as the client has gone (its deadline passed or it cancelled)."""
    for item in iterator:
        if not context.is_active():
            return
        yield item


def returned(generator: Generator[object, None, T]) -> T:
    """What `generator` returns, for a caller that has no use for what it yields on the way (progress events)."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value
