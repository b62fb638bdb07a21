"""Description -> adapter, in memory or as a PEFT directory, with the shipped T2L checkpoint by default."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from hypernet import checkpoint
from hypernet.encoder import DescriptionEncoder
from hypernet.t2l import Adapter
from loracast import adapter_format
from loracast.base_model import BaseModel
from loracast.errors import UserError

MAX_DESCRIPTION_CHARS = 4000


class InputError(UserError, ValueError):
    """The request itself is unusable (empty description, ...); the message says what to fix."""


def check_description(description: str) -> str:
    text = description.strip()
    if not text:
        raise InputError("the description is empty: describe the task in a sentence or more")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise InputError(f"the description has {len(text)} characters; at most {MAX_DESCRIPTION_CHARS} are accepted")
    return text


class TextToLoRAGenerator:
    """Loads a T2L checkpoint and its encoder once; each `generate` is one hypernetwork pass."""

    def __init__(self, path: Path = checkpoint.DEFAULT_T2L, base: BaseModel | None = None) -> None:
        self.hyper, self.meta = checkpoint.load(path)
        self.path = Path(path)
        self.fingerprint = self.meta.get("base_fingerprint", "")
        if base is not None and base.fingerprint != self.fingerprint:
            raise checkpoint.CheckpointError(
                f"{path} was trained for base model {self.fingerprint[:12]}…, not {base.fingerprint[:12]}…"
            )
        self.encoder = DescriptionEncoder(self.meta.get("encoder", "minilm"), base)
        self.spec = self.hyper.cfg.spec

    @torch.no_grad()
    def generate(self, description: str) -> Adapter:
        """{(layer, module): (A (r, in), B (out, r))} for one description."""
        adapter = self.hyper(self.encoder([check_description(description)]))
        return {k: (a[0], b[0]) for k, (a, b) in adapter.items()}

    def metadata(self, description: str) -> dict[str, str]:
        return {
            adapter_format.META_FINGERPRINT: self.fingerprint,
            "loracast.hypernet_version": self.meta.get("hypernet_version", checkpoint.HYPERNET_VERSION),
            "loracast.description_sha256": hashlib.sha256(description.strip().encode()).hexdigest(),
        }

    def save(self, description: str, out: Path, base_name: str = "smollm2") -> Path:
        adapter = self.generate(description)
        return adapter_format.save(out, adapter, self.spec, base_name, self.metadata(description))
