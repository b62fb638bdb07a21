"""Prometheus series both servers export, defined once (a name may be registered only once per process).

Labels are bounded: `component` is "coordinator" or "worker", `result` is "hit" or "miss"; never an adapter
id, a description or a document.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CACHE_REQUESTS = Counter("loracast_adapter_cache_requests", "Adapter cache lookups by result", ["component", "result"])
BYTES_STREAMED = Counter(
    "loracast_adapter_bytes_streamed", "Adapter payload bytes sent (coordinator) or received (worker)", ["component"]
)
TRANSFER_SECONDS = Histogram(
    "loracast_adapter_transfer_seconds",
    "Time to stream one adapter payload",
    ["component"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
