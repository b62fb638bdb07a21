"""Answering questions about one document: its Doc-to-LoRA adapter vs the document in the prompt, side by side.

    nice -n 5 .venv/bin/python bench/bench_d2l_answering.py [--tokens 2048] [--questions 100]

One held-out fictional document of ~`tokens` tokens (a composite of generated profiles, never trained on) and
`questions` questions about it (its own, cycled when more are asked for). Each side runs in its own process, so
its peak memory is its own, on the worker's engine (ONNX Runtime, `OnnxDecoder`, the real base model):

- adapter: the coordinator's process internalizes the document (D2L, PyTorch) and writes the adapter; the worker's
  process reads it, hot-swaps it into its base session (the graph's `down_proj` LoRA inputs), and answers each
  question with the question alone in the prompt;
- in_context: the worker's process answers each question with the document before it in the prompt (the
  reference a user would otherwise pick), on the plain base model.

Every answer decodes exactly `new_tokens` tokens (end-of-sequence cannot stop it): equal work per answer, so
the sides differ only in the prompt. Cumulative latency for the first N questions counts, for the adapter, the
internalization, reading the adapter and applying it (both sides build the same base session first, untimed).
Peak memory is the worker process's resident set (sampled every 2 ms) while answering, and over its whole life;
the internalizing process's peak is reported beside it (it runs on the coordinator, not the edge). Ratios above
1 favour the adapter. Writes bench/results/d2l_answering.json, a markdown table and
bench/results/d2l_answering.png (cumulative latency against N).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PeakRss, rss_mb, the_document

from loracast.plots import figure

RESULTS = Path(__file__).resolve().parent / "results"
MILESTONES = (1, 10, 100)


def lifetime_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def role_internalize(args: argparse.Namespace) -> dict:
    """The coordinator's side: D2L turns the document into an adapter directory."""
    from hypernet.makers import DocToLoRAMaker
    from loracast import base_model

    text, _ = the_document(args.tokens, 1)
    base = base_model.load()
    maker = DocToLoRAMaker(Path(args.checkpoint), base)
    t0 = time.perf_counter()
    maker.save(text, Path(args.adapter))
    return {"internalize_s": time.perf_counter() - t0, "process_peak_mb": lifetime_peak_mb()}


def role_answer(args: argparse.Namespace) -> dict:
    """The worker's side: answer every question, with the adapter hot-swapped or with the document in the prompt."""
    from hypernet.sni_data import user_turn
    from loracast import adapter_format
    from worker import onnx_io
    from worker.chat import ChatTokenizer
    from worker.model_cache import MODEL_FILE, graph_metadata, prepare
    from worker.onnx_session import OnnxDecoder

    text, questions = the_document(args.tokens, args.questions)
    model_dir = prepare("smollm2")
    tok = ChatTokenizer(model_dir)
    setup_s = 0.0
    model = model_dir / MODEL_FILE
    decoder = OnnxDecoder(model)
    if args.role == "adapter":
        t0 = time.perf_counter()
        fingerprint = graph_metadata(model)[onnx_io.META_FINGERPRINT]
        adapter, spec, _ = adapter_format.load(Path(args.adapter), expected_fingerprint=fingerprint)
        decoder.set_adapter(adapter, spec)
        setup_s = time.perf_counter() - t0
    prompts = [tok.encode_chat(q if args.role == "adapter" else user_turn(q, text)) for q in questions]
    before_mb = rss_mb()
    latency, first = [], []
    with PeakRss() as peak:
        for ids in prompts:
            t0 = time.perf_counter()
            stream = decoder.generate(ids, args.new_tokens)
            next(stream)
            first.append(time.perf_counter() - t0)
            for _ in stream:
                pass
            latency.append(time.perf_counter() - t0)
    return {
        "setup_s": setup_s,
        "prompt_tokens_median": statistics.median(len(p) for p in prompts),
        "latency_s": latency,
        "first_token_s": first,
        "rss_before_answering_mb": before_mb,
        "answering_peak_mb": peak.peak / 2**20,
        "process_peak_mb": lifetime_peak_mb(),
    }


