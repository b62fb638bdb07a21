"""What an adapter is made of, without torch: target modules, rank, scaling, PEFT key names.

Torch-free so that the worker's serving path (ONNX Runtime + numpy) can read adapters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """Which modules get an adapter and how it is scaled (rsLoRA: alpha / sqrt(r))."""

    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class ModuleShape:
    in_features: int
    out_features: int


@dataclass
class LoraTargets:
    """The shape of an adapter for one base model: layers x target modules."""

    num_layers: int
    shapes: dict[str, ModuleShape] = field(default_factory=dict)

    def names(self) -> Iterator[tuple[int, str]]:
        for layer in range(self.num_layers):
            for module in self.shapes:
                yield layer, module


def peft_key(layer: int, module: str, which: str) -> str:
    """The PEFT state-dict key of one LoRA matrix (which is 'A' or 'B')."""
    block = "self_attn" if module in ATTN_MODULES else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight"
