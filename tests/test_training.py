"""The training loop: deterministic, resumable, and it records where a checkpoint came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from hypernet import checkpoint, train_t2l
from hypernet.sni_data import DEFAULT_PARAPHRASES, collate, data_hash, encode_example, user_turn
from hypernet.train_t2l import TrainArgs, answer_logits, answer_loss, distill_loss, example_losses, train
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


def test_example_losses_are_each_rows_own_answer_loss(tiny_base):
    tok = tiny_base.tokenizer
    examples = [
        encode_example(tok, user_turn("one two three"), "four", 64),
        encode_example(tok, user_turn("a"), "a much longer answer than the other one", 64),
        encode_example(tok, user_turn("x y"), "z", 64),
    ]
    pad = tok.pad_token_id or 0
    with torch.no_grad():
        per_row = example_losses(tiny_base.model, collate(examples, pad))
        alone = [answer_loss(tiny_base.model, collate([e], pad)).item() for e in examples]
    assert per_row.tolist() == pytest.approx(alone, abs=1e-5)
    assert len(set(round(v, 4) for v in alone)) == 3  # the rows differ, so a mix-up of rows would show


def test_contrast_trains_adapters_apart_and_is_recorded(tmp_path, tiny_base_dir, tiny_data_dir):
    args = _args(tmp_path, tiny_base_dir, tiny_data_dir, "contrast", 12)
    args.lr, args.contrast, args.contrast_rows = 1e-2, 1.0, 2
    meta = train(args)
    gaps = [e["contrast_gap"] for e in _log(args)]
    assert len(gaps) == 12 and gaps[0] == pytest.approx(0.0, abs=1e-6)  # B starts at zero: one adapter for all
    assert max(gaps[-3:]) > 0  # another task's adapter ends up doing this task worse
    assert meta["train_args"]["contrast"] == 1.0


def test_the_shared_adapter_learns_and_survives_the_checkpoint(tmp_path, tiny_base_dir, tiny_data_dir):
    args = _args(tmp_path, tiny_base_dir, tiny_data_dir, "shared", 6)
    args.lr, args.shared_adapter = 1e-2, True
    meta = train(args)
    hyper, stored = checkpoint.load(args.out)
    assert hyper.cfg.shared_adapter and json.loads(stored["train_args"])["shared_adapter"] is True
    assert meta["train_args"]["shared_adapter"] is True
    assert all(b.abs().sum() > 0 for b in hyper.shared_B.values())  # B0 started at zero: it trained
    emb = torch.randn(2, 384)
    a, b = hyper(emb)[(1, "q_proj")]
    assert not torch.allclose(b[0], b[1])  # the description still matters
    with torch.no_grad():
        for head in hyper.heads.values():
            head.weight.zero_(), head.bias.zero_()
        for (layer, module), (a, b) in hyper(emb).items():  # what is left is the layer's own A0, B0
            assert torch.equal(a[1], hyper.shared_A[module][layer]) and torch.equal(b[1], hyper.shared_B[module][layer])


def test_description_distillation_pulls_the_student_toward_the_prompted_teacher(tmp_path, tiny_base_dir, tiny_data_dir):
    def final_kl(name: str, weight: float) -> float:
        args = _args(tmp_path, tiny_base_dir, tiny_data_dir, name, 16)
        args.lr, args.distill, args.distill_rows = 1e-2, weight, 2
        meta = train(args)
        kls = [e["distill_kl"] for e in _log(args)]
        assert len(kls) == 16 and kls[0] > 0  # the untrained adapter is the base model without the description
        assert meta["train_args"]["distill"] == weight
        return sum(kls[-4:])

    # SFT alone moves the student away from the prompted teacher; a heavy distill term holds it closer.
    assert final_kl("heavy", 100.0) < final_kl("light", 1e-6)


def test_distill_loss_is_zero_for_the_same_model_and_prompt(tiny_base):
    tok = tiny_base.tokenizer
    batch = collate([encode_example(tok, user_turn("2 + 2"), "4", 64)], tok.pad_token_id or 0)
    logits, _ = answer_logits(tiny_base.model, batch)
    assert distill_loss(tiny_base.model, logits, batch).item() == pytest.approx(0.0, abs=1e-6)


def test_contrast_and_distill_together_are_refused(tmp_path, tiny_base_dir, tiny_data_dir):
    args = _args(tmp_path, tiny_base_dir, tiny_data_dir, "both", 2)
    args.contrast, args.distill = 0.5, 1.0
    with pytest.raises(UserError, match="--contrast and --distill"):
        train(args)


def test_paraphrases_join_the_description_variants_and_are_recorded(tmp_path, tiny_base_dir, tiny_data_dir):
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
