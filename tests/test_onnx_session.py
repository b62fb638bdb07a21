"""The worker's torch-free inference engine on the tiny Llama: hot-swap, merged and standalone adapters match
PyTorch + PEFT, greedy KV-cache decoding matches HF generate, and the chat prompt matches apply_chat_template."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import TOL, hf_model, max_diff, peft_model, reference_logits
from transformers import AutoTokenizer

from loracast import adapter_format, lora_spec
from loracast.lora_spec import LoraSpec
from worker import onnx_export, onnx_io, onnx_session, weight_packing
from worker.chat import ChatTokenizer
from worker.onnx_session import OnnxDecoder

REPO = Path(__file__).resolve().parents[1]
SPEC_A = LoraSpec(("q_proj", "v_proj"), r=4, alpha=16.0)
SPEC_B = LoraSpec(("q_proj",), r=2, alpha=4.0, use_rslora=False)  # another rank, one module left at rank 0
SPEC_C = LoraSpec(("k_proj", "down_proj"), r=4, alpha=8.0)  # k_proj: the graph has no LoRA inputs for it
SPEC_D = LoraSpec(("down_proj",), r=24)  # as Doc-to-LoRA adapts: down_proj, rank 8 per chunk (3 chunks here)
EXTRA = [8, 300, 41]  # tokens fed one at a time through the KV cache after the prompt


@pytest.fixture(scope="module")
def exported(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama exported with the default LoRA inputs (q_proj, v_proj, down_proj)."""
    return onnx_export.export(tiny_base_dir, tmp_path_factory.mktemp("onnx") / "base.onnx")


@pytest.fixture(scope="module")
def decoder(exported: Path) -> OnnxDecoder:
    return OnnxDecoder(exported, intra_op_threads=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir: Path) -> ChatTokenizer:
    return ChatTokenizer(tiny_base_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer: ChatTokenizer) -> list[int]:
    return tokenizer.encode_chat("What is the capital of France?")


