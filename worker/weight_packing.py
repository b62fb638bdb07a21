"""Exact 4-bit weights: an exported graph's linears rewritten as ONNX Runtime's MatMulNBits where that is exact.

A linear whose float32 weights lie exactly on a GGUF block grid (Q4_1: w = d q + m per block of 32, q in 0..15;
Q8_0: w = d q, q in -127..127) runs as ONNX Runtime's MatMulNBits on 4-bit codes instead of a float32 Gemm.
Decoding one token reads every weight once, so it is memory bound: 4-bit codes with float32 block scales read 3 to
5x fewer bytes. Linears that read the same input (q, k, v; gate, up) run as one MatMulNBits and a Split: fewer,
larger kernel calls. The default base model is de-quantized from a Q4_1/Q8_0 GGUF, so every one of its linears lies
on such a grid and the packed graph computes the same function (only the float summation order changes); weights
that are not on a grid (any other model, a merged adapter) stay float32.

`worker.onnx_session.OnnxDecoder` packs its graph with `pack_linears` (on the CPU, by default) before it opens a
session.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

BLOCK = 32  # MatMulNBits block along the input dimension: the block of GGUF's Q4_1 and Q8_0
EXACT_ACCURACY = 1  # MatMulNBits accuracy_level: float32 activations and accumulation (exact)
INT8_ACCURACY = 4  # MatMulNBits accuracy_level: int8-quantized activations, integer accumulation (faster, lossy)
EXACT = 1e-6  # a weight is on a grid when re-quantizing it moves no value by more than this times its largest
MS_DOMAIN = "com.microsoft"


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
