"""An adapter on the wire: a manifest, then its payload in chunks (the contract is protos/loracast/v1).

The payload is every LoRA matrix, little-endian, in canonical order — layer, then module name, then A before
B — so the same adapter always has the same bytes. The adapter id is the SHA-256 of its content: a JSON
header (base fingerprint, hypernet version, rank, alpha, rsLoRA, target modules, tensor names and shapes)
followed by the float32 payload. The id is therefore independent of the wire dtype, and of the text the
adapter was made from; `payload_sha256` covers the bytes actually sent and is verified before decoding.

Torch-free: the worker's serving path uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from loracast.adapter_format import META_FINGERPRINT, PEFT_KEY, Adapter, as_float32
from loracast.lora_spec import LoraSpec, peft_key
from loracast.v1 import loracast_pb2 as pb

META_HYPERNET_VERSION = "loracast.hypernet_version"
DEFAULT_CHUNK = 256 * 1024
MIN_CHUNK, MAX_CHUNK = 64 * 1024, 1024 * 1024
_NUMPY = {pb.FLOAT16: np.dtype("<f2"), pb.FLOAT32: np.dtype("<f4")}
_ID = re.compile(r"[0-9a-f]{64}")


class WireError(ValueError):
    """A manifest or payload that is malformed, incomplete or corrupt; the message says which."""


def wire_dtype(dtype: int) -> int:
    """The dtype a request asked for, with DTYPE_UNSPECIFIED meaning the default, FLOAT16."""
    if dtype == pb.DTYPE_UNSPECIFIED:
        return pb.FLOAT16
    if dtype not in _NUMPY:
        raise WireError(f"unknown dtype {dtype}: use FLOAT16 or FLOAT32")
    return dtype


def check_adapter_id(adapter_id: str) -> str:
    """Ids are 64 lowercase hex digits; anything else (a path, say) is refused before it is used."""
    if not _ID.fullmatch(adapter_id):
        raise WireError(f"adapter id {adapter_id[:80]!r} is not 64 lowercase hex digits")
    return adapter_id


def check_chunk_size(chunk_size: int) -> int:
    if chunk_size == 0:
        return DEFAULT_CHUNK
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise WireError(f"chunk_size {chunk_size} is out of range: use 0 (default) or {MIN_CHUNK} to {MAX_CHUNK}")
    return chunk_size


def _canonical(adapter: Adapter) -> list[tuple[str, np.ndarray]]:
    tensors = []
    for layer, module in sorted(adapter):
        a, b = adapter[layer, module]
        for which, x in (("A", a), ("B", b)):
            tensors.append((peft_key(layer, module, which), as_float32(x)))
    return tensors


def _content_id(header: dict, fp32_payload: bytes) -> str:
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    digest.update(fp32_payload)
    return digest.hexdigest()


def _header(fingerprint: str, version: str, spec: LoraSpec, tensors: list[tuple[str, tuple[int, ...]]]) -> dict:
    return {
        "base_fingerprint": fingerprint,
        "hypernet_version": version,
        "r": spec.r,
        # As the manifest carries it, a float32, so that a receiver recomputes the same id: Doc-to-LoRA's alpha,
        # scaled with its rank (hypernet.generate.with_rank), is rarely a float32 exactly.
        "alpha": float(np.float32(spec.alpha)),
        "use_rslora": spec.use_rslora,
        "target_modules": list(spec.target_modules),
        "tensors": [[name, list(shape)] for name, shape in tensors],
    }


@dataclass(frozen=True)
class WireAdapter:
    """One adapter ready to send: its manifest and payload in the manifest's dtype."""

    manifest: pb.AdapterManifest
    payload: bytes


def encode(adapter: Adapter, spec: LoraSpec, metadata: Mapping[str, str], dtype: int = pb.FLOAT16) -> WireAdapter:
    """Serialize an adapter; `metadata` is the adapter's loracast.* provenance (base fingerprint required)."""
    if META_FINGERPRINT not in metadata:
        raise WireError("an adapter must record the base model fingerprint it was made for")
    dtype = wire_dtype(dtype)
    tensors = _canonical(adapter)
    fingerprint, version = metadata[META_FINGERPRINT], metadata.get(META_HYPERNET_VERSION, "")
    header = _header(fingerprint, version, spec, [(name, x.shape) for name, x in tensors])
    adapter_id = _content_id(header, b"".join(x.astype("<f4").tobytes() for _, x in tensors))
    entries, parts, offset = [], [], 0
    for name, x in tensors:
        raw = x.astype(_NUMPY[dtype]).tobytes()
        entries.append(pb.TensorEntry(name=name, shape=x.shape, offset=offset, nbytes=len(raw)))
        parts.append(raw)
        offset += len(raw)
    payload = b"".join(parts)
    manifest = pb.AdapterManifest(
        adapter_id=adapter_id,
        base_fingerprint=fingerprint,
        hypernet_version=version,
        rank=spec.r,
        alpha=spec.alpha,
        use_rslora=spec.use_rslora,
        target_modules=spec.target_modules,
        dtype=dtype,
        tensors=entries,
        total_size=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        provenance={k: v for k, v in metadata.items() if k not in (META_FINGERPRINT, META_HYPERNET_VERSION)},
    )
    return WireAdapter(manifest, payload)


