"""Rebuild the SNI task files (sni/train, sni/dev) from a local clone of Super-NaturalInstructions.

Upstream: GitHub `allenai/natural-instructions` (Apache-2.0; cite Wang et al., EMNLP 2022). With a
network, clone it and rebuild our task selection:

    build(clone, out, *task_lists_from(Path("../shared/data")), commit="<clone's commit>")

Selection and cleaning follow data/README.md: English tasks only, input <= 1,200 chars, first gold
output <= 200 chars, duplicate inputs dropped, the first 120 instances kept. Train tasks may never be
in the SNI test split (`splits/default/test_tasks.txt`), and dev must be disjoint from train.

Not rebuilt here: the reading-comprehension files (rc/train), which add passage/question splits, and
the hand-made caveats of the shared copy (per-file `note`, recomputed outputs of a few list/number
tasks, instances skipped during transcription), so instances can differ slightly from it. Existing
files in out/ that are not in the selection are left alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loracast.errors import UserError
from loracast.paths import write_file

TEST_SPLIT = Path("splits") / "default" / "test_tasks.txt"


class SNIBuildError(UserError, ValueError):
    """The clone or the task lists cannot give a valid build; the message says what to fix."""


def task_lists_from(data_dir: Path) -> tuple[list[str], list[str]]:
    """Task names (file stems) of an existing data directory's sni/train and sni/dev."""
    train, dev = (sorted(p.stem for p in (Path(data_dir) / "sni" / split).glob("*.json")) for split in ("train", "dev"))
    if not train:
        raise SNIBuildError(f"no task files in {Path(data_dir) / 'sni' / 'train'}: pass the data dir holding sni/")
    return train, dev


def _read_task(source: Path, name: str) -> dict[str, Any]:
    if not name or Path(name).name != name or name.startswith("."):
        raise SNIBuildError(f"bad task name {name!r}: use a bare SNI task name such as task1150_delete_max_min")
    path = source / "tasks" / f"{name}.json"
    if not path.is_file():
        raise SNIBuildError(f"task {name} not found at {path}: check the name or update the clone")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        definition = raw["Definition"]
        instances = raw["Instances"]
        if not (isinstance(definition, list) and all(isinstance(d, str) for d in definition)):
            raise TypeError("Definition is not a list of strings")
        if not all(isinstance(i["input"], str) and isinstance(i["output"], list) for i in instances):
            raise TypeError("an instance lacks a string input or an output list")
        return {
            "definition": " ".join(definition),
            "categories": list(raw.get("Categories", [])),
            "input_language": list(raw["Input_language"]),
            "output_language": list(raw["Output_language"]),
            "instances": instances,
        }
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise SNIBuildError(
            f"{path} is not an SNI task file ({exc!r}): replace it from the upstream repository"
        ) from exc


def _clean(instances: list[dict], max_instances: int, max_input_chars: int, max_output_chars: int) -> list[dict]:
    kept: list[dict] = []
    seen: set[str] = set()
    for inst in instances:
        if len(kept) >= max_instances:
            break
        outputs = [o for o in inst["output"] if isinstance(o, str)]
        text = inst["input"]
        if not outputs or len(text) > max_input_chars or len(outputs[0]) > max_output_chars or text in seen:
            continue
        seen.add(text)
        kept.append({"input": text, "output": outputs[0], "all_outputs": outputs})
    return kept


def build(
    source: Path,
    out: Path,
    train_tasks: list[str],
    dev_tasks: list[str],
    max_instances: int = 120,
    max_input_chars: int = 1200,
    max_output_chars: int = 200,
    commit: str = "unknown",
) -> dict:
    """Write the named tasks as out/sni/{train,dev}/<task>.json; return counts and skipped tasks.

    Everything is checked before anything is written. Non-English tasks, and tasks left with no
    instance after cleaning, are skipped and listed under "skipped" (task -> reason).
    """
    source, out = Path(source), Path(out)
    train_tasks, dev_tasks = list(dict.fromkeys(train_tasks)), list(dict.fromkeys(dev_tasks))
    if not (source / "tasks").is_dir():
        raise SNIBuildError(f"{source} has no tasks/ folder: pass the root of a natural-instructions clone")
    if overlap := sorted(set(train_tasks) & set(dev_tasks)):
        raise SNIBuildError(f"dev tasks also in train: {', '.join(overlap)}; remove them from one of the lists")
    test_file = source / TEST_SPLIT
    if not test_file.is_file():
        raise SNIBuildError(f"{test_file} is missing: the clone needs it to keep SNI test tasks out of train")
    test_tasks = {line.strip() for line in test_file.read_text(encoding="utf-8").splitlines() if line.strip()}
    if leaked := sorted(set(train_tasks) & test_tasks):
        raise SNIBuildError(f"train tasks in the SNI test split: {', '.join(leaked)}; remove them from train")

    splits = {"train": train_tasks, "dev": dev_tasks}
    loaded = {split: {name: _read_task(source, name) for name in names} for split, names in splits.items()}
    summary: dict[str, Any] = {"skipped": {}}
    for split, tasks in loaded.items():
        n_tasks = n_instances = 0
        for name, task in tasks.items():
            if task["input_language"] != ["English"] or task["output_language"] != ["English"]:
                summary["skipped"][name] = f"not English ({task['input_language']} -> {task['output_language']})"
                continue
            instances = _clean(task.pop("instances"), max_instances, max_input_chars, max_output_chars)
            if not instances:
                summary["skipped"][name] = "no instance left after cleaning"
                continue
            record = {"task": name, "source_path": f"tasks/{name}.json", "source_commit": commit, **task}
            write_file(
                out / "sni" / split / f"{name}.json",
                json.dumps({**record, "instances": instances}, ensure_ascii=False, indent=1) + "\n",
            )
            n_tasks, n_instances = n_tasks + 1, n_instances + len(instances)
        summary[split] = {"tasks": n_tasks, "instances": n_instances}
    return summary
