"""`loracast eval t2l`: does the generated adapter make the base model do an unseen task?

Six conditions on every task of the split (`dev`, or `heldout`: see hypernet/sni_splits.py), same instances,
greedy decoding; the description is the task's SNI definition:
  (a) base, input only          (b) base, description + input        (c) multi-task LoRA, input only
  (d) T2L adapter, input only   (e) T2L adapter of another task's description (control)
  (f) multi-task LoRA trained with the description in the prompt, prompted like (b): what a user with
      descriptions could train instead of T2L. Each condition's prompt tokens per query are reported beside it.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from rouge_score import rouge_scorer

from hypernet import checkpoint
from hypernet.answering import answer
from hypernet.encoder import DescriptionEncoder
from hypernet.makers import TextToLoRAMaker
from hypernet.sni_data import chat_prompt, user_turn
from hypernet.sni_splits import eval_tasks
from hypernet.t2l import Adapter
from loracast import base_model
from loracast.errors import UserError
from loracast.lora import inject

CONDITIONS = {
    "a": "base, input only",
    "b": "base + description in prompt",
    "c": "multi-task LoRA",
    "d": "T2L adapter",
    "e": "T2L, other task's description (control)",
    "f": "multi-task LoRA trained with descriptions + description in prompt",
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


def multitask_adapter(path: Path, encoder: DescriptionEncoder, described: bool) -> Adapter:
    """The one adapter of a multi-task LoRA checkpoint; `described`: it must have been trained with the
    description in the prompt (condition (f)), else without (condition (c))."""
    if described and not Path(path).is_file():
        raise checkpoint.CheckpointError(
            f"condition (f) needs {path}: train it with `loracast train mtl --describe --out {path}`, "
            "or leave (f) out with --conditions abcde"
        )
    model, meta = checkpoint.load(path, kinds=("MultiTaskLoRA",))
    if bool(json.loads(meta.get("train_args", "{}")).get("describe")) != described:
        need = "with" if described else "without"
        raise checkpoint.CheckpointError(
            f"{path} was not trained {need} descriptions in the prompt: condition ({'f' if described else 'c'}) "
            f"needs one trained by `loracast train mtl{' --describe' if described else ''}`"
        )
    return {k: (a[0], b[0]) for k, (a, b) in model(encoder(["-"])).items()}


def evaluate(
    data_dir: Path,
    split: str = "dev",
    limit: int | None = None,
    t2l_path: Path = checkpoint.DEFAULT_T2L,
    mtl_path: Path = checkpoint.DEFAULT_MTL,
    described_path: Path = checkpoint.DEFAULT_MTL_DESCRIBED,
    conditions: str = "".join(CONDITIONS),
    base_name: str = base_model.DEFAULT_BASE,
    max_new_tokens: int = 48,
) -> dict:
    if not conditions or set(conditions) - set(CONDITIONS):
        raise UserError(f"--conditions {conditions!r}: give letters of {''.join(CONDITIONS)}, e.g. abcde")
    chosen = {c: CONDITIONS[c] for c in CONDITIONS if c in conditions}
    tasks = eval_tasks(data_dir, split)
    base = base_model.load(base_name)
    tok = base.tokenizer
    maker = TextToLoRAMaker(t2l_path, base)
    wrappers = inject(base.model, maker.spec)
    fixed = {
        c: multitask_adapter(path, maker.encoder, described=c == "f")
        for c, path in (("c", mtl_path), ("f", described_path))
        if c in chosen
    }

    per_task: dict[str, dict] = {}
    for i, task in enumerate(tasks):
        instances = task.instances[:limit]
        inputs = [user_turn(x.input) for x in instances]
        described = [user_turn(x.input, task.definition) for x in instances]
        other = tasks[(i + 1) % len(tasks)]
        runs = {  # a T2L adapter is one hypernetwork pass (~20 ms): generated whether or not (d), (e) run
            "a": (None, inputs),
            "b": (None, described),
            "c": (fixed.get("c"), inputs),
            "d": (maker.make_adapter(task.definition), inputs),
            "e": (maker.make_adapter(other.definition), inputs),
            "f": (fixed.get("f"), described),
        }
        per_task[task.name] = {"control_description_from": other.name, "n": len(instances)}
        for cond in chosen:
            adapter, users = runs[cond]
            preds = answer(base, wrappers, adapter, users, max_new_tokens, progress=f"{task.name[:28]} ({cond})")
            scores = [score(p, x.all_outputs) for p, x in zip(preds, instances, strict=True)]
            prompt_tokens = [len(tok(chat_prompt(tok, u), add_special_tokens=False)["input_ids"]) for u in users]
            per_task[task.name][cond] = {
                m: round(sum(s[m] for s in scores) / len(scores), 2) for m in ("rougeL", "exact")
            }
            per_task[task.name][cond]["prompt_tokens"] = round(sum(prompt_tokens) / len(prompt_tokens), 1)
            per_task[task.name][cond]["examples"] = [
                {"input": x.input[:200], "gold": x.output, "prediction": p}
                for p, x in zip(preds[:3], instances[:3], strict=True)
            ]
    mean = {
        cond: {
            m: round(sum(t[cond][m] for t in per_task.values()) / len(per_task), 2)
            for m in ("rougeL", "exact", "prompt_tokens")
        }
        for cond in chosen
    }
    return {
        "split": split,
        "limit_per_task": limit,
        "conditions": chosen,
        "mean": mean,
        "tasks": per_task,
        "t2l_checkpoint": str(t2l_path),
        "mtl_checkpoint": str(mtl_path) if "c" in chosen else None,
        "described_mtl_checkpoint": str(described_path) if "f" in chosen else None,
        "base_fingerprint": base.fingerprint,
    }


def table(result: dict) -> str:
    """A markdown table: ROUGE-L / exact match per task and the mean, one column per condition evaluated, and
    the prompt tokens each condition spends per query."""
    conditions = result["conditions"]
    head = "| task | " + " | ".join(f"({c}) {d}" for c, d in conditions.items()) + " |"
    rows = [head, "|" + "---|" * (len(conditions) + 1)]
    for name, t in [*result["tasks"].items(), ("**mean**", result["mean"])]:
        cells = [f"{t[c]['rougeL']:.1f} / {t[c]['exact']:.0f}" for c in conditions]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    tokens = [f"{result['mean'][c]['prompt_tokens']:.0f}" for c in conditions]
    rows.append("| prompt tokens / query | " + " | ".join(tokens) + " |")
    return "\n".join(rows) + "\n\nCells: ROUGE-L F1 / exact match, percent; the last row: mean prompt tokens per query."
