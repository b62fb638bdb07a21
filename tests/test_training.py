"""The training loop: deterministic, resumable, and it records where a checkpoint came from."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from hypernet import checkpoint, sni_splits, train_t2l
from hypernet.sni_data import DEFAULT_PARAPHRASES, data_hash, files_hash
from hypernet.train_t2l import TaskStream, TrainArgs, draw_batch, train
from loracast.errors import UserError
from loracast_cli.cli import main


def _args(tmp_path, tiny_base_dir, tiny_data_dir, name: str, steps: int, kind: str = "t2l") -> TrainArgs:
    return TrainArgs(
        kind=kind,
        data_dir=tiny_data_dir,
        out=tmp_path / name / "ck.safetensors",
        work_dir=tmp_path / name,
        base=str(tiny_base_dir),
        steps=steps,
        batch_size=2,
        warmup=1,
        checkpoint_every=2,
        paraphrases=None,  # the shipped file describes the real training tasks, not the fixture's
    )


def _log(args: TrainArgs) -> list[dict]:
    return json.loads((args.work_dir / f"{args.kind}-log.json").read_text())


@pytest.mark.parametrize("kind", ["t2l", "mtl"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_base_dir, tiny_data_dir, kind):
    straight = _args(tmp_path, tiny_base_dir, tiny_data_dir, "straight", 4, kind)
    train(straight)
    interrupted = _args(tmp_path, tiny_base_dir, tiny_data_dir, "resumed", 2, kind)
    train(interrupted)
    interrupted.steps = 4  # the second call finds the state at step 2 and carries on
    meta = train(interrupted)
    assert _log(interrupted) == _log(straight)
    a, _ = checkpoint.load(straight.out)
    b, stored = checkpoint.load(interrupted.out)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert stored["data_sha256"] == data_hash(tiny_data_dir, "train") == meta["data_sha256"]
    assert len(stored["base_fingerprint"]) == 64


def test_training_moves_the_loss(tmp_path, tiny_base_dir, tiny_data_dir):
    args = _args(tmp_path, tiny_base_dir, tiny_data_dir, "lr", 12)
    args.lr = 1e-2
    train(args)
    log = _log(args)
    assert sum(e["loss"] for e in log[-3:]) < sum(e["loss"] for e in log[:3])


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "t2l.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(bad)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.safetensors")


def test_paraphrases_join_the_description_pool_and_are_recorded(tmp_path, tiny_base_dir, tiny_data_dir):
    plain = _args(tmp_path, tiny_base_dir, tiny_data_dir, "plain", 3)
    train(plain)
    para = _args(tmp_path, tiny_base_dir, tiny_data_dir, "para", 3)
    para.paraphrases = tmp_path / "paraphrases.json"
    texts = ["Output the list in reverse order.", "Flip the list.", "Write the items last to first."]
    para.paraphrases.write_text(json.dumps({"tasks": {"task1_reverse": texts}}))
    meta = train(para)
    assert meta["paraphrases_sha256"] == hashlib.sha256(para.paraphrases.read_bytes()).hexdigest()
    assert checkpoint.load(para.out)[1]["paraphrases_sha256"] == meta["paraphrases_sha256"]
    assert _log(para) != _log(plain)  # some steps drew a paraphrase's embedding


def test_the_multi_task_lora_ignores_paraphrases(tmp_path, tiny_base_dir, tiny_data_dir):
    """It never sees a description, so the shipped file must not change which examples its run draws."""
    plain = _args(tmp_path, tiny_base_dir, tiny_data_dir, "mtl-plain", 3, kind="mtl")
    train(plain)
    para = _args(tmp_path, tiny_base_dir, tiny_data_dir, "mtl-para", 3, kind="mtl")
    para.paraphrases = tmp_path / "paraphrases.json"
    para.paraphrases.write_text(json.dumps({"tasks": {"task1_reverse": ["Flip the list.", "Reverse it."]}}))
    assert train(para)["paraphrases_sha256"] is None
    assert _log(para) == _log(plain)


def test_train_t2l_takes_the_shipped_paraphrases_unless_told_otherwise(tmp_path, monkeypatch):
    seen: list[TrainArgs] = []
    monkeypatch.setattr(train_t2l, "train", lambda a: seen.append(a) or {"final_loss_50": 0.0, "wall_s_this_run": 0})
    argv = ["train", "t2l", "--data", str(tmp_path), "--work-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra in ([], ["--paraphrases", "none"], ["--paraphrases", "mine.json"]):
        assert main([*argv, *extra]) == 0
    assert [a.paraphrases for a in seen] == [DEFAULT_PARAPHRASES, None, Path("mine.json")]


def _three_task_data(tmp_path: Path, tiny_data_dir: Path) -> Path:
    """The tiny data plus a third training task, and the anchor's descriptions for task1 and task3."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data_dir, root)
    (root / "sni" / "train" / "task4_double.json").write_text(
        json.dumps(
            {
                "task": "task4_double",
                "definition": "Double the number.",
                "categories": ["Mathematics"],
                "instances": [{"input": "21", "output": "42"}, {"input": "5", "output": "10"}],
            }
        )
    )
    (root / "sni" / "descriptions").mkdir()
    for name, texts in {"task1_reverse": ANCHOR, "task4_double": ["Multiply by two.", "Give twice the value."]}.items():
        (root / "sni" / "descriptions" / f"{name}.json").write_text(json.dumps({"task": name, "descriptions": texts}))
    return root


