"""Scaling: how adapter creation, delivery and edge inference grow with rank, target modules and document length.

    nice -n 5 .venv/bin/python bench/bench_scaling.py [--ranks 2,4,8,16,32,64] [--modules "q_proj,v_proj;..."]
        [--doc-tokens 256,512,1024,2048,4096,7680] [--repeats 3] [--new-tokens 32] [--threads N]
        [--json bench/results/scaling.json] [--plot-dir bench/results]

Everything runs on the real base model: PyTorch (`loracast.base_model.load()`) for the hypernetworks, the worker's
cached ONNX export (`OnnxDecoder`) for inference.

1. Rank sweep, for every rank x module set (default: q,v; q,k,v,o; all seven linears), with a random adapter of
   the usual magnitude (`common.random_attention_adapter`; MLP modules get the same recipe):
   - wire: payload bytes (fp16, the default), manifest bytes; `adapter_wire.encode` time; streaming in process
     (cutting the payload into DataChunk messages, serializing them as gRPC would, and joining them again: no
     network, bench_delivery.py measures that); `adapter_wire.decode` time, which includes its SHA-256 check;
   - hot-swap: `OnnxDecoder.set_adapter` time, when the graph takes the adapter as inputs (only the modules it
     was exported with, up to its max rank: recorded in `graph`; everything else can only be merged);
   - merged: the time to build a session with the adapter folded into the weights (`OnnxDecoder.merged`);
   - decode tokens/s with the adapter, hot-swapped where possible and merged always, with the base model (no
     adapter) measured beside it in the same round as the floor (runs interleaved, so load from other processes
     hits all alike); a fixed chat prompt, `new_tokens` greedy tokens, median over rounds;
   - Text-to-LoRA generation: a randomly initialised `TextToLoRA` with the shipped checkpoint's architecture
     (encoder embedding dim, latent and trunk sizes) for that rank and module set; the hypernetwork forward plus
     what `TextToLoRAMaker.make_adapter` does after it, on a random task embedding (the description encoder's
     time does not depend on the adapter: bench_t2l_generate.py has it).
2. Document-length sweep, one held-out document per length (`common.the_document`, built by
   `hypernet.eval_d2l.speed_documents`) and one of its questions:
   - Doc-to-LoRA internalization with the shipped checkpoint (`DocToLoRAMaker.make_adapter`): seconds, chunks,
     the adapter's rank (capped by the checkpoint's max rank) and wire bytes;
   - answering on ONNX Runtime: time to the first token and decode tokens/s with the document in the prompt (plain
     base model) vs the question alone with the adapter hot-swapped (the default export takes D2L's down_proj up
     to rank 64; merged where the graph cannot), plus the hot-swap time and what merging would cost instead;
   - memory: the KV cache the prompt fills (exact, from the graph's shape); how far the process's resident set
     rises above where it stood, while answering (sampled every 2 ms: each generation's KV buffers, and whatever
     ONNX Runtime's arena grows by for a prompt longer than any before; it keeps what it grew to); and what the
     merged session adds (its own float32 copy of the adapted weights).
   Documents come out near, not at, the asked length: both are recorded, plots use the actual one.

A point repeats `repeats` times but stops early once it has used `--point-budget-s` (a long document's prompt
takes tens of seconds per run on 2 cores); the runs actually made are recorded. Writes the JSON (atomically),
prints a markdown table per sweep and draws scaling_rank.png and scaling_document.png into --plot-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import torch
from common import PROMPTS, PeakRss, random_attention_adapter, rss_mb, the_document, timed
from tqdm import tqdm
from transformers import PreTrainedModel

from hypernet import checkpoint
from hypernet.d2l import chunk_ids
from hypernet.makers import DocToLoRAMaker
from hypernet.sni_data import user_turn
from hypernet.t2l import T2LConfig, TextToLoRA
from loracast import adapter_wire, base_model
from loracast.adapter_format import META_FINGERPRINT, as_float32
from loracast.lora_spec import ATTN_MODULES, MLP_MODULES, LoraSpec
from loracast.plots import figure
from loracast.v1 import loracast_pb2 as pb
from worker import model_cache, onnx_io
from worker.chat import ChatTokenizer
from worker.onnx_session import Adapter, OnnxDecoder

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RANKS = "2,4,8,16,32,64"
DEFAULT_MODULES = "q_proj,v_proj;q_proj,k_proj,v_proj,o_proj;" + ",".join(ATTN_MODULES + MLP_MODULES)
DEFAULT_DOC_TOKENS = "256,512,1024,2048,4096,7680"
SWAP_REPEATS = 20  # set_adapter takes milliseconds: more repeats cost nothing and steady the median
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default=DEFAULT_RANKS, help="comma-separated adapter ranks")
    p.add_argument("--modules", default=DEFAULT_MODULES, help="module sets: comma-separated, sets split by ';'")
    p.add_argument("--doc-tokens", default=DEFAULT_DOC_TOKENS, help="comma-separated document lengths (tokens)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measured point (medians)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded per run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for torch and ONNX Runtime")
    p.add_argument("--point-budget-s", type=float, default=20.0, help="stop repeating a point after this many seconds")
    p.add_argument("--json", type=Path, default=RESULTS / "scaling.json")
    p.add_argument("--plot-dir", type=Path, default=RESULTS)
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _module_sets(text: str) -> list[tuple[str, ...]]:
    known = ATTN_MODULES + MLP_MODULES
    sets = [tuple(m.strip() for m in group.split(",") if m.strip()) for group in text.split(";") if group.strip()]
    for modules in sets:
        if unknown := [m for m in modules if m not in known]:
            raise SystemExit(f"unknown module(s) {unknown}: choose from {', '.join(known)}")
    return sets


def _repeat(fn: Callable[[], T], repeats: int, budget_s: float) -> list[T]:
    """`fn()` up to `repeats` times, fewer once `budget_s` is spent (always at least once)."""
    out, start = [], time.perf_counter()
    for _ in range(max(1, repeats)):
        out.append(fn())
        if time.perf_counter() - start >= budget_s:
            break
    return out


def _clock(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    """(seconds, result) of fn(*args)."""
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _med(xs: Sequence[float], scale: float = 1.0, digits: int = 2) -> float:
    return round(scale * statistics.median(xs), digits)


def _module_shapes(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every adaptable linear of one decoder layer."""
    layer = model.model.layers[0]
    return {
        m: (lin.in_features, lin.out_features)
        for m in ATTN_MODULES + MLP_MODULES
        for lin in [getattr(layer.self_attn if m in ATTN_MODULES else layer.mlp, m)]
    }


