"""`loracast eval t2l` on the tiny Llama: every condition, every instance by default, a control from another task,
condition (f) prompted like (b), and each condition's prompt tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypernet import checkpoint, eval_t2l, sni_splits
from hypernet.eval_t2l import CONDITIONS, evaluate, score, table
from hypernet.train_t2l import TrainArgs, train
from loracast.errors import UserError
from loracast_cli.cli import main


@pytest.fixture(scope="module")
def tiny_described_mtl(tiny_base_dir: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Condition (f)'s checkpoint for the tiny Llama: `train mtl --describe`, a few steps."""
    work = tmp_path_factory.mktemp("mtl-described-run")
    args = TrainArgs(
        kind="mtl",
        data_dir=tiny_data_dir,
        out=work / "mtl-described.safetensors",
        work_dir=work,
        base=str(tiny_base_dir),
        steps=3,
        batch_size=2,
        warmup=1,
        paraphrases=None,
        describe=True,
    )
    train(args)
    return args.out


def _evaluate(tiny_t2l, tiny_mtl, tiny_described_mtl, tiny_base_dir, tiny_data_dir, **kwargs) -> dict:
    return evaluate(
        tiny_data_dir,
        kwargs.pop("split", "train"),
        t2l_path=tiny_t2l,
        mtl_path=tiny_mtl,
        described_path=tiny_described_mtl,
        base_name=str(tiny_base_dir),
        max_new_tokens=3,
        **kwargs,
    )


def test_every_instance_of_every_task_is_scored_by_default(
    tiny_t2l, tiny_mtl, tiny_described_mtl, tiny_base_dir, tiny_data_dir, monkeypatch
):
    calls: list[tuple[str, object, list[str]]] = []
    real = eval_t2l.answer

    def recording(base, wrappers, adapter, users, max_new_tokens, progress):
        calls.append((progress[-2], adapter, users))
        return real(base, wrappers, adapter, users, max_new_tokens)

    monkeypatch.setattr(eval_t2l, "answer", recording)
    result = _evaluate(tiny_t2l, tiny_mtl, tiny_described_mtl, tiny_base_dir, tiny_data_dir)
    tasks = result["tasks"]
    assert list(tasks) == ["task1_reverse", "task2_sentiment"]
    assert all(t["n"] == 2 for t in tasks.values())  # both instances, not a sample of them
    assert tasks["task1_reverse"]["control_description_from"] == "task2_sentiment"
    assert tasks["task2_sentiment"]["control_description_from"] == "task1_reverse"
    for cond in CONDITIONS:
        mean = sum(t[cond]["rougeL"] for t in tasks.values()) / len(tasks)
        assert result["mean"][cond]["rougeL"] == pytest.approx(mean, abs=0.01)
    assert table(result).count("\n| ") == len(tasks) + 2  # a row per task, the mean, the prompt tokens

    # (f) reads the prompt (b) reads, with its own adapter; both pay for the description in prompt tokens.
    by_cond = {cond: (adapter, users) for cond, adapter, users in calls[: len(CONDITIONS)]}
    assert (
        by_cond["f"][1] == by_cond["b"][1] == ["Reverse the given list.\n\n[1, 2]", "Reverse the given list.\n\n[3, 4]"]
    )
    assert by_cond["f"][0] is not None and by_cond["f"][0] is not by_cond["c"][0]
    t1 = tasks["task1_reverse"]
    assert t1["f"]["prompt_tokens"] == t1["b"]["prompt_tokens"] > t1["d"]["prompt_tokens"] == t1["a"]["prompt_tokens"]
    assert "| prompt tokens / query |" in table(result)


def test_a_limit_and_a_subset_of_conditions(tiny_t2l, tiny_mtl, tiny_base_dir, tiny_data_dir, tmp_path):
    quick = _evaluate(
        tiny_t2l, tiny_mtl, tmp_path / "absent.safetensors", tiny_base_dir, tiny_data_dir, limit=1, conditions="abcde"
    )
    assert [t["n"] for t in quick["tasks"].values()] == [1, 1] and quick["limit_per_task"] == 1
    assert list(quick["conditions"]) == list("abcde") and "f" not in quick["mean"]
    assert quick["described_mtl_checkpoint"] is None


def test_condition_f_needs_a_multi_task_lora_trained_with_descriptions(
    tiny_t2l, tiny_mtl, tiny_described_mtl, tiny_base_dir, tiny_data_dir, tmp_path
):
    with pytest.raises(checkpoint.CheckpointError, match="train mtl --describe"):
        _evaluate(tiny_t2l, tiny_mtl, tmp_path / "absent.safetensors", tiny_base_dir, tiny_data_dir)
    with pytest.raises(checkpoint.CheckpointError, match="not trained with descriptions"):
        _evaluate(tiny_t2l, tiny_mtl, tiny_mtl, tiny_base_dir, tiny_data_dir, conditions="f")
    with pytest.raises(checkpoint.CheckpointError, match="not trained without descriptions"):
        _evaluate(tiny_t2l, tiny_described_mtl, tiny_described_mtl, tiny_base_dir, tiny_data_dir, conditions="c")
    with pytest.raises(UserError, match="--conditions 'abz'"):
        _evaluate(tiny_t2l, tiny_mtl, tiny_described_mtl, tiny_base_dir, tiny_data_dir, conditions="abz")


def test_the_heldout_split_is_evaluated_from_the_training_folder(
    tiny_t2l, tiny_mtl, tiny_base_dir, tiny_data_dir, tmp_path, monkeypatch
):
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps({"tasks": {"task2_sentiment": "Sentiment Analysis"}}))
    monkeypatch.setattr(sni_splits, "HELDOUT_FILE", path)
    absent = tmp_path / "absent.safetensors"
    result = _evaluate(tiny_t2l, tiny_mtl, absent, tiny_base_dir, tiny_data_dir, split="heldout", conditions="ad")
    assert result["split"] == "heldout" and list(result["tasks"]) == ["task2_sentiment"]


def test_scores_normalize_and_take_the_best_gold_answer():
    assert score("Positive.", ("negative", "positive")) == {"rougeL": 100.0, "exact": 100.0, "contained": 100.0}
    partial = score("the answer is positive", ("positive",))
    assert partial["exact"] == 0 and partial["contained"] == 100 and 0 < partial["rougeL"] < 100
    assert score("impositive", ("positive",))["contained"] == 0  # whole words only


def test_the_command_line_passes_the_split_conditions_and_fs_checkpoint(tmp_path, monkeypatch, capsys):
    seen: dict = {}
    monkeypatch.setattr(eval_t2l, "evaluate", lambda *a, **kw: seen.update(kw) or {})
    monkeypatch.setattr(eval_t2l, "table", lambda result: "table")
    argv = ["eval", "t2l", "--data", str(tmp_path), "--split", "heldout", "--conditions", "abcde"]
    assert main([*argv, "--mtl-described", "f.safetensors"]) == 0
    assert (seen["split"], seen["conditions"], seen["described_path"]) == ("heldout", "abcde", Path("f.safetensors"))
    assert main(argv) == 0 and seen["described_path"] == checkpoint.DEFAULT_MTL_DESCRIBED