ANCHOR = ["Turn the list around.", "Give the elements last to first.", "Reverse the order of the items."]


@pytest.fixture
def held_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """task2_sentiment is the held-out split for this test (the committed list names real SNI tasks)."""
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps({"tasks": {"task2_sentiment": "Sentiment Analysis"}}))
    monkeypatch.setattr(sni_splits, "HELDOUT_FILE", path)
    return ["task2_sentiment"]


def _record_batches(monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path) -> list[str]:
    """Every training row as the base model reads it, decoded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows: list[str] = []
    real = train_t2l.collate

    def recording(examples, pad_id):
        rows.extend(tok.decode(ids) for ids, _ in examples)
        return real(examples, pad_id)

    monkeypatch.setattr(train_t2l, "collate", recording)
    return rows


@pytest.mark.parametrize(("kind", "describe"), [("t2l", False), ("mtl", False), ("mtl", True)])
def test_dev_and_heldout_tasks_never_enter_training_batches(
    tmp_path, tiny_base_dir, tiny_data_dir, held_out, monkeypatch, kind, describe
):
    data = _three_task_data(tmp_path, tiny_data_dir)
    rows = _record_batches(monkeypatch, tiny_base_dir)
    args = _args(tmp_path, tiny_base_dir, data, "run", 6, kind)
    args.describe = describe
    meta = train(args)
    text = "\n".join(rows)
    assert len(rows) == 12
    for never in ("I love it", "I hate it", "cat", "dog"):  # task2 (held out), task3 (dev)
        assert f"user\n{never}" not in text and f"\n\n{never}" not in text
    assert "[1, 2]" in text or "[3, 4]" in text
    assert "21" in text or "5<|im_end|>" in text
    assert meta["heldout_tasks"] == held_out and meta["training_tasks"] == 2
    assert meta["data_sha256"] != data_hash(data, "train")  # the held-out task's file is not in it


def test_the_description_goes_before_the_input_for_condition_f(
    tmp_path, tiny_base_dir, tiny_data_dir, held_out, monkeypatch
):
    data = _three_task_data(tmp_path, tiny_data_dir)
    rows = _record_batches(monkeypatch, tiny_base_dir)
    args = _args(tmp_path, tiny_base_dir, data, "described", 20, "mtl")
    args.describe = True
    meta = train(args)
    pools = {
        "[1, 2]": ["Reverse the given list.", *ANCHOR],
        "[3, 4]": ["Reverse the given list.", *ANCHOR],
        "21": ["Double the number.", "Multiply by two.", "Give twice the value."],
        "5": ["Double the number.", "Multiply by two.", "Give twice the value."],
    }
    seen = set()
    for row in rows:
        user = row.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        description, instance_input = user.rsplit("\n\n", 1)
        assert description in pools[instance_input]
        seen.add(description)
    assert len(seen) >= 5  # several descriptions of each task, not the definition alone
    assert meta["description_sources"] == {"anchor": 2} and meta["describe"] is True
    assert args.work_dir.joinpath("mtl-described-state.pt").is_file()
    assert json.loads(checkpoint.read_metadata(args.out)["train_args"])["describe"] is True


def test_t2l_records_the_anchor_descriptions_it_trained_on(tmp_path, tiny_base_dir, tiny_data_dir):
    data = _three_task_data(tmp_path, tiny_data_dir)
    meta = train(_args(tmp_path, tiny_base_dir, data, "anchor", 2))
    files = [data / "sni" / "descriptions" / f"{n}.json" for n in ("task1_reverse", "task4_double")]
    assert meta["descriptions_sha256"] == files_hash(files)
    assert meta["description_sources"] == {"anchor": 2}
    assert train(_args(tmp_path, tiny_base_dir, tiny_data_dir, "none", 2))["descriptions_sha256"] is None


def test_task_stream_is_a_seeded_permutation_every_epoch():
    stream = TaskStream(7, seed=3)
    epochs = [[stream[k] for k in range(e * 7, (e + 1) * 7)] for e in range(4)]
    assert all(sorted(e) == list(range(7)) for e in epochs)  # every task once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # a fresh order each epoch
    again = TaskStream(7, seed=3)
    assert [again[k] for k in reversed(range(28))] == [stream[k] for k in reversed(range(28))]  # any order of access
    other = TaskStream(7, seed=4)
    assert [other[k] for k in range(28)] != [stream[k] for k in range(28)]


def test_draws_are_deterministic_under_a_seed_and_cover_every_description():
    examples = [[(([1], [1]), None)], [(([2], [2]), None)], [(([3], [3]), None)]]
    sizes = [207, 7, 1]  # a task with the anchor's 200, one with paraphrases only, one with its definition only

    def draws(seed: int) -> list:
        rng, stream = random.Random(seed), TaskStream(3, seed)
        return [d for step in range(3000) for d in draw_batch(rng, stream, step, 2, examples, sizes)]

    first = draws(0)
    assert first == draws(0) and first != draws(1)
    for task, size in enumerate(sizes):
        assert {d.description for d in first if d.task == task} == set(range(size))
    blind = draw_batch(random.Random(0), TaskStream(3, 0), 0, 2, examples, None)
    assert all(d.description is None for d in blind)


def test_a_run_resumes_only_on_the_data_it_started_on(tmp_path, tiny_base_dir, tiny_data_dir):
    data = _three_task_data(tmp_path, tiny_data_dir)
    args = _args(tmp_path, tiny_base_dir, data, "drift", 2)
    train(args)
    (data / "sni" / "descriptions" / "task4_double.json").write_text(
        json.dumps({"task": "task4_double", "descriptions": ["Something else entirely."]})
    )
    args.steps = 4
    with pytest.raises(UserError, match="descriptions_sha256"):
        train(args)


def test_describe_is_refused_for_t2l(tmp_path, tiny_base_dir, tiny_data_dir):
    args = _args(tmp_path, tiny_base_dir, tiny_data_dir, "t2l-described", 2)
    args.describe = True
    with pytest.raises(UserError, match="--describe is for `train mtl`"):
        train(args)


def test_train_mtl_describe_writes_condition_fs_checkpoint_by_default(tmp_path, monkeypatch):
    seen: list[TrainArgs] = []
    monkeypatch.setattr(train_t2l, "train", lambda a: seen.append(a) or {"final_loss_50": 0.0, "wall_s_this_run": 0})
    for extra in ([], ["--describe"]):
        assert main(["train", "mtl", "--data", str(tmp_path), "--work-dir", str(tmp_path), *extra]) == 0
    assert [(a.describe, a.out) for a in seen] == [
        (False, checkpoint.DEFAULT_MTL),
        (True, checkpoint.DEFAULT_MTL_DESCRIBED),
    ]
