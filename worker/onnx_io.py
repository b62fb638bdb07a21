"""The worker's ONNX graph contract: input, output, weight and metadata names. Pure Python, no torch.

The one-time export (`worker.onnx_export`, needs torch) writes a graph with exactly these names, and the
serving path (ONNX Runtime + numpy, no torch) feeds and reads them. Shapes, all float32 unless noted:

Inputs
  input_ids                      int64 (batch, seq)
  attention_mask                 int64 (batch, past + seq)   1 = real token, 0 = padding (left padding)
  position_ids                   int64 (batch, seq)          e.g. cumsum(attention_mask) - 1, clipped at 0
  past_key_values.{i}.key/value        (batch, kv_heads, past, head_dim) for every layer i; past may be 0
  lora.{i}.{module}.A                  (rank, in_features)   for every layer i and target module
  lora.{i}.{module}.B                  (out_features, rank)  rank is dynamic; rank 0 = no adapter. Fed with
                                                             the adapter's scale folded in: scale * B

Outputs
  logits                               (batch, seq, vocab)
  present.{i}.key/value                (batch, kv_heads, past + seq, head_dim): the next step's past

Every target linear computes y = W x + B (A x), written as Gemm(Gemm(x, A), B, C=W x); the caller feeds B
pre-multiplied by the adapter's scale (alpha / r, or alpha / sqrt(r) for rsLoRA). With empty A (0, in) and
B (out, 0) the graph is exactly the base model, so one graph serves with and without an adapter (hot-swap).
For a merged adapter, override the initializer `weight_name(i, module)` (layout (out, in), as in Hugging
Face) with W + scale * B @ A via `SessionOptions.add_initializer` and feed rank-0 A/B.

Version history: 1 had a `lora_scale` (1,) input multiplying B (A x) and a plain-op attention; 2 folds the
scale into B and runs the attention as ONNX Runtime's fused com.microsoft ops (see `worker.onnx_export`); 3 adds
down_proj to the default target modules and raises the default max rank to 64, so Doc-to-LoRA adapters hot-swap
too (a version-2 export lacks those inputs: the worker exports again).
"""

from __future__ import annotations

from loracast.lora_spec import ATTN_MODULES

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LORA_SCALE = "lora_scale"  # IO version 1 only; `worker.onnx_session` still feeds it to such graphs
LOGITS = "logits"

# Keys of the graph's metadata_props (ONNX Runtime: session.get_modelmeta().custom_metadata_map).
META_VERSION = "loracast.io_version"  # bumped when this contract changes
META_FINGERPRINT = "loracast.base_fingerprint"  # loracast.base_model.fingerprint of the exported model
META_TARGET_MODULES = "loracast.target_modules"  # comma separated, in input order
META_NUM_LAYERS = "loracast.num_layers"
META_NUM_KV_HEADS = "loracast.num_kv_heads"
META_HEAD_DIM = "loracast.head_dim"
META_MAX_RANK = "loracast.max_rank"  # the largest adapter rank the worker should accept
IO_VERSION = "3"
# Above this many bytes of weights a model file keeps its weights in `<file>.data`: a protobuf cannot exceed 2 GiB.
MAX_INLINE_BYTES = 2**31 - 2**26


def past_name(layer: int, kind: str) -> str:
    """kind is 'key' or 'value'."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def lora_name(layer: int, module: str, which: str) -> str:
    """which is 'A' or 'B'."""
    return f"lora.{layer}.{module}.{which}"


def weight_name(layer: int, module: str) -> str:
    """The graph initializer holding the base weight of one target linear (out, in)."""
    block = "self_attn" if module in ATTN_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{module}.weight"


def io_names(num_layers: int, target_modules: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The graph's input names and output names, in graph order."""
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    inputs += [past_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    inputs += [lora_name(i, m, w) for i in range(num_layers) for m in target_modules for w in ("A", "B")]
    outputs = [LOGITS] + [present_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    return inputs, outputs
