"""Decode speed of the worker (ONNX Runtime) vs PyTorch eager on the real base model, side by side.

    .venv/bin/python bench/bench_worker_decode.py [--new-tokens 128] [--rounds 2] [--threads N]

Greedy decoding of a fixed number of new tokens (end-of-sequence is not allowed to stop it, so every run
decodes the same count) on a few chat prompts, for:

- torch_eager: Hugging Face `generate(do_sample=False, use_cache=True)`, float32;
- onnx_fp32: the worker's `OnnxDecoder` on the exported graph with every weight float32 (`pack_weights=False`);
- onnx: the worker's default decoder, no adapter (linears on the base model's GGUF grid run as exact 4-bit);
- onnx_hot_swap: the default decoder with a rank-8 q_proj,v_proj adapter fed as graph inputs;
- onnx_merged: a session with that adapter folded into q_proj and v_proj (those stay float32);
- onnx_int8_act: the opt-in fast decoder (`int8_activations=True`): the same 4-bit linears with int8-quantized
  activations (MatMulNBits accuracy_level 4). LOSSY, so its quality is measured too (below).

Runs are interleaved (each round runs every mode on every prompt, in a rotated order) so that load from
other processes on the machine hits all modes alike; the medians over runs are reported, with ratios to
torch_eager. Also: switching to an adapter already resident (`set_adapter`), building a merged session, and
the largest logit difference of each ONNX mode from PyTorch (+ the adapter) on one prompt.

Quality (`quality` in the JSON), base model, for torch_eager, onnx (exact) and onnx_int8_act on the same run:
perplexity teacher-forced over fixed text (the reading-comprehension passages of
`hypernet.d2l_data.rc_documents(default data dir, "heldout")`, then "train" passages in their fixed order until
--ppl-tokens scored tokens; each passage is one pass through `OnnxDecoder.logits`, every token after a
passage's first is scored), the fraction of those positions whose argmax equals torch's, the fraction of the
timed runs' greedy tokens identical to torch's (position by position) and the first position they diverge.
Writes bench/results/worker_decode.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from hypernet.d2l_data import rc_documents
from hypernet.sni_data import default_data_dir
from loracast import base_model
from loracast.lora import applied, inject, to_torch
from loracast.lora_spec import LoraSpec
from worker import model_cache
from worker.chat import ChatTokenizer
from worker.onnx_session import Adapter, OnnxDecoder

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Write a long, detailed essay about the history of the Roman Empire.",
    "Explain step by step how a compiler turns source code into machine code.",
    "Describe a week-long trip through Japan, day by day, with food and places to see.",
]
SPEC = LoraSpec(("q_proj", "v_proj"), r=8, alpha=16.0)
OTHER_SPEC = LoraSpec(("q_proj", "v_proj"), r=4, alpha=8.0)  # the adapter switched away from and back


class _Clock(BaseStreamer):
    """Records when `generate` hands out the prompt and each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timed(tokens: Iterator[int]) -> tuple[list[int], float, float]:
    """Drain a token stream: (tokens, seconds to the first token, seconds from the first token to the last)."""
    start = time.perf_counter()
    out, first = [], start
    for token in tokens:
        if not out:
            first = time.perf_counter()
        out.append(token)
    return out, first - start, time.perf_counter() - first


def _torch_run(model: PreTrainedModel, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    clock = _Clock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # masks end-of-sequence: every run decodes the same count
            do_sample=False,
            use_cache=True,
            streamer=clock,
        )
    end = time.perf_counter()
    # put() is called with the prompt, then with each new token.
    return out[0, len(prompt) :].tolist(), clock.times[1] - start, end - clock.times[1]


def _random_adapter(model: PreTrainedModel, spec: LoraSpec, seed: int) -> Adapter:
    """A random adapter of the usual magnitude (A ~ Kaiming-like, B small but nonzero), as numpy arrays."""
    rng = np.random.default_rng(seed)
    adapter = {}
    for i, layer in enumerate(model.model.layers):
        for module in spec.target_modules:
            lin = getattr(layer.self_attn, module)
            a = rng.standard_normal((spec.r, lin.in_features), dtype=np.float32) / np.float32(lin.in_features) ** 0.5
            b = rng.standard_normal((lin.out_features, spec.r), dtype=np.float32) * 0.02
            adapter[(i, module)] = (a, b)
    return adapter


