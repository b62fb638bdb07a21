"""The shipped hypernetwork format: one safetensors file, its config and provenance in the metadata.

Loading never unpickles anything: the metadata is JSON and the weights are plain tensors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hypernet.d2l import D2LConfig, DocToLoRA
from hypernet.t2l import MultiTaskLoRA, T2LConfig, TextToLoRA
from loracast.errors import UserError
from loracast.paths import replacing

HYPERNET_VERSION = "t2l-1"
D2L_VERSION = "d2l-1"
DEFAULT_T2L = Path(__file__).resolve().parent / "checkpoints" / "t2l.safetensors"
DEFAULT_MTL = Path(__file__).resolve().parent / "checkpoints" / "multitask-lora.safetensors"
# Condition (f) of `eval t2l`: a multi-task LoRA trained with the description in the prompt (`train mtl --describe`).
DEFAULT_MTL_DESCRIBED = Path(__file__).resolve().parent / "checkpoints" / "multitask-lora-described.safetensors"
DEFAULT_D2L = Path(__file__).resolve().parent / "checkpoints" / "d2l.safetensors"

Hypernetwork = TextToLoRA | MultiTaskLoRA | DocToLoRA
# The `kind` metadata of a checkpoint -> its model class, its config class, the command that trains it.
KINDS: dict[str, tuple[type[Hypernetwork], type[T2LConfig | D2LConfig], str]] = {
    "TextToLoRA": (TextToLoRA, T2LConfig, "t2l"),
    "MultiTaskLoRA": (MultiTaskLoRA, T2LConfig, "mtl"),
    "DocToLoRA": (DocToLoRA, D2LConfig, "d2l"),
}


class CheckpointError(UserError, RuntimeError):
    """A hypernetwork checkpoint is missing or unreadable; the message names the file."""


def save(path: Path, model: Hypernetwork, meta: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous file, never half of a new one."""
    metadata = {"config": json.dumps(model.cfg.to_dict()), "kind": type(model).__name__}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    with replacing(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp, metadata=metadata)


def save_trained(model: Hypernetwork, meta: dict, args: Any, log: list[dict], log_path: Path) -> dict:
    """End a training run: the checkpoint at `args.out` records `meta`, the run's arguments and its final loss
    (mean of the last 50 steps); the loss log goes to `log_path`. Returns the metadata written."""
    meta = {
        **meta,
        "train_args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "final_loss_50": sum(e["loss"] for e in log[-50:]) / max(1, len(log[-50:])),
    }
    save(args.out, model.eval(), meta)
    log_path.write_text(json.dumps(log))
    return meta


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load(path: Path, kinds: tuple[str, ...] = ("TextToLoRA", "MultiTaskLoRA")) -> tuple[Hypernetwork, dict[str, str]]:
    """A checkpoint of one of `kinds` (a file of another kind is refused with a clear error)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"hypernetwork checkpoint {path} does not exist: train one with `loracast train {KINDS[kinds[0]][2]}`"
        )
    try:
        meta = read_metadata(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"hypernetwork checkpoint {path} is corrupt or not a LoraCast one ({exc})") from exc
    if meta.get("kind") in KINDS and meta["kind"] not in kinds:
        raise CheckpointError(f"{path} is a {meta['kind']} checkpoint; this needs a {' or '.join(kinds)} one")
    try:
        model_cls, cfg_cls, _ = KINDS[meta["kind"]]
        model = model_cls(cfg_cls.from_dict(json.loads(meta["config"])))
        model.load_state_dict(load_file(path))
    except (SafetensorError, KeyError, ValueError, RuntimeError, OSError, TypeError) as exc:
        raise CheckpointError(f"hypernetwork checkpoint {path} is corrupt or not a LoraCast one ({exc})") from exc
    return model.eval(), meta


def load_state(path: Path) -> dict | None:
    """Resumable training state (weights, optimizer, step, RNG), or None if there is none."""
    return torch.load(path, weights_only=False) if Path(path).is_file() else None


def save_state(path: Path, state: dict) -> None:
    with replacing(path) as tmp:
        torch.save(state, tmp)


def save_training(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, rng: random.Random, step: int, log: list[dict]
) -> None:
    """Everything a training loop needs to continue exactly where it stopped."""
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "log": log,
    }
    save_state(path, state)


def resume_training(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, rng: random.Random
) -> tuple[int, list[dict]]:
    """Restore a `save_training` state into `model`, `opt` and the RNGs: (its step, its log); (0, []) if none."""
    state = load_state(path)
    if state is None:
        return 0, []
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["log"]
