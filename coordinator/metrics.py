"""The coordinator's Prometheus series (base units; labels are bounded: never an adapter id or a text).

The series the worker exports too (cache lookups, bytes streamed, transfer time) are defined once in
`loracast.serving_metrics` and used here with component="coordinator"; per-RPC latency and status codes come from
`loracast.grpc_common`'s interceptor.
"""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

from loracast.serving_metrics import BYTES_STREAMED, CACHE_REQUESTS, TRANSFER_SECONDS

COMPONENT = "coordinator"

CACHE_HITS = CACHE_REQUESTS.labels(component=COMPONENT, result="hit")
CACHE_MISSES = CACHE_REQUESTS.labels(component=COMPONENT, result="miss")
BYTES_SENT = BYTES_STREAMED.labels(component=COMPONENT)
TRANSFER = TRANSFER_SECONDS.labels(component=COMPONENT)

GENERATION_SECONDS = Histogram(
    "loracast_adapter_generation_seconds",
    "Time of one hypernetwork pass that made an adapter (cache hits are not counted)",
    ["kind"],  # "t2l" or "d2l"
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge("loracast_generations_in_flight", "Hypernetwork passes running now")
CACHED_ADAPTERS = Gauge("loracast_coordinator_cached_adapters", "Adapters in the coordinator's cache")
CACHED_BYTES = Gauge("loracast_coordinator_cache_bytes", "Bytes on disk of the adapters in the coordinator's cache")