def _max_logit_diff(decoder: OnnxDecoder, model: PreTrainedModel, ids: list[int], prefill: int) -> float:
    """Largest |logit| difference over every position: ONNX (prefill + cached steps) vs one PyTorch pass."""
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(decoder.logits(ids, prefill=prefill) - want).max())


def _ppl_texts(tokenizer: ChatTokenizer, min_tokens: int) -> tuple[list[list[int]], dict]:
    """Token ids of fixed passages (rc heldout, then rc train in order) until `min_tokens` are scored."""
    data = default_data_dir()
    if data is None:
        raise SystemExit("no data directory for the perplexity text: set $LORACAST_DATA (rc/*.json)")
    texts, parts, scored = [], {}, 0
    for part in ("heldout", "train"):
        for doc in rc_documents(data, part):
            if scored >= min_tokens:
                break
            ids = tokenizer.encode(doc.text)
            if len(ids) < 2:
                continue
            texts.append(ids)
            parts[part] = parts.get(part, 0) + 1
            scored += len(ids) - 1
    return texts, {"source": "rc passages (hypernet.d2l_data.rc_documents)", "passages": parts, "tokens": scored}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _teacher_forced(logits_of: Callable[[list[int]], np.ndarray], texts: list[list[int]]) -> tuple[float, np.ndarray]:
    """(perplexity, argmax at every scored position) of one model over the passages."""
    nll, argmax = [], []
    for ids in texts:
        logp = _log_softmax(logits_of(ids)[:-1])
        nll.append(-logp[np.arange(len(ids) - 1), ids[1:]])
        argmax.append(logp.argmax(-1))
    return float(np.exp(np.concatenate(nll).mean())), np.concatenate(argmax)


def _agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """Greedy tokens identical to the reference, position by position, and where each run first diverges."""
    same = [np.asarray(a) == np.asarray(b) for a, b in zip(got, want, strict=True)]
    first = [int(np.argmin(s)) if not s.all() else len(s) for s in same]
    return {"fraction": round(float(np.concatenate(same).mean()), 4), "first_divergence": first}


