"""Decode speed of the worker (ONNX Runtime) vs PyTorch eager vs llama.cpp on the real base model, side by side.

    .venv/bin/pip install -e '.[bench]'   # llama-cpp-python, built from source for this CPU (minutes)
    .venv/bin/python bench/bench_worker_decode.py [--new-tokens 128] [--rounds 2] [--threads N] [--json PATH]
                                                  [--no-llamacpp]

Greedy decoding of a fixed number of new tokens (end-of-sequence is not allowed to stop it, so every run
decodes the same count) on a few chat prompts, for:

- torch_eager: Hugging Face `generate(do_sample=False, use_cache=True)`, float32;
- onnx_fp32: the worker's `OnnxDecoder` on the exported graph with every weight float32 (`pack_weights=False`);
- onnx: the worker's default decoder, no adapter (linears on the base model's GGUF grid run as exact 4-bit);
- onnx_hot_swap: the default decoder with a rank-8 q_proj,v_proj adapter fed as graph inputs;
- onnx_merged: a session with that adapter folded into q_proj and v_proj (those stay float32);
- onnx_int8_act: the opt-in fast decoder (`int8_activations=True`): the same 4-bit linears with int8-quantized
  activations (MatMulNBits accuracy_level 4). LOSSY, so its quality is measured too (below);
- llamacpp: llama.cpp (llama-cpp-python, `Llama.generate` with the greedy sampler) on the very GGUF file the
  base model ships in (`base_model.gguf_dir() / base_model.GGUF_FILE`, Q4_1), fed the same prompt token ids as
  the other modes (the worker's `ChatTokenizer`; whether llama.cpp's own tokenizer gives the same ids for the
  rendered chat prompts is recorded), KV cache cleared before every run. Left out with --no-llamacpp.
  Its extra weight buffer types (AMX kernels on x86 CPUs with AMX) are used unless a prefill with them crashes
  in a child process first: llama-cpp-python 0.3.36 built by GCC 12 dies there with SIGILL (GCC 12's
  `_tile_loadconfig` lets the tile shapes be optimized away); then the weights go to plain CPU buffers (the
  AVX-512/AVX2 kernels of the native build) and the JSON says so (`llamacpp.extra_buffer_types`).

Every mode is timed the same way: the time to the first new token (prompt prefill + first pick) and the decode
rate over the remaining tokens. Runs are interleaved (each round runs every mode on every prompt, in a rotated
order) so that load from other processes on the machine hits all modes alike; the medians over runs are
reported, with ratios to torch_eager and to llamacpp (`onnx_vs_llamacpp_decode`: the worker's default decoder's
decode tokens/s over llama.cpp's; above 1 the worker is faster). Also: switching to an adapter already resident
(`set_adapter`), building a merged session, and the largest logit difference of each ONNX mode from PyTorch
(+ the adapter) on one prompt.

Quality (`quality` in the JSON), base model, for torch_eager, onnx (exact) and onnx_int8_act on the same run:
perplexity teacher-forced over fixed text (the reading-comprehension passages of
`hypernet.d2l_data.rc_documents(default data dir, "heldout")`, then "train" passages in their fixed order until
--ppl-tokens scored tokens; each passage is one pass through `OnnxDecoder.logits`, every token after a
passage's first is scored), the fraction of those positions whose argmax equals torch's, the fraction of the
timed runs' greedy tokens identical to torch's (position by position, llamacpp too) and the first position
they diverge.
Writes bench/results/worker_decode.json (or --json PATH, atomically) and prints markdown tables. In-process:
`run(parse_args([...]))` returns the JSON's dict; `print_report(result)` prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import torch
from common import (
    INSTALL_LLAMACPP,
    PROMPTS,
    BenchError,
    extra_buffer_types_work,
    gguf_path,
    import_llama_cpp,
    llamacpp_stream,
    random_attention_adapter,
    timed,
    without_extra_buffer_types,
)
from tqdm import tqdm
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from hypernet.d2l_data import rc_documents
from hypernet.sni_data import default_data_dir
from loracast import base_model
from loracast.lora import applied, inject, to_torch
from loracast.lora_spec import LoraSpec
from loracast.paths import write_json
from worker import model_cache
from worker.chat import CONFIG_FILE, TEMPLATE_FILE, ChatTokenizer
from worker.onnx_session import OnnxDecoder

if TYPE_CHECKING:
    from llama_cpp import Llama

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_JSON = RESULTS / "worker_decode.json"
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


def _max_logit_diff(decoder: OnnxDecoder, model: PreTrainedModel, ids: list[int], prefill: int) -> float:
    """Largest |logit| difference over every position: ONNX (prefill + cached steps) vs one PyTorch pass."""
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(decoder.logits(ids, prefill=prefill) - want).max())


def _ppl_texts(tokenizer: ChatTokenizer, min_tokens: int) -> tuple[list[list[int]], dict]:
    """Token ids of fixed passages (rc heldout, then rc train in order) until `min_tokens` are scored."""
    data = default_data_dir()
    if data is None:
        raise BenchError("no data directory for the perplexity text: set $LORACAST_DATA (rc/*.json)")
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


def _template_text(model_dir: Path) -> str | None:
    """The chat template of the Hugging Face tokenizer directory, as `ChatTokenizer` finds it."""
    if (model_dir / TEMPLATE_FILE).is_file():
        return (model_dir / TEMPLATE_FILE).read_text()
    config = model_dir / CONFIG_FILE
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def _llamacpp_prompt_check(llm: Llama, tokenizer: ChatTokenizer, model_dir: Path, prompts: list[list[int]]) -> dict:
    """Whether llama.cpp's own tokenizer (the GGUF's vocabulary) gives the worker's ids for the rendered prompts."""
    rendered = [tokenizer.render([{"role": "user", "content": text}]) for text in PROMPTS]
    ids = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in rendered]
    gguf_template = llm.metadata.get("tokenizer.chat_template")
    return {
        "prompt_ids_same_as_worker": [a == b for a, b in zip(ids, prompts, strict=True)],
        "chat_template_same_as_gguf": None if gguf_template is None else gguf_template == _template_text(model_dir),
        "gguf_add_bos_token": llm.metadata.get("tokenizer.ggml.add_bos_token"),
    }


