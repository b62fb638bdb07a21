"""`loracast eval d2l` on the tiny Llama: every condition, the needle buckets and the quality-time curve."""

from __future__ import annotations

import json
from pathlib import Path

from support import write_rc_fixture

from hypernet import d2l_data
from hypernet.eval_d2l import CEILING, CONDITIONS, EvalArgs, Evaluator, evaluate, ratio_vs_context_distillation, table
from hypernet.self_distill import DistillConfig
from loracast_cli import cli

FAST = DistillConfig(budget_s=2, max_steps=2, batch_size=4, max_new_tokens=3, top_k=4)


def _args(tmp_path: Path, tiny_d2l: Path, tiny_base_dir: Path, **overrides) -> EvalArgs:
    args = dict(
        data_dir=write_rc_fixture(tmp_path),
        d2l_path=tiny_d2l,
        base=str(tiny_base_dir),
        distill=FAST,
        fictional=2,
        composites=1,
        composite_tokens=64,
        passages=2,
        needles=1,
        needle_lengths=(32, 64),
        curve_documents=1,
        budgets=(0, 1, 2),
        max_new_tokens=4,
    )
    return EvalArgs(**{**args, **overrides})


def test_every_condition_needles_and_the_curve_are_measured(tmp_path, tiny_d2l, tiny_base_dir):
    result = evaluate(_args(tmp_path, tiny_d2l, tiny_base_dir))
    for name, expected_docs in (("fictional", 2), ("composites", 1), ("passages", 2)):
        part = result[name]
        assert part["documents"] == expected_docs and part["questions"] >= expected_docs
        assert set(part["mean"]) == set(CONDITIONS)
        for scores in part["mean"].values():
            assert all(0 <= scores[m] <= 100 for m in ("rougeL", "contained"))
        assert set(part["gap_closed"]) == {"rougeL", "contained"}
        assert part["budget_s"] == 2 and part["job"]["elapsed_s"] > 0
        assert part["job"]["steps"] <= 2 and part["job"]["taught"] <= part["job"]["probes"]
    assert set(result["needle"]["buckets"]) == {"32", "64"}
    assert all(set(b["mean"]) == {"a", "b", "c"} for b in result["needle"]["buckets"].values())
    curve = result["curve"]
    assert curve["budgets_s"] == [0, 1, 2]
    assert set(curve["starts"]) == {"zero", "bias", "d2l", CEILING}
    assert all(len(points) == 3 for points in curve["starts"].values())
    assert set(curve["vs_context_distillation"]) >= {"d2l_vs_context_distillation", "ratio_is_lower_bound"}
    text = table(result)
    assert "fictional (2 docs" in text and "| 64 |" in text and "test questions (ceiling)" in text


def test_snapshots_score_the_start_before_the_first_step_and_the_end_after_it(tmp_path, tiny_d2l, tiny_base_dir):
    ev = Evaluator(_args(tmp_path, tiny_d2l, tiny_base_dir))
    doc = d2l_data.fictional_documents(1, 0, part="heldout")[0]
    scored: list[object] = []
    real = ev.answers
    ev.answers = lambda adapter, d: scored.append(adapter) or real(adapter, d)  # type: ignore[method-assign]
    scores = ev.snapshots(doc, [0, 0.001, 1000], "zero", on_test=False)
    assert len(scores) == 3
    # Budgets 0 and 0.001 end before the first step (the teacher alone takes longer): the start, scored once;
    # 1000 outlasts the job (max_steps): its final adapter.
    assert len(scored) == 2 and scores[0] is scores[1]
    assert all(float(b.abs().sum()) == 0 for _, b in scored[0].values())  # zero start: B = 0
    assert any(float(b.abs().sum()) > 0 for _, b in scored[1].values())


def test_the_ratio_is_the_time_zero_init_needs_for_lora_casts_score():
    curve = {
        "budgets_s": [0, 10, 20, 40],
        "starts": {
            "zero": [{"contained": 0}, {"contained": 10}, {"contained": 30}, {"contained": 50}],
            "d2l": [{"contained": 5}, {"contained": 30}, {"contained": 40}, {"contained": 45}],
        },
    }
    r = ratio_vs_context_distillation(curve, 10)
    assert r["d2l_vs_context_distillation"] == 2.0 and not r["ratio_is_lower_bound"]  # 30 reached at 20 s
    curve["starts"]["zero"][2:] = [{"contained": 20}, {"contained": 25}]
    r = ratio_vs_context_distillation(curve, 10)
    assert r["d2l_vs_context_distillation"] == 4.0 and r["ratio_is_lower_bound"]
    assert ratio_vs_context_distillation(curve, 15) == {}  # not a budget on the curve


def test_cli_prints_the_table_and_writes_json(tmp_path, tiny_d2l, tiny_base_dir, capsys):
    out = tmp_path / "eval.json"
    code = cli.main(
        [
            "eval", "d2l", "--data", str(write_rc_fixture(tmp_path)), "--checkpoint", str(tiny_d2l),
            "--base", str(tiny_base_dir), "--sets", "fictional", "--documents", "1", "--budget-seconds", "0",
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert "| fictional (1 docs" in capsys.readouterr().out
    written = json.loads(out.read_text())["fictional"]
    assert set(written["mean"]) == set(CONDITIONS) and written["job"]["steps"] == 0
