"""SNI data: the prompt contract, answer-only labels, description variants, scoring."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from hypernet.eval_t2l import score
from hypernet.sni_data import (
    DEFAULT_PARAPHRASES,
    DataError,
    default_data_dir,
    description_variants,
    encode_example,
    load_paraphrases,
    load_tasks,
    user_turn,
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
