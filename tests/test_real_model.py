"""End to end on the real SmolLM2-135M-Instruct and the shipped T2L and D2L checkpoints."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hypernet import d2l_data
from hypernet.answering import answer
from hypernet.makers import DocToLoRAMaker, TextToLoRAMaker
from hypernet.sni_data import chat_prompt, collate
from hypernet.train_t2l import answer_loss
from loracast import adapter_format, base_model
from loracast.lora import applied, inject, to_torch


@pytest.fixture(scope="module")
def real_base() -> base_model.BaseModel:
    return base_model.load()


def _gold_answers(base: base_model.BaseModel, doc: d2l_data.Document) -> dict[str, torch.Tensor]:
    """Each question alone in the prompt, teacher-forced on its gold answer: the batch answer_loss scores."""
    tok = base.tokenizer
    rows = []
    for qa in doc.qas:
        prompt = tok(chat_prompt(tok, qa.question), add_special_tokens=False)["input_ids"]
        answer_ids = tok(qa.answer, add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer_ids, [-100] * len(prompt) + answer_ids))
    return collate(rows, tok.pad_token_id or 0)


def test_shipped_t2l_adapter_loads_in_peft_and_changes_the_answer(real_base, tmp_path):
    maker = TextToLoRAMaker(base=real_base)  # refuses a checkpoint trained for another base
    description = "Classify the sentiment of a product review as positive or negative."
    out = maker.save(description, tmp_path / "sentiment")
    stored, spec, _ = adapter_format.load(out, expected_fingerprint=real_base.fingerprint)
    adapter = to_torch(stored)

    tok = real_base.tokenizer
    ids = tok(["This blender broke after two days."], return_tensors="pt")["input_ids"]
    wrappers = inject(real_base.model, spec)
    with torch.no_grad():
        with applied(wrappers, adapter):
            ours = real_base.model(ids).logits
        plain = real_base.model(ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model.resolve()), out)
        theirs = peft_model.eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - plain).abs().max().item() > 1e-2  # a trained hypernetwork's adapter does something

    review = "Best headphones I have ever owned, the sound is crisp."
    reply = answer(real_base, wrappers, adapter, [review], max_new_tokens=8)[0]
    assert reply.strip(), "the adapted model answered nothing"


def test_shipped_d2l_adapter_holds_facts_of_an_unseen_document(real_base, tmp_path):
    """A held-out generated profile (no entity name of it was ever trained on): its adapter, loaded through PEFT
    exactly as ours, makes the base model without the document likelier to give the document's answers."""
    doc = d2l_data.fictional_documents(1, seed=11, part="heldout")[0]
    maker = DocToLoRAMaker(base=real_base)
    out = maker.save(doc.text, tmp_path / "profile")
    stored, spec, meta = adapter_format.load(out, expected_fingerprint=real_base.fingerprint)
    assert meta["loracast.document_sha256"] and doc.text not in (out / "adapter_config.json").read_text()
    adapter = to_torch(stored)

    batch = _gold_answers(real_base, doc)
    wrappers = inject(real_base.model, spec)
    with torch.no_grad():
        with applied(wrappers, adapter):
            adapted = answer_loss(real_base.model, batch).item()
            ours = real_base.model(batch["input_ids"][:1]).logits
        plain = answer_loss(real_base.model, batch).item()
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model.resolve()), out)
        theirs = peft_model.eval()(batch["input_ids"][:1]).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    print(f"gold-answer loss without the document: base {plain:.3f}, D2L adapter {adapted:.3f}")
    assert adapted < plain - 0.1


def test_self_distillation_makes_the_real_model_recall_a_document_it_never_saw(real_base):
    """A held-out profile, internalized for 30 s: the questions of the evaluation (never shown to the probe writer)
    get their gold answers likelier than with the one pass alone, and some are answered outright."""
    doc = d2l_data.fictional_documents(1, seed=5, part="heldout")[0]
    maker = DocToLoRAMaker(base=real_base)
    phases: list[str] = []
    one_pass = maker.make_adapter(doc.text)
    distilled = maker.internalize(doc.text, budget_s=30, on_progress=lambda p: phases.append(p.phase))
    assert phases[0] == "start" and phases[-1] == "done" and "distill" in phases

    batch = _gold_answers(real_base, doc)
    with torch.no_grad():
        with applied(maker.wrappers, one_pass):
            before = answer_loss(real_base.model, batch).item()
        with applied(maker.wrappers, distilled):
            after = answer_loss(real_base.model, batch).item()
    replies = answer(real_base, maker.wrappers, distilled, [qa.question for qa in doc.qas], max_new_tokens=32)
    recalled = sum(qa.answer.lower() in r.lower() for qa, r in zip(doc.qas, replies, strict=True))
    print(f"gold-answer loss: one pass {before:.3f}, distilled {after:.3f}; recalled {recalled}/{len(doc.qas)}")
    assert after < before - 0.3
    assert recalled >= 1
