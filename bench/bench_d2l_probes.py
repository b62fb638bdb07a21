"""Which self-distillation recipe transfers to real questions, per step: probe families, loss, start, frozen layers.

    .venv/bin/python bench/bench_d2l_probes.py [--documents 3] [--steps 10,20,30,40]

A design study, so it runs on *training-part* fictional profiles (`d2l_data`, part "train", seed 7), never on the
held-out documents the evaluation scores: the probe writer was designed on these. Each variant changes one
thing of the default `DistillConfig` (families, loss, start, frozen share); every variant trains the same number
of steps and its adapter is scored (answer contained, the profile's own questions, which no probe copies) after
each step count, with the median seconds per step and the teacher's seconds, so recall per second follows.
Writes bench/results/d2l_probes.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from hypernet import d2l_data
from hypernet.eval_d2l import EvalArgs, Evaluator, mean_scores, one_per_fact
from hypernet.self_distill import DistillConfig
from hypernet.sni_data import default_data_dir
from loracast.paths import write_json

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "default (cloze, span, relation, seed; KL; zero start)": {},
    "d2l start": {"start": "d2l"},
    "cross-entropy on the teacher's text": {"loss": "ce"},
    "families: cloze + seed": {"families": ("cloze", "seed")},
    "families: span + relation": {"families": ("span", "relation")},
    "families: + self-written questions": {"families": ("cloze", "span", "relation", "seed", "self")},
    "frozen share 0.6 (18 layers)": {"frozen_share": 0.6},
}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    ev = Evaluator(EvalArgs(data_dir=args.data))
    docs = [one_per_fact(d) for d in d2l_data.fictional_documents(40, 7, part="train")[: args.documents]]
    floor = statistics.mean(mean_scores(ev.answers(None, d), d)["contained"] for d in docs)
    target = statistics.mean(mean_scores(ev.in_context(d), d)["contained"] for d in docs)
    out: dict = {"documents": len(docs), "floor": floor, "target": target, "steps": args.steps, "variants": {}}
    for name, change in VARIANTS.items():
        change = dict(change)
        start = change.pop("start", "zero")
        cfg = replace(DistillConfig(), budget_s=10**4, max_steps=max(args.steps), plateau_loss=0, **change)
        out["variants"][name] = variant(ev, docs, cfg, start, args.steps)
        print(name, json.dumps(out["variants"][name]), flush=True)
    return out


def variant(ev: Evaluator, docs: list, cfg: DistillConfig, start: str, steps: list[int]) -> dict:
    """Answer-contained after each of `steps` training steps (mean over `docs`), seconds per step, teacher seconds."""
    curve: dict[int, list[float]] = {s: [] for s in steps}
    step_s: list[float] = []
    teacher_s: list[float] = []
    ev.args.distill = cfg
    for doc in docs:
        last = [0.0]

        def on_step(step: int, seconds: float, adapter: dict, doc=doc, last=last) -> None:
            step_s.append(seconds - last[0])
            last[0] = seconds
            if step in curve:
                curve[step].append(mean_scores(ev.answers(adapter, doc), doc)["contained"])

        teacher_s.append(ev.internalize(doc, cfg.budget_s, start, on_step=on_step)[1]["teacher_s"])
    return {
        "contained_at_step": {str(s): round(statistics.mean(v), 1) for s, v in curve.items()},
        "step_s_median": round(statistics.median(step_s[1:]), 2),
        "teacher_s_mean": round(statistics.mean(teacher_s), 1),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=3)
    p.add_argument("--steps", type=lambda s: [int(t) for t in s.split(",")], default=[10, 20, 30, 40])
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, default=RESULTS / "d2l_probes.json")
    return p


def main() -> None:
    args = parser().parse_args()
    write_json(run(args), args.json)


if __name__ == "__main__":
    main()
