"""The coordinator's adapter store: the one interface the servicer talks to about where adapters live.

Two backends: `LocalStore` (coordinator/local_store.py; one directory used by one coordinator, the default) and
`RedisStore` (coordinator/redis_store.py; one Redis shared by every coordinator of a cluster). Both keep adapters
once, in float32, content addressed, and index them by the key of the text they were made from (`source_key`):
never the text itself. A store raises the domain errors below and knows nothing of gRPC; the servicer maps them to
status codes (one table in coordinator/server.py) and owns ListAdapters' paging and its page tokens.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from loracast import adapter_wire
from loracast.adapter_format import Adapter
from loracast.adapter_wire import WireAdapter
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb

# Provenance key -> AdapterSummary.source
SOURCES = {"loracast.description_sha256": "description", "loracast.document_sha256": "document"}


class NotCached(LookupError):
    """No adapter with this id in the store (never made, evicted, or its bytes were damaged and dropped)."""

    def __str__(self) -> str:
        return f"no adapter {self.args[0]} in the coordinators' store"


class StoreUnavailable(RuntimeError):
    """The shared store cannot be reached now, and this coordinator does not hold the adapter itself: another
    coordinator may, and the store may be back in a moment."""


class Abandoned(Exception):
    """Nobody waits any more for the adapter a claim was waited on for (the callers' deadlines passed)."""


@dataclass(frozen=True)
class Claim:
    """What `AdapterStore.claim` found: the adapter, if it was made meanwhile (then nothing is to be made), and
    whether this coordinator waited for another one's pass."""

    found: WireAdapter | None
    waited: bool = False


class AdapterStore(Protocol):
    backend: str  # "local" or "redis": the label of loracast_store_errors_total

    def find(self, key: str, dtype: int) -> WireAdapter | None:
        """The adapter made before from the source with this key, in `dtype`; None if there is none (or the store
        cannot be reached)."""
        ...

    def get(self, adapter_id: str, dtype: int) -> WireAdapter:
        """The adapter with this id in `dtype`, now the most recently used. Raises WireError for a malformed id,
        NotCached for an unknown one, StoreUnavailable when the answer is not known here."""
        ...

    def put(self, key: str, adapter: Adapter, spec: LoraSpec, metadata: Mapping[str, str], dtype: int) -> WireAdapter:
        """Keep a new adapter under its content id, indexed under its source key, least recently used ones evicted
        beyond the capacity; returns it in `dtype`. Never fails for an unreachable store: the adapter is then
        kept by this coordinator alone until the store is back."""
        ...

    def recent(self, before: int | None, limit: int) -> list[tuple[int, pb.AdapterManifest]]:
        """Up to `limit` FLOAT32 manifests, most recently used first, with their use stamps (strictly increasing
        across uses, restarts and coordinators); only those stamped before `before` when it is given."""
        ...

    def claim(self, key: str, dtype: int, abandoned: Callable[[], bool]) -> AbstractContextManager[Claim]:
        """Hold the right to make the adapter of `key` until the block ends: one pass per text, cluster-wide.
        While another coordinator holds it, wait (raising Abandoned once `abandoned()`); a claim whose holder died
        expires and is taken over."""
        ...

    def stats(self) -> tuple[int, int]:
        """Adapters and bytes held (the last known figures when the store cannot be reached); never raises."""
        ...

    def watch(self, on_change: Callable[[bool], None]) -> None:
        """Call `on_change(up)` now and whenever the store becomes reachable or unreachable."""
        ...

    def close(self) -> None: ...


def source_key(
    kind: str, hypernet_version: str, checkpoint_sha256: str, text: str, budget_s: float | None = None
) -> str:
    """The index key of one source text: the same text through the same checkpoint always makes the same adapter.

    The checkpoint's own hash is part of it because a retrained checkpoint keeps its hypernet version. A document's
    internalization budget (`budget_s`) is too: each budget makes its own adapter. Descriptions have none, and their
    keys stay those of the caches written before budgets existed.
    """
    fields: list[str | float] = [kind, hypernet_version, checkpoint_sha256, text]
    if budget_s is not None:
        fields.append(float(budget_s))
    material = json.dumps(fields, ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()


def source_of(manifest: pb.AdapterManifest) -> str:
    """What an adapter was made from ("description", "document", "" when unknown), from its provenance."""
    return next((name for key, name in SOURCES.items() if key in manifest.provenance), "")


class Float16Memo:
    """The FLOAT16 encodings of float32 adapters, least recently used dropped beyond `capacity_bytes`: a store
    keeps float32 and converts on demand (the id is the same: the manifest carries both encodings' digests)."""

    def __init__(self, capacity_bytes: int = 64 * 2**20) -> None:
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._wires: OrderedDict[str, WireAdapter] = OrderedDict()
        self._size = 0

    def cached(self, adapter_id: str) -> WireAdapter | None:
        with self._lock:
            wire = self._wires.get(adapter_id)
            if wire is not None:
                self._wires.move_to_end(adapter_id)
            return wire

    def in_dtype(self, fp32: WireAdapter, dtype: int) -> WireAdapter:
        """`fp32` in `dtype` (FLOAT16 encodings remembered)."""
        if adapter_wire.wire_dtype(dtype) == pb.FLOAT32:
            return fp32
        adapter, spec, metadata = adapter_wire.decode(fp32.manifest, fp32.payload)
        wire = adapter_wire.encode(adapter, spec, metadata, dtype)
        adapter_id, size = wire.manifest.adapter_id, len(wire.payload)
        with self._lock:
            if size <= self.capacity_bytes and adapter_id not in self._wires:
                self._wires[adapter_id] = wire
                self._size += size
                while self._size > self.capacity_bytes:
                    _, old = self._wires.popitem(last=False)
                    self._size -= len(old.payload)
        return wire

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            old = self._wires.pop(adapter_id, None)
            if old is not None:
                self._size -= len(old.payload)
