"""The coordinator's Prometheus series (base units; labels are bounded: never an adapter id or a text).

The series the worker exports too (cache lookups, bytes streamed, transfer time) are defined once in
`loracast.serving_metrics` and used here with component="coordinator"; per-RPC latency and status codes come from
`loracast.grpc_server`'s interceptor.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from loracast.serving_metrics import BYTES_STREAMED, CACHE_REQUESTS, TRANSFER_SECONDS

COMPONENT = "coordinator"

CACHE_HITS = CACHE_REQUESTS.labels(component=COMPONENT, result="hit")
CACHE_MISSES = CACHE_REQUESTS.labels(component=COMPONENT, result="miss")
BYTES_SENT = BYTES_STREAMED.labels(component=COMPONENT)
TRANSFER = TRANSFER_SECONDS.labels(component=COMPONENT)

# For "d2l" this is the internalization's time: the one pass and the self-distillation of its budget.
MAKE_SECONDS = Histogram(
    "loracast_adapter_make_seconds",
    "Time to make one adapter: a Text-to-LoRA pass, or a whole Doc-to-LoRA internalization (cache hits not counted)",
    ["kind"],  # "t2l" or "d2l"
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
INTERNALIZATIONS = Counter(
    "loracast_internalizations",
    "Doc-to-LoRA internalizations that ended, by outcome",
    ["outcome"],  # "done", "cancelled" (no caller waited any more) or "failed"
)
INTERNALIZATION_STEPS = Histogram(
    "loracast_internalization_steps",
    "Self-distillation steps of one finished internalization (0: the one pass alone)",
    buckets=(0, 1, 5, 10, 25, 50, 100, 200, 400, 800, 1600),
)
PROBE_LOSS = Histogram(
    "loracast_internalization_probe_loss",
    "The last step's probe loss of one finished internalization (internalizations without a step are not counted)",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
MAKES_IN_FLIGHT = Gauge(
    "loracast_adapter_makes_in_flight", "Adapters being made now: Text-to-LoRA passes and Doc-to-LoRA internalizations"
)
CACHED_ADAPTERS = Gauge("loracast_coordinator_cached_adapters", "Adapters in the coordinator's cache")
CACHED_BYTES = Gauge("loracast_coordinator_cache_bytes", "Bytes on disk of the adapters in the coordinator's cache")

# The adapter store (coordinator/adapter_store.py), local or shared in Redis. The Grafana dashboard and
# deploy/k8s read these names.
STORE_REQUESTS = Counter(
    "loracast_store_requests",
    "Adapter store lookups of a source text by result (a hit costs no hypernetwork pass)",
    ["result"],  # "hit" or "miss"
)
for _result in ("hit", "miss"):
    STORE_REQUESTS.labels(result=_result)
STORE_CLAIM_WAITS = Counter(
    "loracast_store_claim_waits",
    "Calls that waited for another coordinator's pass of the same text instead of running their own",
)
STORE_ERRORS = Counter(
    "loracast_store_errors", "Adapter store operations that failed (the store unreachable or failing)", ["backend"]
)
STORE_UP = Gauge(
    "loracast_store_up", "1 while the adapter store is reachable, 0 while this coordinator serves without it"
)
