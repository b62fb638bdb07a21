"""An adapter on the wire: a manifest, then its payload in chunks (the contract is protos/loracast/v1).

The payload is every LoRA matrix, little-endian, in canonical order — layer, then module name, then A before
B — so the same adapter always has the same bytes. The adapter id commits to the config and to the payload in
both dtypes:

    adapter_id = hex(SHA-256(config ‖ SHA-256(float32 payload) ‖ SHA-256(float16 payload)))

where the inner digests are 32 raw bytes and `config` is the compact, key-sorted JSON of the base fingerprint,
hypernet version, rank, alpha (as the manifest's float32), rsLoRA, target modules and the tensor names and shapes.
A manifest carries `payload_sha256` for the bytes it sends and `other_dtype_sha256` for the other dtype's: a
receiver hashes what it received, takes the other digest from the manifest and recomputes the id (`content_id`),
so a float16 adapter is as verifiable as a float32 one, and forging either (other bytes, another base
fingerprint) takes a SHA-256 preimage. The id is independent of the wire dtype and of the text the adapter was
made from.

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
_OTHER = {pb.FLOAT16: pb.FLOAT32, pb.FLOAT32: pb.FLOAT16}
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


def _float16_payload(fp32_payload: bytes) -> bytes:
    """The FLOAT16 encoding of a FLOAT32 payload: what the id's float16 digest is taken over, by sender and receiver
    alike. Values past float16's range become inf (no warning: an adapter may hold them, and both sides agree)."""
    with np.errstate(over="ignore"):
        return np.frombuffer(fp32_payload, _NUMPY[pb.FLOAT32]).astype(_NUMPY[pb.FLOAT16]).tobytes()


def content_id(manifest: pb.AdapterManifest) -> str:
    """The id a manifest's config and payload digests give (the module docstring defines it); the digests must be
    hex, as `check_manifest` makes sure. The manifest's own `adapter_id` is not read: a receiver compares the two
    once the payload has passed its SHA-256 check."""
    digests = {manifest.dtype: manifest.payload_sha256, _OTHER[manifest.dtype]: manifest.other_dtype_sha256}
    config = {
        "base_fingerprint": manifest.base_fingerprint,
        "hypernet_version": manifest.hypernet_version,
        "r": manifest.rank,
        # The manifest's float32, whatever float it was set from: Doc-to-LoRA's alpha, scaled with its rank
        # (hypernet.makers.with_rank), is rarely a float32 exactly, and the receiver only sees the float32.
        "alpha": float(np.float32(manifest.alpha)),
        "use_rslora": manifest.use_rslora,
        "target_modules": list(manifest.target_modules),
        "tensors": [[entry.name, list(entry.shape)] for entry in manifest.tensors],
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    digest.update(bytes.fromhex(digests[pb.FLOAT32]))
    digest.update(bytes.fromhex(digests[pb.FLOAT16]))
    return digest.hexdigest()


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
    # Both encodings are made: the id needs the digest of each, and only one of them is sent.
    fp32 = b"".join(x.astype(_NUMPY[pb.FLOAT32]).tobytes() for _, x in tensors)
    payloads = {pb.FLOAT32: fp32, pb.FLOAT16: _float16_payload(fp32)}
    itemsize, entries, offset = _NUMPY[dtype].itemsize, [], 0
    for name, x in tensors:
        entries.append(pb.TensorEntry(name=name, shape=x.shape, offset=offset, nbytes=x.size * itemsize))
        offset += x.size * itemsize
    manifest = pb.AdapterManifest(
        base_fingerprint=metadata[META_FINGERPRINT],
        hypernet_version=metadata.get(META_HYPERNET_VERSION, ""),
        rank=spec.r,
        alpha=spec.alpha,
        use_rslora=spec.use_rslora,
        target_modules=spec.target_modules,
        dtype=dtype,
        tensors=entries,
        total_size=len(payloads[dtype]),
        payload_sha256=hashlib.sha256(payloads[dtype]).hexdigest(),
        other_dtype_sha256=hashlib.sha256(payloads[_OTHER[dtype]]).hexdigest(),
        provenance={k: v for k, v in metadata.items() if k not in (META_FINGERPRINT, META_HYPERNET_VERSION)},
    )
    manifest.adapter_id = content_id(manifest)
    return WireAdapter(manifest, payloads[dtype])


def check_manifest(manifest: pb.AdapterManifest) -> None:
    """Structural checks a receiver runs before accepting a single data byte."""
    check_adapter_id(manifest.adapter_id)
    if manifest.dtype not in _NUMPY:
        raise WireError(f"manifest dtype {manifest.dtype} is not FLOAT16 or FLOAT32")
    for field in ("payload_sha256", "other_dtype_sha256"):
        if not _ID.fullmatch(getattr(manifest, field)):
            raise WireError(f"manifest {field} is not 64 lowercase hex digits")
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
    # payload_sha256 now stands for the bytes received, so the id binds them, the config and the other dtype's
    # digest together: whoever changed any of them would have had to find a SHA-256 preimage of the id.
    if content_id(manifest) != manifest.adapter_id:
        raise WireError(f"adapter {manifest.adapter_id[:12]}…: content does not match its id")
    # float32 bytes determine the float16 ones, so a float32 receiver also checks the half of the id it was told:
    # an id whose float16 digest is not this adapter's would let its float16 receivers get other weights.
    fp16_digest = manifest.other_dtype_sha256
    if manifest.dtype == pb.FLOAT32 and hashlib.sha256(_float16_payload(payload)).hexdigest() != fp16_digest:
        raise WireError(f"adapter {manifest.adapter_id[:12]}…: its float16 digest is not its float32 payload's")
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
