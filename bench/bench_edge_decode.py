"""Edge decode against its limit: memory bandwidth, weight bytes read per token, and where the worker's time goes.

    .venv/bin/pip install -e '.[bench]'   # llama-cpp-python (see bench_worker_decode.py)
    .venv/bin/python bench/bench_edge_decode.py [--threads 2] [--new-tokens 128] [--rounds 3] [--no-llamacpp]
                                                [--genai-model DIR] [--profile-tokens 128] [--quiet-wait S]
                                                [--json PATH]

Decoding one token reads every weight of the model once (the embedding table: one row), so a decoder whose weights
do not fit in cache can go no faster than bandwidth / bytes per token. This measures, in one run:

- the machine's read bandwidth (bench_memory_bandwidth.py in a child process, at the engines' thread count, over
  arrays far above the last-level cache), before and after the decode runs;
- for each engine, the bytes it reads per generated token: weights counted from what it runs, each tensor once
  (every initializer a node of the worker's packed graph reads, the embedding gather one row; every tensor of the
  GGUF by its type, the tied token_embd once for the LM head and one row for the lookup), plus the KV cache at the
  runs' mean context (float32 in the worker, float16 in llama.cpp);
- each engine's decode tokens/s, runs interleaved as in bench_worker_decode.py (same prompts, same threads, greedy,
  `--new-tokens` every run), and tokens/s x bytes/token / bandwidth: the fraction of the limit it reaches;
- where the worker's time per token goes: ONNX Runtime's own profiler on the default decoder over
  `--profile-tokens` decode steps, kernel time by category (the layers' MatMulNBits, the LM head, the Q4_1 offset
  Gemms and their block sums, the rank-0 LoRA Gemms, attention, rotary, norms, ...), ONNX Runtime's time between
  kernels (`session run - kernels`) and Python between steps (`wall per token - session run`).

Engines: onnx (the worker's default `OnnxDecoder`), onnx_int8_act (its opt-in int8-activation mode), llamacpp
(llama-cpp-python on the base model's GGUF, --no-llamacpp leaves it out) and, with --genai-model DIR, genai: an
onnxruntime-genai model folder (its model builder's output; `og.Generator`, greedy).

The machine is shared: every run records the CPU time the rest of the machine used meanwhile (/proc/stat minus this
process; `others_cpus`), --quiet-wait S waits before each run (at most S seconds) for un-niced processes to go quiet,
and the report gives medians and bests. Writes bench/results/edge_decode.json (or --json
PATH) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from common import (
    PROMPTS,
    extra_buffer_types_work,
    gguf_path,
    import_llama_cpp,
    llamacpp_stream,
    without_extra_buffer_types,
)
from tqdm import tqdm

from loracast import base_model
from loracast.paths import write_json
from worker import model_cache, onnx_io
from worker.chat import ChatTokenizer
from worker.onnx_session import OnnxDecoder
from worker.weight_packing import EXACT_ACCURACY, INT8_ACCURACY, MS_DOMAIN, pack_linears

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
DEFAULT_JSON = RESULTS / "edge_decode.json"
GATHERS = ("Gather", "GatherBlockQuantized")  # a lookup reads one row of its table per token

# The worker's variants: OnnxDecoder keyword arguments.
WORKER_MODES: dict[str, dict] = {
    "onnx": {},
    "onnx_int8_act": {"int8_activations": True},
}


def measure_bandwidth(sizes_mb: list[int], threads: int, repeats: int) -> dict:
    """bench_memory_bandwidth.py's result for these array sizes at `threads` threads, run in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bandwidth.json"
        sizes = ",".join(map(str, sizes_mb))
        command = [sys.executable, str(BENCH / "bench_memory_bandwidth.py"), "--sizes-mb", sizes, "--threads"]
        subprocess.run([*command, str(threads), "--repeats", str(repeats), "--json", str(out)], check=True)
        return json.loads(out.read_text())


