"""The worker's ONNX export of the tiny Llama: KV-cache decoding, LoRA inputs and hot-swap match PyTorch."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

from loracast import base_model, lora_spec
from loracast.lora import LoraSpec, applied, inject
from worker import onnx_export, onnx_io

ALL_MODULES = lora_spec.ATTN_MODULES + lora_spec.MLP_MODULES
TOL = 1e-4
PAD = 0
Adapter = dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def exported(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama exported with every linear as a LoRA target (covers the attention and the MLP)."""
    start = time.perf_counter()
    path = onnx_export.export(tiny_base_dir, tmp_path_factory.mktemp("onnx") / "base.onnx", ALL_MODULES)
    print(f"\nexport of the tiny Llama: {time.perf_counter() - start:.2f} s, {path.stat().st_size} bytes")
    return path


@pytest.fixture(scope="module")
def session(exported: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])


def _torch_model(model_dir: Path) -> torch.nn.Module:
    """A private copy of the tiny Llama (inject() changes the model, so not the shared fixture)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _random_adapter(model: torch.nn.Module, rank: int) -> Adapter:
    gen = torch.Generator().manual_seed(7)
    adapter = {}
    for i, layer in enumerate(model.model.layers):
        for module in ALL_MODULES:
            lin = getattr(layer.self_attn if module in lora_spec.ATTN_MODULES else layer.mlp, module)
            a = torch.randn(rank, lin.in_features, generator=gen) * 0.1
            b = torch.randn(lin.out_features, rank, generator=gen) * 0.1
            adapter[(i, module)] = (a.numpy(), b.numpy())
    return adapter


def _lora_feed(session: ort.InferenceSession, adapter: Adapter | None, scale: float) -> dict[str, np.ndarray]:
    """A/B inputs for every (layer, module), B with the scale folded in; rank 0 (empty A and B) when there is no
    adapter."""
    feed = {}
    for inp in session.get_inputs():
        if not inp.name.startswith("lora."):
            continue
        _, layer, module, which = inp.name.split(".")
        if adapter is not None:
            a, b = adapter[(int(layer), module)]
            feed[inp.name] = a if which == "A" else np.float32(scale) * b
        else:  # A is (rank, in), B is (out, rank); the fixed dimension is the other one
            shape = (0, inp.shape[1]) if which == "A" else (inp.shape[0], 0)
            feed[inp.name] = np.zeros(shape, dtype=np.float32)
    return feed


def _decode(
    session: ort.InferenceSession,
    prompts: list[list[int]],
    new_tokens: list[list[int]],
    adapter: Adapter | None = None,
    scale: float = 1.0,
) -> list[np.ndarray]:
    """Prefill the left-padded prompts, then feed `new_tokens` one step at a time through the KV cache.

    Returns, per row, the logits of every real token (prompt + new tokens), as (tokens, vocab).
    """
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = np.full((rows, width), PAD, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = p
        mask[r, width - len(p) :] = 1
    positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    kv_heads, head_dim = session.get_inputs()[3].shape[1], session.get_inputs()[3].shape[3]
    past = {name: np.zeros((rows, kv_heads, 0, head_dim), dtype=np.float32) for name in past_names}
    lora_feed = _lora_feed(session, adapter, scale)
    out_names = [o.name for o in session.get_outputs()]

    per_row: list[list[np.ndarray]] = [[] for _ in prompts]
    for step in range(len(new_tokens[0]) + 1):
        if step > 0:  # one new token per row
            ids = np.array([[toks[step - 1]] for toks in new_tokens], dtype=np.int64)
            mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        feed = {onnx_io.INPUT_IDS: ids, onnx_io.ATTENTION_MASK: mask, onnx_io.POSITION_IDS: positions}
        result = dict(zip(out_names, session.run(None, {**feed, **past, **lora_feed}), strict=True))
        past = {name: result[name.replace("past_key_values.", "present.")] for name in past_names}
        for r, p in enumerate(prompts):
            per_row[r].append(result[onnx_io.LOGITS][r, width - len(p) :] if step == 0 else result[onnx_io.LOGITS][r])
    return [np.concatenate(chunks) for chunks in per_row]


def _reference(model: torch.nn.Module, prompts: list[list[int]], new_tokens: list[list[int]]) -> list[np.ndarray]:
    """PyTorch logits of each full, unpadded sequence in one forward pass (no cache)."""
    with torch.no_grad():
        return [model(torch.tensor([p + t])).logits[0].numpy() for p, t in zip(prompts, new_tokens, strict=True)]


def _max_diff(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    assert [g.shape for g in got] == [w.shape for w in want]
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))


PROMPTS = [[101, 7, 2048, 33, 950, 12], [4, 4000, 77, 5]]  # different lengths: row 1 is left-padded
NEW_TOKENS = [[8, 300, 41], [1200, 3, 99]]


def test_graph_has_the_contracted_inputs_outputs_and_metadata(exported, session, tiny_base_dir):
    inputs, outputs = onnx_io.io_names(2, ALL_MODULES)
    assert [i.name for i in session.get_inputs()] == inputs
    assert [o.name for o in session.get_outputs()] == outputs
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert isinstance(shapes["lora.0.q_proj.A"][0], str) and isinstance(shapes["lora.1.down_proj.B"][1], str)
    assert onnx_io.LORA_SCALE not in shapes  # since IO version 2 the scale is folded into B
    assert meta_version(session) == onnx_io.IO_VERSION == "3"
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[onnx_io.META_FINGERPRINT] == base_model.load(str(tiny_base_dir)).fingerprint
    assert meta[onnx_io.META_TARGET_MODULES] == ",".join(ALL_MODULES)
    assert (meta[onnx_io.META_NUM_LAYERS], meta[onnx_io.META_MAX_RANK]) == ("2", str(onnx_export.HOT_SWAP_MAX_RANK))
    # The merged mode overrides target weights by name: they must be initializers, in HF layout (out, in).
    weights = {t.name: tuple(t.dims) for t in onnx.load(str(exported)).graph.initializer}
    assert weights[onnx_io.weight_name(1, "k_proj")] == (16, 32)
    assert weights[onnx_io.weight_name(0, "down_proj")] == (32, 64)


def meta_version(session: ort.InferenceSession) -> str:
    return session.get_modelmeta().custom_metadata_map[onnx_io.META_VERSION]


def test_attention_norms_and_lora_run_as_few_fused_ops(exported):
    """A decoding step is bound by per-op overhead: the attention is ONNX Runtime's fused ops, each residual add
    is fused into the next RMSNorm, and a LoRA term is two Gemms."""
    ops = [node.op_type for node in onnx.load(str(exported)).graph.node]
    layers, targets = 2, len(ALL_MODULES)
    assert ops.count("GroupQueryAttention") == layers and ops.count("RotaryEmbedding") == 2 * layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert ops.count("Gemm") == layers * 3 * targets + 1  # W, A and B of every linear; the lm_head
    assert "Softmax" not in ops and "Transpose" not in ops


def test_prefill_and_cached_decode_match_the_hf_model(session, tiny_base_dir):
    got = _decode(session, PROMPTS, NEW_TOKENS)
    diff = _max_diff(got, _reference(_torch_model(tiny_base_dir), PROMPTS, NEW_TOKENS))
    print(f"\nplain, prefill + 3 cached steps: max abs diff {diff:.2e}")
    assert diff < TOL


def test_lora_inputs_match_the_torch_lora_layer(session, tiny_base_dir):
    model = _torch_model(tiny_base_dir)
    spec = LoraSpec(target_modules=ALL_MODULES, r=4)
    adapter = _random_adapter(model, spec.r)
    plain = _reference(model, PROMPTS, NEW_TOKENS)
    wrappers = inject(model, spec)
    as_torch = {key: (torch.from_numpy(a), torch.from_numpy(b)) for key, (a, b) in adapter.items()}
    with applied(wrappers, as_torch):
        want = _reference(model, PROMPTS, NEW_TOKENS)
    assert _max_diff(want, plain) > 1e-2, "the adapter should visibly change the logits"

    diff = _max_diff(_decode(session, PROMPTS, NEW_TOKENS, adapter, spec.scale), want)
    print(f"\nrank-4 LoRA on all 7 modules, prefill + 3 cached steps: max abs diff {diff:.2e}")
    assert diff < TOL


def test_rank_zero_is_the_plain_model_and_adapters_hot_swap(session, tiny_base_dir):
    model = _torch_model(tiny_base_dir)
    plain = _reference(model, PROMPTS, NEW_TOKENS)
    before = _decode(session, PROMPTS, NEW_TOKENS, None, scale=8.0)
    _decode(session, PROMPTS, NEW_TOKENS, _random_adapter(model, 4), scale=8.0)  # swap in, then out
    after = _decode(session, PROMPTS, NEW_TOKENS, None, scale=8.0)
    diff = _max_diff(after, plain)
    print(f"\nrank 0 after an adapter, vs the plain model: max abs diff {diff:.2e}")
    assert diff < TOL
    assert all(np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def test_default_export_with_external_data_is_atomic(tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "MAX_INLINE_BYTES", 0)  # force the > 2 GiB path on the tiny model
    out = onnx_export.export(tiny_base_dir, tmp_path / "base.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.onnx", "base.onnx.data"]  # no temp files left
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == onnx_io.io_names(2, onnx_export.HOT_SWAP_MODULES)[0]
    want = _reference(_torch_model(tiny_base_dir), PROMPTS, NEW_TOKENS)
    assert _max_diff(_decode(session, PROMPTS, NEW_TOKENS), want) < TOL
