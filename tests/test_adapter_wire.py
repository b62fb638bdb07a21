"""The adapter wire format: content ids, dtypes, chunking, and refusal of anything the manifest did not promise."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from loracast import adapter_wire
from loracast.adapter_format import META_FINGERPRINT
from loracast.adapter_wire import WireError
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb

SPEC = LoraSpec(("q_proj", "v_proj"), r=4, alpha=8.0, use_rslora=True)
META = {
    META_FINGERPRINT: "f" * 64,
    adapter_wire.META_HYPERNET_VERSION: "t2l-test",
    "loracast.description_sha256": "d" * 64,
}


def _adapter(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        (layer, module): (rng.standard_normal((4, 32), np.float32), rng.standard_normal((out, 4), np.float32))
        for layer in range(3)
        for module, out in (("q_proj", 32), ("v_proj", 16))
    }


def test_fp32_round_trip_is_exact_and_carries_provenance():
    adapter = _adapter()
    wire = adapter_wire.encode(adapter, SPEC, META, pb.FLOAT32)
    got, spec, meta = adapter_wire.decode(wire.manifest, wire.payload)
    assert spec == SPEC
    assert meta == META
    assert got.keys() == adapter.keys()
    for key, (a, b) in adapter.items():
        np.testing.assert_array_equal(got[key][0], a)
        np.testing.assert_array_equal(got[key][1], b)
    assert wire.manifest.total_size == len(wire.payload) == sum(a.nbytes + b.nbytes for a, b in adapter.values())


def test_fp16_is_the_default_halves_the_bytes_and_keeps_the_content_id():
    adapter = _adapter()
    fp16 = adapter_wire.encode(adapter, SPEC, META)
    fp32 = adapter_wire.encode(adapter, SPEC, META, pb.FLOAT32)
    assert fp16.manifest.dtype == pb.FLOAT16
    assert 2 * fp16.manifest.total_size == fp32.manifest.total_size
    assert fp16.manifest.adapter_id == fp32.manifest.adapter_id
    assert fp16.manifest.payload_sha256 != fp32.manifest.payload_sha256
    # Each carries the other's digest: the half of the id its own bytes cannot give.
    assert fp16.manifest.other_dtype_sha256 == fp32.manifest.payload_sha256
    assert fp32.manifest.other_dtype_sha256 == fp16.manifest.payload_sha256
    got, _, _ = adapter_wire.decode(fp16.manifest, fp16.payload)
    for key, (a, b) in adapter.items():
        np.testing.assert_allclose(got[key][0], a, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(got[key][1], b, rtol=1e-3, atol=1e-4)


def test_content_id_depends_on_weights_and_base_not_on_provenance_or_dict_order():
    adapter = _adapter()
    base_id = adapter_wire.encode(adapter, SPEC, META).manifest.adapter_id
    reordered = dict(reversed(list(adapter.items())))
    other_text = {**META, "loracast.description_sha256": "e" * 64}
    assert adapter_wire.encode(reordered, SPEC, other_text).manifest.adapter_id == base_id
    assert adapter_wire.encode(_adapter(1), SPEC, META).manifest.adapter_id != base_id
    other_base = {**META, META_FINGERPRINT: "0" * 64}
    assert adapter_wire.encode(adapter, SPEC, other_base).manifest.adapter_id != base_id


@pytest.mark.parametrize("dtype", [pb.FLOAT16, pb.FLOAT32])
def test_a_flipped_byte_is_detected_before_decoding(dtype):
    wire = adapter_wire.encode(_adapter(), SPEC, META, dtype)
    corrupt = bytearray(wire.payload)
    corrupt[len(corrupt) // 2] ^= 0x01
    with pytest.raises(WireError, match="SHA-256"):
        adapter_wire.decode(wire.manifest, bytes(corrupt))
    with pytest.raises(WireError, match="bytes"):
        adapter_wire.decode(wire.manifest, wire.payload[:-1])


def test_the_content_id_is_the_documented_hash_of_config_and_both_digests():
    fp16 = adapter_wire.encode(_adapter(), SPEC, META).manifest
    fp32 = adapter_wire.encode(_adapter(), SPEC, META, pb.FLOAT32).manifest
    config = {
        "alpha": 8.0,
        "base_fingerprint": "f" * 64,
        "hypernet_version": "t2l-test",
        "r": 4,
        "target_modules": ["q_proj", "v_proj"],
        "tensors": [[entry.name, list(entry.shape)] for entry in fp32.tensors],
        "use_rslora": True,
    }
    material = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    material += bytes.fromhex(fp32.payload_sha256) + bytes.fromhex(fp16.payload_sha256)
    assert fp16.adapter_id == fp32.adapter_id == hashlib.sha256(material).hexdigest()


@pytest.mark.parametrize("dtype", [pb.FLOAT16, pb.FLOAT32])
@pytest.mark.parametrize("field", ["payload_sha256", "other_dtype_sha256"])
def test_a_payload_swapped_with_a_consistent_hash_still_fails_the_content_id(dtype, field):
    """Another adapter's bytes with their real SHA-256 (payload_sha256), or with the digest of its other
    encoding claimed too: the id of the adapter they pose as was made from neither."""
    wire = adapter_wire.encode(_adapter(), SPEC, META, dtype)
    other = adapter_wire.encode(_adapter(7), SPEC, META, dtype)
    forged = pb.AdapterManifest()
    forged.CopyFrom(wire.manifest)
    forged.payload_sha256 = other.manifest.payload_sha256
    if field == "other_dtype_sha256":
        forged.other_dtype_sha256 = other.manifest.other_dtype_sha256
    with pytest.raises(WireError, match="does not match its id"):
        adapter_wire.decode(forged, other.payload)


def test_a_float16_adapter_relabeled_for_another_base_fails_the_content_id():
    wire = adapter_wire.encode(_adapter(), SPEC, META)
    forged = pb.AdapterManifest()
    forged.CopyFrom(wire.manifest)
    forged.base_fingerprint = "0" * 64
    with pytest.raises(WireError, match="does not match its id"):
        adapter_wire.decode(forged, wire.payload)


def test_a_float32_adapter_whose_id_commits_to_other_float16_bytes_is_refused():
    """The creator of an id chooses both digests: one whose float16 half is not its float32 payload's would give
    float16 receivers other weights under the same id. A float32 receiver can tell, and refuses it."""
    wire = adapter_wire.encode(_adapter(), SPEC, META, pb.FLOAT32)
    other = adapter_wire.encode(_adapter(7), SPEC, META, pb.FLOAT32)
    forged = pb.AdapterManifest()
    forged.CopyFrom(wire.manifest)
    forged.other_dtype_sha256 = other.manifest.other_dtype_sha256
    forged.adapter_id = adapter_wire.content_id(forged)  # a consistent id: the creator forged it
    with pytest.raises(WireError, match="float16 digest is not its float32 payload's"):
        adapter_wire.decode(forged, wire.payload)


def test_chunks_cover_the_payload_and_resume_from_an_offset():
    payload = bytes(range(256)) * 1000  # 256000 bytes
    whole = list(adapter_wire.chunks(payload, chunk_size=adapter_wire.MIN_CHUNK))
    assert [c.offset for c in whole] == list(range(0, len(payload), adapter_wire.MIN_CHUNK))
    assert b"".join(c.data for c in whole) == payload
    resumed = list(adapter_wire.chunks(payload, offset=100_000, chunk_size=adapter_wire.MIN_CHUNK))
    assert resumed[0].offset == 100_000
    assert payload[:100_000] + b"".join(c.data for c in resumed) == payload
    assert list(adapter_wire.chunks(payload, offset=len(payload))) == []
    with pytest.raises(WireError, match="beyond"):
        list(adapter_wire.chunks(payload, offset=len(payload) + 1))


@pytest.mark.parametrize("size", [1, adapter_wire.MIN_CHUNK - 1, adapter_wire.MAX_CHUNK + 1])
def test_chunk_sizes_outside_the_contract_are_refused(size):
    with pytest.raises(WireError, match="chunk_size"):
        adapter_wire.check_chunk_size(size)
    assert adapter_wire.check_chunk_size(0) == adapter_wire.DEFAULT_CHUNK


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "A" * 64, "0" * 63, "0" * 64 + "/x", "g" * 64])
def test_adapter_ids_that_are_not_sha256_hex_are_refused(bad):
    with pytest.raises(WireError, match="64 lowercase hex"):
        adapter_wire.check_adapter_id(bad)


def _mutated(**changes) -> pb.AdapterManifest:
    manifest = pb.AdapterManifest()
    manifest.CopyFrom(adapter_wire.encode(_adapter(), SPEC, META).manifest)
    for field, value in changes.items():
        if field == "first_tensor_name":
            manifest.tensors[0].name = value
        elif field == "first_tensor_offset":
            manifest.tensors[0].offset = value
        else:
            setattr(manifest, field, value)
    return manifest


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"first_tensor_name": "model.embed_tokens.weight"}, "not a LoRA matrix"),
        ({"first_tensor_name": "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"}, "not a LoRA matrix"),
        ({"first_tensor_offset": 8}, "does not follow"),
        ({"total_size": 1 << 40}, "total_size"),
        ({"rank": 0}, "no rank"),
        ({"rank": 8}, "not rank 8"),
        ({"dtype": 7}, "dtype"),
        ({"alpha": float("nan")}, "alpha"),
        ({"payload_sha256": "nope"}, "payload_sha256"),
        ({"other_dtype_sha256": ""}, "other_dtype_sha256"),
    ],
)
def test_malformed_manifests_are_refused_before_any_data(changes, message):
    with pytest.raises(WireError, match=message):
        adapter_wire.check_manifest(_mutated(**changes))


def test_encode_requires_the_base_fingerprint():
    with pytest.raises(WireError, match="fingerprint"):
        adapter_wire.encode(_adapter(), SPEC, {adapter_wire.META_HYPERNET_VERSION: "x"})


@pytest.mark.parametrize("dtype", [pb.FLOAT16, pb.FLOAT32])
def test_content_id_survives_an_alpha_that_float32_cannot_hold_exactly(dtype):
    spec = LoraSpec(("q_proj", "v_proj"), r=4, alpha=16 / 3, use_rslora=True)
    wire = adapter_wire.encode(_adapter(), spec, META, dtype)
    _, got, _ = adapter_wire.decode(wire.manifest, wire.payload)  # would fail the content-id check
    assert got.alpha == pytest.approx(16 / 3)
