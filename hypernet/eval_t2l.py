"""`loracast eval t2l`: does the generated adapter make the base model do an unseen task?

Five conditions on every task of the split, same instances, greedy decoding:
  (a) base, input only          (b) base, description + input        (c) multi-task LoRA, input only
  (d) T2L adapter, input only   (e) T2L adapter of another task's description (control)
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from rouge_score import rouge_scorer

from hypernet import checkpoint
from hypernet.answering import answer
from hypernet.generate import TextToLoRAGenerator
from hypernet.sni_data import load_tasks, user_turn
from loracast import base_model
from loracast.lora import inject

CONDITIONS = {
    "a": "base, input only",
    "b": "base + description in prompt",
    "c": "multi-task LoRA",
    "d": "T2L adapter",
    "e": "T2L, other task's description (control)",
}
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def score(prediction: str, references: tuple[str, ...]) -> dict[str, float]:
    """ROUGE-L F1, exact match and answer-contained (a gold answer occurs in the prediction, as whole words),
    after normalization, best over the gold answers, in percent."""
    rouge = max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)
    pred = normalize(prediction)
    exact = max(float(pred == normalize(ref)) for ref in references)
    contained = max(float(bool(normalize(ref)) and f" {normalize(ref)} " in f" {pred} ") for ref in references)
    return {"rougeL": 100 * rouge, "exact": 100 * exact, "contained": 100 * contained}


def evaluate(
    data_dir: Path,
    split: str = "dev",
    limit: int | None = None,
    t2l_path: Path = checkpoint.DEFAULT_T2L,
    mtl_path: Path = checkpoint.DEFAULT_MTL,
    base_name: str = base_model.DEFAULT_BASE,
    max_new_tokens: int = 48,
) -> dict:
    base = base_model.load(base_name)
    generator = TextToLoRAGenerator(t2l_path, base)
    mtl, _ = checkpoint.load(mtl_path)
    wrappers = inject(base.model, generator.spec)
    tasks = load_tasks(data_dir, split)
    mtl_adapter = {k: (a[0], b[0]) for k, (a, b) in mtl(generator.encoder(["-"])).items()}

    per_task: dict[str, dict] = {}
    for i, task in enumerate(tasks):
        instances = task.instances[:limit]
        inputs = [user_turn(x.input) for x in instances]
        other = tasks[(i + 1) % len(tasks)]
        runs = {
            "a": (None, inputs),
            "b": (None, [user_turn(x.input, task.definition) for x in instances]),
            "c": (mtl_adapter, inputs),
            "d": (generator.generate(task.definition), inputs),
            "e": (generator.generate(other.definition), inputs),
        }
        per_task[task.name] = {"control_description_from": other.name, "n": len(instances)}
        for cond, (adapter, users) in runs.items():
            preds = answer(base, wrappers, adapter, users, max_new_tokens, progress=f"{task.name[:28]} ({cond})")
            scores = [score(p, x.all_outputs) for p, x in zip(preds, instances, strict=True)]
            per_task[task.name][cond] = {
                m: round(sum(s[m] for s in scores) / len(scores), 2) for m in ("rougeL", "exact")
            }
            per_task[task.name][cond]["examples"] = [
                {"input": x.input[:200], "gold": x.output, "prediction": p}
                for p, x in zip(preds[:3], instances[:3], strict=True)
            ]
    mean = {
        cond: {m: round(sum(t[cond][m] for t in per_task.values()) / len(per_task), 2) for m in ("rougeL", "exact")}
        for cond in CONDITIONS
    }
    return {
        "split": split,
        "limit_per_task": limit,
        "conditions": CONDITIONS,
        "mean": mean,
        "tasks": per_task,
        "t2l_checkpoint": str(t2l_path),
        "base_fingerprint": base.fingerprint,
    }


def table(result: dict) -> str:
    """A markdown table: ROUGE-L / exact match per task and the mean, one column per condition."""
    head = "| task | " + " | ".join(f"({c}) {d}" for c, d in CONDITIONS.items()) + " |"
    rows = [head, "|" + "---|" * (len(CONDITIONS) + 1)]
    for name, t in [*result["tasks"].items(), ("**mean**", result["mean"])]:
        cells = [f"{t[c]['rougeL']:.1f} / {t[c]['exact']:.0f}" for c in CONDITIONS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\nCells: ROUGE-L F1 / exact match, percent."
