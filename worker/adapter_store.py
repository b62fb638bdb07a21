"""Adapters on the worker's disk: an LRU bounded in bytes, filled by resumable, verified transfers.

Layout under the cache directory:

    partial/<id>.manifest   the manifest of a transfer in progress (written before its first data byte)
    partial/<id>.part       the payload bytes received so far: a broken stream resumes from its size
    adapters/<id>/          an installed adapter: manifest.pb and payload.bin, exactly as received
    sources.json            description / document SHA-256 -> adapter id, from the coordinator's earlier answers

A payload is verified (size, SHA-256, and the content id in either dtype) with `adapter_wire.decode` before it is
moved into `adapters/` with one rename, so a torn, corrupt or forged transfer never becomes an adapter. Installed
adapters and partial manifests are verified again at startup, so those of an older id scheme (manifests without
other_dtype_sha256) are dropped, never trusted, and fetched again under their new ids. A full disk
(ENOSPC, EDQUOT) ends the transfer with RESOURCE_EXHAUSTED and deletes what it had written: a half-written file
cannot be completed in place, and its space is the first to give back. Recency is the manifest file's mtime, so
the LRU order survives a restart. Torch-free.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from loracast import adapter_wire
from loracast.lora_spec import LoraSpec
from loracast.paths import TEMP_SUFFIX, write_file
from loracast.v1 import loracast_pb2 as pb
from worker import metrics

PARTIAL, ADAPTERS, SOURCES = "partial", "adapters", "sources.json"
MANIFEST, PAYLOAD = "manifest.pb", "payload.bin"
RETRIES = 3  # a broken stream is resumed this many times

# (adapter id, offset) -> the adapter's stream: its manifest, then data chunks from `offset`. A source raises
# StreamInterrupted for a break that asking again may mend; whatever else it raises (no such adapter, a refusal, a
# deadline) goes back to the caller as it is. The worker's one source is the coordinator's FetchAdapter
# (`worker.coordinator_client`), which decides which of its failures are breaks.
ChunkSource = Callable[[str, int], Iterable[pb.AdapterChunk]]
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
log = logging.getLogger(__name__)


class StoreError(Exception):
    """An adapter cannot be installed or used; the message says why and what to do. The worker's servicer maps
    each kind below to the status it answers with."""


class NotResident(StoreError):
    """The adapter is not installed and there is no source to fetch it from."""


class AdapterRejected(StoreError):
    """What the coordinator sent cannot be installed here (a bad manifest, another base model, larger than the
    whole cache, or bytes that fail verification twice): asking again will not help."""


class TransferBroken(StoreError):
    """The transfer broke more times than it is retried; what arrived is kept for the next call to resume."""


class DiskFull(StoreError):
    """The cache directory's disk is full; what the transfer had written is deleted."""


@dataclass(frozen=True)
class Resident:
    """A verified adapter, decoded to float32 and ready to apply."""

    manifest: pb.AdapterManifest
    adapter: dict[tuple[int, str], tuple]
    spec: LoraSpec
    was_resident: bool  # False: it was fetched for this call (or a concurrent one)


class StreamInterrupted(Exception):
    """The stream broke or misbehaved; what arrived so far is kept and the transfer resumes from there (at most
    `retries` times). Raised by the store for a stream that breaks the wire format's rules, and by a source for a
    break that asking again may mend (a connection lost mid-stream)."""