def _median_ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=base_model.DEFAULT_BASE, help="'smollm2' or a Hugging Face model directory")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="runs of every (mode, prompt) pair")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both frameworks")
    p.add_argument("--switch-repeats", type=int, default=50)
    p.add_argument("--ppl-tokens", type=int, default=6000, help="tokens scored for the perplexity (at least)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)
    base = base_model.load(args.base)
    model = base.model
    model_dir = model_cache.prepare(args.base)
    tokenizer = ChatTokenizer(model_dir)
    prompts = [tokenizer.encode_chat(text) for text in PROMPTS]

    start = time.perf_counter()
    decoder = OnnxDecoder(model_dir / model_cache.MODEL_FILE, intra_op_threads=args.threads)
    load_s = time.perf_counter() - start
    fp32 = OnnxDecoder(model_dir / model_cache.MODEL_FILE, intra_op_threads=args.threads, pack_weights=False)
    int8 = OnnxDecoder(model_dir / model_cache.MODEL_FILE, intra_op_threads=args.threads, int8_activations=True)
    adapter, other = _random_adapter(model, SPEC, 1), _random_adapter(model, OTHER_SPEC, 2)
    merge_s = []
    start = time.perf_counter()
    merged = decoder.merged(adapter, SPEC)
    merge_s.append(time.perf_counter() - start)

    def hot_swap(prompt: list[int], n: int) -> Iterator[int]:
        decoder.set_adapter(adapter, SPEC)
        try:
            return decoder.generate(prompt, n)  # keeps the adapter it started with
        finally:
            decoder.clear_adapter()

    modes: dict[str, Callable[[list[int], int], tuple[list[int], float, float]]] = {
        "torch_eager": lambda prompt, n: _torch_run(model, prompt, n),
        "onnx_fp32": lambda prompt, n: _timed(fp32.generate(prompt, n)),
        "onnx": lambda prompt, n: _timed(decoder.generate(prompt, n)),
        "onnx_hot_swap": lambda prompt, n: _timed(hot_swap(prompt, n)),
        "onnx_merged": lambda prompt, n: _timed(merged.generate(prompt, n)),
        "onnx_int8_act": lambda prompt, n: _timed(int8.generate(prompt, n)),
    }
    for run in modes.values():  # warm-up: first-run allocations are not what users wait for
        run(prompts[0], 4)

    names = list(modes)
    load_start = os.getloadavg()[0]
    ttft: dict[str, list[float]] = {name: [] for name in names}
    rate: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[list[int]]] = {name: [] for name in names}
    with tqdm(total=args.rounds * len(prompts) * len(names), desc="decode runs") as bar:
        for r in range(args.rounds):
            for j, prompt in enumerate(prompts):
                shift = (r * len(prompts) + j) % len(names)
                for name in names[shift:] + names[:shift]:
                    bar.set_postfix_str(name)
                    tokens, first, rest = modes[name](prompt, args.new_tokens)
                    ttft[name].append(first)
                    rate[name].append((len(tokens) - 1) / rest)
                    if r == 0:
                        outputs[name].append(tokens)
                    bar.update()
            start = time.perf_counter()
            decoder.merged(adapter, SPEC)
            merge_s.append(time.perf_counter() - start)

    # Switching between adapters already resident: what a request for another cached adapter waits for.
    switch = []
    for i in range(args.switch_repeats):
        a, spec = (other, OTHER_SPEC) if i % 2 else (adapter, SPEC)
        start = time.perf_counter()
        decoder.set_adapter(a, spec)
        switch.append(time.perf_counter() - start)
    decoder.clear_adapter()

    # Last, because inject() wraps the torch model's q_proj and v_proj (the timed torch runs use the plain model).
    ids, prefill = prompts[0] + outputs["torch_eager"][0][:3], len(prompts[0])
    pairs = (("onnx_fp32", fp32), ("onnx", decoder), ("onnx_int8_act", int8))
    logit_diff = {name: _max_logit_diff(d, model, ids, prefill) for name, d in pairs}
    with applied(inject(model, SPEC), to_torch(adapter)):
        logit_diff["onnx_merged"] = _max_logit_diff(merged, model, ids, prefill)
        decoder.set_adapter(adapter, SPEC)
        logit_diff["onnx_hot_swap"] = _max_logit_diff(decoder, model, ids, prefill)
        decoder.clear_adapter()

    # Quality of the lossy fast mode beside the exact decoder and PyTorch, on the same text (base model).
    texts, ppl_source = _ppl_texts(tokenizer, args.ppl_tokens)

    def torch_logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    ppl, top1 = {}, {}
    for name, logits_of in (("torch_eager", torch_logits), ("onnx", decoder.logits), ("onnx_int8_act", int8.logits)):
        ppl[name], top1[name] = _teacher_forced(logits_of, tqdm(texts, desc=f"perplexity {name}", leave=False))
    quality = {
        "perplexity_text": ppl_source,
        "perplexity": {name: round(v, 4) for name, v in ppl.items()},
        "perplexity_vs_torch": {name: round(v / ppl["torch_eager"] - 1, 5) for name, v in ppl.items()},
        "teacher_forced_top1_same_as_torch": {
            name: round(float((top1[name] == top1["torch_eager"]).mean()), 4) for name in ("onnx", "onnx_int8_act")
        },
        "greedy_tokens_same_as_torch": {
            name: _agreement(outputs[name], outputs["torch_eager"]) for name in ("onnx", "onnx_int8_act")
        },
        "greedy_tokens_int8_act_same_as_onnx": _agreement(outputs["onnx_int8_act"], outputs["onnx"]),
        "max_logit_diff_vs_torch": {name: float(f"{logit_diff[name]:.1e}") for name in ("onnx", "onnx_int8_act")},
    }

    tokens_per_s = {name: round(statistics.median(rate[name]), 1) for name in names}
    torch_rate = tokens_per_s["torch_eager"]
    onnx_vs_torch = round(tokens_per_s["onnx"] / torch_rate, 2)
    result = {
        # The headline: the worker's default decoder vs PyTorch eager, decode tokens/s, medians of interleaved runs.
        "onnx_vs_torch_decode": onnx_vs_torch,
        "base": args.base,
        "new_tokens": args.new_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "rounds": args.rounds,
        "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": args.threads},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        # 1-minute load average at the start and the end of the timed runs: other processes share the machine.
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "decode_tokens_per_s": tokens_per_s,
        "decode_tokens_per_s_runs": {name: [round(x, 1) for x in rate[name]] for name in names},
        "time_to_first_token_ms": {name: _median_ms(ttft[name]) for name in names},
        "ratio_vs_torch_decode": {name: round(tokens_per_s[name] / torch_rate, 2) for name in names},
        "adapter_switch_ms": {"median": _median_ms(switch), "max": round(1000 * max(switch), 2)},
        "merged_session_build_s": round(statistics.median(merge_s), 2),
        "decoder_load_s": round(load_s, 2),
        "packed_linears": len(decoder.packed),
        "max_logit_diff_vs_torch": {name: float(f"{d:.1e}") for name, d in logit_diff.items()},
        "same_tokens_as_torch": {
            name: [a == b for a, b in zip(outputs[name], outputs["torch_eager"], strict=True)]
            for name in ("onnx_fp32", "onnx", "onnx_int8_act")
        },
        "quality": quality,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "worker_decode.json").write_text(json.dumps(result, indent=2))

    headline = (
        f"onnx_vs_torch_decode = {onnx_vs_torch}x  (onnx {tokens_per_s['onnx']} vs torch eager {torch_rate} "
        f"decode tokens/s; load average {result['load_average'][0]} -> {result['load_average'][1]})"
    )
    print(f"\n{headline}")
    print(
        f"\n{args.new_tokens} new tokens, greedy, {args.threads} threads for torch and ONNX Runtime "
        f"({os.cpu_count()} CPUs), medians of {args.rounds * len(prompts)} runs per mode\n"
    )
    print("| mode | decode tokens/s | x torch eager | first token ms | max logit diff vs torch |")
    print("|---|---|---|---|---|")
    for name in names:
        diff = result["max_logit_diff_vs_torch"].get(name, "-")
        print(
            f"| {name} | {tokens_per_s[name]} | {result['ratio_vs_torch_decode'][name]} | "
            f"{result['time_to_first_token_ms'][name]} | {diff} |"
        )
    print(
        f"\nadapter switch (resident): median {result['adapter_switch_ms']['median']} ms; "
        f"merged session build: {result['merged_session_build_s']} s; decoder load: {result['decoder_load_s']} s; "
        f"{len(decoder.packed)} linears run as exact 4-bit"
    )
    print(f"same greedy tokens as torch: {result['same_tokens_as_torch']}")
    print(
        f"\nquality, base model: perplexity over {ppl_source['tokens']} tokens of {ppl_source['source']} "
        f"{ppl_source['passages']}; greedy tokens from the timed runs ({len(prompts)} prompts x {args.new_tokens})\n"
    )
    print("| mode | perplexity | vs torch | teacher-forced top-1 = torch | greedy tokens = torch | first divergence |")
    print("|---|---|---|---|---|---|")
    for name in ("torch_eager", "onnx", "onnx_int8_act"):
        greedy = quality["greedy_tokens_same_as_torch"].get(name, {"fraction": 1.0, "first_divergence": "-"})
        print(
            f"| {name} | {quality['perplexity'][name]} | {quality['perplexity_vs_torch'][name]:+.3%} | "
            f"{quality['teacher_forced_top1_same_as_torch'].get(name, 1.0)} | {greedy['fraction']} | "
            f"{greedy['first_divergence']} |"
        )
    print(f"\n{headline}")


if __name__ == "__main__":
    main()
