"""SNI data: the prompt contract, answer-only labels, descriptions, the held-out split, scoring."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from hypernet import sni_splits
from hypernet.eval_t2l import score
from hypernet.sni_data import (
    DEFAULT_PARAPHRASES,
    DataError,
    default_data_dir,
    description_pool,
    description_variants,
    encode_example,
    load_descriptions,
    load_paraphrases,
    load_tasks,
    user_turn,
)
from hypernet.sni_splits import (
    HELDOUT_FILE,
    HELDOUT_SEED,
    HELDOUT_SIZE,
    choose_heldout,
    eval_tasks,
    heldout_candidates,
    heldout_names,
    top_category,
    training_tasks,
)


def test_labels_cover_exactly_the_answer_and_end_of_turn(tiny_base):
    tok = tiny_base.tokenizer
    ids, labels = encode_example(tok, user_turn("[1, 2]"), "[2, 1]", max_len=512)
    answer = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    assert tok.decode(answer) == "[2, 1]" + tok.eos_token
    prompt = tok.decode(ids[: len(ids) - len(answer)])
    assert prompt.endswith("<|im_start|>user\n[1, 2]<|im_end|>\n<|im_start|>assistant\n")


def test_the_in_prompt_baseline_puts_the_description_first():
    assert user_turn("x", "Do y.") == "Do y.\n\nx"
    assert user_turn("x") == "x"


def test_variants_keep_the_full_description_and_subsets_of_its_sentences():
    text = "One. Two. Three. Four."
    variants = description_variants(text, 5, random.Random(0))
    assert variants[0] == text and len(variants) == 5
    for v in variants[1:]:
        assert set(v.split()) <= set(text.split()) and v


def test_load_tasks_reads_the_fixture_and_rejects_broken_files(tiny_data_dir, tmp_path):
    tasks = load_tasks(tiny_data_dir, "train")
    assert [t.name for t in tasks] == ["task1_reverse", "task2_sentiment"]
    assert tasks[0].instances[0].all_outputs == ("[2, 1]",)
    (tmp_path / "sni" / "train").mkdir(parents=True)
    (tmp_path / "sni" / "train" / "bad.json").write_text(json.dumps({"task": "bad"}))
    with pytest.raises(DataError, match="not an SNI task file"):
        load_tasks(tmp_path, "train")
    with pytest.raises(DataError, match="no SNI task files"):
        load_tasks(tmp_path, "dev")


def test_scores_take_the_best_gold_answer():
    assert score("Positive.", ("negative", "positive")) == {"rougeL": 100.0, "exact": 100.0, "contained": 100.0}
    partial = score("the answer is positive", ("positive",))
    assert partial["exact"] == 0.0 and 0 < partial["rougeL"] < 100 and partial["contained"] == 100.0
    # Contained means whole words: "12" is not in "1234", and an empty gold answer never counts.
    assert score("It was 1234.", ("12",))["contained"] == 0.0
    assert score("anything", ("",))["contained"] == 0.0


def _paraphrase_file(tmp_path: Path, tasks: object) -> Path:
    path = tmp_path / "paraphrases.json"
    path.write_text(json.dumps({"tasks": tasks}))
    return path


def test_paraphrases_load_for_training_tasks_and_never_for_dev_ones(tiny_data_dir, tmp_path):
    tasks = load_tasks(tiny_data_dir, "train")
    good = _paraphrase_file(tmp_path, {"task1_reverse": [" Flip the list. ", "Give the list backwards."]})
    assert load_paraphrases(good, tasks, tiny_data_dir) == {
        "task1_reverse": ["Flip the list.", "Give the list backwards."]
    }
    cases = {
        "describes dev tasks": {"task3_upper": ["Capitalize the word."]},
        "not in the training split": {"task9_unknown": ["Do something."]},
        "empty descriptions": {"task1_reverse": ["Flip it.", "  "]},
        "not a paraphrase file": ["a list, not an object"],
    }
    for message, content in cases.items():
        with pytest.raises(DataError, match=message):
            load_paraphrases(_paraphrase_file(tmp_path, content), tasks, tiny_data_dir)


def _real_data() -> list[Path | None]:
    """None (the file alone) always; the real data set as well where it is present (a second case, not a skip)."""
    real = default_data_dir()
    return [None] + ([real] if real and (real / "sni" / "train").is_dir() else [])


@pytest.mark.parametrize("data_dir", _real_data(), ids=lambda p: "file" if p is None else "shared-data")
def test_the_shipped_paraphrases_give_six_descriptions_to_training_tasks_only(data_dir: Path | None):
    shipped = json.loads(DEFAULT_PARAPHRASES.read_text(encoding="utf-8"))["tasks"]
    assert len(shipped) == 151  # written for the 151 training tasks of before 2026-12-07
    assert all(len(texts) == 6 and all(t.strip() for t in texts) for texts in shipped.values())
    if data_dir is not None:  # training tasks all, none of dev's (the training split has grown since)
        tasks = load_tasks(data_dir, "train")
        assert set(load_paraphrases(DEFAULT_PARAPHRASES, tasks, data_dir)) <= {t.name for t in tasks}
        assert len(tasks) > len(shipped)


def _with_descriptions(tmp_path: Path, tiny_data_dir: Path, files: dict[str, object]) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_data_dir, root)
    (root / "sni" / "descriptions").mkdir()
    for name, content in files.items():
        (root / "sni" / "descriptions" / f"{name}.json").write_text(json.dumps(content))
    return root


def test_the_anchor_descriptions_load_for_training_tasks_and_never_for_dev_ones(tiny_data_dir, tmp_path):
    texts = ["Turn the list around. ", "Give the items last to first."]
    root = _with_descriptions(
        tmp_path, tiny_data_dir, {"task1_reverse": {"task": "task1_reverse", "descriptions": texts}}
    )
    tasks = load_tasks(root, "train")
    anchor = load_descriptions(root, tasks)
    assert anchor == {"task1_reverse": ["Turn the list around.", "Give the items last to first."]}
    paraphrases = {"task1_reverse": ["Flip the list."], "task2_sentiment": ["Say if it is positive."]}
    assert description_pool(tasks[0], paraphrases, anchor) == [
        "Reverse the given list.",
        "Flip the list.",
        "Turn the list around.",
        "Give the items last to first.",
    ]
    assert description_pool(tasks[1], paraphrases, anchor) == [tasks[1].definition, "Say if it is positive."]
    cases = {
        "describes dev tasks": {"task3_upper": {"task": "task3_upper", "descriptions": ["Capitals."]}},
        "not a description file": {"task1_reverse": {"task": "task1_reverse"}},
        "must name task task1_reverse": {"task1_reverse": {"task": "task2_sentiment", "descriptions": ["x"]}},
    }
    for i, (message, files) in enumerate(cases.items()):
        with pytest.raises(DataError, match=message):
            load_descriptions(_with_descriptions(tmp_path / str(i), tiny_data_dir, files), tasks)


def test_tasks_keep_their_categories(tmp_path):
    (tmp_path / "sni" / "train").mkdir(parents=True)
    task = {"task": "t", "definition": "D.", "categories": ["Classification -> Verification"], "instances": []}
    (tmp_path / "sni" / "train" / "t.json").write_text(json.dumps(task))
    assert load_tasks(tmp_path, "train")[0].categories == ("Classification -> Verification",)
    assert top_category(("Classification -> Verification", "Reasoning")) == "Classification"
    assert top_category(()) == "none"


def test_the_heldout_rule_stratifies_by_category_and_is_seeded():
    candidates = {f"task{i:03d}": "A" for i in range(60)} | {f"task{i:03d}": "B" for i in range(60, 90)}
    candidates |= {f"task{i:03d}": c for i, c in zip(range(90, 100), "CCCCCDDDDE", strict=True)}
    chosen = choose_heldout(candidates, size=10, seed=1)
    assert chosen == sorted(chosen) and chosen == choose_heldout(candidates, size=10, seed=1)
    counts = Counter(candidates[n] for n in chosen)
    assert counts == {"A": 6, "B": 3, "C": 1}  # shares 6, 3, 0.5, 0.4, 0.1: the largest remainder takes the 10th
    assert choose_heldout(candidates, size=10, seed=2) != chosen
    with pytest.raises(DataError, match="cannot hold out"):
        choose_heldout(candidates, size=101)


@pytest.mark.parametrize("data_dir", _real_data(), ids=lambda p: "file" if p is None else "shared-data")
def test_the_committed_heldout_split_is_the_rules_and_no_training_run_sees_it(data_dir: Path | None):
    committed = json.loads(HELDOUT_FILE.read_text(encoding="utf-8"))
    assert (committed["size"], committed["seed"]) == (HELDOUT_SIZE, HELDOUT_SEED)
    assert heldout_names() == sorted(committed["tasks"]) and len(committed["tasks"]) == HELDOUT_SIZE
    shipped = set(json.loads(DEFAULT_PARAPHRASES.read_text(encoding="utf-8"))["tasks"])
    assert not shipped & set(committed["tasks"])  # none of the tasks earlier checkpoints trained on
    if data_dir is not None:
        assert choose_heldout(heldout_candidates(data_dir)) == heldout_names()
        names = {t.name for t in training_tasks(data_dir)}
        assert len(names) == len(load_tasks(data_dir, "train")) - HELDOUT_SIZE
        assert not names & set(heldout_names()) and not names & {t.name for t in load_tasks(data_dir, "dev")}
        assert [t.name for t in eval_tasks(data_dir, "heldout")] == heldout_names()
        assert all((data_dir / "sni" / "descriptions" / f"{n}.json").is_file() for n in heldout_names())


def test_heldout_evaluation_needs_its_tasks_in_the_data(tiny_data_dir, tmp_path, monkeypatch):
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps({"tasks": {"task2_sentiment": "Sentiment Analysis"}}))
    monkeypatch.setattr(sni_splits, "HELDOUT_FILE", path)
    assert [t.name for t in eval_tasks(tiny_data_dir, "heldout")] == ["task2_sentiment"]
    assert [t.name for t in training_tasks(tiny_data_dir)] == ["task1_reverse"]
    path.write_text(json.dumps({"tasks": {"task9_elsewhere": "Classification"}}))
    with pytest.raises(DataError, match="task9_elsewhere"):
        eval_tasks(tiny_data_dir, "heldout")


def test_a_train_split_holding_a_dev_task_is_refused(tiny_data_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data_dir, root)
    shutil.copy(root / "sni" / "dev" / "task3_upper.json", root / "sni" / "train")
    with pytest.raises(DataError, match="holds dev tasks"):
        training_tasks(root)
