"""End to end on the real SmolLM2-135M-Instruct and the shipped T2L checkpoint."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hypernet.answering import answer
from hypernet.generate import TextToLoRAGenerator
from loracast import adapter_format, base_model
from loracast.lora import applied, inject, to_torch


@pytest.fixture(scope="module")
def real_base() -> base_model.BaseModel:
    return base_model.load()


def test_shipped_t2l_adapter_loads_in_peft_and_changes_the_answer(real_base, tmp_path):
    generator = TextToLoRAGenerator(base=real_base)  # refuses a checkpoint trained for another base
    description = "Classify the sentiment of a product review as positive or negative."
    out = generator.save(description, tmp_path / "sentiment")
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
