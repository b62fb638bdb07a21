"""One-time export of the frozen base model to ONNX, with a KV cache and LoRA A/B as graph inputs.

The graph's inputs and outputs are the contract in `worker.onnx_io` (read its docstring); the serving
path relies on it and never imports this module or torch.

Why a hand-written decoder step: the TorchScript exporter fails on transformers' `DynamicCache`, so
`DecoderStep` re-implements one Llama forward step (embedding, RMSNorm, rotary, grouped-query
attention with explicit past K/V concatenation, SiLU MLP, tied lm_head) on the Hugging Face model's
own weights, with past and present K/V as plain tensors, and that is what gets exported.

Every linear is written as one ONNX Gemm on the Hugging Face weight itself (`_linear`): the graph keeps
the weights in their (out, in) layout under their Hugging Face names (so a merged adapter can override
them by name) and the tied embedding is stored once instead of once more transposed for the lm_head.

Decoding one token on a CPU runs thousands of tiny ops, each paying the runtime's per-op overhead, so the
step is written with few of them: the attention block is ONNX Runtime's fused `com.microsoft` ops
(RotaryEmbedding on Q and K, GroupQueryAttention with past/present K/V and the padding/causal mask as an
additive bias), and each residual add is fused into the next RMSNorm (SkipSimplifiedLayerNormalization).
Each is an autograd Function whose eager `forward` is the reference math (what the tracer runs) and whose
`symbolic` emits the fused op. The rotary tables are computed once per step for the positions being fed,
so any position works (no maximum length baked in).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import PreTrainedModel

from loracast import base_model
from loracast.lora_spec import ATTN_MODULES, MLP_MODULES
from worker import onnx_io

OPSET = 17

LoraInputs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # target module -> (A, B) of one layer


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for x of shape (tokens, in): exported as one Gemm(transB=1) on `weight` itself."""
    return torch.addmm(torch.zeros(1) if bias is None else bias, x, weight.t())


MS = "com.microsoft"


class _Rotary(torch.autograd.Function):
    """Rotary embedding of x (batch, seq, heads * head_dim), Hugging Face's rotate-half form, with per-token
    tables cos/sin (rows, head_dim / 2) indexed by `rows` (batch, seq). Exported as com.microsoft RotaryEmbedding."""

    @staticmethod
    def forward(ctx, x, rows, cos, sin, heads: int):
        b, s, _ = x.shape
        x = x.view(b, s, heads, -1)
        half = x.shape[-1] // 2
        c, n = torch.cat((cos[rows], cos[rows]), -1)[:, :, None], torch.cat((sin[rows], sin[rows]), -1)[:, :, None]
        return (x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * n).reshape(b, s, -1)

    @staticmethod
    def symbolic(g, x, rows, cos, sin, heads: int):
        out = g.op(f"{MS}::RotaryEmbedding", x, rows, cos, sin)
        out.setType(x.type())
        return out


class _GroupQueryAttention(torch.autograd.Function):
    """Grouped-query attention over past + new K/V: q (batch, seq, heads * d), k/v (batch, seq, kv_heads * d),
    past K/V (batch, kv_heads, past, d), bias (batch, 1, seq, total) additive. Returns (out (batch, seq,
    heads * d), present K, present V). Exported as com.microsoft GroupQueryAttention (causal, which the bias
    also is); `seqlens` (batch,) int32 = total - 1 and `total` () int32 are its bookkeeping inputs."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens, total, bias, heads: int, kv_heads: int, scale: float):
        b, s, _ = q.shape
        d = past_k.shape[-1]
        k = torch.cat((past_k, k.view(b, s, kv_heads, d).transpose(1, 2)), dim=2)
        v = torch.cat((past_v, v.view(b, s, kv_heads, d).transpose(1, 2)), dim=2)
        # Query heads grouped by the kv head they share: K and V get a group axis of 1 and are broadcast.
        qg = q.view(b, s, kv_heads, heads // kv_heads, d).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(qg, k[:, :, None].transpose(3, 4)) * scale + bias[:, :, None]
        out = torch.matmul(torch.softmax(scores, dim=-1), v[:, :, None])
        return out.permute(0, 3, 1, 2, 4).reshape(b, s, heads * d), k, v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens, total, bias, heads: int, kv_heads: int, scale: float):
        # The optional cos_cache, sin_cache and position_ids inputs before attention_bias are left empty by
        # `_fill_optional_inputs` after the export (the tracer cannot write an empty input name).
        out, pk, pv = g.op(
            f"{MS}::GroupQueryAttention", q, k, v, past_k, past_v, seqlens, total, bias,
            num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale, outputs=3,
        )  # fmt: skip
        out.setType(q.type())
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return out, pk, pv


class _SkipRMSNorm(torch.autograd.Function):
    """(RMSNorm(x + skip) * weight, x + skip): the residual add fused into the next norm. Exported as
    com.microsoft SkipSimplifiedLayerNormalization (its outputs 0 and 3)."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps: float):
        h = x + skip
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)), h

    @staticmethod
    def symbolic(g, x, skip, weight, eps: float):
        y, _, _, h = g.op(f"{MS}::SkipSimplifiedLayerNormalization", x, skip, weight, epsilon_f=eps, outputs=4)
        y.setType(x.type())
        h.setType(x.type())
        return y, h