class _Transfer:
    """One transfer in progress, shared by every request for the same adapter."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Resident | None = None
        self.error: BaseException | None = None


def _short(adapter_id: str) -> str:
    return adapter_id[:12] + "…"


def _read_manifest(path: Path) -> pb.AdapterManifest:
    """A stored manifest, structurally checked; raises WireError, DecodeError or OSError."""
    manifest = pb.AdapterManifest.FromString(path.read_bytes())
    adapter_wire.check_manifest(manifest)
    return manifest


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def installed_ids(root: Path) -> list[str]:
    """The names of the adapter directories under the cache directory `root`: ids, unverified (`read_installed`
    checks one)."""
    directory = Path(root) / ADAPTERS
    return [path.name for path in directory.iterdir()] if directory.is_dir() else []


def read_installed(root: Path, adapter_id: str, fingerprint: str) -> Resident:
    """An installed adapter under the cache directory `root`, verified; reads only, so any process may call it.

    Raises FileNotFoundError when it is not installed, WireError (or DecodeError) when it is damaged or made for
    another base model.
    """
    adapter_wire.check_adapter_id(adapter_id)
    directory = Path(root) / ADAPTERS / adapter_id
    manifest = _read_manifest(directory / MANIFEST)
    adapter, spec, _ = adapter_wire.decode(manifest, (directory / PAYLOAD).read_bytes())
    if manifest.adapter_id != adapter_id:
        raise adapter_wire.WireError(f"{directory} holds adapter {_short(manifest.adapter_id)}")
    if manifest.base_fingerprint != fingerprint:
        raise adapter_wire.WireError(
            f"adapter {_short(adapter_id)} was made for base model {manifest.base_fingerprint[:12]}…, "
            f"not {fingerprint[:12]}…"
        )
    return Resident(manifest, adapter, spec, was_resident=True)


class AdapterStore:
    """Installed adapters for one base model (`fingerprint`), at most `capacity_bytes` of payload on disk."""

    def __init__(self, root: Path, capacity_bytes: int, fingerprint: str, retries: int = RETRIES) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"the adapter cache capacity must be positive, not {capacity_bytes} bytes")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.fingerprint = fingerprint
        self.retries = retries
        self._partial = self.root / PARTIAL
        self._adapters = self.root / ADAPTERS
        self._partial.mkdir(parents=True, exist_ok=True)
        self._adapters.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, pb.AdapterManifest] = OrderedDict()  # least recently used first
        self._inflight: dict[str, _Transfer] = {}
        self._sources: dict[str, str] = {}
        self._last_use = 0  # ns; see _touch
        self._reload()

    # -- startup ----------------------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Re-verify the installed adapters, keep resumable partials, drop everything else."""
        for leftover in self.root.glob(f".{SOURCES}.*{TEMP_SUFFIX}"):  # a write of the index that a crash interrupted
            leftover.unlink(missing_ok=True)
        for path in self._partial.iterdir():
            stem, _, ext = path.name.partition(".")
            if ext not in ("part", "manifest") or not self._resumable(stem):
                _remove(path)
        found = []
        for path in self._adapters.iterdir():
            try:
                manifest = read_installed(self.root, path.name, self.fingerprint).manifest
                found.append(((path / MANIFEST).stat().st_mtime_ns, manifest))
            except (OSError, DecodeError, adapter_wire.WireError) as exc:
                log.warning("dropping cached adapter %s: %s", path.name[:64], exc)
                _remove(path)
        for mtime, manifest in sorted(found, key=lambda item: item[0]):
            self._entries[manifest.adapter_id] = manifest
            self._last_use = max(self._last_use, mtime)
        with self._lock:
            self._evict(0)  # the capacity may have shrunk since the last run
        try:
            sources = json.loads((self.root / SOURCES).read_text())
            self._sources = {k: v for k, v in sources.items() if isinstance(v, str) and v in self._entries}
        except (OSError, ValueError, AttributeError):
            self._sources = {}
        self._update_gauges()

    def _resumable(self, adapter_id: str) -> bool:
        try:
            manifest = _read_manifest(self._partial / f"{adapter_id}.manifest")
        except (OSError, DecodeError, adapter_wire.WireError):
            return False
        part = self._partial / f"{adapter_id}.part"
        size = part.stat().st_size if part.exists() else 0
        return (
            manifest.adapter_id == adapter_id
            and manifest.base_fingerprint == self.fingerprint
            and size <= manifest.total_size
        )

    # -- lookups ----------------------------------------------------------------------------------------------

    def resident(self) -> list[pb.AdapterManifest]:
        """The installed adapters, most recently used first."""
        with self._lock:
            return list(reversed(self._entries.values()))

    def get(self, adapter_id: str) -> Resident | None:
        """The installed adapter, verified again and marked most recently used; None when it is not installed."""
        adapter_wire.check_adapter_id(adapter_id)
        with self._lock:
            if adapter_id not in self._entries:
                return None
            self._entries.move_to_end(adapter_id)
        try:
            found = read_installed(self.root, adapter_id, self.fingerprint)
            with self._lock:
                if adapter_id in self._entries:
                    self._touch(adapter_id)
        except (OSError, DecodeError, adapter_wire.WireError) as exc:
            with self._lock:
                if adapter_id in self._entries:  # damaged on disk since it was installed: fetch it again
                    log.warning("dropping cached adapter %s: %s", adapter_id, exc)
                    self._drop(adapter_id)
            return None
        return found

    def recall(self, key: str) -> str | None:
        """The resident adapter an earlier answer gave for `key` (a source text's SHA-256), if still installed."""
        with self._lock:
            adapter_id = self._sources.get(key)
            return adapter_id if adapter_id in self._entries else None

    def remember(self, key: str, adapter_id: str) -> None:
        with self._lock:
            if self._sources.get(key) == adapter_id:
                return
            self._sources[key] = adapter_id
            self._save_sources()

    def _save_sources(self) -> None:
        """Persist the source index, pruned to installed adapters (so it stays as small as the cache)."""
        self._sources = {k: v for k, v in self._sources.items() if v in self._entries or v in self._inflight}
        try:
            write_file(self.root / SOURCES, json.dumps(self._sources, sort_keys=True).encode(), durable=True)
        except OSError as exc:  # it only spares coordinator calls: a full disk must not fail a served request
            log.warning("cannot save %s (%s): the index stays in memory", self.root / SOURCES, exc.strerror)

    # -- installing -------------------------------------------------------------------------------------------

    def ensure(
        self, adapter_id: str, source: ChunkSource | None, manifest: pb.AdapterManifest | None = None
    ) -> Resident:
        """The adapter, from the cache or fetched through `source` and installed; concurrent calls for the same id
        share one transfer. `manifest` (from GenerateFromDescription) lets a wrong base be refused before any
        data is asked for; without it the stream's own manifest is checked first.

        Raises WireError for a malformed id, a StoreError, or what the source raised other than StreamInterrupted
        (retrying cannot help: no such adapter, a refusal, a deadline).
        """
        adapter_wire.check_adapter_id(adapter_id)
        found = self.get(adapter_id)
        if found is not None:
            metrics.CACHE_HITS.inc()
            return found
        metrics.CACHE_MISSES.inc()
        if source is None:
            raise NotResident(
                f"adapter {_short(adapter_id)} is not resident and this worker has no coordinator to fetch it from"
            )
        with self._lock:
            transfer = self._inflight.get(adapter_id)
            owner = transfer is None
            if owner:
                transfer = self._inflight[adapter_id] = _Transfer()
        if not owner:
            transfer.done.wait()
            if transfer.error is not None:
                raise transfer.error
            return transfer.result
        try:
            transfer.result = self._fetch(adapter_id, source, manifest)
            return transfer.result
        except BaseException as exc:
            transfer.error = exc
            raise
        finally:
            with self._lock:
                del self._inflight[adapter_id]
            transfer.done.set()

    def _accept(self, adapter_id: str, manifest: pb.AdapterManifest) -> None:
        """Checks that need no data: the structure, the id, the base model, the size."""
        try:
            adapter_wire.check_manifest(manifest)
        except adapter_wire.WireError as exc:
            raise AdapterRejected(f"the coordinator sent a bad manifest: {exc}") from exc
        if manifest.adapter_id != adapter_id:
            raise AdapterRejected(
                f"asked for adapter {_short(adapter_id)}, the coordinator sent {_short(manifest.adapter_id)}"
            )
        if manifest.base_fingerprint != self.fingerprint:
            raise AdapterRejected(
                f"adapter {_short(adapter_id)} was made for base model {manifest.base_fingerprint[:12]}…, this worker "
                f"serves {self.fingerprint[:12]}…: point the worker at a coordinator for the same base model"
            )
        if manifest.total_size > self.capacity_bytes:
            raise AdapterRejected(
                f"adapter {_short(adapter_id)} has {manifest.total_size} bytes, more than this worker's whole adapter "
                f"cache ({self.capacity_bytes} bytes): raise --capacity-mb"
            )

    def _start_partial(self, adapter_id: str, manifest: pb.AdapterManifest) -> None:
        (self._partial / f"{adapter_id}.part").unlink(missing_ok=True)
        write_file(self._partial / f"{adapter_id}.manifest", manifest.SerializeToString(), durable=True)

    def _fetch(self, adapter_id: str, source: ChunkSource, manifest: pb.AdapterManifest | None) -> Resident:
        try:
            return self._transfer(adapter_id, source, manifest)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            for leftover in (f"{adapter_id}.part", f"{adapter_id}.manifest", f"{adapter_id}.staging"):
                _remove(self._partial / leftover)
            raise DiskFull(
                f"the worker's disk is full: adapter {_short(adapter_id)} cannot be stored in {self.root} "
                f"({exc.strerror}); free space there or lower --capacity-mb"
            ) from None

    def _transfer(self, adapter_id: str, source: ChunkSource, manifest: pb.AdapterManifest | None) -> Resident:
        part = self._partial / f"{adapter_id}.part"
        stored = self._partial / f"{adapter_id}.manifest"
        if manifest is not None:
            self._accept(adapter_id, manifest)
        # A transfer an earlier call (or run) left half done is resumed, unless its manifest differs in anything
        # (other bytes, or the same bytes under other digests: its bytes would fail the check at the end).
        previous = _read_manifest(stored) if self._resumable(adapter_id) else None
        if previous is None:
            part.unlink(missing_ok=True)
            stored.unlink(missing_ok=True)
        if manifest is not None and previous != manifest:
            self._start_partial(adapter_id, manifest)

        start = time.perf_counter()
        failures, restarted = 0, False
        while True:
            # The partial's manifest on disk is the transfer's state: `_receive` writes it before any data.
            manifest = _read_manifest(stored) if stored.exists() else None
            offset = part.stat().st_size if part.exists() else 0
            try:
                manifest = self._receive(adapter_id, source, manifest, offset)
            except StreamInterrupted as exc:
                problem = str(exc)
            else:
                payload = part.read_bytes()
                try:
                    adapter, spec, _ = adapter_wire.decode(manifest, payload)
                except adapter_wire.WireError as exc:
                    part.unlink()
                    if restarted:
                        stored.unlink()
                        raise AdapterRejected(f"{exc}; it failed again from scratch: not installed") from None
                    log.warning("adapter %s: %s; fetching it again from offset 0", _short(adapter_id), exc)
                    restarted = True
                    continue
                self._install(manifest, part)
                seconds = time.perf_counter() - start
                metrics.TRANSFER.observe(seconds)
                log.info("installed adapter %s: %d bytes in %.2f s", _short(adapter_id), manifest.total_size, seconds)
                return Resident(manifest, adapter, spec, was_resident=False)
            failures += 1
            if failures > self.retries:
                raise TransferBroken(
                    f"adapter {_short(adapter_id)}: the transfer broke {failures} times (last: {problem}); "
                    "what arrived is kept, ask again to resume"
                )
            log.warning("adapter %s: %s; resuming", _short(adapter_id), problem)

    def _receive(
        self, adapter_id: str, source: ChunkSource, manifest: pb.AdapterManifest | None, offset: int
    ) -> pb.AdapterManifest:
        """One FetchAdapter call from `offset`, appended to the partial file; returns the manifest in force.

        Raises StreamInterrupted unless the payload is complete (verifying it is the caller's job).
        """
        stream = iter(source(adapter_id, offset))
        try:
            first = next(stream, None)
            if first is None or not first.HasField("manifest"):
                raise StreamInterrupted("the stream did not start with a manifest")
            if manifest is None:
                self._accept(adapter_id, first.manifest)  # before a single data byte is read
                manifest = first.manifest
                self._start_partial(adapter_id, manifest)
            elif first.manifest != manifest:
                self._accept(adapter_id, first.manifest)
                self._start_partial(adapter_id, first.manifest)
                raise StreamInterrupted("the coordinator now sends other bytes (another dtype?); starting over")
            position = offset
            with open(self._partial / f"{adapter_id}.part", "ab") as f:
                for message in stream:
                    if not message.HasField("data"):
                        raise StreamInterrupted("a second manifest in the middle of the data")
                    chunk = message.data
                    if chunk.offset != position:
                        raise StreamInterrupted(f"a chunk at offset {chunk.offset}, expected {position}")
                    if position + len(chunk.data) > manifest.total_size:
                        f.truncate(offset)  # over-long: nothing of this call can be trusted
                        raise StreamInterrupted(f"more bytes than the manifest's {manifest.total_size}")
                    f.write(chunk.data)
                    position += len(chunk.data)
                    metrics.BYTES_RECEIVED.inc(len(chunk.data))
                f.flush()
                os.fsync(f.fileno())
            if position < manifest.total_size:
                raise StreamInterrupted(f"the stream ended at byte {position} of {manifest.total_size}")
            return manifest
        finally:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:  # a gRPC call: do not leave it streaming after an early exit
                cancel()

    def _install(self, manifest: pb.AdapterManifest, part: Path) -> None:
        """Move a verified payload into adapters/<id>/ with one rename, evicting least recently used ones first."""
        adapter_id = manifest.adapter_id
        staging = self._partial / f"{adapter_id}.staging"
        _remove(staging)
        staging.mkdir()
        os.replace(part, staging / PAYLOAD)
        write_file(staging / MANIFEST, manifest.SerializeToString(), durable=True)
        with self._lock:
            self._evict(manifest.total_size)
            os.replace(staging, self._adapters / adapter_id)
            self._entries[adapter_id] = manifest
            self._touch(adapter_id)
            self._save_sources()
            self._update_gauges()
        (self._partial / f"{adapter_id}.manifest").unlink(missing_ok=True)

    def _touch(self, adapter_id: str) -> None:
        """Record a use in the manifest's mtime, strictly increasing: file timestamps are only as fine as the
        kernel's clock tick, and two uses in one tick must still keep their order across a restart."""
        self._last_use = max(time.time_ns(), self._last_use + 1)
        os.utime(self._adapters / adapter_id / MANIFEST, ns=(self._last_use, self._last_use))

    def _evict(self, incoming: int) -> None:
        """Drop least recently used adapters until `incoming` more bytes fit. Caller holds the lock."""
        used = sum(m.total_size for m in self._entries.values())
        while self._entries and used + incoming > self.capacity_bytes:
            adapter_id, manifest = next(iter(self._entries.items()))
            log.info("evicting adapter %s (%d bytes), the least recently used", _short(adapter_id), manifest.total_size)
            self._drop(adapter_id)
            used -= manifest.total_size

    def _drop(self, adapter_id: str) -> None:
        """Uninstall one adapter. Caller holds the lock."""
        self._entries.pop(adapter_id, None)
        _remove(self._adapters / adapter_id)
        self._update_gauges()

    def _update_gauges(self) -> None:
        entries = list(self._entries.values())
        metrics.RESIDENT_ADAPTERS.set(len(entries))
        metrics.RESIDENT_BYTES.set(sum(m.total_size for m in entries))