def random_adapter(model: PreTrainedModel, spec: LoraSpec, seed: int) -> Adapter:
    """`common.random_attention_adapter` for any module set: MLP modules get its recipe here."""
    attn = tuple(m for m in spec.target_modules if m in ATTN_MODULES)
    adapter = dict(random_attention_adapter(model, replace(spec, target_modules=attn), seed)) if attn else {}
    rng = np.random.default_rng(seed + 1)
    for i, layer in enumerate(model.model.layers):
        for module in (m for m in spec.target_modules if m in MLP_MODULES):
            lin = getattr(layer.mlp, module)
            a = rng.standard_normal((spec.r, lin.in_features), dtype=np.float32) / np.float32(lin.in_features) ** 0.5
            b = rng.standard_normal((lin.out_features, spec.r), dtype=np.float32) * 0.02
            adapter[(i, module)] = (a, b)
    return adapter


def _stream(wire: adapter_wire.WireAdapter) -> bytes:
    """The payload cut into DataChunks and serialized as the server would send them, then parsed and joined as the
    worker does: the in-process part of streaming, without the network."""
    messages = [c.SerializeToString() for c in adapter_wire.chunks(wire.payload)]
    return b"".join(pb.DataChunk.FromString(m).data for m in messages)


def _wire(adapter: Adapter, spec: LoraSpec, fingerprint: str, repeats: int) -> dict[str, Any]:
    metadata = {META_FINGERPRINT: fingerprint}
    wire = adapter_wire.encode(adapter, spec, metadata)
    encode = [_clock(adapter_wire.encode, adapter, spec, metadata)[0] for _ in range(repeats)]
    stream = [_clock(_stream, wire)[0] for _ in range(repeats)]
    decode = [_clock(adapter_wire.decode, wire.manifest, wire.payload)[0] for _ in range(repeats)]
    return {
        "wire_bytes": len(wire.payload),
        "manifest_bytes": wire.manifest.ByteSize(),
        "chunks": -(-len(wire.payload) // adapter_wire.DEFAULT_CHUNK),
        "encode_ms": _med(encode, 1000),
        "stream_ms": _med(stream, 1000),
        "decode_verify_ms": _med(decode, 1000),
    }


def _t2l_ms(shipped: dict, shapes: dict[str, tuple[int, int]], spec: LoraSpec, repeats: int) -> tuple[float, int]:
    """Median ms of one T2L pass (+ make_adapter's unbatching) for this spec, and the hypernetwork's parameter count."""
    cfg = T2LConfig.from_dict({**shipped, "shapes": {m: shapes[m] for m in spec.target_modules}, "r": spec.r})
    torch.manual_seed(0)
    hyper = TextToLoRA(cfg).eval()
    embedding = torch.nn.functional.normalize(torch.randn(1, cfg.embed_dim), dim=-1)

    @torch.no_grad()
    def once() -> None:
        adapter = hyper(embedding)
        {k: (a[0], b[0]) for k, (a, b) in adapter.items()}  # as TextToLoRAMaker.make_adapter returns it

    once()  # warm-up: first-call allocations are not what a request waits for
    times = [_clock(once)[0] for _ in range(repeats)]
    return _med(times, 1000), sum(p.numel() for p in hyper.parameters())


def _tok_s(decoder: OnnxDecoder, prompt: list[int], new_tokens: int) -> float:
    tokens, _, rest = timed(decoder.generate(prompt, new_tokens))
    return (len(tokens) - 1) / rest if rest > 0 else float("nan")


def _hot_swap(decoder: OnnxDecoder, adapter: Adapter, spec: LoraSpec) -> dict[str, Any]:
    """set_adapter's median time, or why the graph cannot take this adapter as inputs."""
    if refusal := decoder.hot_swap_refusal(adapter, spec):
        return {"hot_swap": False, "hot_swap_why_not": refusal}
    swaps = []
    for _ in range(SWAP_REPEATS):
        swaps.append(_clock(decoder.set_adapter, adapter, spec)[0])
        decoder.clear_adapter()
    return {"hot_swap": True, "hot_swap_ms": _med(swaps, 1000, 3)}


def _decode_rates(
    args: argparse.Namespace,
    decoder: OnnxDecoder,
    merged: OnnxDecoder,
    adapter: Adapter | None,
    spec: LoraSpec,
    prompt: list[int],
) -> dict[str, list[float]]:
    """Decode tokens/s per mode over rounds; each round runs every mode, so load from elsewhere hits all alike."""
    rates: dict[str, list[float]] = {"base": [], "merged": []}
    if adapter is not None:
        rates["hot_swap"] = []

    def one_round() -> None:
        rates["base"].append(_tok_s(decoder, prompt, args.new_tokens))
        rates["merged"].append(_tok_s(merged, prompt, args.new_tokens))
        if adapter is not None:
            decoder.set_adapter(adapter, spec)
            try:
                rates["hot_swap"].append(_tok_s(decoder, prompt, args.new_tokens))
            finally:
                decoder.clear_adapter()

    _repeat(one_round, args.repeats, args.point_budget_s)
    return rates


def rank_point(
    args: argparse.Namespace,
    model: PreTrainedModel,
    decoder: OnnxDecoder,
    prompt: list[int],
    fingerprint: str,
    spec: LoraSpec,
    seed: int,
) -> dict[str, Any]:
    """Every rank-sweep measurement of one (module set, rank)."""
    adapter = random_adapter(model, spec, seed)
    row: dict[str, Any] = {
        "modules": list(spec.target_modules),
        "r": spec.r,
        "params": sum(a.size + b.size for a, b in adapter.values()),
    }
    row.update(_wire(adapter, spec, fingerprint, args.repeats))
    row.update(_hot_swap(decoder, adapter, spec))
    build_s, merged = _clock(decoder.merged, adapter, spec)
    row["merged_build_s"] = round(build_s, 2)
    list(merged.generate(prompt, 2))  # warm-up of the new session
    rates = _decode_rates(args, decoder, merged, adapter if row["hot_swap"] else None, spec, prompt)
    row["decode_tok_s"] = {mode: _med(xs, digits=1) for mode, xs in rates.items()}
    row["decode_rounds"] = len(rates["base"])
    shipped = json.loads(checkpoint.read_metadata(checkpoint.DEFAULT_T2L)["config"])
    row["t2l_ms"], row["t2l_params"] = _t2l_ms(shipped, _module_shapes(model), spec, args.repeats)
    return row


def rank_sweep(
    args: argparse.Namespace, model: PreTrainedModel, decoder: OnnxDecoder, prompt: list[int], fingerprint: str
) -> list[dict[str, Any]]:
    configs = [(modules, r) for modules in _module_sets(args.modules) for r in _ints(args.ranks)]
    rows = []
    for seed, (modules, r) in enumerate(bar := tqdm(configs, desc="rank sweep")):
        bar.set_postfix_str(f"{_label(modules)} r={r}")
        # alpha = 2r, the usual LoRA choice (and the default spec's 16 at r = 8).
        spec = LoraSpec(modules, r=r, alpha=2.0 * r)
        rows.append(rank_point(args, model, decoder, prompt, fingerprint, spec, seed))
    return rows


def _answering(
    args: argparse.Namespace, decoder: OnnxDecoder, ids: list[int], kv_bytes_per_token: int
) -> dict[str, Any]:
    """First token and decode speed of one prompt, and the memory it takes."""
    before_mb = rss_mb()
    with PeakRss() as peak:
        runs = _repeat(lambda: timed(decoder.generate(ids, args.new_tokens)), args.repeats, args.point_budget_s)
    rates = [(len(tokens) - 1) / rest for tokens, _, rest in runs if rest > 0]
    return {
        "prompt_tokens": len(ids),
        "first_token_s": _med([first for _, first, _ in runs], digits=3),
        "decode_tok_s": _med(rates, digits=1) if rates else None,
        "runs": len(runs),
        "kv_cache_mb": round(kv_bytes_per_token * (len(ids) + args.new_tokens) / 2**20, 1),
        # Over the resident set just before: the KV buffers of each generation, and what ONNX Runtime's arena
        # grows by for a prompt longer than any it ran before (it keeps what it grew to).
        "peak_rss_growth_mb": round(peak.peak / 2**20 - before_mb, 1),
    }


def document_point(
    args: argparse.Namespace,
    maker: DocToLoRAMaker,
    decoder: OnnxDecoder,
    tokenizer: ChatTokenizer,
    kv_bytes_per_token: int,
    tokens: int,
) -> dict[str, Any]:
    """Every document-sweep measurement of one document length."""
    text, (question,) = the_document(tokens, 1)
    row: dict[str, Any] = {"doc_tokens_target": tokens, "doc_tokens": len(tokenizer.encode(text))}
    row["chunks"] = len(chunk_ids(maker.base.tokenizer, text, maker.hyper.cfg.chunk_tokens))
    runs = _repeat(lambda: _clock(maker.make_adapter, text), args.repeats, args.point_budget_s)
    adapter = {k: (as_float32(a), as_float32(b)) for k, (a, b) in runs[-1][1].items()}
    spec = maker.spec_for(adapter)
    row["internalize_s"] = _med([s for s, _ in runs], digits=3)
    row["internalize_runs"] = len(runs)
    row["rank"] = spec.r
    row["target_modules"] = list(spec.target_modules)
    row["wire_bytes"] = len(adapter_wire.encode(adapter, spec, maker.metadata(text)).payload)

    # Merged: what applying it costs where the graph cannot take it as inputs (another export, a larger rank).
    before_mb = rss_mb()
    build_s, merged = _clock(decoder.merged, adapter, spec)
    row["merged_build_s"] = round(build_s, 2)
    row["merged_rss_growth_mb"] = round(rss_mb() - before_mb, 1)  # what the adapter's own session costs
    question_ids = tokenizer.encode_chat(question)
    row["in_context"] = _answering(args, decoder, tokenizer.encode_chat(user_turn(question, text)), kv_bytes_per_token)
    row.update(_hot_swap(decoder, adapter, spec))
    if row["hot_swap"]:
        decoder.set_adapter(adapter, spec)
        try:
            row["adapter"] = _answering(args, decoder, question_ids, kv_bytes_per_token)
        finally:
            decoder.clear_adapter()
    else:
        list(merged.generate(question_ids, 2))  # warm-up of the new session
        row["adapter"] = _answering(args, merged, question_ids, kv_bytes_per_token)
    return row


def document_sweep(
    args: argparse.Namespace,
    base: base_model.BaseModel,
    decoder: OnnxDecoder,
    tokenizer: ChatTokenizer,
    kv_bytes_per_token: int,
) -> list[dict[str, Any]]:
    maker = DocToLoRAMaker(checkpoint.DEFAULT_D2L, base)
    maker.make_adapter(the_document(256, 1)[0])  # warm-up: first-call allocations are not what a request waits for
    rows = []
    for tokens in (bar := tqdm(_ints(args.doc_tokens), desc="document sweep")):
        bar.set_postfix_str(f"{tokens} tokens")
        rows.append(document_point(args, maker, decoder, tokenizer, kv_bytes_per_token, tokens))
    return rows


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _label(modules: Sequence[str]) -> str:
    return ",".join(m.removesuffix("_proj") for m in modules)


def plot_rank(rows: list[dict[str, Any]], path: Path) -> None:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_label(row["modules"]), []).append(row)
    with figure(path, 2, 3, figsize=(15, 8)) as axes:
        panels = [
            ("wire bytes (fp16)", lambda r: r["wire_bytes"], True),
            (
                "encode + stream + decode/verify ms",
                lambda r: r["encode_ms"] + r["stream_ms"] + r["decode_verify_ms"],
                True,
            ),
            ("hot-swap set_adapter ms", lambda r: r.get("hot_swap_ms"), False),
            ("merged session build s", lambda r: r["merged_build_s"], False),
            ("T2L hypernetwork ms", lambda r: r["t2l_ms"], True),
        ]
        flat = axes.ravel()
        for ax, (title, value, log) in zip(flat, panels, strict=False):
            for label, group in groups.items():
                points = [(r["r"], value(r)) for r in group if value(r) is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=label)
            ax.set_title(title)
            if log:
                ax.set_yscale("log")
        ax = flat[5]
        for i, (label, group) in enumerate(groups.items()):
            color = f"C{i}"
            ranks = [r["r"] for r in group]
            ax.plot(
                ranks,
                [r["decode_tok_s"]["merged"] for r in group],
                "--",
                marker="s",
                color=color,
                label=f"{label} merged",
            )
            hot = [(r["r"], r["decode_tok_s"]["hot_swap"]) for r in group if "hot_swap" in r["decode_tok_s"]]
            if hot:
                ax.plot(*zip(*hot, strict=True), "-", marker="o", color=color, label=f"{label} hot-swap")
            ax.plot(ranks, [r["decode_tok_s"]["base"] for r in group], ":", color="gray", alpha=0.6)
        ax.plot([], [], ":", color="gray", label="base (no adapter)")
        ax.set_title("decode tokens/s")
        for ax in flat:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank r")
            ax.legend(fontsize=7)