def _save_random_adapter(
    model_dir: Path, spec: LoraSpec, fingerprint: str, out: Path, seed: int
) -> tuple[dict, LoraSpec, Path]:
    """A random, clearly nonzero adapter saved as a PEFT directory, and read back as the worker reads it."""
    model = hf_model(model_dir)
    gen = torch.Generator().manual_seed(seed)
    adapter = {}
    for i, layer in enumerate(model.model.layers):
        for module in spec.target_modules:
            lin = getattr(layer.self_attn if module in lora_spec.ATTN_MODULES else layer.mlp, module)
            a = torch.randn(spec.r, lin.in_features, generator=gen) * 0.2
            b = torch.randn(lin.out_features, spec.r, generator=gen) * 0.2
            adapter[(i, module)] = (a, b)
    adapter_format.save(out, adapter, spec, "tiny", {adapter_format.META_FINGERPRINT: fingerprint})
    loaded, loaded_spec, _ = adapter_format.load(out, expected_fingerprint=fingerprint)
    return loaded, loaded_spec, out


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, decoder, tmp_path_factory) -> dict[str, tuple[dict, LoraSpec, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {"A": SPEC_A, "B": SPEC_B, "C": SPEC_C, "D": SPEC_D}
    return {
        name: _save_random_adapter(tiny_base_dir, spec, decoder.fingerprint, root / name, seed)
        for seed, (name, spec) in enumerate(specs.items(), start=1)
    }


@pytest.mark.parametrize("name", ["A", "D"])  # T2L's modules; D2L's down_proj at a rank above T2L's
def test_hot_swap_matches_peft(decoder, adapters, prompt, tiny_base_dir, name):
    adapter, spec, path = adapters[name]
    ids = prompt + EXTRA
    want = reference_logits(tiny_base_dir, path, ids)
    assert max_diff(want, reference_logits(tiny_base_dir, None, ids)) > 1e-2, "the adapter must matter"
    decoder.set_adapter(adapter, spec)
    try:
        diff = max_diff(decoder.logits(ids, prefill=len(prompt)), want)
    finally:
        decoder.clear_adapter()
    print(f"\nhot-swap {spec.target_modules} r={spec.r}, prefill + {len(EXTRA)} cached steps vs PEFT: {diff:.2e}")
    assert diff < TOL


def test_merged_session_matches_peft_and_leaves_the_base_alone(decoder, adapters, prompt, tiny_base_dir):
    adapter, spec, path = adapters["A"]
    ids = prompt + EXTRA
    merged = decoder.merged(adapter, spec)
    assert merged.session is not decoder.session and merged.merged_spec == spec
    diff = max_diff(merged.logits(ids, prefill=len(prompt)), reference_logits(tiny_base_dir, path, ids))
    print(f"\nmerged session vs PEFT: max abs diff {diff:.2e}")
    assert diff < TOL
    assert max_diff(decoder.logits(ids), reference_logits(tiny_base_dir, None, ids)) < TOL
    with pytest.raises(RuntimeError, match="merged"):
        merged.set_adapter(adapter, spec)


def test_merged_session_takes_modules_the_graph_has_no_lora_inputs_for(decoder, adapters, prompt, tiny_base_dir):
    adapter, spec, path = adapters["C"]
    refusal = decoder.hot_swap_refusal(adapter, spec)  # what the worker checks to choose merging
    assert refusal.startswith("the graph has no LoRA inputs for k_proj (")
    assert decoder.hot_swap_refusal(*adapters["A"][:2]) is None
    with pytest.raises(ValueError, match=re.escape(refusal)):
        decoder.set_adapter(adapter, spec)
    diff = max_diff(decoder.merged(adapter, spec).logits(prompt), reference_logits(tiny_base_dir, path, prompt))
    print(f"\nmerged k_proj + down_proj vs PEFT: max abs diff {diff:.2e}")
    assert diff < TOL


def test_standalone_merged_model_runs_in_a_plain_session(exported, decoder, adapters, prompt, tiny_base_dir, tmp_path):
    adapter, spec, path = adapters["A"]
    out = decoder.export_merged(adapter, spec, tmp_path / "merged.onnx", adapter_id="abc123")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.onnx"]  # no temp files left behind

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == onnx_io.io_names(decoder.num_layers, ())[0]  # no LoRA inputs
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[onnx_io.META_FINGERPRINT] == decoder.fingerprint
    assert meta[onnx_session.META_MERGED_ADAPTER] == "abc123"

    kv_heads, head_dim = session.get_inputs()[3].shape[1], session.get_inputs()[3].shape[3]
    feed = {
        onnx_io.INPUT_IDS: np.array([prompt], np.int64),
        onnx_io.ATTENTION_MASK: np.ones((1, len(prompt)), np.int64),
        onnx_io.POSITION_IDS: np.arange(len(prompt), dtype=np.int64)[None],
    }
    feed.update({name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for name in names[3:]})
    logits = session.run([onnx_io.LOGITS], feed)[0][0]
    diff = max_diff(logits, reference_logits(tiny_base_dir, path, prompt))
    print(f"\nstandalone merged .onnx in a plain ORT session vs PEFT: max abs diff {diff:.2e}")
    assert diff < TOL
    # The decoder opens it too (nothing to hot-swap) and decodes through its cache.
    standalone = OnnxDecoder(out)
    assert standalone.target_modules == ()
    want = decoder.merged(adapter, spec).logits(prompt + EXTRA)
    assert max_diff(standalone.logits(prompt + EXTRA, prefill=len(prompt)), want) < TOL
    # The LoRA branch is gone, not just fed empty: 2 Gemms (A, then B adding to W x) per target linear.
    removed = len(onnx.load(str(exported)).graph.node) - len(onnx.load(str(out)).graph.node)
    assert removed >= 2 * decoder.num_layers * len(decoder.target_modules)


def test_greedy_generate_matches_hf_generate(decoder, adapters, prompt, tokenizer, tiny_base_dir):
    adapter, spec, path = adapters["A"]
    model = peft_model(tiny_base_dir, path)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
        )
    want = out[0, len(prompt) :].tolist()
    if want and want[-1] == tokenizer.eos_id:  # HF keeps the eos it stopped on; generate() does not yield it
        want = want[:-1]
    decoder.set_adapter(adapter, spec)
    try:
        stream = decoder.generate(prompt, max_new_tokens=8, eos_id=tokenizer.eos_id)
        got = list(stream)
    finally:
        decoder.clear_adapter()
    print(f"\ngreedy tokens: {got}")
    assert got == want


def test_adapters_switch_without_a_new_session(decoder, adapters, prompt, tiny_base_dir):
    session = decoder.session
    ids = prompt + EXTRA
    for name in ("A", "B", None, "A"):
        adapter, spec, path = adapters[name] if name else (None, None, None)
        if name:
            decoder.set_adapter(adapter, spec)
        else:
            decoder.clear_adapter()
        diff = max_diff(decoder.logits(ids, prefill=len(prompt)), reference_logits(tiny_base_dir, path, ids))
        print(f"\nafter switching to {name or 'no adapter'}: max abs diff {diff:.2e}")
        assert diff < TOL
        assert decoder.session is session
        assert decoder.adapter_spec == spec
    decoder.clear_adapter()


def test_in_place_kv_cache_grows_and_matches_the_plain_cache(decoder, adapters, prompt, monkeypatch):
    """IO version 2 on the CPU: GroupQueryAttention appends to preallocated K/V buffers in place; a generation
    longer than the buffers grows them. Same tokens and logits as feeding past/present arrays (version 1's way)."""
    assert decoder._in_place_cache
    monkeypatch.setattr(onnx_session, "_CACHE_STEP", 2)  # room for 2 new tokens: it grows several times
    adapter, spec, _ = adapters["A"]
    decoder.set_adapter(adapter, spec)
    try:
        ids = prompt + EXTRA * 3
        tokens, logits = list(decoder.generate(prompt, 9)), decoder.logits(ids, prefill=len(prompt))
        monkeypatch.setattr(decoder, "_in_place_cache", False)
        assert list(decoder.generate(prompt, 9)) == tokens
        assert max_diff(decoder.logits(ids, prefill=len(prompt)), logits) < 1e-5
    finally:
        decoder.clear_adapter()


def test_generation_keeps_the_adapter_it_started_with(decoder, adapters, prompt):
    adapter, spec, _ = adapters["A"]
    plain = list(decoder.generate(prompt, 5))
    decoder.set_adapter(adapter, spec)
    with_a = list(decoder.generate(prompt, 5))
    stream = decoder.generate(prompt, 5)  # started with A ...
    decoder.clear_adapter()  # ... and A stays for this stream
    assert list(stream) == with_a
    assert list(decoder.generate(prompt, 5)) == plain


def test_bad_adapters_are_refused(decoder, adapters):
    adapter, _, _ = adapters["A"]
    with pytest.raises(ValueError, match="maximum"):
        decoder.set_adapter(adapter, LoraSpec(r=decoder.max_rank + 1))
    a, b = adapter[(0, "q_proj")]
    with pytest.raises(ValueError, match="do not fit"):
        decoder.set_adapter({(0, "q_proj"): (a[:, :-1], b)}, SPEC_A)
    with pytest.raises(ValueError, match="no LoRA input"):
        decoder.set_adapter({(decoder.num_layers, "q_proj"): (a, b)}, SPEC_A)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.merged({(0, "q_proj"): (a, b[:-1])}, SPEC_A)
    assert decoder.adapter_spec is None


def test_choose_providers(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert onnx_session.choose_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider", "CUDAExecutionProvider"])
    assert onnx_session.choose_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    [{"role": "user", "content": "Ünïcode ✓ 東京 🙂\n  two lines,\ttabs and <|im_end|> inside"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Summarize: {{ not a template }} {% raw %}"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompt_matches_apply_chat_template(tokenizer, tiny_base_dir, messages):
    hf = AutoTokenizer.from_pretrained(tiny_base_dir)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.render(messages) == text
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tokenizer.encode(tokenizer.render(messages)) == ids
    if len(messages) == 1:
        assert tokenizer.encode_chat(messages[0]["content"]) == ids
    no_prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert tokenizer.render(messages, add_generation_prompt=False) == no_prompt


def test_streamed_text_joins_to_the_decoded_text(tokenizer, tiny_base_dir):
    ids = [*tokenizer.encode("Ünïcode ✓ 東京 🙂 and plain words"), tokenizer.eos_id]
    assert "".join(tokenizer.decode_stream(ids)) == tokenizer.decode(ids) == "Ünïcode ✓ 東京 🙂 and plain words"
    assert tokenizer.decode(ids) == AutoTokenizer.from_pretrained(tiny_base_dir).decode(ids, skip_special_tokens=True)


def test_the_serving_path_imports_no_torch():
    code = "import sys, worker.onnx_session, worker.chat; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- exact 4-bit weights --------------------------------------------------------------------------------------


def _gguf_q4_1(w: torch.Tensor) -> torch.Tensor:
    """w rounded as GGUF's Q4_1 stores it: per block of 32 along the input, d q + m with q in 0..15, d and m fp16."""
    blocks = w.reshape(w.shape[0], -1, weight_packing.BLOCK)
    low = blocks.amin(-1, keepdim=True).half().float()
    step = ((blocks.amax(-1, keepdim=True) - low) / 15).half().float()
    codes = ((blocks - low) / torch.where(step > 0, step, 1)).round().clamp(0, 15)
    return (codes * step + low).reshape(w.shape)


def _gguf_q8_0(w: torch.Tensor) -> torch.Tensor:
    """w rounded as GGUF's Q8_0 stores it: per block of 32, d q with q in -127..127, d fp16."""
    blocks = w.reshape(w.shape[0], -1, weight_packing.BLOCK)
    step = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    codes = (blocks / torch.where(step > 0, step, 1)).round().clamp(-127, 127)  # the padding row is all zeros
    return (codes * step).reshape(w.shape)


@pytest.fixture(scope="module")
def grid_base_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its weights rounded as the default base model's GGUF stores them (linears Q4_1, the
    tied embedding Q8_0), saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("grid-llama")
    model = hf_model(tiny_base_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in lora_spec.ATTN_MODULES + lora_spec.MLP_MODULES:
                lin = getattr(layer.self_attn if module in lora_spec.ATTN_MODULES else layer.mlp, module)
                lin.weight.copy_(_gguf_q4_1(lin.weight))
        model.model.embed_tokens.weight.copy_(_gguf_q8_0(model.model.embed_tokens.weight))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_base_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def grid_decoder(grid_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxDecoder:
    exported = onnx_export.export(grid_base_dir, tmp_path_factory.mktemp("grid-onnx") / "base.onnx")
    return OnnxDecoder(exported, intra_op_threads=1)


def test_pack_linear_is_exact_on_gguf_grids_and_declines_other_weights():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    for rounded, parts, has_offsets in ((_gguf_q4_1(w), 1, True), (_gguf_q8_0(w), 2, False)):
        form = weight_packing.pack_linear(rounded.numpy())
        assert form is not None and len(form.parts) == parts and (form.offsets is not None) == has_offsets
        # Decode the parts as MatMulNBits does: scale * (code - zero point), zero point 8 when absent.
        total = np.zeros((6, 2, weight_packing.BLOCK), np.float32)
        for codes, scales, zero in form.parts:
            unpacked = np.stack([codes & 15, codes >> 4], axis=-1).reshape(6, 2, weight_packing.BLOCK)
            zp = 8 if zero is None else np.stack([zero & 15, zero >> 4], axis=-1).reshape(6, -1)[:, :2, None]
            total += scales.reshape(6, 2, 1) * (unpacked.astype(np.float32) - zp)
        if has_offsets:
            total += form.offsets[..., None]
        assert np.abs(total.reshape(6, 64) - rounded.numpy()).max() < 1e-6
    assert weight_packing.pack_linear(w.numpy()) is None
    assert weight_packing.pack_linear(_gguf_q4_1(w)[:, :40].numpy()) is None  # not whole blocks


def test_packed_decoder_matches_pytorch_in_every_mode(grid_decoder, grid_base_dir, prompt, tmp_path):
    layers = grid_decoder.num_layers
    assert len(grid_decoder.packed) == 7 * layers + 1  # every linear and the tied lm_head
    assert not onnx_session.OnnxDecoder(grid_decoder.path, pack_weights=False).packed
    graph = onnx.load(str(grid_decoder.path)).graph
    weight_packing.pack_linears(graph, {})
    ops = [node.op_type for node in graph.node]
    # q, k, v as one call; o; gate, up as one call; down; the Q8_0 lm_head's two 4-bit parts
    assert ops.count("MatMulNBits") == 4 * layers + 2 and ops.count("Split") == 2 * layers
    ids = prompt + EXTRA
    diff = max_diff(grid_decoder.logits(ids, prefill=len(prompt)), reference_logits(grid_base_dir, None, ids))
    print(f"\npacked 4-bit base vs PyTorch: max abs diff {diff:.2e}")
    assert diff < TOL

    adapter, spec, path = _save_random_adapter(grid_base_dir, SPEC_A, grid_decoder.fingerprint, tmp_path / "a", 5)
    want = reference_logits(grid_base_dir, path, ids)
    grid_decoder.set_adapter(adapter, spec)
    try:
        diff = max_diff(grid_decoder.logits(ids, prefill=len(prompt)), want)
    finally:
        grid_decoder.clear_adapter()
    print(f"packed base + hot-swapped adapter vs PEFT: max abs diff {diff:.2e}")
    assert diff < TOL

    merged = grid_decoder.merged(adapter, spec)
    # The merged weights are off the grid: they stay float32, every other linear stays packed.
    merged_names = {onnx_io.weight_name(i, m) for i in range(layers) for m in spec.target_modules}
    assert set(merged.packed) == set(grid_decoder.packed) - merged_names
    diff = max_diff(merged.logits(ids, prefill=len(prompt)), want)
    print(f"packed base with a merged adapter vs PEFT: max abs diff {diff:.2e}")
    assert diff < TOL


def test_int8_activations_are_opt_in_fast_and_close(grid_decoder, grid_base_dir, prompt):
    """`int8_activations` packs the same linears with MatMulNBits accuracy_level 4 (lossy); the default stays exact."""
    assert not grid_decoder.int8_activations  # exact is the default
    graph = onnx.load(str(grid_decoder.path)).graph
    weight_packing.pack_linears(graph, {}, accuracy_level=weight_packing.INT8_ACCURACY)
    levels = {
        onnx.helper.get_attribute_value(a)
        for node in graph.node
        if node.op_type == "MatMulNBits"
        for a in node.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {weight_packing.INT8_ACCURACY}

    fast = OnnxDecoder(grid_decoder.path, intra_op_threads=1, int8_activations=True)
    assert fast.int8_activations and fast.packed == grid_decoder.packed
    ids = prompt + EXTRA
    want = reference_logits(grid_base_dir, None, ids)
    exact_diff = max_diff(grid_decoder.logits(ids, prefill=len(prompt)), want)
    got = fast.logits(ids, prefill=len(prompt))
    diff = max_diff(got, want)
    scale = float(np.abs(want).max())
    print(f"\nint8 activations vs PyTorch: max abs diff {diff:.2e} (exact {exact_diff:.2e}, largest logit {scale:.2f})")
    assert exact_diff < TOL < diff  # the fast mode really runs int8: it is not the exact function
    assert diff < 0.05 * scale  # but it stays close: a few percent of the logits' range at most
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    assert agree >= 0.75, agree

    # Merged sessions keep the mode; the base decoder's default is untouched.
    out, k = fast._base_weights({"q_proj"})[onnx_io.weight_name(0, "q_proj")].shape
    adapter = {(0, "q_proj"): (np.full((1, k), 0.01, np.float32), np.full((out, 1), 0.01, np.float32))}
    merged = fast.merged(adapter, SPEC_B)
    assert merged.int8_activations and not grid_decoder.merged(adapter, SPEC_B).int8_activations
