"""`loracast eval t2l` on the tiny Llama: every condition, every instance by default, a control from another task."""

from __future__ import annotations

import pytest

from hypernet.eval_t2l import CONDITIONS, evaluate, score, table


def test_every_instance_of_every_task_is_scored_by_default(tiny_t2l, tiny_mtl, tiny_base_dir, tiny_data_dir):
    result = evaluate(
        tiny_data_dir, "train", t2l_path=tiny_t2l, mtl_path=tiny_mtl, base_name=str(tiny_base_dir), max_new_tokens=3
    )
    tasks = result["tasks"]
    assert list(tasks) == ["task1_reverse", "task2_sentiment"]
    assert all(t["n"] == 2 for t in tasks.values())  # both instances, not a sample of them
    assert tasks["task1_reverse"]["control_description_from"] == "task2_sentiment"
    assert tasks["task2_sentiment"]["control_description_from"] == "task1_reverse"
    for cond in CONDITIONS:
        mean = sum(t[cond]["rougeL"] for t in tasks.values()) / len(tasks)
        assert result["mean"][cond]["rougeL"] == pytest.approx(mean, abs=0.01)
    assert table(result).count("\n| ") == len(tasks) + 1  # a row per task and the mean

    quick = evaluate(
        tiny_data_dir, "train", 1, t2l_path=tiny_t2l, mtl_path=tiny_mtl, base_name=str(tiny_base_dir), max_new_tokens=3
    )
    assert [t["n"] for t in quick["tasks"].values()] == [1, 1] and quick["limit_per_task"] == 1


def test_scores_normalize_and_take_the_best_gold_answer():
    assert score("Positive.", ("negative", "positive")) == {"rougeL": 100.0, "exact": 100.0, "contained": 100.0}
    partial = score("the answer is positive", ("positive",))
    assert partial["exact"] == 0 and partial["contained"] == 100 and 0 < partial["rougeL"] < 100
    assert score("impositive", ("positive",))["contained"] == 0  # whole words only
