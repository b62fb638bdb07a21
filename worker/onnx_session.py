"""The worker's inference engine: the exported base model in ONNX Runtime, adapters applied without re-export.

Imports no torch: ONNX Runtime, onnx and numpy only. The graph is the one `worker.onnx_export` writes, fed
as `worker.onnx_io` documents. An adapter is applied in one of three ways:

- hot-swap (`OnnxDecoder.set_adapter` / `clear_adapter`): LoRA A and B are graph inputs, fed with every run;
  switching adapters swaps a few small arrays and keeps the session. Only the modules the graph was
  exported with (`target_modules`) can be hot-swapped.
- merged (`OnnxDecoder.merged`): a second session whose target weights W are overridden with
  W + scale * B @ A through `SessionOptions.add_initializer`; it feeds rank-0 LoRA inputs, so it runs at
  the base model's speed. Any linear of the graph can be merged, targeted at export or not.
- standalone (`OnnxDecoder.export_merged`): a plain `.onnx` file with the adapter folded into the weights and
  the LoRA inputs and their branch removed, for devices that only run plain ONNX (its inputs are
  input_ids, attention_mask, position_ids and the past K/V; `OnnxDecoder` opens it too).

Decoding is greedy with the KV cache (`generate`): one pass over the prompt, then one token per step. On the
CPU with a graph of IO version 2, each generation keeps its K/V in preallocated buffers that the graph's
GroupQueryAttention appends to in place (`_Cache`, bound once through `io_binding`) instead of receiving the
whole cache as new arrays every step; version-1 graphs and CUDA feed past/present arrays (`_PlainCache`).

Exact 4-bit weights (`pack_linears`, on by default on the CPU): a linear whose float32 weights lie exactly on
a GGUF block grid (Q4_1: w = d q + m per block of 32, q in 0..15; Q8_0: w = d q, q in -127..127) runs as
ONNX Runtime's MatMulNBits on 4-bit codes instead of a float32 Gemm. Decoding one token reads every weight
once, so it is memory bound: 4-bit codes with float32 block scales read 3 to 5x fewer bytes. Linears that read
the same input (q, k, v; gate, up) run as one MatMulNBits and a Split: fewer, larger kernel calls. The default
base model is de-quantized from a Q4_1/Q8_0 GGUF, so every one of its linears lies on such a grid and the
packed graph computes the same function (only the float summation order changes); weights that are not on a
grid (any other model, a merged adapter) stay float32.

Opt-in int8 activations (`OnnxDecoder(int8_activations=True)`, `worker serve --int8-activations`): the same
packed linears run with MatMulNBits' accuracy_level 4, which quantizes each activation block to int8 and
accumulates in integers: about 2x faster per matmul on the CPU, but LOSSY (logits move by far more than the
exact mode's 1e-3; bench/bench_worker_decode.py measures the perplexity and greedy-token cost). Off by default.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from loracast.lora_spec import LoraSpec
from worker import onnx_io

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
META_MERGED_ADAPTER = "loracast.merged_adapter"  # metadata of a standalone merged model: the adapter's id

# (A (rank, in), B (out, rank)) per (layer, module), as `loracast.adapter_format.load` returns them.
Adapter = Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]]


def choose_providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it (onnxruntime-gpu), else the CPU."""
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def _float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _value(x: np.ndarray, device: str = "cpu") -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(x, device, 0)


def merge_weights(weights: Mapping[str, np.ndarray], adapter: Adapter, spec: LoraSpec) -> dict[str, np.ndarray]:
    """W + scale * B @ A for every adapted linear, keyed by its graph initializer name (`onnx_io.weight_name`)."""
    merged = {}
    for (layer, module), (a, b) in adapter.items():
        name = onnx_io.weight_name(layer, module)
        if name not in weights:
            raise ValueError(f"the graph has no weight {name!r} for the adapter's ({layer}, {module!r})")
        w, a, b = weights[name], _float32(a), _float32(b)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != w.shape:
            raise ValueError(f"adapter ({layer}, {module!r}): A {a.shape} and B {b.shape} do not fit W {w.shape}")
        merged[name] = np.ascontiguousarray(w + np.float32(spec.scale) * (b @ a), dtype=np.float32)
    return merged