def _fill_optional_inputs(graph: onnx.GraphProto) -> None:
    """Move GroupQueryAttention's attention_bias (traced as its 8th input) to its slot, input 10."""
    for node in graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) == 8:
            bias = node.input[7]
            del node.input[7:]
            node.input.extend(["", "", "", bias])


class DecoderStep(nn.Module):
    """One forward step of a Hugging Face Llama with explicit KV cache and LoRA tensors as inputs.

    forward(input_ids, attention_mask, position_ids, *rest) where rest is, in `onnx_io.io_names` order:
    past key and value of every layer, then A and B of every (layer, target module), B already scaled.
    Returns (logits, present key and value of every layer).
    """

    def __init__(self, model: PreTrainedModel, target_modules: tuple[str, ...]) -> None:
        super().__init__()
        cfg = model.config
        if cfg.model_type != "llama":
            raise ValueError(f"only the Llama architecture is supported, not {cfg.model_type!r}")
        unknown = set(target_modules) - set(ATTN_MODULES + MLP_MODULES)
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}")
        rope = model.model.rotary_emb
        if rope.rope_type in ("dynamic", "longrope"):
            raise ValueError(f"rope type {rope.rope_type!r} changes with the sequence length; not exportable")
        # Registered under the same names as in the HF model, so the graph's weights keep those names.
        self.model = model.model
        self.lm_head = model.lm_head
        self.target_modules = target_modules
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.hidden_size = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.inv_freq = rope.inv_freq  # a plain attribute: exported as a constant, not a named weight
        self.rope_scaling = rope.attention_scaling

    def _proj(self, block: nn.Module, module: str, x: torch.Tensor, lora: LoraInputs) -> torch.Tensor:
        """y = W x (+ b), plus B (A x) when `module` is a LoRA target (B fed with the adapter's scale folded in).

        The LoRA term is two Gemms, the second adding to y through its C input: at rank 0 it returns y.
        """
        lin = getattr(block, module)
        y = _linear(x, lin.weight, lin.bias)
        if module in lora:
            a, b = lora[module]
            y = torch.addmm(y, _linear(x, a), b.t())
        return y

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        n_past = 2 * self.num_layers
        pasts, loras = rest[:n_past], rest[n_past:]
        per_layer = 2 * len(self.target_modules)
        # Read the dynamic sizes once: every later use then shares the same few shape nodes in the graph.
        batch, seq, total = input_ids.shape[0], input_ids.shape[1], attention_mask.shape[1]

        # Additive attention bias (batch, 1, seq, total): a query at cache index past + i sees the cache
        # indices <= past + i that hold a real token. GroupQueryAttention's own bookkeeping: every row's cache
        # holds `total` entries (left padding is masked by the bias).
        query_index = torch.arange(seq) + (total - seq)
        causal = torch.arange(total)[None, :] <= query_index[:, None]
        allowed = causal[None, :, :] & (attention_mask[:, None, :] > 0)
        attn_bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
        ones = torch.ones_like(attention_mask)
        seqlens = (ones.sum(1) - 1).to(torch.int32)
        total_len = ones[0].sum().to(torch.int32)

        # Rotary tables of the positions fed in this step, shared by all layers: row r = b * seq + s holds
        # cos/sin of position_ids[b, s] (as Hugging Face computes them), and `rows` points each token at its row.
        freqs = position_ids.reshape(-1, 1).float() * self.inv_freq[None, :]
        cos, sin = freqs.cos() * self.rope_scaling, freqs.sin() * self.rope_scaling
        rows = torch.arange(batch * seq).view(batch, seq)

        # The residual stream is (tokens, hidden) with tokens = batch * seq: every linear is then a plain Gemm.
        h = self.model.embed_tokens(input_ids).reshape(-1, self.hidden_size)
        x = self.model.layers[0].input_layernorm(h)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            ab = loras[i * per_layer : (i + 1) * per_layer]
            lora = {m: (ab[2 * j], ab[2 * j + 1]) for j, m in enumerate(self.target_modules)}
            attn, mlp = layer.self_attn, layer.mlp

            q = self._proj(attn, "q_proj", x, lora).view(batch, seq, -1)
            k = self._proj(attn, "k_proj", x, lora).view(batch, seq, -1)
            v = self._proj(attn, "v_proj", x, lora).view(batch, seq, -1)
            q = _Rotary.apply(q, rows, cos, sin, self.num_heads)
            k = _Rotary.apply(k, rows, cos, sin, self.num_kv_heads)
            out, k, v = _GroupQueryAttention.apply(
                q, k, v, pasts[2 * i], pasts[2 * i + 1], seqlens, total_len, attn_bias,
                self.num_heads, self.num_kv_heads, float(attn.scaling),
            )  # fmt: skip
            presents += [k, v]
            out = self._proj(attn, "o_proj", out.reshape(-1, self.num_heads * self.head_dim), lora)
            norm = layer.post_attention_layernorm
            x, h = _SkipRMSNorm.apply(out, h, norm.weight, norm.variance_epsilon)

            gate = mlp.act_fn(self._proj(mlp, "gate_proj", x, lora))
            out = self._proj(mlp, "down_proj", gate * self._proj(mlp, "up_proj", x, lora), lora)
            norm = self.model.layers[i + 1].input_layernorm if i + 1 < self.num_layers else self.model.norm
            x, h = _SkipRMSNorm.apply(out, h, norm.weight, norm.variance_epsilon)

        logits = _linear(x, self.lm_head.weight)
        return (logits.view(batch, seq, -1), *presents)


