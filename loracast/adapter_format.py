"""The adapter format, a stable contract: a standard PEFT LoRA directory.

    DIR/adapter_config.json        PEFT LoraConfig (PeftModel.from_pretrained loads it unchanged)
    DIR/adapter_model.safetensors  keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

LoraCast's provenance rides in the safetensors metadata (PEFT ignores it): `loracast.base_fingerprint`,
`loracast.hypernet_version`, and the SHA-256 of the source text (`loracast.description_sha256`,
`loracast.document_sha256`), never the text itself. Directories are written to a temporary sibling
and renamed into place, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from loracast.errors import UserError
from loracast.lora_spec import LoraSpec, peft_key

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FINGERPRINT = "loracast.base_fingerprint"
PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")

# (A (r, in), B (out, r)) per (layer, module): numpy arrays, or torch tensors when saving.
Adapter = Mapping[tuple[int, str], tuple]


class AdapterError(UserError, ValueError):
    """An adapter directory is missing, malformed, or made for another base model."""


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def as_float32(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; this module itself stays torch-free
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def peft_config(spec: LoraSpec, base_name: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "target_modules": list(spec.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def save(out: Path, adapter: Adapter, spec: LoraSpec, base_name: str, metadata: Mapping[str, str]) -> Path:
    """Write `adapter` as a PEFT directory at `out`, atomically; an existing adapter there is replaced."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and is_adapter_dir(out)):
        raise AdapterError(f"{out} exists and is not a LoRA adapter directory: choose another --out or remove it")
    if META_FINGERPRINT not in metadata:
        raise AdapterError("an adapter must record the base model fingerprint it was made for")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {}
        for (layer, module), (a, b) in adapter.items():
            tensors[peft_key(layer, module, "A")] = as_float32(a)
            tensors[peft_key(layer, module, "B")] = as_float32(b)
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", **metadata})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(spec, base_name), indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(path: Path, expected_fingerprint: str | None = None) -> tuple[dict, LoraSpec, dict[str, str]]:
    """Read an adapter directory (numpy arrays); refuse it if it was made for another base model."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise AdapterError(f"{path} is not a LoRA adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
        spec = LoraSpec(
            tuple(cfg["target_modules"]), int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
        )
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        raw = load_file(path / WEIGHTS_FILE)
    except (OSError, ValueError, KeyError, TypeError, OverflowError, SafetensorError) as exc:
        raise AdapterError(f"{path}: corrupt adapter ({exc})") from exc
    if spec.r < 1:
        raise AdapterError(f"{path}: corrupt adapter (rank r={spec.r}, must be at least 1)")
    found = metadata.get(META_FINGERPRINT)
    if expected_fingerprint is not None and found != expected_fingerprint:
        raise AdapterError(
            f"{path} was made for base model {str(found)[:12]}…, not the loaded base {expected_fingerprint[:12]}…: "
            "make it again for this base"
        )
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, tensor in raw.items():
        m = PEFT_KEY.fullmatch(key)
        if m is None:
            raise AdapterError(f"{path}: unexpected tensor {key!r} in {WEIGHTS_FILE}")
        pairs.setdefault((int(m[1]), m[2]), {})[m[3]] = tensor
    try:
        adapter = {k: (v["A"], v["B"]) for k, v in pairs.items()}
    except KeyError as exc:
        raise AdapterError(f"{path}: a LoRA pair is missing its {exc.args[0]} matrix") from exc
    return adapter, spec, metadata
