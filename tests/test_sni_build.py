"""Rebuilding SNI task files from a (fake) natural-instructions clone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypernet.sni_build import SNIBuildError, build, task_lists_from
from hypernet.sni_data import load_tasks


def _upstream_task(definition: list[str], instances: list[tuple[str, list[str]]], language: str = "English") -> dict:
    return {
        "Definition": definition,
        "Categories": ["Test Category"],
        "Input_language": [language],
        "Output_language": [language],
        "Instances": [{"id": f"x-{n}", "input": i, "output": o} for n, (i, o) in enumerate(instances)],
    }


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    root = tmp_path / "natural-instructions"
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    tasks = {
        "task1_reverse": _upstream_task(
            ["Reverse the list.", "Answer with a list."],
            [
                ("[1, 2]", ["[2, 1]", "[2,1]"]),
                ("x" * 1201, ["long input"]),
                ("[3, 4]", ["y" * 201]),
                ("[1, 2]", ["duplicate"]),
                ("[5, 6]", ["[6, 5]"]),
            ],
        ),
        "task2_count": _upstream_task(["Count the words."], [(f"w{n}", [str(n)]) for n in range(10)]),
        "task3_spanish": _upstream_task(["Traduce."], [("hola", ["hello"])], language="Spanish"),
        "task4_dev": _upstream_task(["Sort the list."], [("[2, 1]", ["[1, 2]"])]),
    }
    for name, task in tasks.items():
        (root / "tasks" / f"{name}.json").write_text(json.dumps(task), encoding="utf-8")
    (root / "splits" / "default" / "test_tasks.txt").write_text("task4_dev\n", encoding="utf-8")
    return root


def test_build_format_filtering_and_loader(clone: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = build(clone, out, ["task1_reverse", "task2_count", "task3_spanish"], ["task4_dev"], commit="abc123")

    assert summary["train"] == {"tasks": 2, "instances": 2 + 10}
    assert summary["dev"] == {"tasks": 1, "instances": 1}
    assert list(summary["skipped"]) == ["task3_spanish"]
    assert not (out / "sni" / "train" / "task3_spanish.json").exists()

    raw = json.loads((out / "sni" / "train" / "task1_reverse.json").read_text(encoding="utf-8"))
    assert raw["task"] == "task1_reverse"
    assert raw["source_path"] == "tasks/task1_reverse.json"
    assert raw["source_commit"] == "abc123"
    assert raw["definition"] == "Reverse the list. Answer with a list."
    assert raw["categories"] == ["Test Category"]
    assert raw["input_language"] == raw["output_language"] == ["English"]
    # Long input, long output and the duplicate "[1, 2]" are dropped; the first gold output is kept.
    assert raw["instances"] == [
        {"input": "[1, 2]", "output": "[2, 1]", "all_outputs": ["[2, 1]", "[2,1]"]},
        {"input": "[5, 6]", "output": "[6, 5]", "all_outputs": ["[6, 5]"]},
    ]
    assert not list(out.rglob("*.tmp"))

    train = {t.name: t for t in load_tasks(out, "train")}
    assert set(train) == {"task1_reverse", "task2_count"}
    assert train["task1_reverse"].instances[0].all_outputs == ("[2, 1]", "[2,1]")
    assert [t.name for t in load_tasks(out, "dev")] == ["task4_dev"]
    assert task_lists_from(out) == (["task1_reverse", "task2_count"], ["task4_dev"])


def test_max_instances_keeps_the_first(clone: Path, tmp_path: Path) -> None:
    summary = build(clone, tmp_path / "out", ["task2_count"], [], max_instances=3)
    assert summary["train"] == {"tasks": 1, "instances": 3}
    (task,) = load_tasks(tmp_path / "out", "train")
    assert [i.input for i in task.instances] == ["w0", "w1", "w2"]


@pytest.mark.parametrize(
    ("train", "dev", "message"),
    [
        (["task1_reverse", "task2_count"], ["task2_count"], "dev tasks also in train: task2_count"),
        (["task1_reverse", "task4_dev"], [], "train tasks in the SNI test split: task4_dev"),
        (["task1_reverse", "task9_missing"], [], "task task9_missing not found"),
        (["../task1_reverse"], [], "bad task name"),
    ],
)
def test_refusals(clone: Path, tmp_path: Path, train: list[str], dev: list[str], message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(SNIBuildError, match=message):
        build(clone, out, train, dev)
    assert not out.exists(), "nothing may be written when the build is refused"


def test_refuses_source_without_tasks_folder(tmp_path: Path) -> None:
    with pytest.raises(SNIBuildError, match=r"has no tasks/ folder: pass the root of a natural-instructions clone"):
        build(tmp_path, tmp_path / "out", ["task1_reverse"], [])


def test_refuses_malformed_task_and_missing_test_split(clone: Path, tmp_path: Path) -> None:
    (clone / "tasks" / "task5_broken.json").write_text('{"Definition": "not a list"}', encoding="utf-8")
    with pytest.raises(SNIBuildError, match=r"task5_broken\.json is not an SNI task file"):
        build(clone, tmp_path / "out", ["task5_broken"], [])
    (clone / "splits" / "default" / "test_tasks.txt").unlink()
    with pytest.raises(SNIBuildError, match=r"test_tasks\.txt is missing"):
        build(clone, tmp_path / "out", ["task1_reverse"], [])


def test_task_lists_from_refuses_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(SNIBuildError, match="no task files"):
        task_lists_from(tmp_path)
