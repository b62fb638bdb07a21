"""LoRA on a torch model: the one layer everything else builds on.

`LoRALinear` wraps a frozen `nn.Linear` and adds `scale * B(A(x))`. Unlike PEFT, A and B are not
parameters of the layer but tensors set per forward pass, optionally with a batch dimension, so a
hypernetwork can generate a different adapter for every example of a batch and train through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from loracast.lora_spec import ATTN_MODULES, LoraSpec, LoraTargets, ModuleShape


def _block(model: nn.Module, layer: int, module: str) -> nn.Module:
    return getattr(model.model.layers[layer], "self_attn" if module in ATTN_MODULES else "mlp")


def targets_of(model: nn.Module, spec: LoraSpec) -> LoraTargets:
    shapes = {}
    for module in spec.target_modules:
        lin = getattr(_block(model, 0, module), module)
        lin = lin.base if isinstance(lin, LoRALinear) else lin
        shapes[module] = ModuleShape(lin.in_features, lin.out_features)
    return LoraTargets(num_layers=len(model.model.layers), shapes=shapes)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.A: torch.Tensor | None = None  # (r, in) or (batch, r, in)
        self.B: torch.Tensor | None = None  # (out, r) or (batch, out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.A is None or self.B is None:
            return y
        if self.A.dim() == 2:
            return y + self.scale * (x @ self.A.T) @ self.B.T
        # Per-example adapters: x is (batch, seq, in).
        return y + self.scale * torch.bmm(torch.bmm(x, self.A.transpose(1, 2)), self.B.transpose(1, 2))


def inject(model: nn.Module, spec: LoraSpec) -> dict[tuple[int, str], LoRALinear]:
    """Wrap every target linear of every layer (idempotent); returns the wrappers by (layer, module)."""
    wrappers = {}
    for layer in range(len(model.model.layers)):
        for module in spec.target_modules:
            block = _block(model, layer, module)
            lin = getattr(block, module)
            if not isinstance(lin, LoRALinear):
                lin = LoRALinear(lin, spec.scale)
                setattr(block, module, lin)
            lin.scale = spec.scale
            wrappers[(layer, module)] = lin
    return wrappers


def to_torch(adapter: Mapping[tuple[int, str], tuple]) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """An adapter read from disk (numpy arrays) as torch tensors."""
    return {k: (torch.as_tensor(a), torch.as_tensor(b)) for k, (a, b) in adapter.items()}


def set_adapter(
    wrappers: Mapping[tuple[int, str], LoRALinear],
    adapter: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None,
) -> None:
    """Point every wrapper at its (A, B) pair; None removes the adapter (plain base model)."""
    for key, lin in wrappers.items():
        lin.A, lin.B = (None, None) if adapter is None else adapter[key]


@contextmanager
def applied(
    wrappers: Mapping[tuple[int, str], LoRALinear],
    adapter: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None,
) -> Iterator[None]:
    set_adapter(wrappers, adapter)
    try:
        yield
    finally:
        set_adapter(wrappers, None)