def run_role(role: str, args: argparse.Namespace, adapter: Path) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--adapter", str(adapter), "--checkpoint", args.checkpoint]
    cmd += ["--tokens", str(args.tokens), "--questions", str(args.questions), "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {role} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(internal: dict, adapter: dict, context: dict) -> dict:
    """Cumulative latency at each N, time to first token, memory, and where the curves cross."""
    fixed = internal["internalize_s"] + adapter["setup_s"]
    n = len(adapter["latency_s"])
    cum_adapter = [fixed + sum(adapter["latency_s"][:i]) for i in range(1, n + 1)]
    cum_context = [sum(context["latency_s"][:i]) for i in range(1, n + 1)]
    crossing = next((i + 1 for i in range(n) if cum_adapter[i] < cum_context[i]), None)
    at = {
        str(m): {
            "adapter_s": round(cum_adapter[m - 1], 2),
            "in_context_s": round(cum_context[m - 1], 2),
            "ratio": round(cum_context[m - 1] / cum_adapter[m - 1], 2),
        }
        for m in MILESTONES
        if m <= n
    }
    sides = {"adapter": adapter, "in_context": context}
    per_q = {side: round(statistics.median(r["latency_s"]), 3) for side, r in sides.items()}
    ttft = {side: round(statistics.median(r["first_token_s"]), 3) for side, r in sides.items()}
    return {
        "cumulative": at,
        "adapter_faster_from_question": crossing,
        "per_question_s_median": per_q,
        "first_token_s_median": ttft,
        "answering_peak_mb": {
            "adapter": round(adapter["answering_peak_mb"], 1),
            "in_context": round(context["answering_peak_mb"], 1),
        },
        "curves": {"adapter_s": cum_adapter, "in_context_s": cum_context},
    }


def plot(result: dict, path: Path) -> None:
    curves = result["comparison"]["curves"]
    n = range(1, len(curves["adapter_s"]) + 1)
    with figure(path, figsize=(6, 4)) as ax:
        ax.plot(n, curves["in_context_s"], label="document in the prompt")
        ax.plot(n, curves["adapter_s"], label="D2L adapter (incl. internalize + apply)")
        ax.set_xlabel("questions asked about the document")
        ax.set_ylabel("cumulative seconds")
        ax.set_title(f"~{result['document_tokens']}-token document, {result['new_tokens']} tokens per answer")
        ax.legend()


def table(result: dict) -> str:
    c, internal = result["comparison"], result["internalize"]
    rows = ["| questions | adapter (s) | in context (s) | in context / adapter |", "|---|---|---|---|"]
    rows += [f"| {n} | {v['adapter_s']} | {v['in_context_s']} | {v['ratio']}x |" for n, v in c["cumulative"].items()]
    mem = c["answering_peak_mb"]
    rows += [
        "",
        f"Per question (median): adapter {c['per_question_s_median']['adapter']} s, in context "
        f"{c['per_question_s_median']['in_context']} s; first token {c['first_token_s_median']['adapter']} s vs "
        f"{c['first_token_s_median']['in_context']} s. Adapter cheaper in total from question "
        f"{c['adapter_faster_from_question']} on.",
        f"Worker peak memory while answering: adapter {mem['adapter']} MB, in context {mem['in_context']} MB "
        f"({mem['in_context'] / mem['adapter']:.2f}x). Internalizing (coordinator): {internal['internalize_s']:.2f} s, "
        f"process peak {internal['process_peak_mb']:.0f} MB.",
    ]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="document length")
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=24, help="tokens decoded per answer")
    p.add_argument("--checkpoint", default=None, help="D2L checkpoint (default: shipped)")
    p.add_argument("--json", default=str(RESULTS / "d2l_answering.json"))
    p.add_argument("--role", choices=["internalize", "adapter", "in_context"], help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.checkpoint is None:
        from hypernet.checkpoint import DEFAULT_D2L

        args.checkpoint = str(DEFAULT_D2L)
    if args.role:
        out = role_internalize(args) if args.role == "internalize" else role_answer(args)
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        internal = run_role("internalize", args, adapter)
        sides = {role: run_role(role, args, adapter) for role in ("adapter", "in_context")}
    result = {
        "command": "python bench/bench_d2l_answering.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "document_tokens": args.tokens,
        "questions": args.questions,
        "new_tokens": args.new_tokens,
        "internalize": internal,
        "sides": sides,
    }
    result["comparison"] = compare(internal, sides["adapter"], sides["in_context"])
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
