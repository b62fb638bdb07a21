"""Doc-to-LoRA's quality-time curve, and how much sooner than plain context distillation it gets there.

    .venv/bin/python bench/bench_d2l_vs_cd.py [--documents 6] [--budgets 0,2,5,10,15,20,40,60,80]

On held-out fictional profiles (real base model), one internalization job of the largest budget per start
(zero init = plain per-document context distillation on LoraCast's own probes; the D2L checkpoint's bias
adapter; the D2L one pass = LoraCast), its adapter scored after each budget (off the clock), beside the
floor (no document), the target (document in the prompt) and the labelled ceiling (distillation on the
test questions themselves): `hypernet.eval_d2l.Evaluator.curve`.

`d2l_vs_context_distillation` = seconds zero init needs to reach the score LoraCast reaches at its default
budget, over that budget (same probes, same machine, one run; a lower bound when zero init never gets
there). Writes bench/results/d2l_vs_cd.json and the plot bench/results/d2l_vs_cd.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hypernet import d2l_data
from hypernet.eval_d2l import CEILING, EvalArgs, Evaluator, one_per_fact, table
from hypernet.sni_data import default_data_dir
from loracast.paths import write_json
from loracast.plots import figure

RESULTS = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace) -> dict:
    eargs = EvalArgs(data_dir=args.data, budgets=tuple(args.budgets), threads=args.threads)
    ev = Evaluator(eargs)
    docs = [one_per_fact(d) for d in d2l_data.fictional_documents(args.documents, eargs.seed, part="heldout")]
    curve = ev.curve(docs)
    return {**curve["vs_context_distillation"], "curve": curve, "base_fingerprint": ev.base.fingerprint}


def plot(result: dict, path: Path) -> None:
    c = result["curve"]
    with figure(path, figsize=(7, 4.5), dpi=120) as ax:
        for name, points in c["starts"].items():
            label = "ceiling: the test questions" if name == CEILING else f"start: {name}"
            style = ":" if name == CEILING else "-"
            ax.plot(c["budgets_s"], [p["contained"] for p in points], style, marker="o", label=label)
        ax.axhline(c["target"]["contained"], color="green", linestyle="--", label="document in prompt")
        ax.axhline(c["floor"]["contained"], color="grey", linestyle="--", label="no document")
        ax.axvline(result["lora_cast_seconds"], color="black", linewidth=0.6)
        ax.set_xlabel("internalization seconds (2-core CPU), from the document's arrival")
        ax.set_ylabel("answer contained, %")
        ax.set_title("Doc-to-LoRA: quality against internalization time")
        ax.legend(fontsize=8)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=6, help="held-out profiles")
    p.add_argument(
        "--budgets", type=lambda s: [float(t) for t in s.split(",")], default=[0, 2, 5, 10, 15, 20, 40, 60, 80]
    )
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
    print(table({"curve": result["curve"]}))


if __name__ == "__main__":
    main()
