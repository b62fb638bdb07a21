"""The local adapter store: one directory on disk, used by one coordinator, bounded by bytes, kept across restarts.

    ROOT/adapters/<adapter id>.adapter   b"LCA2", the manifest's length (uint32 LE), the FLOAT32 manifest, payload
    ROOT/sources/<source key>            the id of the adapter made from one source text (see `source_key`)
    ROOT/lock                            held by the one coordinator process that uses ROOT

Adapters are stored once, in float32; FLOAT16 is converted when asked for and memoized in memory. Every file is
written to a temporary sibling, fsynced and renamed into place: a crash leaves the old state or the new one, never
half a file. Recency (for eviction and listing) is the adapter file's mtime in nanoseconds, strictly increasing
from use to use, so it survives a restart and serves as the use stamp of `recent`. Source texts are never stored: a
source key is a SHA-256. Files of the first format (b"LCA1", whose ids covered the float32 payload only) are
removed at startup; a source key that pointed at one finds nothing and is dropped, and its adapter is made again,
under the new id, when it is next asked for.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from google.protobuf.message import DecodeError

from coordinator.adapter_store import Claim, Float16Memo, NotCached
from loracast import adapter_wire
from loracast.adapter_format import Adapter
from loracast.adapter_wire import WireAdapter, WireError
from loracast.errors import ConfigError
from loracast.lora_spec import LoraSpec
from loracast.paths import TEMP_SUFFIX, write_file
from loracast.v1 import loracast_pb2 as pb

MAGIC = b"LCA2"
_HEADER = struct.Struct("<4sI")
_SUFFIX = ".adapter"
_SOURCE_KEY = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger(__name__)


class LocalStore:
    """Thread-safe. `capacity_bytes` bounds the files on disk (least recently used go first; the newest adapter
    always stays); `memo_bytes` bounds the FLOAT16 encodings kept in memory. Raises ConfigError when the directory
    cannot be used (unwritable, or another coordinator holds it)."""

    backend = "local"

    def __init__(self, root: Path, capacity_bytes: int | None = None, memo_bytes: int = 64 * 2**20) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self._adapters = self.root / "adapters"
        self._sources = self.root / "sources"
        self._lock = threading.Lock()
        # adapter id -> (FLOAT32 manifest, file size, use stamp), least recently used first
        self._entries: OrderedDict[str, tuple[pb.AdapterManifest, int, int]] = OrderedDict()
        self._last_stamp = 0
        self._memo = Float16Memo(memo_bytes)
        try:
            self._adapters.mkdir(parents=True, exist_ok=True)
            self._sources.mkdir(exist_ok=True)
            self._lock_file = open(self.root / "lock", "wb")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise ConfigError(f"cannot use the cache directory {self.root}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise ConfigError(
                f"another coordinator uses the cache directory {self.root}: give each its own, or share a Redis store"
            ) from None
        self._load()

    def close(self) -> None:
        self._lock_file.close()  # releases the flock

    def watch(self, on_change: Callable[[bool], None]) -> None:
        on_change(True)  # a directory this process holds is always there

    # -- reading ---------------------------------------------------------------------------------------------

    def find(self, key: str, dtype: int) -> WireAdapter | None:
        path = self._source_path(key)
        try:
            pointer = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return self.get(adapter_wire.check_adapter_id(pointer.decode("ascii", "replace")), dtype)
        except (NotCached, WireError):  # evicted since, or a damaged index file
            with self._lock:  # unless a put has just pointed it at a new adapter
                if path.exists() and path.read_bytes() == pointer:
                    path.unlink()
            return None

    def get(self, adapter_id: str, dtype: int) -> WireAdapter:
        adapter_wire.check_adapter_id(adapter_id)  # before the id goes anywhere near a path
        dtype = adapter_wire.wire_dtype(dtype)
        with self._lock:
            if adapter_id not in self._entries:
                raise NotCached(adapter_id)
            manifest, file_size, _ = self._entries[adapter_id]
            stamp = self._used(adapter_id)
        memoized = self._memo.cached(adapter_id) if dtype == pb.FLOAT16 else None
        path = self._adapter_path(adapter_id)
        try:
            os.utime(path, ns=(stamp, stamp))  # recency that outlives this process
            if memoized is not None:
                return memoized
            wire = WireAdapter(manifest, self._read_payload(path, manifest, file_size))
        except (FileNotFoundError, WireError) as exc:  # other OSErrors (EIO, EMFILE) say nothing about the file
            self._drop(adapter_id, f"cannot read {path.name} ({exc}); dropped from the cache")
            raise NotCached(adapter_id) from None
        return self._memo.in_dtype(wire, dtype)

    def recent(self, before: int | None, limit: int) -> list[tuple[int, pb.AdapterManifest]]:
        with self._lock:
            listed = []
            for manifest, _, stamp in reversed(self._entries.values()):
                if len(listed) == limit:
                    break
                if before is None or stamp < before:
                    listed.append((stamp, manifest))
            return listed

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return len(self._entries), sum(size for _, size, _ in self._entries.values())

    # -- writing ---------------------------------------------------------------------------------------------

    @contextmanager
    def claim(self, key: str, dtype: int, abandoned: Callable[[], bool]) -> Iterator[Claim]:
        # One process owns the directory (the flock), and the servicer runs one job per source key: the claim is
        # only the last look before a pass (a job of this text may have ended since the caller's lookup).
        yield Claim(self.find(key, dtype))

    def put(self, key: str, adapter: Adapter, spec: LoraSpec, metadata: Mapping[str, str], dtype: int) -> WireAdapter:
        wire = adapter_wire.encode(adapter, spec, metadata, pb.FLOAT32)
        adapter_id = wire.manifest.adapter_id
        manifest = wire.manifest.SerializeToString()
        data = _HEADER.pack(MAGIC, len(manifest)) + manifest + wire.payload
        path = self._adapter_path(adapter_id)
        write_file(path, data, durable=True)
        with self._lock:
            self._entries[adapter_id] = (wire.manifest, len(data), 0)
            stamp = self._used(adapter_id)
            evicted = self._evict()
        os.utime(path, ns=(stamp, stamp))
        write_file(self._source_path(key), adapter_id.encode(), durable=True)
        for victim in evicted:
            self._adapter_path(victim).unlink(missing_ok=True)
        return self._memo.in_dtype(wire, dtype)

    # -- internals -------------------------------------------------------------------------------------------

    def _adapter_path(self, adapter_id: str) -> Path:
        return self._adapters / f"{adapter_id}{_SUFFIX}"

    def _source_path(self, key: str) -> Path:
        if not _SOURCE_KEY.fullmatch(key):
            raise ValueError(f"a source key is a SHA-256 in hex, not {key[:80]!r}")
        return self._sources / key

    def _used(self, adapter_id: str, stamp: int | None = None) -> int:
        """Under the lock: `adapter_id` (in the store) is now the most recently used; returns its new stamp (the
        clock in ns, or `stamp`, made strictly greater than every stamp before: two uses in one clock tick keep
        their order)."""
        self._last_stamp = max(time.time_ns() if stamp is None else stamp, self._last_stamp + 1)
        manifest, size, _ = self._entries[adapter_id]
        self._entries[adapter_id] = (manifest, size, self._last_stamp)
        self._entries.move_to_end(adapter_id)
        return self._last_stamp

    def _evict(self) -> list[str]:
        """Under the lock: forget least recently used adapters over capacity; returns their ids (files to delete)."""
        victims: list[str] = []
        if self.capacity_bytes is None:
            return victims
        total = sum(size for _, size, _ in self._entries.values())
        while total > self.capacity_bytes and len(self._entries) > 1:
            adapter_id, (_, size, _) = next(iter(self._entries.items()))  # the least recently used
            self._forget(adapter_id)
            victims.append(adapter_id)
            total -= size
        return victims

    def _forget(self, adapter_id: str) -> None:
        """Under the lock: drop all that memory holds of `adapter_id` (index entry, FLOAT16 memo)."""
        self._entries.pop(adapter_id, None)
        self._memo.forget(adapter_id)

    def _drop(self, adapter_id: str, why: str) -> None:
        log.warning("adapter %s…: %s", adapter_id[:12], why)
        with self._lock:
            self._forget(adapter_id)
            self._adapter_path(adapter_id).unlink(missing_ok=True)

    @staticmethod
    def _read_manifest(path: Path) -> tuple[pb.AdapterManifest, int]:
        """The manifest of a cache file, checked against the file's name and size; and that size."""
        with open(path, "rb") as f:
            magic, length = _HEADER.unpack(f.read(_HEADER.size).ljust(_HEADER.size, b"\0"))
            if magic != MAGIC:
                raise WireError(f"not a {MAGIC.decode()} cache file (an older LoraCast's, or something else)")
            try:
                manifest = pb.AdapterManifest.FromString(f.read(length))
            except DecodeError as exc:
                raise WireError(f"unreadable manifest ({exc})") from None
            file_size = os.fstat(f.fileno()).st_size
        adapter_wire.check_manifest(manifest)
        if manifest.adapter_id != path.name.removesuffix(_SUFFIX) or manifest.dtype != pb.FLOAT32:
            raise WireError("the manifest does not match the file name, or is not FLOAT32")
        if file_size != _HEADER.size + length + manifest.total_size:
            raise WireError(f"{file_size} bytes, not what the manifest says")
        return manifest, file_size

    @staticmethod
    def _read_payload(path: Path, manifest: pb.AdapterManifest, file_size: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(file_size - manifest.total_size)  # the payload is the file's tail
            payload = f.read()
        if len(payload) != manifest.total_size or hashlib.sha256(payload).hexdigest() != manifest.payload_sha256:
            raise WireError("the payload does not match its manifest (a damaged file)")
        return payload

    def _load(self) -> None:
        """Rebuild the in-memory index from the files; damaged ones and leftovers of a crash are removed."""
        for directory in (self._adapters, self._sources):
            for leftover in directory.glob(f".*{TEMP_SUFFIX}"):
                leftover.unlink(missing_ok=True)
        found = []
        for path in self._adapters.glob(f"*{_SUFFIX}"):
            try:
                manifest, file_size = self._read_manifest(path)
                mtime = path.stat().st_mtime_ns
            except (OSError, WireError) as exc:
                log.warning("removing %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            found.append((mtime, manifest, file_size))
        with self._lock:
            for mtime, manifest, size in sorted(found, key=lambda item: item[0]):
                self._entries[manifest.adapter_id] = (manifest, size, 0)
                self._used(manifest.adapter_id, mtime)
            evicted = self._evict()  # the capacity may have shrunk since the last run
        for victim in evicted:
            self._adapter_path(victim).unlink(missing_ok=True)
