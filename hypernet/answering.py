"""Greedy answers from the base model with an optional adapter, batched (the prompt contract)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm import tqdm

from hypernet.sni_data import chat_prompt
from loracast.base_model import BaseModel
from loracast.lora import LoRALinear, applied


@torch.no_grad()
def answer(
    base: BaseModel,
    wrappers: Mapping[tuple[int, str], LoRALinear],
    adapter: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None,
    users: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: str | None = None,
) -> list[str]:
    """One greedy completion per user turn, all with the same adapter (None: the plain base)."""
    tok = base.tokenizer
    tok.padding_side = "left"
    prompts = [chat_prompt(tok, u) for u in users]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    outputs = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with applied(wrappers, adapter):
        for idx in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            out = base.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            for row, i in enumerate(idx):
                outputs[i] = tok.decode(out[row, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return outputs