# -- bytes per token -------------------------------------------------------------------------------------------


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _lm_head_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes that compute the logits from the final hidden state: those between the last
    normalization and the logits output (the LM head's matmuls, their offset term and their sum)."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    logits = next(o.name for o in graph.output if o.name in (onnx_io.LOGITS, "logits"))
    found, todo = set(), [logits]
    while todo:
        name = todo.pop()
        i = producers.get(name)
        if i is None or i in found or "LayerNormalization" in graph.node[i].op_type:
            continue
        found.add(i)
        node = graph.node[i]
        todo += list(node.input[:1] if node.op_type == "Reshape" else node.input)  # not the shape's computation
    return found


def graph_read_bytes(graph: onnx.GraphProto) -> dict[str, int]:
    """Bytes of initializers one decode step reads, by part: lm_head, embedding (one row of each table only a
    lookup reads), layers (everything else). Each initializer counts once, however many nodes read it; a Reshape of
    one is a view (folded at load), and GroupQueryAttention's rotary tables are looked up like an embedding."""
    weights = {t.name: t for t in graph.initializer}
    head = _lm_head_nodes(graph)
    full: dict[str, str] = {}  # initializer -> part, for those some node reads whole
    rows: set[str] = set()  # initializers only looked up
    for i, node in enumerate(graph.node):
        for j, name in enumerate(node.input):
            if name not in weights or node.op_type == "Reshape":
                continue
            lookup = node.op_type in GATHERS and (j == 0 or (node.op_type == "GatherBlockQuantized" and j != 1))
            if lookup or (node.op_type == "GroupQueryAttention" and j in (7, 8)):  # cos_cache, sin_cache
                rows.add(name)
            elif name not in full:
                full[name] = "lm_head" if i in head else "layers"
    parts: dict[str, int] = collections.Counter()
    for name, part in full.items():
        parts[part] += _tensor_bytes(weights[name])
    for name in rows - full.keys():
        parts["embedding"] += _tensor_bytes(weights[name]) // max(weights[name].dims[0], 1)
    return dict(parts)


def packed_graph(path: Path, cache: dict, int8_activations: bool = False) -> onnx.ModelProto:
    """The graph `OnnxDecoder(path, packing_cache=cache, int8_activations=...)` runs on the CPU."""
    model = onnx.load(str(path))
    pack_linears(model.graph, cache, frozenset(), INT8_ACCURACY if int8_activations else EXACT_ACCURACY)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return model


def gguf_read_bytes(path: Path) -> tuple[dict[str, int], dict]:
    """Bytes of the GGUF's tensors one llama.cpp decode step reads, by part, and the tensor types by count."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    parts: dict[str, int] = collections.Counter()
    types: dict[str, int] = collections.Counter()
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        size = int(t.n_bytes)
        if t.name == "token_embd.weight":
            rows = int(t.shape[-1])
            parts["embedding"] += size // rows
            if "output.weight" not in names:  # tied: the LM head reads the whole table
                parts["lm_head"] += size
        elif t.name == "output.weight":
            parts["lm_head"] += size
        else:
            parts["layers"] += size
    return dict(parts), dict(types)


def kv_read_bytes(layers: int, kv_heads: int, head_dim: int, context: float, itemsize: int) -> int:
    """Bytes of K and V one decode step reads at this context length."""
    return int(2 * layers * kv_heads * head_dim * context * itemsize)


# -- timing ----------------------------------------------------------------------------------------------------


def _busy_jiffies() -> int:
    """CPU time of the whole machine so far (every CPU; not idle or iowait), in clock ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def _unniced_jiffies() -> int:
    """CPU time of processes at nice 0 or below so far (/proc/stat's user column), in clock ticks."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[1])


def wait_for_quiet(timeout_s: float, window_s: float = 0.5, cpus: float = 0.25) -> float:
    """Wait until un-niced processes used less than `cpus` CPUs over the last `window_s` (at most `timeout_s`);
    returns the seconds waited. This benchmark runs niced: a run that overlaps someone's timed work measures that."""
    tick, start = os.sysconf("SC_CLK_TCK"), time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        before = _unniced_jiffies()
        time.sleep(window_s)
        if (_unniced_jiffies() - before) / tick / window_s < cpus:
            break
    return time.perf_counter() - start


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_run(tokens: Iterator[int]) -> dict:
    """Drain a token stream: tokens, seconds to the first one, seconds after it (wall, and this process's CPU time),
    and the CPUs others used meanwhile."""
    tick = os.sysconf("SC_CLK_TCK")
    busy, own = _busy_jiffies(), _own_cpu_s()
    start = time.perf_counter()
    out, first, own_first = [], start, own
    for token in tokens:
        if not out:
            first, own_first = time.perf_counter(), _own_cpu_s()
        out.append(token)
    end, own_end = time.perf_counter(), _own_cpu_s()
    others = (_busy_jiffies() - busy) / tick - (own_end - own)
    return {
        "tokens": out,
        "first_s": first - start,
        "rest_s": end - first,
        "rest_cpu_s": own_end - own_first,
        "others_cpus": others / (end - start),
    }


# -- profile ---------------------------------------------------------------------------------------------------


def _category(node: onnx.NodeProto, lm_head: bool, weights: set[str]) -> str:
    op = node.op_type
    if lm_head:
        return "lm_head"
    if op == "MatMulNBits":
        return "layers: MatMulNBits"
    if op == "Gemm":
        if node.name.endswith(".offset") or node.output[0].endswith(".offset"):
            return "layers: Q4_1 offset Gemm"
        if any(name.startswith("lora.") or name.endswith(".A") for name in node.input) or node.input[1] not in weights:
            return "layers: LoRA Gemm (rank 0)"
        return "layers: float32 Gemm"
    if op == "ReduceSum" and node.output[0].endswith(".block_sums"):
        return "layers: Q4_1 block sums"
    if op in ("GroupQueryAttention", "Attention", "MultiHeadAttention"):
        return "attention"
    return {
        "RotaryEmbedding": "rotary",
        "SkipSimplifiedLayerNormalization": "norms",
        "SimplifiedLayerNormalization": "norms",
        "Split": "split (q/k/v, gate/up)",
        "Sigmoid": "SiLU",
        "Mul": "SiLU",
        "QuickGelu": "SiLU",
        "Reshape": "reshape",
        "Gather": "embedding",
    }.get(op, "other")


def profile_worker(decoder: OnnxDecoder, model: onnx.ModelProto, prompt: list[int], steps: int, threads: int) -> dict:
    """ONNX Runtime's profile of `steps` decode steps on `model` (the decoder's packed graph), by category."""
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    weights = {t.name for t in model.graph.initializer}
    head = _lm_head_nodes(model.graph)
    categories = {node.name: _category(node, i in head, weights) for i, node in enumerate(model.graph.node)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = decoder.session
        decoder.session = ort.InferenceSession(model.SerializeToString(), options, providers=decoder.providers)
        try:
            list(decoder.generate(prompt, 4))  # warm-up
            gaps = []
            stream = decoder.generate(prompt, steps + 1)
            next(stream)
            last = time.perf_counter()
            for _ in stream:
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
            events = json.loads(Path(decoder.session.end_profiling()).read_text())
        finally:
            decoder.session = session
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-steps:]
    start = runs[0]["ts"]
    kernels: dict[str, float] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        kernels[categories.get(name, f"fused: {op}")] += e["dur"]
        by_op[op] += e["dur"]
    run_ms = sum(r["dur"] for r in runs) / len(runs) / 1e3
    wall_ms = 1e3 * sum(gaps) / len(gaps)
    kernel_ms = {k: round(v / len(runs) / 1e3, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])}
    per_token = {
        **kernel_ms,
        "onnxruntime between kernels": round(run_ms - sum(kernel_ms.values()), 3),
        "python between steps": round(wall_ms - run_ms, 3),
    }
    return {
        "steps": len(runs),
        "wall_ms_per_token": round(wall_ms, 3),
        "session_run_ms_per_token": round(run_ms, 3),
        "ms_per_token": per_token,
        "share": {k: round(v / wall_ms, 4) for k, v in per_token.items()},
        "kernel_ms_per_token_by_op": {k: round(v / len(runs) / 1e3, 3) for k, v in by_op.most_common()},
    }


