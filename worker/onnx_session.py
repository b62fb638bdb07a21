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

Exact 4-bit weights (on by default on the CPU): linears whose weights lie on a GGUF block grid run as ONNX
Runtime's MatMulNBits on 4-bit codes (`worker.weight_packing` rewrites the graph; its docstring says how).

Opt-in int8 activations (`OnnxDecoder(int8_activations=True)`, `worker serve --int8-activations`): the same
packed linears run with MatMulNBits' accuracy_level 4, which quantizes each activation block to int8 and
accumulates in integers: about 2x faster per matmul on the CPU, but LOSSY (logits move by far more than the
exact mode's 1e-3; bench/bench_worker_decode.py measures the perplexity and greedy-token cost). Off by default.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping, Set
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from loracast.lora_spec import LoraSpec
from worker import onnx_io
from worker.weight_packing import EXACT_ACCURACY, INT8_ACCURACY, MS_DOMAIN, PackedLinear, pack_linears

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


def read_weights(model_path: Path, names: Set[str]) -> dict[str, np.ndarray]:
    """These initializers of an ONNX file, as arrays: what merging starts from, without a session."""
    graph = onnx.load(str(model_path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in names}


class OnnxDecoder:
    """One ONNX Runtime session on an exported graph, with greedy KV-cache decoding and LoRA adapters.

    `initializers` overrides graph weights by name (what `merged` uses). `pack_weights` runs the linears that
    lie on a block grid as exact 4-bit MatMulNBits (see `worker.weight_packing`; on the CPU provider only, where it
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