def _ratio(a: float, b: float | None) -> float | None:
    return round(a / b, 2) if b else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=base_model.DEFAULT_BASE, help="'smollm2' or a Hugging Face model directory")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="runs of every (mode, prompt) pair")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every framework")
    p.add_argument("--switch-repeats", type=int, default=50)
    p.add_argument("--ppl-tokens", type=int, default=6000, help="tokens scored for the perplexity (at least)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results (atomically)")
    p.add_argument(
        "--llamacpp-extra-bufts",
        choices=("auto", "on", "off"),
        default="auto",
        help="llama.cpp's extra weight buffer types (AMX kernels on x86 with AMX); auto: on unless a prefill with "
        "them crashes in a child process (as llama-cpp-python 0.3.36 built with GCC 12 does, SIGILL)",
    )
    p.add_argument(
        "--no-llamacpp",
        action="store_true",
        help=f"leave the llama.cpp mode out (its ratios are null); otherwise it needs `{INSTALL_LLAMACPP}`",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's arguments; `parse_args([])` gives the defaults, for a caller in the same process."""
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark, write the JSON to `args.json` and return its dict. Raises BenchError (one line)."""
    llama_cpp = None if args.no_llamacpp else import_llama_cpp()  # before minutes of loading, not after
    if llama_cpp is not None and args.base != base_model.DEFAULT_BASE:
        raise BenchError("llama.cpp runs the GGUF of the default base model only: pass --no-llamacpp with --base")

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
    adapter, other = random_attention_adapter(model, SPEC, 1), random_attention_adapter(model, OTHER_SPEC, 2)
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
        "onnx_fp32": lambda prompt, n: timed(fp32.generate(prompt, n)),
        "onnx": lambda prompt, n: timed(decoder.generate(prompt, n)),
        "onnx_hot_swap": lambda prompt, n: timed(hot_swap(prompt, n)),
        "onnx_merged": lambda prompt, n: timed(merged.generate(prompt, n)),
        "onnx_int8_act": lambda prompt, n: timed(int8.generate(prompt, n)),
    }
    llamacpp_info = None
    if llama_cpp is not None:
        n_ctx = max(len(p) for p in prompts) + args.new_tokens + 16
        if args.llamacpp_extra_bufts == "auto":
            extra_bufts, why = extra_buffer_types_work(args.threads, max(prompts, key=len))
        else:
            extra_bufts, why = args.llamacpp_extra_bufts == "on", f"--llamacpp-extra-bufts {args.llamacpp_extra_bufts}"
        start = time.perf_counter()
        with contextlib.nullcontext() if extra_bufts else without_extra_buffer_types(llama_cpp):
            llm = llama_cpp.Llama(
                model_path=str(gguf_path()),
                n_ctx=n_ctx,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                logits_all=False,
                verbose=False,
            )
        llamacpp_info = {
            "gguf": base_model.GGUF_FILE,
            "load_s": round(time.perf_counter() - start, 2),
            "n_ctx": n_ctx,
            "extra_buffer_types": extra_bufts,
            "extra_buffer_types_why": why,
            "sampler": "greedy (Llama.generate, temp=0, top_k=1, repeat_penalty=1)",
            **_llamacpp_prompt_check(llm, tokenizer, model_dir, prompts),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }
        modes["llamacpp"] = lambda prompt, n: timed(llamacpp_stream(llm, prompt, n))
    for run_mode in modes.values():  # warm-up: first-run allocations are not what users wait for
        run_mode(prompts[0], 4)

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
                    if len(tokens) != args.new_tokens:
                        raise BenchError(f"{name} decoded {len(tokens)} tokens, not {args.new_tokens}")
                    ttft[name].append(first)
                    rate[name].append((len(tokens) - 1) / rest)
                    if r == 0:
                        outputs[name].append(tokens)
                    bar.update()
            start = time.perf_counter()
            decoder.merged(adapter, SPEC)
            merge_s.append(time.perf_counter() - start)
    load_end = os.getloadavg()[0]

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
    greedy_modes = [name for name in ("onnx", "onnx_int8_act", "llamacpp") if name in modes]
    quality = {
        "perplexity_text": ppl_source,
        "perplexity": {name: round(v, 4) for name, v in ppl.items()},
        "perplexity_vs_torch": {name: round(v / ppl["torch_eager"] - 1, 5) for name, v in ppl.items()},
        "teacher_forced_top1_same_as_torch": {
            name: round(float((top1[name] == top1["torch_eager"]).mean()), 4) for name in ("onnx", "onnx_int8_act")
        },
        # torch_eager cannot pick end-of-sequence (min_new_tokens); the others can (and go on after it).
        "greedy_tokens_same_as_torch": {
            name: _agreement(outputs[name], outputs["torch_eager"]) for name in greedy_modes
        },
        "greedy_tokens_int8_act_same_as_onnx": _agreement(outputs["onnx_int8_act"], outputs["onnx"]),
        "greedy_tokens_llamacpp_same_as_onnx": (
            _agreement(outputs["llamacpp"], outputs["onnx"]) if "llamacpp" in modes else None
        ),
        "max_logit_diff_vs_torch": {name: float(f"{logit_diff[name]:.1e}") for name in ("onnx", "onnx_int8_act")},
    }

    tokens_per_s = {name: round(statistics.median(rate[name]), 1) for name in names}
    torch_rate = tokens_per_s["torch_eager"]
    llamacpp_rate = tokens_per_s.get("llamacpp")
    result = {
        # The headlines: the worker's default decoder vs llama.cpp on the same GGUF, and vs PyTorch eager;
        # decode tokens/s, medians of interleaved runs. Above 1: the worker is faster.
        "onnx_vs_llamacpp_decode": _ratio(tokens_per_s["onnx"], llamacpp_rate),
        "onnx_int8_act_vs_llamacpp_decode": _ratio(tokens_per_s["onnx_int8_act"], llamacpp_rate),
        "onnx_vs_torch_decode": _ratio(tokens_per_s["onnx"], torch_rate),
        "base": args.base,
        "new_tokens": args.new_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "rounds": args.rounds,
        "threads": {
            "torch": torch.get_num_threads(),
            "onnxruntime_intra_op": args.threads,
            "llamacpp": args.threads if llama_cpp is not None else None,
        },
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        # 1-minute load average at the start and the end of the timed runs: other processes share the machine.
        "load_average": [round(load_start, 2), round(load_end, 2)],
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "llama_cpp": llama_cpp.__version__ if llama_cpp is not None else None,
        },
        "decode_tokens_per_s": tokens_per_s,
        "decode_tokens_per_s_runs": {name: [round(x, 1) for x in rate[name]] for name in names},
        "time_to_first_token_ms": {name: _median_ms(ttft[name]) for name in names},
        "ratio_vs_torch_decode": {name: _ratio(tokens_per_s[name], torch_rate) for name in names},
        "ratio_vs_llamacpp_decode": (
            {name: _ratio(tokens_per_s[name], llamacpp_rate) for name in names} if llamacpp_rate else None
        ),
        "llamacpp": llamacpp_info,
        "adapter_switch_ms": {"median": _median_ms(switch), "max": round(1000 * max(switch), 2)},
        "merged_session_build_s": round(statistics.median(merge_s), 2),
        "decoder_load_s": round(load_s, 2),
        "packed_linears": len(decoder.packed),
        "max_logit_diff_vs_torch": {name: float(f"{d:.1e}") for name, d in logit_diff.items()},
        "same_tokens_as_torch": {
            name: [a == b for a, b in zip(outputs[name], outputs["torch_eager"], strict=True)]
            for name in ("onnx_fp32", "onnx", "onnx_int8_act", "llamacpp")
            if name in modes
        },
        "quality": quality,
    }
    write_json(result, Path(args.json))
    return result


def print_report(result: dict) -> None:
    """The markdown tables of a result from `run`."""
    rates, llamacpp = result["decode_tokens_per_s"], result["llamacpp"]
    threads = result["threads"]["onnxruntime_intra_op"]
    versus_llamacpp = (
        f"onnx_vs_llamacpp_decode = {result['onnx_vs_llamacpp_decode']}x  (onnx {rates['onnx']} vs llama.cpp "
        f"{rates['llamacpp']} decode tokens/s; int8_act {result['onnx_int8_act_vs_llamacpp_decode']}x); "
        if llamacpp
        else "onnx_vs_llamacpp_decode = null (llama.cpp left out); "
    )
    headline = (
        f"{versus_llamacpp}onnx_vs_torch_decode = {result['onnx_vs_torch_decode']}x  (torch eager "
        f"{rates['torch_eager']} decode tokens/s); "
        f"load average {result['load_average'][0]} -> {result['load_average'][1]}"
    )
    print(f"\n{headline}")
    print(
        f"\n{result['new_tokens']} new tokens, greedy, {threads} threads for every framework "
        f"({result['machine']['cpus']} CPUs), medians of {result['rounds'] * len(result['prompt_tokens'])} runs "
        f"per mode; llama.cpp: "
        + (f"llama-cpp-python {result['versions']['llama_cpp']} on {llamacpp['gguf']}" if llamacpp else "left out")
        + "\n"
    )
    by_llamacpp = result["ratio_vs_llamacpp_decode"] or {}
    print("| mode | decode tokens/s | x torch eager | x llama.cpp | first token ms | max logit diff vs torch |")
    print("|---|---|---|---|---|---|")
    for name, tps in rates.items():
        diff = result["max_logit_diff_vs_torch"].get(name, "-")
        print(
            f"| {name} | {tps} | {result['ratio_vs_torch_decode'][name]} | {by_llamacpp.get(name, '-')} | "
            f"{result['time_to_first_token_ms'][name]} | {diff} |"
        )
    print(
        f"\nadapter switch (resident): median {result['adapter_switch_ms']['median']} ms; "
        f"merged session build: {result['merged_session_build_s']} s; decoder load: {result['decoder_load_s']} s; "
        f"{result['packed_linears']} linears run as exact 4-bit"
    )
    if llamacpp is not None:
        print(
            f"llama.cpp: load {llamacpp['load_s']} s; extra buffer types (AMX) {llamacpp['extra_buffer_types']}: "
            f"{llamacpp['extra_buffer_types_why']}; its tokenizer gives the worker's prompt ids: "
            f"{llamacpp['prompt_ids_same_as_worker']}; chat template same as the GGUF's: "
            f"{llamacpp['chat_template_same_as_gguf']}"
        )
    print(f"same greedy tokens as torch: {result['same_tokens_as_torch']}")
    quality = result["quality"]
    ppl_source = quality["perplexity_text"]
    print(
        f"\nquality, base model: perplexity over {ppl_source['tokens']} tokens of {ppl_source['source']} "
        f"{ppl_source['passages']}; greedy tokens from the timed runs "
        f"({len(result['prompt_tokens'])} prompts x {result['new_tokens']})\n"
    )
    print("| mode | perplexity | vs torch | teacher-forced top-1 = torch | greedy tokens = torch | first divergence |")
    print("|---|---|---|---|---|---|")
    for name in ("torch_eager", "onnx", "onnx_int8_act", "llamacpp"):
        if name not in rates:
            continue
        greedy = quality["greedy_tokens_same_as_torch"].get(name, {"fraction": 1.0, "first_divergence": "-"})
        ppl = quality["perplexity"].get(name)
        vs_torch = f"{quality['perplexity_vs_torch'][name]:+.3%}" if ppl is not None else "-"
        top1 = quality["teacher_forced_top1_same_as_torch"].get(name, 1.0 if name == "torch_eager" else "-")
        print(
            f"| {name} | {ppl if ppl is not None else '-'} | {vs_torch} | {top1} | {greedy['fraction']} | "
            f"{greedy['first_divergence']} |"
        )
    print(f"\n{headline}")


def main() -> None:
    args = parse_args()
    try:
        result = run(args)
    except BenchError as e:
        print(f"bench_worker_decode: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print_report(result)


if __name__ == "__main__":
    main()