BLOCK = 32  # MatMulNBits block along the input dimension: the block of GGUF's Q4_1 and Q8_0
EXACT_ACCURACY = 1  # MatMulNBits accuracy_level: float32 activations and accumulation (exact)
INT8_ACCURACY = 4  # MatMulNBits accuracy_level: int8-quantized activations, integer accumulation (faster, lossy)
EXACT = 1e-6  # a weight is on a grid when re-quantizing it moves no value by more than this times its largest
MS_DOMAIN = "com.microsoft"


def read_weights(model_path: Path, names: Set[str]) -> dict[str, np.ndarray]:
    """These initializers of an ONNX file, as arrays: what merging starts from, without a session."""
    graph = onnx.load(str(model_path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in names}


@dataclass(frozen=True)
class PackedLinear:
    """W (out, in) as MatMulNBits parts whose outputs sum to x W^T, plus an optional per-block offset term.

    parts: (codes (out, in/BLOCK, BLOCK/2) uint8, two 4-bit codes a byte, low nibble first; scales (out * in/BLOCK,);
    zero points ((out * ceil(in/BLOCK/2),) uint8) or None for MatMulNBits' default 8). Each part computes
    x . (scale * (code - zero point)) per block.
    offsets: (out, in/BLOCK) or None: a constant per block of W, multiplied by the sum of x over that block.
    """

    parts: tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], ...]
    offsets: np.ndarray | None