def _example_inputs(step: DecoderStep, batch: int = 2, seq: int = 3, past: int = 4, rank: int = 2) -> tuple:
    """Dummy inputs to trace with; sizes differ from each other so the tracer cannot mix them up."""
    kv = torch.zeros(batch, step.num_kv_heads, past, step.head_dim)
    pasts = [kv] * (2 * step.num_layers)
    loras = []
    for layer in step.model.layers:
        for module in step.target_modules:
            lin = getattr(layer.self_attn if module in ATTN_MODULES else layer.mlp, module)
            loras += [torch.zeros(rank, lin.in_features), torch.zeros(lin.out_features, rank)]
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq)
    return (ids, mask, positions, *pasts, *loras)


def _dynamic_axes(num_layers: int, target_modules: tuple[str, ...]) -> dict[str, dict[int, str]]:
    axes = {
        onnx_io.INPUT_IDS: {0: "batch", 1: "seq"},
        onnx_io.ATTENTION_MASK: {0: "batch", 1: "total"},
        onnx_io.POSITION_IDS: {0: "batch", 1: "seq"},
        onnx_io.LOGITS: {0: "batch", 1: "seq"},
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            axes[onnx_io.past_name(i, kind)] = {0: "batch", 2: "past"}
            axes[onnx_io.present_name(i, kind)] = {0: "batch", 2: "total"}
        for module in target_modules:
            axes[onnx_io.lora_name(i, module, "A")] = {0: "lora_rank"}
            axes[onnx_io.lora_name(i, module, "B")] = {1: "lora_rank"}
    return axes


# What the shipped hypernetworks target, so both hot-swap: Text-to-LoRA q_proj and v_proj at rank 8, Doc-to-LoRA
# down_proj at rank 8 per chunk, at most 64 (hypernet.d2l.D2LConfig.max_rank). The rank-0 branches cost no decode
# speed we could measure (bench/bench_worker_decode.py: 5.67x PyTorch with down_proj's, 5.38x and 5.39x without);
# merging a D2L adapter instead costs a session build.
HOT_SWAP_MODULES = ("q_proj", "v_proj", "down_proj")
HOT_SWAP_MAX_RANK = 64


def export(
    model_dir: Path,
    out: Path,
    target_modules: tuple[str, ...] = HOT_SWAP_MODULES,
    max_rank: int = HOT_SWAP_MAX_RANK,
) -> Path:
    """Export the model in `model_dir` (a Hugging Face directory) to `out`, atomically; returns `out`.

    `max_rank` is only recorded in the metadata (the graph accepts any rank).
    """
    out = Path(out)
    base = base_model.load(str(model_dir))
    step = DecoderStep(base.model, tuple(target_modules)).eval()
    inputs, outputs = onnx_io.io_names(step.num_layers, step.target_modules)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        traced = Path(tmp) / "traced.onnx"
        with torch.no_grad():
            torch.onnx.export(
                step,
                _example_inputs(step),
                str(traced),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=_dynamic_axes(step.num_layers, step.target_modules),
                opset_version=OPSET,
                custom_opsets={MS: 1},
                dynamo=False,
            )
        graph = onnx.load(str(traced))
        _fill_optional_inputs(graph.graph)
        meta = {
            onnx_io.META_VERSION: onnx_io.IO_VERSION,
            onnx_io.META_FINGERPRINT: base.fingerprint,
            onnx_io.META_TARGET_MODULES: ",".join(step.target_modules),
            onnx_io.META_NUM_LAYERS: str(step.num_layers),
            onnx_io.META_NUM_KV_HEADS: str(step.num_kv_heads),
            onnx_io.META_HEAD_DIM: str(step.head_dim),
            onnx_io.META_MAX_RANK: str(max_rank),
        }
        onnx.helper.set_model_props(graph, meta)

        # Save under the final name inside the temporary directory, then move into place: the data
        # file first, so the graph that appears at `out` never points at missing or older weights.
        final = Path(tmp) / out.name
        external = weight_bytes > onnx_io.MAX_INLINE_BYTES
        data_name = out.name + ".data"
        onnx.save_model(graph, str(final), save_as_external_data=external, location=data_name)
        onnx.checker.check_model(str(final))
        if external:
            os.replace(Path(tmp) / data_name, out.parent / data_name)
        os.replace(final, out)
    return out