def plot_document(rows: list[dict[str, Any]], path: Path) -> None:
    x = [r["doc_tokens"] for r in rows]
    with figure(path, 1, 2, figsize=(12, 4.5)) as (ax, mem):
        ax.plot(x, [r["internalize_s"] for r in rows], marker="o", label="D2L internalize")
        ax.plot(
            x, [r["in_context"]["first_token_s"] for r in rows], marker="o", label="first token, document in prompt"
        )
        ax.plot(x, [r["adapter"]["first_token_s"] for r in rows], marker="o", label="first token, adapter")
        ax.plot(x, [r["merged_build_s"] for r in rows], ":", marker=".", label="merged session build (not needed)")
        ax.plot(x, [r.get("hot_swap_ms", float("nan")) / 1000 for r in rows], marker="o", label="hot-swap")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.set_title("time vs document length")
        mem.plot(x, [r["in_context"]["kv_cache_mb"] for r in rows], marker="o", label="KV cache, document in prompt")
        mem.plot(x, [r["adapter"]["kv_cache_mb"] for r in rows], marker="o", label="KV cache, adapter")
        mem.plot(x, [r["in_context"]["peak_rss_growth_mb"] for r in rows], "--", label="peak RSS growth, in prompt")
        mem.plot(x, [r["adapter"]["peak_rss_growth_mb"] for r in rows], "--", label="peak RSS growth, adapter")
        mem.plot(x, [r["merged_rss_growth_mb"] for r in rows], ":", marker=".", label="a merged session (not needed)")
        mem.set_ylabel("MB")
        mem.set_yscale("log")
        mem.set_title("memory vs document length")
        for a in (ax, mem):
            a.set_xscale("log", base=2)
            a.set_xlabel("document tokens")
            a.legend(fontsize=8)


