"""The coordinator's adapter cache: content addressed, on disk, bounded by bytes, kept across restarts.

    ROOT/adapters/<adapter id>.adapter   b"LCA2", the manifest's length (uint32 LE), the FLOAT32 manifest, payload
    ROOT/sources/<source key>            the id of the adapter made from one source text (see `source_key`)
    ROOT/lock                            held by the one coordinator process that uses ROOT

Adapters are stored once, in float32; FLOAT16 is converted when asked for (under the same id: the manifest
carries both encodings' digests, see loracast.adapter_wire) and memoized in memory. Every file is written to a
temporary sibling, fsynced and renamed into place: a crash leaves the old state or the new one, never half a file.
Recency (for eviction and ListAdapters) is the adapter file's mtime, so it survives a restart. Source texts are
never stored: a source key is a SHA-256. Files of the first format (b"LCA1", whose ids covered the float32 payload
only) are removed at startup; a source key that pointed at one finds nothing and is dropped, and its text is
generated again, under the new id, when it is next asked for.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import secrets
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from google.protobuf.message import DecodeError

from loracast import adapter_wire
from loracast.adapter_format import Adapter
from loracast.adapter_wire import WireAdapter, WireError
from loracast.lora_spec import LoraSpec
from loracast.paths import TEMP_SUFFIX, write_file
from loracast.v1 import loracast_pb2 as pb

MAGIC = b"LCA2"
_HEADER = struct.Struct("<4sI")
_SUFFIX = ".adapter"
_SOURCE_KEY = re.compile(r"[0-9a-f]{64}")
# Provenance key -> AdapterSummary.source
SOURCES = {"loracast.description_sha256": "description", "loracast.document_sha256": "document"}
DEFAULT_PAGE_SIZE = 100  # ListAdapters
MAX_PAGE_SIZE = 1000
_PAGE_TOKEN = re.compile(r"([0-9a-f]{16})\.([0-9]{1,19})")  # this cache's run, then a use stamp


class CacheError(RuntimeError):
    """The cache directory cannot be used (unwritable, or another coordinator holds it)."""


class PageTokenError(ValueError):
    """A ListAdapters page token this cache did not issue (or issued before the coordinator restarted)."""


class NotCached(LookupError):
    """No adapter with this id in the cache (never made, evicted, or its file was corrupt and dropped)."""

    def __str__(self) -> str:
        return f"no adapter {self.args[0]} in this coordinator's cache"


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


def _source_of(manifest: pb.AdapterManifest) -> str:
    return next((name for key, name in SOURCES.items() if key in manifest.provenance), "")


class AdapterCache:
    """Thread-safe. `capacity_bytes` bounds the files on disk (least recently used go first; the newest adapter
    always stays); `memo_bytes` bounds the FLOAT16 encodings kept in memory."""

    def __init__(self, root: Path, capacity_bytes: int | None = None, memo_bytes: int = 64 * 2**20) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.memo_bytes = memo_bytes
        self._adapters = self.root / "adapters"
        self._sources = self.root / "sources"
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[pb.AdapterManifest, int]] = OrderedDict()  # LRU first
        # Every use stamps an adapter with the next number, so the recency order is the stamps' order and a page
        # token (the last stamp listed) keeps its place while adapters are used. The run id makes a token from
        # before a restart (when the stamps start again) an error rather than a wrong page.
        self._stamps: dict[str, int] = {}
        self._next_stamp = itertools.count(1)
        self._run = secrets.token_hex(8)
        self._memo: OrderedDict[str, WireAdapter] = OrderedDict()
        self._memo_size = 0
        try:
            self._adapters.mkdir(parents=True, exist_ok=True)
            self._sources.mkdir(exist_ok=True)
            self._lock_file = open(self.root / "lock", "wb")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise CacheError(f"cannot use the cache directory {self.root}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise CacheError(f"another coordinator uses the cache directory {self.root}: give each its own") from None
        self._load()

    def close(self) -> None:
        self._lock_file.close()  # releases the flock

    # -- reading ---------------------------------------------------------------------------------------------

    def find(self, key: str, dtype: int) -> WireAdapter | None:
        """The adapter made before from the source with this key, in `dtype`; None if there is none."""
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
        """The adapter with this id in `dtype`. Raises WireError for a malformed id, NotCached for an unknown one."""
        adapter_wire.check_adapter_id(adapter_id)  # before the id goes anywhere near a path
        dtype = adapter_wire.wire_dtype(dtype)
        with self._lock:
            if adapter_id not in self._entries:
                raise NotCached(adapter_id)
            manifest, file_size = self._entries[adapter_id]
            self._used(adapter_id)
            memoized = self._memo.get(adapter_id) if dtype == pb.FLOAT16 else None
            if memoized is not None:
                self._memo.move_to_end(adapter_id)
        path = self._adapter_path(adapter_id)
        try:
            os.utime(path)  # recency that outlives this process
            if memoized is not None:
                return memoized
            wire = WireAdapter(manifest, self._read_payload(path, manifest, file_size))
        except (FileNotFoundError, WireError) as exc:  # other OSErrors (EIO, EMFILE) say nothing about the file
            self._drop(adapter_id, f"cannot read {path.name} ({exc}); dropped from the cache")
            raise NotCached(adapter_id) from None
        return self._in_dtype(wire, dtype)

    def entries(self) -> list[pb.AdapterManifest]:
        """The FLOAT32 manifests of every cached adapter, most recently used first."""
        with self._lock:
            return [manifest for manifest, _ in reversed(self._entries.values())]

    def summaries(self, page_size: int = 0, page_token: str = "") -> tuple[list[pb.AdapterSummary], str]:
        """One page of ListAdapters, most recently used first, and the token of the next page ("" after the last).

        `page_size` 0 is DEFAULT_PAGE_SIZE, above MAX_PAGE_SIZE is MAX_PAGE_SIZE; `page_token` "" starts at the
        top. An adapter used after a page was read moves to the top: the pages after it no longer list it.
        """
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = self._read_token(page_token) if page_token else None
        with self._lock:
            later = [
                (self._stamps[adapter_id], manifest)
                for adapter_id, (manifest, _) in reversed(self._entries.items())
                if after is None or self._stamps[adapter_id] < after
            ]
        page = [
            pb.AdapterSummary(
                adapter_id=m.adapter_id,
                hypernet_version=m.hypernet_version,
                source=_source_of(m),
                size_bytes=m.total_size,
            )
            for _, m in later[:size]
        ]
        return page, (f"{self._run}.{later[size - 1][0]}" if len(later) > size else "")

    def _read_token(self, token: str) -> int:
        match = _PAGE_TOKEN.fullmatch(token)
        if match is None:
            raise PageTokenError(f"page_token {token[:40]!r} is not one this coordinator issued; list from the start")
        if match[1] != self._run:
            raise PageTokenError(
                "page_token is not from this coordinator's current run (it restarted since, or the token is another"
                " coordinator's); list again from the first page"
            )
        return int(match[2])

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    # -- writing ---------------------------------------------------------------------------------------------

    def put(self, key: str, adapter: Adapter, spec: LoraSpec, metadata: Mapping[str, str], dtype: int) -> WireAdapter:
        """Store a generated adapter under its content id and index it under its source key; returns it in `dtype`."""
        wire = adapter_wire.encode(adapter, spec, metadata, pb.FLOAT32)
        adapter_id = wire.manifest.adapter_id
        manifest = wire.manifest.SerializeToString()
        data = _HEADER.pack(MAGIC, len(manifest)) + manifest + wire.payload
        write_file(self._adapter_path(adapter_id), data, durable=True)
        with self._lock:
            self._entries[adapter_id] = (wire.manifest, len(data))
            self._used(adapter_id)
            evicted = self._evict()
        write_file(self._source_path(key), adapter_id.encode(), durable=True)
        for victim in evicted:
            self._adapter_path(victim).unlink(missing_ok=True)
        return self._in_dtype(wire, dtype)

    # -- internals -------------------------------------------------------------------------------------------

    def _adapter_path(self, adapter_id: str) -> Path:
        return self._adapters / f"{adapter_id}{_SUFFIX}"

    def _source_path(self, key: str) -> Path:
        if not _SOURCE_KEY.fullmatch(key):
            raise ValueError(f"a source key is a SHA-256 in hex, not {key[:80]!r}")
        return self._sources / key

    def _in_dtype(self, fp32: WireAdapter, dtype: int) -> WireAdapter:
        if adapter_wire.wire_dtype(dtype) == pb.FLOAT32:
            return fp32
        adapter, spec, metadata = adapter_wire.decode(fp32.manifest, fp32.payload)
        wire = adapter_wire.encode(adapter, spec, metadata, dtype)
        adapter_id, size = wire.manifest.adapter_id, len(wire.payload)
        with self._lock:
            if size <= self.memo_bytes and adapter_id in self._entries and adapter_id not in self._memo:
                self._memo[adapter_id] = wire
                self._memo_size += size
                while self._memo_size > self.memo_bytes:
                    _, old = self._memo.popitem(last=False)
                    self._memo_size -= len(old.payload)
        return wire

    def _used(self, adapter_id: str) -> None:
        """Under the lock: `adapter_id` (in the cache) is now the most recently used."""
        self._entries.move_to_end(adapter_id)
        self._stamps[adapter_id] = next(self._next_stamp)

    def _evict(self) -> list[str]:
        """Under the lock: forget least recently used adapters over capacity; returns their ids (files to delete)."""
        victims: list[str] = []
        if self.capacity_bytes is None:
            return victims
        total = sum(size for _, size in self._entries.values())
        while total > self.capacity_bytes and len(self._entries) > 1:
            adapter_id, (_, size) = next(iter(self._entries.items()))  # the least recently used
            self._forget(adapter_id)
            victims.append(adapter_id)
            total -= size
        return victims

    def _forget(self, adapter_id: str) -> None:
        """Under the lock: drop all that memory holds of `adapter_id` (index entry, use stamp, FLOAT16 memo)."""
        self._entries.pop(adapter_id, None)
        self._stamps.pop(adapter_id, None)
        old = self._memo.pop(adapter_id, None)
        if old is not None:
            self._memo_size -= len(old.payload)

    def _drop(self, adapter_id: str, why: str) -> None:
        print(f"coordinator cache: adapter {adapter_id[:12]}…: {why}", file=sys.stderr, flush=True)
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
                print(f"coordinator cache: removing {path.name}: {exc}", file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)
                continue
            found.append((mtime, manifest, file_size))
        for _, manifest, size in sorted(found, key=lambda item: item[0]):
            self._entries[manifest.adapter_id] = (manifest, size)
            self._used(manifest.adapter_id)
        with self._lock:
            evicted = self._evict()  # the capacity may have shrunk since the last run
        for victim in evicted:
            self._adapter_path(victim).unlink(missing_ok=True)
