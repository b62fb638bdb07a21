"""Super-NaturalInstructions tasks: loading, the prompt contract, and batches for training.

Prompt contract (tools outside the project rely on it): the model is prompted with the base
model's chat template, the user turn holding only the instance input, and decoded greedily. The
answer is followed by the template's end-of-turn token, so a trained adapter learns to stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from loracast.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Six LLM-written descriptions per sni/train task, shipped as data: what the shipped T2L checkpoint trained on.
DEFAULT_PARAPHRASES = REPO_ROOT / "hypernet" / "data" / "sni_train_paraphrases.json"


class DataError(UserError, ValueError):
    """The data directory is missing or malformed; the message says what to fix."""


@dataclass(frozen=True)
class Instance:
    input: str
    output: str
    all_outputs: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    definition: str
    instances: tuple[Instance, ...]
    categories: tuple[str, ...] = ()


def default_data_dir() -> Path | None:
    """`$LORACAST_DATA`, else `../shared/data` beside the working directory or the repository."""
    if env := os.environ.get("LORACAST_DATA"):
        return Path(env)
    for candidate in (Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def task_files(data_dir: Path, split: str) -> list[Path]:
    folder = Path(data_dir) / "sni" / split
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataError(f"no SNI task files in {folder}: pass --data DIR holding sni/{split}/*.json")
    return files


def load_tasks(data_dir: Path, split: str) -> list[Task]:
    tasks = []
    for path in task_files(data_dir, split):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            instances = tuple(
                Instance(i["input"], i["output"], tuple(i.get("all_outputs") or [i["output"]]))
                for i in raw["instances"]
            )
            categories = tuple(str(c) for c in raw.get("categories") or ())
            tasks.append(Task(raw["task"], raw["definition"].strip(), instances, categories))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not an SNI task file ({exc!r})") from exc
    return tasks


def data_hash(data_dir: Path, split: str) -> str:
    """SHA-256 over the split's files (names and bytes), recorded with a trained checkpoint."""
    return files_hash(task_files(data_dir, split))


def files_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def description_files(data_dir: Path, tasks: list[Task]) -> list[Path]:
    """The anchor's description files (`sni/descriptions/<task>.json`) of those of `tasks` that have one.

    Refuses a data directory that holds one for a dev task: dev descriptions are validation only.
    """
    folder = Path(data_dir) / "sni" / "descriptions"
    present = {p.stem for p in folder.glob("*.json")}
    dev = {p.stem for p in (Path(data_dir) / "sni" / "dev").glob("*.json")}
    if leaked := sorted(present & dev):
        raise DataError(f"{folder}: describes dev tasks {leaked[:3]}; dev is validation only, remove those files")
    return [folder / f"{t.name}.json" for t in tasks if t.name in present]


def load_descriptions(data_dir: Path, tasks: list[Task]) -> dict[str, list[str]]:
    """The anchor's descriptions (Text-to-LoRA's GPT-4o-written ones, 200 per task) of the tasks that have them."""
    out = {}
    for path in description_files(data_dir, tasks):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            texts = [str(d).strip() for d in raw["descriptions"]]
            named = raw["task"]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a description file {{'task', 'descriptions': [...]}} ({exc!r})") from exc
        if named != path.stem or not texts or not all(texts):
            raise DataError(f"{path}: must name task {path.stem} and hold non-empty descriptions")
        out[path.stem] = texts
    return out


def description_pool(task: Task, *sources: dict[str, list[str]]) -> list[str]:
    """Every description a training task has: its SNI definition first, then each source's for it, in order.

    Training draws one of them uniformly per example, as the anchor does from its 128 per task.
    """
    return [task.definition] + [text for source in sources for text in source.get(task.name, [])]


def description_variants(definition: str, n: int, rng: random.Random) -> list[str]:
    """The definition itself plus n-1 variants that each keep a random subset of its sentences.

    A second description of a task made from its definition alone (bench/encoder_choice.py asks whether an
    encoder puts it near the first); training draws from `description_pool` instead.
    """
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", definition) if s]
    variants = [definition]
    for _ in range(n - 1):
        if len(sentences) <= 1:
            variants.append(definition)
            continue
        keep = sorted(rng.sample(range(len(sentences)), max(1, round(len(sentences) * rng.uniform(0.5, 0.9)))))
        variants.append(" ".join(sentences[i] for i in keep))
    return variants


def load_paraphrases(path: Path, tasks: list[Task], data_dir: Path) -> dict[str, list[str]]:
    """Extra descriptions per training task from a JSON file {"tasks": {task name: [description, ...]}}.

    The file must name only tasks of `tasks` (the training split), and never a task of the data's dev split:
    dev descriptions are validation only.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))["tasks"]
        paraphrases = {str(name): [str(d).strip() for d in texts] for name, texts in raw.items()}
    except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a paraphrase file {{'tasks': {{name: [descriptions]}}}} ({exc!r})") from exc
    dev = {p.stem for p in (Path(data_dir) / "sni" / "dev").glob("*.json")}
    if leaked := sorted(set(paraphrases) & dev):
        raise DataError(f"{path}: describes dev tasks {leaked[:3]}; dev is validation only, remove them")
    if unknown := sorted(set(paraphrases) - {t.name for t in tasks}):
        raise DataError(
            f"{path}: tasks {unknown[:3]} are not in the training split of {data_dir}; "
            "pass --paraphrases none to train on the definitions alone"
        )
    if empty := sorted(n for n, texts in paraphrases.items() if not all(texts)):
        raise DataError(f"{path}: empty descriptions for {empty[:3]}")
    return paraphrases


def user_turn(instance_input: str, description: str | None = None) -> str:
    """The user turn: the input alone, or (the in-prompt baseline) the description before it."""
    return instance_input if description is None else f"{description}\n\n{instance_input}"


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """Chat models end a turn with their EOS token (SmolLM2: <|im_end|>), which also stops generation."""
    return tokenizer.eos_token or ""


def encode_example(
    tokenizer: PreTrainedTokenizerBase, user: str, answer: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt): the loss covers the answer tokens only."""
    prompt = tokenizer(chat_prompt(tokenizer, user), add_special_tokens=False)["input_ids"]
    target = tokenizer(answer + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    # Keep the whole answer; cut the prompt from the left if the example is too long.
    prompt = prompt[-max(1, max_len - len(target)) :]
    ids = (prompt + target)[:max_len]
    labels = ([-100] * len(prompt) + target)[:max_len]
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for teacher-forced training."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