def rank_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| modules | r | wire KB | encode ms | stream ms | decode+verify ms | hot-swap ms | merged build s "
        "| tok/s base | tok/s hot-swap | tok/s merged | T2L ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rates = r["decode_tok_s"]
        lines.append(
            f"| {_label(r['modules'])} | {r['r']} | {r['wire_bytes'] / 1024:.1f} | {r['encode_ms']} | {r['stream_ms']} "
            f"| {r['decode_verify_ms']} | {r.get('hot_swap_ms', '-')} | {r['merged_build_s']} | {rates['base']} "
            f"| {rates.get('hot_swap', '-')} | {rates['merged']} | {r['t2l_ms']} |"
        )
    return "\n".join(lines)


def document_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| doc tokens | chunks | D2L rank | wire KB | internalize s | hot-swap ms | merge s "
        "| first token s: in prompt / adapter "
        "| tok/s: in prompt / adapter | KV MB: in prompt / adapter | peak RSS growth MB: in prompt / adapter "
        "| merged session MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, a = r["in_context"], r["adapter"]
        lines.append(
            f"| {r['doc_tokens']} | {r['chunks']} | {r['rank']} | {r['wire_bytes'] / 1024:.1f} | {r['internalize_s']} "
            f"| {r.get('hot_swap_ms', '-')} | {r['merged_build_s']} | {c['first_token_s']} / {a['first_token_s']} "
            f"| {c['decode_tok_s']} / {a['decode_tok_s']} | {c['kv_cache_mb']} / {a['kv_cache_mb']} "
            f"| {c['peak_rss_growth_mb']} / {a['peak_rss_growth_mb']} | {r['merged_rss_growth_mb']} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both sweeps with `args` (as `build_parser` makes them); writes args.json and the plots, returns the result."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)
    load_start = os.getloadavg()[0]
    base = base_model.load()
    model_dir = model_cache.prepare(base_model.DEFAULT_BASE)
    graph = model_cache.graph_metadata(model_dir / model_cache.MODEL_FILE)
    tokenizer = ChatTokenizer(model_dir)
    start = time.perf_counter()
    decoder = OnnxDecoder(model_dir / model_cache.MODEL_FILE, intra_op_threads=args.threads)
    load_s = time.perf_counter() - start
    prompt = tokenizer.encode_chat(PROMPTS[0])
    list(decoder.generate(prompt, 4))  # warm-up: first-run allocations are not what users wait for
    # K and V, float32, per layer: what one token of context holds in the cache.
    kv_bytes_per_token = (
        2 * decoder.num_layers * int(graph[onnx_io.META_NUM_KV_HEADS]) * int(graph[onnx_io.META_HEAD_DIM]) * 4
    )

    ranks = rank_sweep(args, base.model, decoder, prompt, base.fingerprint)
    documents = document_sweep(args, base, decoder, tokenizer, kv_bytes_per_token)

    result: dict[str, Any] = {
        "command": "python bench/bench_scaling.py " + " ".join(sys.argv[1:]),
        # What was run, also when an orchestrator calls run() and sys.argv is its own.
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        # 1-minute load average before and after: other processes share the machine.
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "threads": args.threads,
        "repeats": args.repeats,
        "point_budget_s": args.point_budget_s,
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(prompt),
        "wire_dtype": "float16",
        "graph": {
            "hot_swap_modules": list(decoder.target_modules),
            "max_rank": decoder.max_rank,
            "num_layers": decoder.num_layers,
            "kv_bytes_per_token": kv_bytes_per_token,
        },
        "decoder_load_s": round(load_s, 2),
        "rank_sweep": ranks,
        "document_sweep": documents,
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)

    _atomic_write(Path(args.json), json.dumps(result, indent=2))
    plot_dir = Path(args.plot_dir)
    plot_rank(ranks, plot_dir / "scaling_rank.png")
    plot_document(documents, plot_dir / "scaling_document.png")
    print(
        f"\nRank sweep: {args.new_tokens} new tokens on a {len(prompt)}-token prompt, {args.threads} threads. "
        f"The graph hot-swaps {', '.join(decoder.target_modules)} up to rank {decoder.max_rank}; "
        "other configurations are merged only.\n"
    )
    print(rank_table(ranks))
    print(f"\nDocument sweep: D2L (shipped checkpoint) vs the document in the prompt, {args.new_tokens} new tokens.\n")
    print(document_table(documents))
    print(
        f"\nwrote {args.json}, {plot_dir / 'scaling_rank.png'}, {plot_dir / 'scaling_document.png'} "
        f"in {result['wall_s']} s (load average {result['load_average'][0]} -> {result['load_average'][1]})"
    )
    return result


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