def check_manifest(manifest: pb.AdapterManifest) -> None:
    """Structural checks a receiver runs before accepting a single data byte."""
    check_adapter_id(manifest.adapter_id)
    if manifest.dtype not in _NUMPY:
        raise WireError(f"manifest dtype {manifest.dtype} is not FLOAT16 or FLOAT32")
    if not _ID.fullmatch(manifest.payload_sha256):
        raise WireError("manifest payload_sha256 is not 64 lowercase hex digits")
    if manifest.rank == 0 or not manifest.target_modules or not manifest.tensors:
        raise WireError("manifest has no rank, target modules or tensors")
    if not math.isfinite(manifest.alpha):
        raise WireError("manifest alpha is not a finite number")
    itemsize, offset = _NUMPY[manifest.dtype].itemsize, 0
    matrices: set[tuple[int, str, str]] = set()
    for entry in manifest.tensors:
        m = PEFT_KEY.fullmatch(entry.name)
        if m is None or m[2] not in manifest.target_modules:
            raise WireError(f"manifest tensor {entry.name[:120]!r} is not a LoRA matrix of a target module")
        # Two entries for one matrix (a name repeated, or spelled "layers.00", or under the other block) would
        # leave one entry's bytes unused by decode: the payload must be exactly the adapter.
        matrix = (int(m[1]), m[2], m[3])
        if matrix in matrices:
            raise WireError(f"manifest lists the lora_{m[3]} matrix of layer {matrix[0]} {m[2]} twice")
        matrices.add(matrix)
        if len(entry.shape) != 2 or entry.shape[0 if m[3] == "A" else 1] != manifest.rank:
            raise WireError(f"manifest tensor {entry.name} has shape {list(entry.shape)}, not rank {manifest.rank}")
        if entry.offset != offset or entry.nbytes != entry.shape[0] * entry.shape[1] * itemsize:
            raise WireError(f"manifest tensor {entry.name} does not follow the previous one or has a wrong size")
        offset += entry.nbytes
    if offset != manifest.total_size:
        raise WireError(f"manifest tensors cover {offset} bytes, total_size says {manifest.total_size}")


def decode(manifest: pb.AdapterManifest, payload: bytes) -> tuple[dict, LoraSpec, dict[str, str]]:
    """Verify and unpack a received adapter: (adapter of float32 arrays, spec, loracast.* metadata).

    Raises WireError when the payload is not exactly what the manifest promised (size, SHA-256, content id).
    """
    check_manifest(manifest)
    if len(payload) != manifest.total_size:
        raise WireError(f"payload has {len(payload)} bytes, the manifest promised {manifest.total_size}")
    if hashlib.sha256(payload).hexdigest() != manifest.payload_sha256:
        raise WireError(f"adapter {manifest.adapter_id[:12]}…: payload fails its SHA-256 check (corrupt transfer)")
    spec = LoraSpec(tuple(manifest.target_modules), manifest.rank, manifest.alpha, manifest.use_rslora)
    np_dtype = _NUMPY[manifest.dtype]
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for entry in manifest.tensors:
        m = PEFT_KEY.fullmatch(entry.name)
        raw = np.frombuffer(payload, np_dtype, count=entry.nbytes // np_dtype.itemsize, offset=entry.offset)
        pairs.setdefault((int(m[1]), m[2]), {})[m[3]] = raw.reshape(tuple(entry.shape)).astype(np.float32)
    if any(len(p) != 2 for p in pairs.values()):
        raise WireError(f"adapter {manifest.adapter_id[:12]}…: a LoRA pair is missing its A or B matrix")
    adapter = {k: (p["A"], p["B"]) for k, p in pairs.items()}
    if manifest.dtype == pb.FLOAT32:  # fp32 is the id's own encoding: the id can be checked exactly
        header = _header(
            manifest.base_fingerprint,
            manifest.hypernet_version,
            spec,
            [(e.name, tuple(e.shape)) for e in manifest.tensors],
        )
        if _content_id(header, payload) != manifest.adapter_id:
            raise WireError(f"adapter {manifest.adapter_id[:12]}…: content does not match its id")
    metadata = {META_FINGERPRINT: manifest.base_fingerprint, META_HYPERNET_VERSION: manifest.hypernet_version}
    metadata.update(manifest.provenance)
    return adapter, spec, metadata


def chunks(payload: bytes, offset: int = 0, chunk_size: int = DEFAULT_CHUNK) -> Iterator[pb.DataChunk]:
    """The payload from `offset` on, as DataChunk messages of `chunk_size` bytes (the last may be shorter).

    A bad offset raises at the call, not at the first chunk, so a server refuses before it sends the manifest.
    """
    if not 0 <= offset <= len(payload):
        raise WireError(f"offset {offset} is beyond the payload's {len(payload)} bytes")
    return _chunks(payload, offset, chunk_size)


def _chunks(payload: bytes, offset: int, chunk_size: int) -> Iterator[pb.DataChunk]:
    view = memoryview(payload)
    for start in range(offset, len(payload), chunk_size):
        yield pb.DataChunk(offset=start, data=bytes(view[start : start + chunk_size]))
