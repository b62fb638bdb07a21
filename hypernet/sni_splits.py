"""Which SNI tasks train and which validate: `sni/dev`, and `heldout`, about 30 of `sni/train` never trained on.

`sni/dev` (10 tasks of SNI's test split) is too small to tell a real gain from one task's luck, so a second
validation split is held out of `sni/train`, fixed before any run of the new recipe (issue 18) by this rule:

1. Candidates: the training tasks added on 2026-12-07, i.e. those the shipped paraphrase file does not describe
   (no earlier checkpoint trained on them), that have the anchor's descriptions (so every held-out task can
   be described the way training tasks are). That is 305 tasks.
2. Group them by top-level category: the first SNI category's part before '->' ('none' without a category).
3. Give each group round(HELDOUT_SIZE * its share) tasks by the largest-remainder method (ties: the larger
   group, then the category name).
4. In each group draw that many from its sorted task names with `random.Random(f"{HELDOUT_SEED}:{category}")`.

The result is committed in `hypernet/data/sni_heldout.json` so it cannot drift; a test checks it equals the rule's
output on the shared data. Every training run (T2L, the multi-task LoRAs (c) and (f)) leaves these tasks out.

    .venv/bin/python -m hypernet.sni_splits [--data DIR]   # rewrites the JSON (only if the rule changes)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from hypernet.sni_data import (
    DEFAULT_PARAPHRASES,
    REPO_ROOT,
    DataError,
    Task,
    default_data_dir,
    load_tasks,
)

HELDOUT_FILE = REPO_ROOT / "hypernet" / "data" / "sni_heldout.json"
HELDOUT_SIZE = 30
HELDOUT_SEED = 18  # the issue that asked for the split


def top_category(categories: tuple[str, ...]) -> str:
    return categories[0].split("->")[0].strip() if categories else "none"


def heldout_candidates(data_dir: Path) -> dict[str, str]:
    """Rule step 1 and 2: {task name: top-level category} of the tasks the held-out split is drawn from."""
    described_before = set(json.loads(DEFAULT_PARAPHRASES.read_text(encoding="utf-8"))["tasks"])
    anchor = {p.stem for p in (Path(data_dir) / "sni" / "descriptions").glob("*.json")}
    return {
        t.name: top_category(t.categories)
        for t in load_tasks(data_dir, "train")
        if t.name in anchor and t.name not in described_before
    }


def choose_heldout(candidates: dict[str, str], size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[str]:
    """Rule steps 3 and 4: a category-stratified draw of `size` of `candidates` ({name: category}), sorted."""
    if size > len(candidates):
        raise DataError(f"cannot hold out {size} tasks from {len(candidates)} candidates")
    groups: dict[str, list[str]] = {}
    for name in sorted(candidates):
        groups.setdefault(candidates[name], []).append(name)
    quota = {c: size * len(names) / len(candidates) for c, names in groups.items()}
    counts = {c: int(q) for c, q in quota.items()}
    by_remainder = sorted(groups, key=lambda c: (-(quota[c] - counts[c]), -len(groups[c]), c))
    for c in by_remainder[: size - sum(counts.values())]:
        counts[c] += 1
    chosen = [n for c, names in groups.items() for n in random.Random(f"{seed}:{c}").sample(names, counts[c])]
    return sorted(chosen)


def heldout_names() -> list[str]:
    """The committed held-out split."""
    return list(json.loads(HELDOUT_FILE.read_text(encoding="utf-8"))["tasks"])


def training_tasks(data_dir: Path) -> list[Task]:
    """`sni/train` without the held-out tasks: what every training run sees. Refuses a train split that holds a
    dev task (dev is validation only)."""
    tasks = load_tasks(data_dir, "train")
    dev = {p.stem for p in (Path(data_dir) / "sni" / "dev").glob("*.json")}
    if leaked := sorted(dev & {t.name for t in tasks}):
        raise DataError(f"sni/train of {data_dir} holds dev tasks {leaked[:3]}; dev is validation only")
    heldout = set(heldout_names())
    return [t for t in tasks if t.name not in heldout]


def eval_tasks(data_dir: Path, split: str) -> list[Task]:
    """The tasks of a validation split: `heldout` (from sni/train), or any folder of sni/ (`dev`)."""
    if split != "heldout":
        return load_tasks(data_dir, split)
    names = heldout_names()
    tasks = {t.name: t for t in load_tasks(data_dir, "train")}
    if missing := [n for n in names if n not in tasks]:
        raise DataError(f"held-out tasks {missing[:3]} are not in sni/train of {data_dir}: is it the shared data?")
    return [tasks[n] for n in names]


def write_heldout(data_dir: Path) -> dict:
    candidates = heldout_candidates(data_dir)
    chosen = choose_heldout(candidates)
    result = {
        "rule": "hypernet/sni_splits.py (module docstring)",
        "size": HELDOUT_SIZE,
        "seed": HELDOUT_SEED,
        "candidates": len(candidates),
        "tasks": {name: candidates[name] for name in chosen},
    }
    HELDOUT_FILE.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Rewrite hypernet/data/sni_heldout.json from the rule.")
    p.add_argument("--data", type=Path, default=default_data_dir())
    print(json.dumps(write_heldout(p.parse_args().data)["tasks"], indent=1))
