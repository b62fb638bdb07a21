"""The shipped hypernetwork format: one safetensors file, its config and provenance in the metadata.

Loading never unpickles anything: the metadata is JSON and the weights are plain tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hypernet.t2l import MultiTaskLoRA, T2LConfig, TextToLoRA
from loracast.errors import UserError

HYPERNET_VERSION = "t2l-1"
DEFAULT_T2L = Path(__file__).resolve().parent / "checkpoints" / "t2l.safetensors"
DEFAULT_MTL = Path(__file__).resolve().parent / "checkpoints" / "multitask-lora.safetensors"


class CheckpointError(UserError, RuntimeError):
    """A hypernetwork checkpoint is missing or unreadable; the message names the file."""


def save(path: Path, model: TextToLoRA | MultiTaskLoRA, meta: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous file, never half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    metadata = {"config": json.dumps(model.cfg.to_dict()), "kind": type(model).__name__}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load(path: Path) -> tuple[TextToLoRA | MultiTaskLoRA, dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"hypernetwork checkpoint {path} does not exist: train one with `loracast train t2l`")
    try:
        meta = read_metadata(path)
        cfg = T2LConfig.from_dict(json.loads(meta["config"]))
        model = {"TextToLoRA": TextToLoRA, "MultiTaskLoRA": MultiTaskLoRA}[meta["kind"]](cfg)
        model.load_state_dict(load_file(path))
    except (SafetensorError, KeyError, ValueError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"hypernetwork checkpoint {path} is corrupt or not a LoraCast one ({exc})") from exc
    return model.eval(), meta


def load_state(path: Path) -> dict | None:
    """Resumable training state (weights, optimizer, step, RNG), or None if there is none."""
    return torch.load(path, weights_only=False) if Path(path).is_file() else None


def save_state(path: Path, state: dict) -> None:
    tmp = Path(str(path) + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
