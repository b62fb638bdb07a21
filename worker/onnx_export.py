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


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """Rotary embedding as in Hugging Face: x * cos + rotate_half(x) * sin, with half = head_dim // 2 static."""
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class DecoderStep(nn.Module):
    """One forward step of a Hugging Face Llama with explicit KV cache and LoRA tensors as inputs.

    forward(input_ids, attention_mask, position_ids, *rest) where rest is, in `onnx_io.io_names` order:
    past key and value of every layer, A and B of every (layer, target module), then lora_scale.
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

    def _proj(
        self, block: nn.Module, module: str, x: torch.Tensor, lora: LoraInputs, scale: torch.Tensor
    ) -> torch.Tensor:
        """y = W x (+ b), plus scale * B (A x) when `module` is a LoRA target."""
        lin = getattr(block, module)
        y = _linear(x, lin.weight, lin.bias)
        if module in lora:
            a, b = lora[module]
            y = y + scale * _linear(_linear(x, a), b)
        return y

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        n_past = 2 * self.num_layers
        pasts, loras, scale = rest[:n_past], rest[n_past:-1], rest[-1]
        per_layer = 2 * len(self.target_modules)
        # Read the dynamic sizes once: every later use then shares the same few shape nodes in the graph.
        batch, seq, total = input_ids.shape[0], input_ids.shape[1], attention_mask.shape[1]
        group = self.num_heads // self.num_kv_heads  # query heads per kv head (grouped-query attention)

        # Additive attention bias (batch, 1, 1, seq, total): a query at cache index past + i sees the
        # cache indices <= past + i that hold a real token.
        query_index = torch.arange(seq) + (total - seq)
        causal = torch.arange(total)[None, :] <= query_index[:, None]
        allowed = causal[None, :, :] & (attention_mask[:, None, :] > 0)
        attn_bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None]

        # Rotary embedding, shared by all layers: (batch, seq, 1, head_dim), broadcast over heads.
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scaling)[:, :, None]
        sin = (angles.sin() * self.rope_scaling)[:, :, None]

        # The residual stream is (tokens, hidden) with tokens = batch * seq: every linear is then a plain Gemm.
        h = self.model.embed_tokens(input_ids).reshape(-1, self.hidden_size)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            ab = loras[i * per_layer : (i + 1) * per_layer]
            lora = {m: (ab[2 * j], ab[2 * j + 1]) for j, m in enumerate(self.target_modules)}
            attn, mlp = layer.self_attn, layer.mlp

            x = layer.input_layernorm(h)
            q = self._proj(attn, "q_proj", x, lora, scale).view(batch, seq, self.num_heads, self.head_dim)
            k = self._proj(attn, "k_proj", x, lora, scale).view(batch, seq, self.num_kv_heads, self.head_dim)
            v = self._proj(attn, "v_proj", x, lora, scale).view(batch, seq, self.num_kv_heads, self.head_dim)
            q, k = _rope(q, cos, sin, self.head_dim // 2), _rope(k, cos, sin, self.head_dim // 2)
            k = torch.cat((pasts[2 * i], k.transpose(1, 2)), dim=2)  # (batch, kv_heads, total, head_dim)
            v = torch.cat((pasts[2 * i + 1], v.transpose(1, 2)), dim=2)
            presents += [k, v]

            # Query heads grouped by the kv head they share: (batch, kv_heads, group, seq, head_dim); K and V
            # get a group axis of 1 and are broadcast, not copied.
            q = q.view(batch, seq, self.num_kv_heads, group, self.head_dim).permute(0, 2, 3, 1, 4)
            scores = torch.matmul(q, k[:, :, None].transpose(3, 4)) * attn.scaling + attn_bias
            out = torch.matmul(torch.softmax(scores, dim=-1), v[:, :, None])
            out = out.permute(0, 3, 1, 2, 4).reshape(-1, self.num_heads * self.head_dim)
            h = h + self._proj(attn, "o_proj", out, lora, scale)

            x = layer.post_attention_layernorm(h)
            gate = mlp.act_fn(self._proj(mlp, "gate_proj", x, lora, scale))
            h = h + self._proj(mlp, "down_proj", gate * self._proj(mlp, "up_proj", x, lora, scale), lora, scale)

        logits = _linear(self.model.norm(h), self.lm_head.weight)
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
    return (ids, mask, positions, *pasts, *loras, torch.ones(1))


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


def export(
    model_dir: Path, out: Path, target_modules: tuple[str, ...] = ("q_proj", "v_proj"), max_rank: int = 16
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
                dynamo=False,
            )
        graph = onnx.load(str(traced))
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
