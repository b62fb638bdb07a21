"""Doc-to-LoRA internalization vs per-document context distillation reaching the same score, by document length.

    .venv/bin/python bench/bench_d2l_vs_cd.py [--tokens 512,2048,7680] [--questions 6] [--cd-steps 16]

For each length, held-out composite documents of about that many tokens (fictional profiles never trained
on; at most `questions` questions each, one per fact) go through `hypernet.eval_d2l.Evaluator.speed` on the real
base model: D2L's internalization time and mean ROUGE-L, then context distillation (a LoRA on D2L's modules and
rank, trained on the teacher's top-k with the document in the prompt) checked after 1, 2, 4, ... 4x`cd_steps`
steps until it reaches D2L's score. Ratios above 1 favour D2L; the headline counts the teacher's generation,
which distillation cannot skip and which grows with the document, and the training-only ratio stands beside
it. Writes bench/results/d2l_vs_cd.json and bench/results/d2l_vs_cd.png (each length's distillation curve
against training seconds, D2L's time and score marked).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from hypernet.eval_d2l import EvalArgs, Evaluator
from hypernet.sni_data import default_data_dir
from loracast.paths import write_json
from loracast.plots import figure

RESULTS = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace) -> dict:
    ev = Evaluator(EvalArgs(data_dir=args.data, cd_steps=args.cd_steps, threads=args.threads))
    lengths = {
        str(tokens): ev.speed(tokens=tokens, documents=args.documents, questions=args.questions)
        for tokens in args.tokens
    }
    return {
        # Per length, then the median over lengths: the figure a caller compares against its bar.
        "d2l_vs_context_distillation": statistics.median(r["ratio_cd_with_teacher_over_d2l"] for r in lengths.values()),
        "d2l_vs_context_distillation_training_only": statistics.median(
            r["ratio_cd_over_d2l"] for r in lengths.values()
        ),
        "lengths": lengths,
        "base_fingerprint": ev.base.fingerprint,
    }


def table(result: dict) -> str:
    rows = [
        "| document tokens | questions | D2L s | D2L ROUGE-L (base) | CD reaches it at | CD training s | CD teacher s "
        "| ratio (with teacher) | ratio (training only) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["lengths"].values():
        bound = ">" if r["ratio_is_lower_bound"] else ""
        reached = f"step {r['cd_reached_at_step']}" if r["cd_reached_at_step"] else "not reached"
        rows.append(
            f"| {r['tokens_median']} | {r['questions_per_document']} | {r['d2l_internalize_s_median']:.2f} | "
            f"{r['d2l_rougeL']:.1f} ({r['base_rougeL']:.1f}) | {reached} | {r['cd_train_s_to_reach']:.1f} | "
            f"{r['cd_teacher_s_median']:.1f} | "
            f"{bound}{r['ratio_cd_with_teacher_over_d2l']:.0f}x | {bound}{r['ratio_cd_over_d2l']:.0f}x |"
        )
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    with figure(path, figsize=(7, 4.5), dpi=120) as ax:
        for length, r in result["lengths"].items():
            curve = r["cd_curve"]
            line = ax.plot(
                [p["train_s"] for p in curve], [p["rougeL"] for p in curve], marker="o", label=f"CD, {length}"
            )
            ax.scatter([r["d2l_internalize_s_median"]], [r["d2l_rougeL"]], marker="*", s=160, color=line[0].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("seconds (CD: training only; star: D2L internalization)")
        ax.set_ylabel("ROUGE-L")
        ax.set_title("Doc-to-LoRA vs context distillation, by document tokens")
        ax.legend()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[512, 2048, 7680])
    p.add_argument("--documents", type=int, default=1, help="documents per length")
    p.add_argument("--questions", type=int, default=6, help="questions per document (one per fact)")
    p.add_argument("--cd-steps", type=int, default=16, help="distillation is checked up to 4x this many steps")
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, default=RESULTS / "d2l_vs_cd.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "d2l_vs_cd.png")
    return p


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    write_json(result, args.json)
    plot(result, args.plot)
    print(table(result))


if __name__ == "__main__":
    main()
