"""Adapter creation: Text-to-LoRA generation vs training an ordinary LoRA on the task's examples to the same score.

    .venv/bin/python bench/bench_t2l_vs_lora.py [--tasks 3] [--max-steps 128] [--threads N]

Target: T2L creates an adapter at least 100x faster than gradient training reaches the same score.

Tasks: `--tasks` SNI *train* tasks, drawn by a seeded RNG among those with >= 60 instances and gold answers of at
most 32 characters. The dev split never receives a gradient, so no dev task can be used here. Each task's instances
are split in order: the first half trains the ordinary LoRA, the second half (at most `--eval-instances`) scores
both adapters, greedily under the prompt contract, as `loracast eval t2l` does.

T2L: the shipped checkpoint's adapter maker, loaded once (its load time is reported as context only), warmed up once;
then the median of `--repeats` `make_adapter(definition)` calls, and the adapter's score on the evaluation half.

Ordinary LoRA: the checkpoint's LoraSpec (modules, rank, alpha, rsLoRA), PEFT's init (A Kaiming, B zero), Adam at
`--lr`, batches of `--batch-size` drawn from the training half, loss on the answer tokens only (T2L's training
loss). It is scored after 0, 1, 2, 4, ... `--max-steps` steps, outside the timing; training stops once it has
reached both targets below. Time to reach a target is the training time at the first check at or above it; if no
check reaches it, the budget's time is reported and the ratio is marked as a lower bound.

Two targets, because the first flatters the LoRA's opponent:
  - T2L's score on the same evaluation half. The shipped checkpoint was trained on every train task, these
    instances included, so this score is in-distribution for T2L. Ratio: `t2l_vs_lora_training`.
  - T2L's mean ROUGE-L on the unseen dev tasks, from bench/results/eval_t2l.json (condition d) when it exists and
    was measured on this base model: what T2L delivers on a task it has never seen. Ratio:
    `t2l_vs_lora_training_conservative`.
Each ratio is (LoRA training seconds to reach the target) / (T2L generation seconds), per task, then the median.
Model loading and scoring count on neither side. An ordinary LoRA also needs labelled examples, which T2L does not.

Writes `--json` (default bench/results/t2l_vs_lora.json) and `--plot` (default bench/results/t2l_vs_lora.png),
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from hypernet import checkpoint
from hypernet.answering import answer
from hypernet.eval_t2l import score
from hypernet.makers import TextToLoRAMaker
from hypernet.sni_data import (
    DataError,
    Instance,
    Task,
    collate,
    default_data_dir,
    encode_example,
    load_tasks,
    user_turn,
)
from hypernet.t2l import Adapter
from hypernet.train_t2l import TrainArgs, answer_loss
from loracast import base_model
from loracast.base_model import BaseModel
from loracast.lora import LoRALinear, LoraSpec, inject, train_lora
from loracast.paths import write_json
from loracast.plots import figure

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_T2L = RESULTS / "eval_t2l.json"
MIN_INSTANCES = 60
# Short answers keep greedy scoring cheap and well inside --max-new-tokens, so no gold answer is cut off.
SHORT_OUTPUT_CHARS = 32
TARGET_RATIO = 100
METRICS = ("rougeL", "exact", "contained")


@dataclass(frozen=True)
class TaskSplit:
    task: Task
    train: tuple[Instance, ...]
    eval: tuple[Instance, ...]


def pick_tasks(tasks: Sequence[Task], k: int, seed: int) -> list[Task]:
    eligible = [
        t
        for t in tasks
        if len(t.instances) >= MIN_INSTANCES and max(len(i.output) for i in t.instances) <= SHORT_OUTPUT_CHARS
    ]
    if len(eligible) < k:
        raise DataError(f"only {len(eligible)} train tasks have >= {MIN_INSTANCES} instances and short answers")
    return sorted(random.Random(seed).sample(eligible, k), key=lambda t: t.name)


def split_task(task: Task, eval_instances: int) -> TaskSplit:
    half = len(task.instances) // 2
    return TaskSplit(task, task.instances[:half], task.instances[half:][:eval_instances])


def training_examples(tok: PreTrainedTokenizerBase, instances: Sequence[Instance]) -> list[tuple[list[int], list[int]]]:
    """As T2L was trained: examples longer than its max_len are left out rather than cut (see train_t2l)."""
    fits = [
        e
        for i in instances
        if len((e := encode_example(tok, user_turn(i.input), i.output, 10**6))[0]) <= TrainArgs.max_len
    ]
    return fits or [encode_example(tok, user_turn(instances[0].input), instances[0].output, TrainArgs.max_len)]


def mean_scores(
    base: BaseModel,
    wrappers: dict[tuple[int, str], LoRALinear],
    adapter: Adapter | None,
    instances: Sequence[Instance],
    max_new_tokens: int,
) -> dict[str, float]:
    preds = answer(base, wrappers, adapter, [user_turn(i.input) for i in instances], max_new_tokens)
    scores = [score(p, i.all_outputs) for p, i in zip(preds, instances, strict=True)]
    return {m: round(statistics.mean(s[m] for s in scores), 2) for m in METRICS}


def fit_task_lora(
    base: BaseModel,
    wrappers: dict[tuple[int, str], LoRALinear],
    spec: LoraSpec,
    examples: Sequence[tuple[list[int], list[int]]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_step: Callable[[int, float, Adapter], bool],
    progress: str,
) -> float:
    """Gradient-train one ordinary LoRA (spec's modules and rank) on batches of `examples` with the answer-only
    loss; returns its training seconds. `on_step` as `loracast.lora.train_lora` runs it: outside the timing, True
    ends training."""
    rng = random.Random(seed)
    pad_id = base.tokenizer.pad_token_id or 0
    bar = tqdm(total=steps, desc=progress, leave=False)

    def loss(step: int) -> torch.Tensor:
        value = answer_loss(base.model, collate(rng.sample(examples, min(batch_size, len(examples))), pad_id))
        bar.update()
        bar.set_postfix(loss=f"{value.item():.3f}")
        return value

    _, seconds = train_lora(wrappers, spec.r, steps, lr, loss, on_step, seed)
    bar.close()
    return seconds


def dev_target(fingerprint: str) -> dict[str, Any] | None:
    """T2L's mean ROUGE-L on the unseen dev tasks, if `loracast eval t2l` measured it on this base model."""
    if not EVAL_T2L.is_file():
        return None
    result = json.loads(EVAL_T2L.read_text())
    if result.get("split") != "dev" or result.get("base_fingerprint") != fingerprint:
        return None
    return {
        "rougeL": result["mean"]["d"]["rougeL"],
        "source": str(EVAL_T2L.relative_to(RESULTS.parent.parent)),
        "tasks": len(result["tasks"]),
        "limit_per_task": result["limit_per_task"],
    }


def reach(curve: list[dict[str, Any]], target: float, t2l_s: float) -> dict[str, Any]:
    """When the LoRA's curve first reaches `target`, and that training time over T2L's generation time."""
    hit = next((p for p in curve if p["rougeL"] >= target), None)
    train_s = hit["train_s"] if hit else curve[-1]["train_s"]
    return {
        "target_rougeL": target,
        "reached_at_step": hit["step"] if hit else None,
        "train_s": train_s,
        "ratio": round(train_s / t2l_s, 1),
        # Not reached within the budget: the budget's time, so the ratio is a lower bound.
        "ratio_is_lower_bound": hit is None,
    }


def summary(per_task: list[dict[str, Any]]) -> dict[str, Any]:
    """The median ratio over tasks; a lower bound as soon as one task's ratio is one."""
    return {
        "median": round(statistics.median(r["ratio"] for r in per_task), 1),
        "is_lower_bound": any(r["ratio_is_lower_bound"] for r in per_task),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement; writes `args.json` and `args.plot` unless they are None, and returns the result."""
    if args.data is None:
        raise DataError("no data directory: pass --data DIR holding sni/train/*.json, or set LORACAST_DATA")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    t0 = time.perf_counter()
    base = base_model.load()
    base_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    maker = TextToLoRAMaker(checkpoint.DEFAULT_T2L, base)
    t2l_load_s = time.perf_counter() - t0
    spec = maker.spec
    wrappers = inject(base.model, spec)
    splits = [
        split_task(t, args.eval_instances) for t in pick_tasks(load_tasks(args.data, "train"), args.tasks, args.seed)
    ]
    conservative = dev_target(base.fingerprint)
    checks = {args.max_steps} | {2**i for i in range(args.max_steps.bit_length())}

    maker.make_adapter("Answer the question.")  # warm-up: first-call allocations are not what users wait for
    per_task = []
    for split in tqdm(splits, desc="tasks"):
        task = split.task
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            adapter = maker.make_adapter(task.definition)
            times.append(time.perf_counter() - t0)
        t2l_s = statistics.median(times)
        t2l = {"generate_ms_median": round(1000 * t2l_s, 2)} | mean_scores(
            base, wrappers, adapter, split.eval, args.max_new_tokens
        )
        # Training goes on until the LoRA has reached both targets, so one curve serves both ratios.
        goal = max([t2l["rougeL"]] + ([conservative["rougeL"]] if conservative else []))

        # Step 0 is the base model itself (B starts at zero), so a target the base already meets costs no training.
        curve = [{"step": 0, "train_s": 0.0} | mean_scores(base, wrappers, None, split.eval, args.max_new_tokens)]

        def check(
            step: int, seconds: float, lora: Adapter, split: TaskSplit = split, curve: list = curve, goal: float = goal
        ) -> bool:
            if step not in checks:
                return False
            scores = mean_scores(base, wrappers, lora, split.eval, args.max_new_tokens)
            curve.append({"step": step, "train_s": round(seconds, 3)} | scores)
            return scores["rougeL"] >= goal

        if curve[0]["rougeL"] < goal:
            examples = training_examples(base.tokenizer, split.train)
            fit_task_lora(
                base,
                wrappers,
                spec,
                examples,
                args.max_steps,
                args.lr,
                args.batch_size,
                args.seed,
                check,
                task.name[:32],
            )
        per_task.append(
            {
                "task": task.name,
                "train_instances": len(split.train),
                "eval_instances": len(split.eval),
                "t2l": t2l,
                "lora_curve": curve,
                "in_distribution": reach(curve, t2l["rougeL"], t2l_s),
                **({"conservative": reach(curve, conservative["rougeL"], t2l_s)} if conservative else {}),
            }
        )

    headline = summary([t["in_distribution"] for t in per_task])
    result: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "base_load_s": round(base_load_s, 2),
        "t2l_load_s": round(t2l_load_s, 2),
        "t2l_checkpoint": str(checkpoint.DEFAULT_T2L.relative_to(RESULTS.parent.parent)),
        "lora_spec": {
            "target_modules": list(spec.target_modules),
            "r": spec.r,
            "alpha": spec.alpha,
            "use_rslora": spec.use_rslora,
        },
        "conservative_target": conservative,
        "tasks": per_task,
        "t2l_vs_lora_training": headline["median"],
        "t2l_vs_lora_training_is_lower_bound": headline["is_lower_bound"],
        "target_ratio": TARGET_RATIO,
        "target_met": headline["median"] >= TARGET_RATIO,
        "note": "The shipped T2L checkpoint was trained on every SNI train task, these included: its score here is "
        "in-distribution. The conservative target is its mean ROUGE-L on the unseen dev tasks.",
        "base_fingerprint": base.fingerprint,
        "wall_s": round(time.time() - t_start, 1),
    }
    if conservative:
        low = summary([t["conservative"] for t in per_task])
        result["t2l_vs_lora_training_conservative"] = low["median"]
        result["t2l_vs_lora_training_conservative_is_lower_bound"] = low["is_lower_bound"]
        result["target_met_conservative"] = low["median"] >= TARGET_RATIO
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Per task: the LoRA's ROUGE-L against its training seconds (log x), T2L's score and generation time."""
    tasks = result["tasks"]
    with figure(path, 1, len(tasks), figsize=(4.8 * len(tasks), 4.0), squeeze=False, dpi=120) as axes:
        for ax, t in zip(axes[0], tasks, strict=True):
            trained = [p for p in t["lora_curve"] if p["step"] > 0]  # step 0 has no place on a log axis
            ax.plot(
                [p["train_s"] for p in trained], [p["rougeL"] for p in trained], "o-", label="ordinary LoRA (training)"
            )
            ax.axhline(t["lora_curve"][0]["rougeL"], color="grey", ls=":", label="base model (LoRA step 0)")
            ax.axhline(t["t2l"]["rougeL"], color="C1", label="T2L score (in-distribution)")
            if "conservative" in t:
                ax.axhline(
                    t["conservative"]["target_rougeL"], color="C2", ls="--", label="T2L mean on unseen dev tasks"
                )
            ax.plot(
                t["t2l"]["generate_ms_median"] / 1000,
                t["t2l"]["rougeL"],
                "*",
                color="C1",
                ms=16,
                label="T2L generation",
            )
            ax.set_xscale("log")
            low = f", conservative {_ratio(t['conservative'])}" if "conservative" in t else ""
            ax.set_title(f"{t['task'][:40]}\n{_ratio(t['in_distribution'])}{low}", fontsize=9)
            ax.set_xlabel("seconds to create the adapter")
            ax.set_ylabel("ROUGE-L (eval half)")
        axes[0][0].legend(fontsize=7, loc="best")


def _step(r: dict[str, Any]) -> str:
    return "not reached" if r["reached_at_step"] is None else str(r["reached_at_step"])


def _ratio(r: dict[str, Any]) -> str:
    return f"{'>' if r['ratio_is_lower_bound'] else ''}{r['ratio']:.0f}x"


def table(result: dict[str, Any]) -> str:
    """Markdown: per task T2L's score and time, when the LoRA reached that score, and the ratio."""
    rows = [
        "| task | T2L ROUGE-L | T2L ms | LoRA step reached | LoRA s | ratio | conservative: step / s / ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in result["tasks"]:
        r = t["in_distribution"]
        low = t.get("conservative")
        cons = f"{_step(low)} / {low['train_s']:.1f} / {_ratio(low)}" if low else "-"
        rows.append(
            f"| {t['task']} | {t['t2l']['rougeL']:.1f} | {t['t2l']['generate_ms_median']:.1f} | {_step(r)} | "
            f"{r['train_s']:.1f} | {_ratio(r)} | {cons} |"
        )
    bound = ">" if result["t2l_vs_lora_training_is_lower_bound"] else ""
    out = [
        *rows,
        "",
        f"Median ratio (LoRA training to T2L's score on the same task / T2L generation): "
        f"{bound}{result['t2l_vs_lora_training']:.0f}x; target >= {result['target_ratio']}x: "
        f"{'met' if result['target_met'] else 'not met'}. T2L's score is in-distribution (trained on these tasks).",
    ]
    if "t2l_vs_lora_training_conservative" in result:
        c = result["conservative_target"]
        bound = ">" if result["t2l_vs_lora_training_conservative_is_lower_bound"] else ""
        out.append(
            f"Conservative (target: T2L's mean ROUGE-L {c['rougeL']:.1f} on {c['tasks']} unseen dev tasks): "
            f"{bound}{result['t2l_vs_lora_training_conservative']:.0f}x."
        )
    out.append(
        f"Loading, not counted: base model {result['base_load_s']:.1f} s, T2L maker {result['t2l_load_s']:.1f} s. "
        "'>': not reached within --max-steps, a lower bound."
    )
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=3, help="SNI train tasks, drawn by a seeded RNG")
    p.add_argument("--eval-instances", type=int, default=20, help="at most this many of a task's second half")
    p.add_argument("--max-steps", type=int, default=128, help="the LoRA's training budget, in Adam steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="T2L generations timed per task (median)")
    p.add_argument("--seed", type=int, default=0, help="task draw, LoRA init and batches")
    p.add_argument("--data", type=Path, default=default_data_dir(), help="directory holding sni/train/*.json")
    p.add_argument("--json", type=Path, default=RESULTS / "t2l_vs_lora.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "t2l_vs_lora.png")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy decoding when scoring")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    print(f"\nwrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