def _nibbles(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _on_grid(reconstructed: np.ndarray, blocks: np.ndarray) -> bool:
    return float(np.abs(reconstructed - blocks).max()) <= EXACT * float(np.abs(blocks).max())


def pack_linear(weight: np.ndarray) -> PackedLinear | None:
    """The exact 4-bit form of `weight` (out, in) when it lies on a Q4_1 or Q8_0 block grid, else None."""
    out, k = weight.shape
    if k % BLOCK:
        return None
    blocks = weight.reshape(out, k // BLOCK, BLOCK).astype(np.float32)
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    step = (high - low) / 15  # Q4_1 puts the block's minimum at code 0 and its maximum at code 15
    codes = np.rint((blocks - low) / np.where(step > 0, step, 1))
    if _on_grid(codes * step + low, blocks):
        # Without zero points MatMulNBits computes step * (code - 8): the 8 steps move into the offset.
        return PackedLinear(((_nibbles(codes.astype(np.uint8)), step.reshape(-1), None),), (low + 8 * step)[..., 0])
    step = np.abs(blocks).max(-1, keepdims=True) / 127  # Q8_0 puts the block's largest magnitude at +-127
    codes = np.rint(blocks / np.where(step > 0, step, 1))
    if _on_grid(codes * step, blocks):
        # The CPU kernel packs only 4-bit codes for float32 accumulation, so the 8-bit code u = q + 128 is split
        # into u = 16 high + low: step * (u - 128) = 16 step * (high - 8) + step * (low - 0).
        u = (codes + 128).astype(np.uint8)
        zero = np.zeros(out * ((k // BLOCK + 1) // 2), np.uint8)
        high_part = (_nibbles(u >> 4), (16 * step).reshape(-1), None)
        return PackedLinear((high_part, (_nibbles(u & 15), step.reshape(-1), zero)), None)
    return None


def _is_zero(name: str, constants: Mapping[str, onnx.NodeProto], weights: Mapping[str, onnx.TensorProto]) -> bool:
    """Whether the value `name` is a Constant node's or an initializer's all-zero tensor."""
    if name in constants:
        value = constants[name].attribute[0]
        return value.name == "value" and not numpy_helper.to_array(value.t).any()
    return name in weights and not numpy_helper.to_array(weights[name]).any()


def _structure(form: PackedLinear) -> tuple:
    """What must agree for linears to be packed as one: the parts' zero points and the offsets, present or not."""
    return tuple(zero is None for _, _, zero in form.parts), form.offsets is None


def pack_linears(
    graph: onnx.GraphProto,
    cache: MutableMapping[str, PackedLinear | None],
    skip: frozenset[str] = frozenset(),
    accuracy_level: int = EXACT_ACCURACY,
) -> list[str]:
    """Rewrite, in place, every Gemm x W^T on an initializer W that lies on a block grid as MatMulNBits nodes.

    `cache` holds `pack_linear` of each weight name already looked at (filled here); weights named in `skip`
    (overridden at session creation) stay float32 Gemms. Linears of the same input x with the same kind of grid
    (q, k and v; gate and up) run as one MatMulNBits on their weights stacked along the output, then a Split:
    one larger kernel call instead of several (a decoding step is bound by per-call costs, not arithmetic).
    `accuracy_level` is MatMulNBits' (EXACT_ACCURACY: float32 activations; INT8_ACCURACY: int8 activations,
    faster and lossy). Returns the names of the packed weights.
    """
    weights = {t.name: t for t in graph.initializer}
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    groups: dict[tuple, list[int]] = {}  # (x, structure) -> indices of the Gemm nodes packed together
    for index, node in enumerate(graph.node):
        name = node.input[1] if node.op_type == "Gemm" else ""
        if name not in weights or name in skip:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1 and attrs.get("alpha", 1.0) == 1.0
        if not plain or (len(node.input) > 2 and node.input[2] and not _is_zero(node.input[2], constants, weights)):
            continue
        if name not in cache:
            cache[name] = pack_linear(numpy_helper.to_array(weights[name]))
        if cache[name] is not None:
            groups.setdefault((node.input[0], _structure(cache[name])), []).append(index)
    if not groups:
        return []
    first = {members[0]: members for members in groups.values()}  # emitted where the first one was: x exists
    packed_nodes = {index for members in groups.values() for index in members}
    packed = [graph.node[index].input[1] for index in sorted(packed_nodes)]
    nodes: list[onnx.NodeProto] = []
    new: list[onnx.TensorProto] = []
    block_sums: dict[str, str] = {}  # x -> its sums over blocks, computed once for the linears that share x
    for index, node in enumerate(graph.node):
        if index in first:
            linears = [graph.node[i] for i in first[index]]
            nodes += _packed_nodes(linears, weights, cache, block_sums, new, accuracy_level)
        elif index not in packed_nodes:
            nodes.append(node)
    used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new)
    return packed


def _packed_nodes(
    linears: list[onnx.NodeProto],
    weights: Mapping[str, onnx.TensorProto],
    cache: Mapping[str, PackedLinear | None],
    block_sums: dict[str, str],
    new: list[onnx.TensorProto],
    accuracy_level: int = EXACT_ACCURACY,
) -> list[onnx.NodeProto]:
    """The nodes computing the outputs of `linears` (Gemms of one input x, on weights of one `_structure`) from
    their packed forms stacked along the output; their new initializers are appended to `new`."""
    names = [node.input[1] for node in linears]
    forms = [cache[name] for name in names]
    x, outs, k = linears[0].input[0], [weights[name].dims[0] for name in names], weights[names[0]].dims[1]
    name = names[0] if len(names) == 1 else f"{names[0]}.stacked"
    y = linears[0].output[0] if len(names) == 1 else f"{name}.out"
    nodes, terms = [], []
    for i in range(len(forms[0].parts)):
        codes, scales = (np.concatenate([form.parts[i][j] for form in forms]) for j in (0, 1))
        inputs = [x, f"{name}.q{i}", f"{name}.scales{i}"]
        new += [numpy_helper.from_array(codes, inputs[1]), numpy_helper.from_array(scales, inputs[2])]
        if forms[0].parts[i][2] is not None:
            inputs.append(f"{name}.zeros{i}")
            new.append(numpy_helper.from_array(np.concatenate([form.parts[i][2] for form in forms]), inputs[3]))
        terms.append(f"{y}.part{i}")
        nodes.append(
            onnx.helper.make_node(
                "MatMulNBits", inputs, [terms[-1]], domain=MS_DOMAIN, K=k, N=sum(outs), bits=4, block_size=BLOCK,
                accuracy_level=accuracy_level,  # 1: float32 activations (exact); 4: int8 activations (lossy)
            )
        )  # fmt: skip
    if forms[0].offsets is not None:
        if x not in block_sums:
            block_sums[x] = f"{x}.block_sums"
            shape, axes = f"{x}.block_shape", f"{x}.block_axes"
            new += [
                numpy_helper.from_array(np.array([0, k // BLOCK, BLOCK], np.int64), shape),
                numpy_helper.from_array(np.array([2], np.int64), axes),
            ]
            nodes += [
                onnx.helper.make_node("Reshape", [x, shape], [f"{x}.blocks"]),
                onnx.helper.make_node("ReduceSum", [f"{x}.blocks", axes], [block_sums[x]], keepdims=0),
            ]
        new.append(numpy_helper.from_array(np.concatenate([form.offsets for form in forms]), f"{name}.offsets"))
        # Gemm's C input adds the first part: an op fewer than a Sum.
        gemm_inputs = [block_sums[x], f"{name}.offsets", terms[0]]
        terms[0] = f"{y}.offset"
        nodes.append(onnx.helper.make_node("Gemm", gemm_inputs, [terms[0]], transB=1))
    if len(terms) == 1:
        nodes[-1].output[0] = y  # the last node wrote the only term
    else:
        nodes.append(onnx.helper.make_node("Sum", terms, [y]))
    if len(names) > 1:
        new.append(numpy_helper.from_array(np.array(outs, np.int64), f"{name}.split"))
        nodes.append(onnx.helper.make_node("Split", [y, f"{name}.split"], [n.output[0] for n in linears], axis=-1))
    return nodes


class OnnxDecoder:
    """One ONNX Runtime session on an exported graph, with greedy KV-cache decoding and LoRA adapters.

    `initializers` overrides graph weights by name (what `merged` uses). `pack_weights` runs the linears that
    lie on a block grid as exact 4-bit MatMulNBits (see the module docstring; on the CPU provider only, where it
    was measured; `packed` lists them). `int8_activations` (opt-in, lossy) runs those MatMulNBits with int8
    activations (accuracy_level 4): faster, but the logits are no longer the float32 model's; it has no effect
    without packing. Runs may be issued from several threads; each `generate` keeps the
    adapter that was set when it was called.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        initializers: Mapping[str, np.ndarray] | None = None,
        pack_weights: bool = True,
        packing_cache: MutableMapping[str, PackedLinear | None] | None = None,
        int8_activations: bool = False,
    ) -> None:
        self.path = Path(model_path)
        self.intra_op_threads = intra_op_threads  # 0: ONNX Runtime's default (one per physical core)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        # The OrtValues must outlive the session: they are used in place, not copied.
        self._overrides = {name: _value(_float32(w)) for name, w in (initializers or {}).items()}
        for name, value in self._overrides.items():
            options.add_initializer(name, value)
        providers = providers or choose_providers()
        # pack_linear's results, shared with the decoders `merged` makes: the grid search runs once per weight.
        self._packing = {} if packing_cache is None else packing_cache
        self.pack_weights = pack_weights
        self.int8_activations = int8_activations
        self.packed: tuple[str, ...] = ()
        source: str | bytes = str(self.path)
        if pack_weights and providers[0] == CPU:
            model = onnx.load(str(self.path))
            level = INT8_ACCURACY if int8_activations else EXACT_ACCURACY
            packed = pack_linears(model.graph, self._packing, frozenset(self._overrides), level)
            if packed and model.ByteSize() < onnx_io.MAX_INLINE_BYTES:  # a larger one cannot be passed as bytes
                if not any(o.domain == MS_DOMAIN for o in model.opset_import):
                    model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
                source, self.packed = model.SerializeToString(), tuple(packed)
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.providers = self.session.get_providers()
        self._device = "cuda" if self.providers[0] == CUDA else "cpu"

        meta = self.session.get_modelmeta().custom_metadata_map
        self.fingerprint: str | None = meta.get(onnx_io.META_FINGERPRINT)
        self.max_rank = int(meta.get(onnx_io.META_MAX_RANK, "0"))
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._past_names = [name for name in inputs if name.startswith("past_key_values.")]
        _, kv_heads, _, head_dim = inputs[self._past_names[0]]
        self.num_layers = len(self._past_names) // 2
        self._empty_past = [_value(np.zeros((1, kv_heads, 0, head_dim), np.float32)) for _ in self._past_names]
        self._kv_shape = (kv_heads, head_dim)
        # A graph of IO version 2 attends with GroupQueryAttention, which appends the new K/V in place when past and
        # present are one buffer: decoding then keeps one preallocated cache per generation (`_Cache`) instead of
        # copying the whole cache into new arrays every step. Version 1 graphs (and CUDA) take the plain path.
        version = meta.get(onnx_io.META_VERSION, "1")
        self._in_place_cache = self._device == "cpu" and version.isdigit() and int(version) >= 2

        # LoRA inputs: the fixed dimension of each (A is (rank, in), B is (out, rank)), and a cached rank-0 feed.
        self._lora_dims = {
            name: shape[1] if name.endswith(".A") else shape[0] for name, shape in inputs.items() if name[:5] == "lora."
        }
        self.target_modules = tuple(dict.fromkeys(name.split(".")[2] for name in self._lora_dims))
        self._rank0: dict[str, ort.OrtValue] = {
            name: _value(np.zeros((0, dim) if name.endswith(".A") else (dim, 0), np.float32))
            for name, dim in self._lora_dims.items()
        }
        if onnx_io.LORA_SCALE in inputs:  # a graph of IO version 1
            self._rank0[onnx_io.LORA_SCALE] = _value(np.ones(1, np.float32))
        self._lora_feed = self._rank0
        self.adapter_spec: LoraSpec | None = None  # the hot-swapped adapter's spec, None when none is set
        self.merged_spec: LoraSpec | None = None  # set on a decoder made by `merged`
        self._weights: dict[str, np.ndarray] = {}  # base weights read from the file, for merging

    # -- adapters ---------------------------------------------------------------------------------------------

    def hot_swap_refusal(self, adapter: Adapter, spec: LoraSpec) -> str | None:
        """Why this graph cannot take the adapter as inputs (its rank, or a module without LoRA inputs), else None.

        The worker merges what this refuses, and `set_adapter` raises it as a ValueError.
        """
        if spec.r > self.max_rank:
            return f"adapter rank {spec.r} is above this worker's maximum {self.max_rank}"
        missing = [key for key in adapter if onnx_io.lora_name(*key, "A") not in self._lora_dims]
        if missing:
            modules = ", ".join(dict.fromkeys(module for _, module in missing))
            return (
                f"the graph has no LoRA inputs for {modules} (layer {missing[0][0]} first; hot-swappable modules: "
                f"{', '.join(self.target_modules) or 'none'}); use a merged decoder or export with that module"
            )
        return None

    def set_adapter(self, adapter: Adapter, spec: LoraSpec) -> None:
        """Hot-swap: feed this adapter's A and B from the next run on; the session is kept.

        Modules of the graph the adapter leaves out run at rank 0.
        """
        if self.merged_spec is not None:
            raise RuntimeError("this decoder has an adapter merged into its weights; hot-swap on the base decoder")
        if refusal := self.hot_swap_refusal(adapter, spec):
            raise ValueError(refusal)
        feed = dict(self._rank0)
        for (layer, module), (a, b) in adapter.items():
            name_a, name_b = onnx_io.lora_name(layer, module, "A"), onnx_io.lora_name(layer, module, "B")
            a, b = _float32(a), _float32(b)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter ({layer}, {module!r}): A {a.shape} and B {b.shape} are not a LoRA pair")
            if (a.shape[1], b.shape[0]) != (self._lora_dims[name_a], self._lora_dims[name_b]):
                raise ValueError(f"adapter ({layer}, {module!r}): A {a.shape} and B {b.shape} do not fit the graph")
            if onnx_io.LORA_SCALE not in feed:  # the graph takes B with the scale folded in (IO version 2)
                b = np.float32(spec.scale) * b
            feed[name_a], feed[name_b] = _value(a, self._device), _value(b, self._device)
        if onnx_io.LORA_SCALE in feed:
            feed[onnx_io.LORA_SCALE] = _value(np.array([spec.scale], np.float32))
        self._lora_feed, self.adapter_spec = feed, spec

    def clear_adapter(self) -> None:
        """Back to the plain base model (rank-0 LoRA inputs)."""
        self._lora_feed, self.adapter_spec = self._rank0, None

    def _base_weights(self, modules: set[str]) -> dict[str, np.ndarray]:
        """The base weights (out, in) of these modules in every layer, read from the ONNX file once."""
        names = {onnx_io.weight_name(i, m) for i in range(self.num_layers) for m in modules}
        if missing := names - self._weights.keys():
            self._weights.update(read_weights(self.path, missing))
        return self._weights

    def merged(self, adapter: Adapter, spec: LoraSpec) -> OnnxDecoder:
        """A new decoder (and session) on the same graph with the adapter folded into its weights."""
        weights = self._base_weights({module for _, module in adapter})
        decoder = OnnxDecoder(
            self.path,
            providers=self.providers,
            intra_op_threads=self.intra_op_threads,
            initializers=merge_weights(weights, adapter, spec),
            pack_weights=self.pack_weights,
            packing_cache=self._packing,
            int8_activations=self.int8_activations,
        )
        decoder.merged_spec = spec
        return decoder

    def export_merged(self, adapter: Adapter, spec: LoraSpec, out: Path, adapter_id: str = "") -> Path:
        """Write a standalone `.onnx` with the adapter folded in and no LoRA inputs, atomically; returns `out`.

        The metadata keeps the base fingerprint and records `adapter_id` under META_MERGED_ADAPTER.
        """
        out = Path(out)
        model = onnx.load(str(self.path))
        modules = {module for _, module in adapter}
        targets = {onnx_io.weight_name(i, m) for i in range(self.num_layers) for m in modules}
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in targets}
        merged = merge_weights(weights, adapter, spec)
        for tensor in model.graph.initializer:
            if tensor.name in merged:
                tensor.CopyFrom(numpy_helper.from_array(merged[tensor.name], tensor.name))
        drop_lora_branch(model.graph)
        meta = {p.key: p.value for p in model.metadata_props}
        meta.update({onnx_io.META_TARGET_MODULES: "", onnx_io.META_MAX_RANK: "0", META_MERGED_ADAPTER: adapter_id})
        onnx.helper.set_model_props(model, meta)

        out.parent.mkdir(parents=True, exist_ok=True)
        external = sum(t.ByteSize() for t in model.graph.initializer) > onnx_io.MAX_INLINE_BYTES
        data_name = out.name + ".data"
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            final = Path(tmp) / out.name
            onnx.save_model(model, str(final), save_as_external_data=external, location=data_name)
            onnx.checker.check_model(str(final))
            if external:  # the data first: the graph that appears at `out` never points at older weights
                os.replace(Path(tmp) / data_name, out.parent / data_name)
            os.replace(final, out)
        return out

    # -- decoding ---------------------------------------------------------------------------------------------

    def _stream(self, lora: dict[str, ort.OrtValue], capacity: int) -> _Cache | _PlainCache:
        return _Cache(self, lora, capacity) if self._in_place_cache else _PlainCache(self, lora)

    def logits(self, token_ids: list[int], prefill: int | None = None) -> np.ndarray:
        """Logits (len(token_ids), vocab) of every position with the current adapter.

        The first `prefill` tokens (default: all) go through in one pass, the rest one at a time through the
        KV cache, as `generate` feeds them.
        """
        prefill = len(token_ids) if prefill is None else prefill
        if not 0 < prefill <= len(token_ids):
            raise ValueError(f"prefill must be between 1 and {len(token_ids)}, not {prefill}")
        stream = self._stream(self._lora_feed, len(token_ids))
        rows = [stream.run(token_ids[:prefill])]
        rows += [stream.run(token_ids[i : i + 1]) for i in range(prefill, len(token_ids))]
        return np.concatenate(rows)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> Iterator[int]:
        """Greedy decoding: yields each new token id as soon as it is chosen; stops before `eos_id` (not yielded)
        or after `max_new_tokens`. The adapter set now is used to the end, even if another is set meanwhile.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        return self._generate(list(prompt_ids), max_new_tokens, eos_id, self._lora_feed)

    def _generate(
        self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None, lora: dict[str, ort.OrtValue]
    ) -> Iterator[int]:
        stream = self._stream(lora, len(prompt_ids) + min(max(max_new_tokens, 1), _CACHE_STEP))
        ids = prompt_ids
        for _ in range(max_new_tokens):
            token = int(np.argmax(stream.run(ids)[-1]))
            if token == eos_id:
                return
            yield token
            ids = [token]


_CACHE_STEP = 512  # a generation's in-place KV cache starts with room for this many new tokens and grows by it


class _PlainCache:
    """One generation's KV cache as the graph's past/present arrays: each run returns a new, longer cache."""

    def __init__(self, decoder: OnnxDecoder, lora: dict[str, ort.OrtValue]) -> None:
        self.decoder, self.lora = decoder, lora
        self.past, self.length = decoder._empty_past, 0

    def run(self, ids: list[int]) -> np.ndarray:
        """One pass over `ids` after the cached tokens: their logits (len(ids), vocab); the cache takes them in."""
        d, total = self.decoder, self.length + len(ids)
        feed = {
            onnx_io.INPUT_IDS: _value(np.array([ids], np.int64)),
            onnx_io.ATTENTION_MASK: _value(np.ones((1, total), np.int64)),
            onnx_io.POSITION_IDS: _value(np.arange(self.length, total, dtype=np.int64)[None]),
            **dict(zip(d._past_names, self.past, strict=True)),
            **self.lora,
        }
        outputs = d.session.run_with_ort_values(d._output_names, feed)
        self.past, self.length = outputs[1:], total
        return outputs[0].numpy()[0]


class _Cache:
    """One generation's KV cache as preallocated buffers (1, kv_heads, capacity, head_dim) that GroupQueryAttention
    reads as past and writes as present in place (CPU, IO version 2): no per-step copy of the cache, and the
    inputs stay bound (`io_binding`) between steps. Grows (one copy) when a run would not fit."""

    def __init__(self, decoder: OnnxDecoder, lora: dict[str, ort.OrtValue], capacity: int) -> None:
        self.decoder, self.length = decoder, 0
        self.binding = decoder.session.io_binding()
        self.binding.bind_output(onnx_io.LOGITS)  # bound first: output 0 (re-bound by name every run, in place)
        for name, value in lora.items():
            self.binding.bind_ortvalue_input(name, value)
        self.buffers: list[np.ndarray] = []
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        d = self.decoder
        kv_heads, head_dim = d._kv_shape
        old, self.buffers = (
            self.buffers,
            [np.zeros((1, kv_heads, capacity, head_dim), np.float32) for _ in d._past_names],
        )
        for new, previous in zip(self.buffers, old, strict=False):
            new[:, :, : self.length] = previous[:, :, : self.length]
        # The OrtValues wrap the numpy buffers without a copy; the buffers live as long as this object.
        for past, present, buffer in zip(d._past_names, d._output_names[1:], self.buffers, strict=True):
            value = _value(buffer)
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)

    def run(self, ids: list[int]) -> np.ndarray:
        """One pass over `ids` after the cached tokens: their logits (len(ids), vocab); the cache takes them in."""
        total = self.length + len(ids)
        if total > self.buffers[0].shape[2]:
            self._allocate(total + _CACHE_STEP)
        binding = self.binding
        binding.bind_cpu_input(onnx_io.INPUT_IDS, np.array([ids], np.int64))
        binding.bind_cpu_input(onnx_io.ATTENTION_MASK, np.ones((1, total), np.int64))
        binding.bind_cpu_input(onnx_io.POSITION_IDS, np.arange(self.length, total, dtype=np.int64)[None])
        binding.bind_output(onnx_io.LOGITS)  # ORT allocates it anew: its length changes between runs
        self.decoder.session.run_with_iobinding(binding)
        self.length = total
        return binding.get_outputs()[0].numpy()[0]


def _plain_sum(gemm: onnx.NodeProto) -> bool:
    """Whether this Gemm adds its C input unscaled (beta 1), so that it returns C when A @ B is empty."""
    return all(a.name != "beta" or onnx.helper.get_attribute_value(a) == 1.0 for a in gemm.attribute)


def drop_lora_branch(graph: onnx.GraphProto) -> None:
    """Remove the LoRA inputs (and a version-1 graph's lora_scale) and every node computing from them, in place.

    The exporter writes each target linear as Gemm(Gemm(x, A), B, C=W x) (version 1: Add(W x, lora_scale *
    B (A x))), so at rank 0 that Gemm returns its C input (the Add its base operand): such a node is bypassed,
    and every other node reading a LoRA-derived value is dropped. A graph where a LoRA-derived value reaches an
    output another way is refused.
    """
    lora = {i.name for i in graph.input if i.name.startswith("lora.") or i.name == onnx_io.LORA_SCALE}
    tainted, alias = set(lora), {}  # alias: output of a bypassed Add -> its base operand
    kept = []
    for node in graph.node:  # in topological order
        inputs = [alias.get(name, name) for name in node.input]
        hit = [name in tainted for name in inputs]
        if not any(hit):
            del node.input[:]
            node.input.extend(inputs)
            kept.append(node)
        elif node.op_type == "Add" and hit.count(True) == 1:
            alias[node.output[0]] = inputs[hit.index(False)]
        elif node.op_type == "Gemm" and len(inputs) == 3 and hit == [True, True, False] and _plain_sum(node):
            alias[node.output[0]] = inputs[2]
        else:
            tainted.update(node.output)
    for output in graph.output:
        if output.name in tainted:
            raise ValueError(f"graph output {output.name!r} depends on the LoRA inputs beyond a bypassable Add")
        if output.name in alias:
            kept.append(onnx.helper.make_node("Identity", [alias[output.name]], [output.name]))

    # Keep only what the outputs need (the constants the LoRA branch used go too).
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(kept):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [i for i in graph.input if i.name not in lora]
    del graph.input[:]
    graph.input.extend(inputs)
    value_info = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
