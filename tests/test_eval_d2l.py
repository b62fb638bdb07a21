"""`loracast eval d2l` on the tiny Llama: every condition, the needle buckets and the speed comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_rc_fixture

from hypernet import d2l_data
from hypernet.eval_d2l import CONDITIONS, EvalArgs, Evaluator, context_distill, evaluate, table
from hypernet.sni_data import collate
from hypernet.train_d2l import student_rows, topk_kl
from hypernet.train_t2l import answer_logits
from loracast import cli
from loracast.lora import applied


def _args(tmp_path: Path, tiny_d2l: Path, tiny_base_dir: Path, **overrides) -> EvalArgs:
    args = dict(
        data_dir=write_rc_fixture(tmp_path),
        d2l_path=tiny_d2l,
        base=str(tiny_base_dir),
        fictional=2,
        passages=2,
        needles=1,
        needle_lengths=(32, 64),
        speed_documents=1,
        speed_tokens=64,
        cd_steps=2,
        max_new_tokens=4,
    )
    return EvalArgs(**{**args, **overrides})


def assert_teacher_counted(speed: dict) -> None:
    """The teacher's time is in the ratio. Checked through the recorded parts, not as "greater than" the ratio without
    it: both are rounded to 0.1, and on a fast machine the tiny model's teacher time rounds away."""
    with_teacher = (speed["cd_train_s_to_reach"] + speed["cd_teacher_s_median"]) / speed["d2l_internalize_s_median"]
    # Its inputs are recorded to the millisecond: a few percent off for the tiny model.
    assert speed["ratio_cd_with_teacher_over_d2l"] == pytest.approx(with_teacher, abs=0.1, rel=0.25)
    assert speed["ratio_cd_with_teacher_over_d2l"] >= speed["ratio_cd_over_d2l"]


def test_every_condition_needles_and_speed_are_measured(tmp_path, tiny_d2l, tiny_base_dir):
    result = evaluate(_args(tmp_path, tiny_d2l, tiny_base_dir))
    for name, expected_docs in (("fictional", 2), ("passages", 2)):
        part = result[name]
        assert part["documents"] == expected_docs and part["questions"] >= expected_docs
        assert set(part["mean"]) == set(CONDITIONS)
        for scores in part["mean"].values():
            assert all(0 <= scores[m] <= 100 for m in ("rougeL", "contained"))
        assert set(part["gap_closed"]) == {"rougeL", "contained"}
        assert part["timing_s"]["d2l_internalize_median"] > 0 and part["timing_s"]["cd_train_median"] > 0
    assert set(result["needle"]["buckets"]) == {"32", "64"}
    assert all(set(b["mean"]) == {"a", "b", "c"} for b in result["needle"]["buckets"].values())
    speed = result["speed"]
    # Checked after 1, 2, 4 and 8 steps (up to 4x the step budget), training time growing.
    assert [p["step"] for p in speed["cd_curve"]] == [1, 2, 4, 8]
    times = [p["train_s"] for p in speed["cd_curve"]]
    assert times == sorted(times) and times[0] > 0
    assert speed["ratio_cd_over_d2l"] > 0 and speed["cd_teacher_s_median"] > 0
    assert_teacher_counted(speed)
    assert speed["ratio_is_lower_bound"] == (speed["cd_reached_at_step"] is None)
    text = table(result)
    assert "fictional (2 docs" in text and "| 64 |" in text and "context distillation reaches" in text


def test_context_distillation_moves_the_student_towards_the_teacher(tmp_path, tiny_d2l, tiny_base_dir):
    ev = Evaluator(_args(tmp_path, tiny_d2l, tiny_base_dir, max_new_tokens=6))
    doc = d2l_data.fictional_documents(1, seed=3, part="heldout")[0]
    doc = d2l_data.Document(doc.text, doc.qas[:4], doc.kind, doc.doc_id)
    targets, _ = ev.teacher(doc)
    batch = collate(student_rows(ev.tok, doc, targets), ev.tok.pad_token_id or 0)

    def kl(adapter) -> float:
        with torch.no_grad(), applied(ev.wrappers, adapter):
            logits, _ = answer_logits(ev.base.model, batch)
            return topk_kl(
                logits, torch.cat([t.topk_ids for t in targets]), torch.cat([t.topk_logprobs for t in targets])
            ).item()

    lora, seconds = context_distill(ev.base, ev.wrappers, ev.generator.spec, doc, targets, steps=10, lr=1e-2)
    assert seconds > 0
    assert kl(lora) < kl(None) - 0.01  # a random tiny Llama is near uniform: small but real progress
    # The wrappers are left without an adapter: the base model is plain again.
    assert all(lin.A is None for lin in ev.wrappers.values())


def test_cli_prints_the_table_and_writes_json(tmp_path, tiny_d2l, tiny_base_dir, capsys):
    out = tmp_path / "eval.json"
    code = cli.main(
        [
            "eval", "d2l", "--data", str(write_rc_fixture(tmp_path)), "--checkpoint", str(tiny_d2l),
            "--base", str(tiny_base_dir), "--sets", "fictional", "--documents", "1", "--cd-steps", "1",
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert "| fictional (1 docs" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["fictional"]["mean"]) == set(CONDITIONS)


def test_speed_takes_a_length_and_at_most_one_question_per_fact(tmp_path, tiny_d2l, tiny_base_dir):
    """What `bench/bench_d2l_vs_cd.py` asks for: documents of another length, their questions capped (one per fact),
    the base model's floor and the teacher's time beside the ratios."""
    ev = Evaluator(_args(tmp_path, tiny_d2l, tiny_base_dir))
    speed = ev.speed(tokens=128, documents=1, questions=2)
    assert speed["documents"] == 1 and speed["questions_per_document"] == 2
    assert speed["tokens_median"] > 64  # longer than the args' speed_tokens: the length argument counts
    assert "base_rougeL" in speed and speed["cd_teacher_s_median"] > 0
    assert_teacher_counted(speed)