# -- engines ---------------------------------------------------------------------------------------------------


def _genai_stream(og, model, prompt: list[int], n: int) -> Iterator[int]:
    """Exactly `n` greedy tokens from onnxruntime-genai (end-of-sequence cannot stop it: min_length)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n, min_length=len(prompt) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    for _ in range(n):
        generator.generate_next_token()
        yield int(generator.get_next_tokens()[0])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every engine")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="runs of every (engine, prompt) pair")
    p.add_argument("--modes", default=",".join(WORKER_MODES), help="worker modes, comma separated")
    p.add_argument("--profile-tokens", type=int, default=128, help="decode steps profiled (0: no profile)")
    p.add_argument("--bandwidth-mb", default="256,512", help="array sizes (MB) of the bandwidth measurement")
    p.add_argument("--genai-model", type=Path, help="an onnxruntime-genai model folder to run beside the others")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for un-niced processes to go quiet (a shared machine)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return p


def run(args: argparse.Namespace) -> dict:
    llama_cpp = None if args.no_llamacpp else import_llama_cpp()
    ort.set_default_logger_severity(3)
    sizes = [int(x) for x in args.bandwidth_mb.split(",")]
    bandwidth_before = measure_bandwidth(sizes, args.threads, 20)

    model_dir = model_cache.prepare(base_model.DEFAULT_BASE)
    path = model_dir / model_cache.MODEL_FILE
    tokenizer = ChatTokenizer(model_dir)
    prompts = [tokenizer.encode_chat(text) for text in PROMPTS]
    cache: dict = {}
    decoders, graph_bytes = {}, {}
    for name in args.modes.split(","):
        kwargs = WORKER_MODES[name]
        decoders[name] = OnnxDecoder(path, intra_op_threads=args.threads, packing_cache=cache, **kwargs)
        graph_bytes[name] = graph_read_bytes(packed_graph(path, cache, **kwargs).graph)
    first = next(iter(decoders.values()))
    layers, (kv_heads, head_dim) = first.num_layers, first._kv_shape
    mean_context = statistics.mean(len(p) for p in prompts) + args.new_tokens / 2

    engines: dict[str, Callable[[list[int], int], Iterator[int]]] = {
        name: decoder.generate for name, decoder in decoders.items()
    }
    read = {
        name: {**parts, "kv_cache": kv_read_bytes(layers, kv_heads, head_dim, mean_context, 4)}
        for name, parts in graph_bytes.items()
    }
    info: dict = {}
    if llama_cpp is not None:
        extra, why = extra_buffer_types_work(args.threads, max(prompts, key=len))
        with contextlib.nullcontext() if extra else without_extra_buffer_types(llama_cpp):
            llm = llama_cpp.Llama(
                model_path=str(gguf_path()),
                n_ctx=max(len(p) for p in prompts) + args.new_tokens + 16,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                logits_all=False,
                verbose=False,
            )
        engines["llamacpp"] = lambda prompt, n: llamacpp_stream(llm, prompt, n)
        parts, types = gguf_read_bytes(gguf_path())
        read["llamacpp"] = {**parts, "kv_cache": kv_read_bytes(layers, kv_heads, head_dim, mean_context, 2)}
        info["llamacpp"] = {
            "version": llama_cpp.__version__,
            "gguf": base_model.GGUF_FILE,
            "tensor_types": types,
            "extra_buffer_types": extra,
            "extra_buffer_types_why": why,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }
    if args.genai_model is not None:
        import onnxruntime_genai as og

        config = og.Config(str(args.genai_model))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
        genai = og.Model(config)
        engines["genai"] = lambda prompt, n: _genai_stream(og, genai, prompt, n)
        genai_config = json.loads((args.genai_model / "genai_config.json").read_text())
        genai_file = args.genai_model / genai_config["model"]["decoder"]["filename"]
        read["genai"] = {
            **graph_read_bytes(onnx.load(str(genai_file)).graph),
            "kv_cache": kv_read_bytes(layers, kv_heads, head_dim, mean_context, 4),
        }
        info["genai"] = {"version": og.__version__, "model": str(args.genai_model), "file": genai_file.name}

    for engine in engines.values():  # warm-up
        list(engine(prompts[0], 4))
    names = list(engines)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tqdm(total=args.rounds * len(prompts) * len(names), desc="decode runs") as bar:
        for r in range(args.rounds):
            for j, prompt in enumerate(prompts):
                shift = (r * len(prompts) + j) % len(names)
                for name in names[shift:] + names[:shift]:
                    bar.set_postfix_str(name)
                    waited = wait_for_quiet(args.quiet_wait) if args.quiet_wait else 0.0
                    result = timed_run(engines[name](prompt, args.new_tokens))
                    result["waited_s"] = waited
                    if len(result["tokens"]) != args.new_tokens:
                        raise RuntimeError(f"{name} decoded {len(result['tokens'])} tokens, not {args.new_tokens}")
                    runs[name].append(result)
                    bar.update()

    profile = None
    if args.profile_tokens and "onnx" in decoders:
        model = packed_graph(path, cache, **WORKER_MODES["onnx"])
        profile = profile_worker(decoders["onnx"], model, prompts[0], args.profile_tokens, args.threads)
    bandwidth_after = measure_bandwidth(sizes, args.threads, 20)
    limit = max(bandwidth_before["limit_gb_s"], bandwidth_after["limit_gb_s"])

    rate = {name: [(args.new_tokens - 1) / r["rest_s"] for r in runs[name]] for name in names}
    # Per CPU second of this process: with one thread (no spinning pool), what the engine does when it has the CPU,
    # whatever others take meanwhile; with more threads, spinning waits count too and this means little.
    cpu_rate = {name: [(args.new_tokens - 1) / r["rest_cpu_s"] for r in runs[name]] for name in names}
    per_cpu = {name: round(statistics.median(v), 1) for name, v in cpu_rate.items()}
    median = {name: round(statistics.median(v), 1) for name, v in rate.items()}
    best = {name: round(max(v), 1) for name, v in rate.items()}
    total = {name: sum(parts.values()) for name, parts in read.items()}
    bound = {name: round(limit * 1e9 / total[name], 1) for name in names}
    reference = "llamacpp" if "llamacpp" in names else None
    result = {
        "bandwidth_limit_gb_s": limit,
        "bandwidth_gb_s": {"before": bandwidth_before["gb_s"], "after": bandwidth_after["gb_s"]},
        "read_bytes_per_token": {name: {**read[name], "total": total[name]} for name in names},
        "read_mb_per_token": {name: round(total[name] / 1e6, 1) for name in names},
        "decode_tokens_per_s": median,
        "decode_tokens_per_s_best": best,
        "bandwidth_bound_tokens_per_s": bound,
        "fraction_of_bandwidth_limit": {name: round(median[name] / bound[name], 3) for name in names},
        "fraction_of_bandwidth_limit_best": {name: round(best[name] / bound[name], 3) for name in names},
        "ratio_vs_llamacpp_decode": (
            {name: round(median[name] / median[reference], 2) for name in names} if reference else None
        ),
        "ratio_vs_llamacpp_decode_best": (
            {name: round(best[name] / best[reference], 2) for name in names} if reference else None
        ),
        "decode_tokens_per_cpu_s": per_cpu,
        "fraction_of_bandwidth_limit_per_cpu_s": {name: round(per_cpu[name] / bound[name], 3) for name in names},
        "ratio_vs_llamacpp_decode_per_cpu_s": (
            {name: round(per_cpu[name] / per_cpu[reference], 2) for name in names} if reference else None
        ),
        "decode_tokens_per_s_runs": {name: [round(x, 1) for x in v] for name, v in rate.items()},
        "decode_tokens_per_cpu_s_runs": {name: [round(x, 1) for x in v] for name, v in cpu_rate.items()},
        "others_cpus_runs": {name: [round(r["others_cpus"], 2) for r in runs[name]] for name in names},
        "time_to_first_token_ms": {
            name: round(1e3 * statistics.median(r["first_s"] for r in runs[name]), 2) for name in names
        },
        "worker_profile": profile,
        "mean_context_tokens": mean_context,
        "kv_cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "prompt_tokens": [len(p) for p in prompts],
        "engines": info,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "last_level_cache_bytes": bandwidth_before["last_level_cache_bytes"],
        },
        "load_average": round(os.getloadavg()[0], 2),
        "versions": {"onnxruntime": ort.__version__, "python": sys.version.split()[0]},
    }
    write_json(result, Path(args.json))
    return result


def print_report(result: dict) -> None:
    limit = result["bandwidth_limit_gb_s"]
    print(f"\nread bandwidth limit {limit} GB/s, {result['threads']} threads, load average {result['load_average']}\n")
    print("| engine | MB read / token | bound tok/s | tok/s | of limit | x llama.cpp | best tok/s | of limit |")
    print("|---|---|---|---|---|---|---|---|")
    versus = result["ratio_vs_llamacpp_decode"] or {}
    for name, mb in result["read_mb_per_token"].items():
        print(
            f"| {name} | {mb} | {result['bandwidth_bound_tokens_per_s'][name]} | "
            f"{result['decode_tokens_per_s'][name]} | {result['fraction_of_bandwidth_limit'][name]:.0%} | "
            f"{versus.get(name, '-')} | {result['decode_tokens_per_s_best'][name]} | "
            f"{result['fraction_of_bandwidth_limit_best'][name]:.0%} |"
        )
    print("\n| engine | " + " | ".join(("embedding", "layers", "lm_head", "kv_cache")) + " (MB) |")
    print("|---|---|---|---|---|")
    for name, parts in result["read_bytes_per_token"].items():
        cells = " | ".join(f"{parts.get(k, 0) / 1e6:.2f}" for k in ("embedding", "layers", "lm_head", "kv_cache"))
        print(f"| {name} | {cells} |")
    print("\n| engine | tok/s per CPU second (median) | of limit | x llama.cpp |")
    print("|---|---|---|---|")
    versus_cpu = result["ratio_vs_llamacpp_decode_per_cpu_s"] or {}
    for name, rate in result["decode_tokens_per_cpu_s"].items():
        print(
            f"| {name} | {rate} | {result['fraction_of_bandwidth_limit_per_cpu_s'][name]:.0%} | "
            f"{versus_cpu.get(name, '-')} |"
        )
    profile = result["worker_profile"]
    if profile:
        print(
            f"\nworker profile: {profile['wall_ms_per_token']} ms per token wall, "
            f"{profile['session_run_ms_per_token']} ms in the session run\n"
        )
        print("| where | ms / token | share |")
        print("|---|---|---|")
        for k, v in profile["ms_per_token"].items():
            print(f"| {k} | {v} | {profile['share'][k]:.1%} |")


def main() -> None:
    args = build_parser().parse_args()
    result = run(args)
    print_report(result)


if __name__ == "__main__":
    main()
