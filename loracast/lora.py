"""LoRA on a torch model: the one layer everything else builds on.

`LoRALinear` wraps a frozen `nn.Linear` and adds `scale * B(A(x))`. Unlike PEFT, A and B are not
parameters of the layer but tensors set per forward pass, optionally with a batch dimension, so a
hypernetwork can make a different adapter for every example of a batch and train through it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
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


TorchAdapter = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def train_lora(
    wrappers: Mapping[tuple[int, str], LoRALinear],
    r: int,
    steps: int,
    lr: float,
    loss: Callable[[int], torch.Tensor],
    on_step: Callable[[int, float, TorchAdapter], bool | None] | None = None,
    seed: int = 0,
) -> tuple[TorchAdapter, float]:
    """Gradient-train one ordinary LoRA of rank `r` on the wrapped modules (PEFT's init: A Kaiming-uniform, B
    zero, so step 0 is the base model) with Adam: `loss(step)` runs with it applied. Returns it and the training
    seconds. `on_step(step, seconds_so_far, adapter)` runs after each step, outside the timing (it may apply
    adapters of its own), and ends training early by returning True. The baselines hypernetworks are measured
    against: per-task LoRA training and per-document context distillation."""
    torch.manual_seed(seed)
    lora: TorchAdapter = {}
    for key, lin in wrappers.items():
        a = torch.empty(r, lin.base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        lora[key] = (a.requires_grad_(), torch.zeros(lin.base.out_features, r, requires_grad=True))
    opt = torch.optim.Adam([t for pair in lora.values() for t in pair], lr=lr)
    seconds = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        with applied(wrappers, lora):
            value = loss(step)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        seconds += time.perf_counter() - start
        if on_step is not None and on_step(step, seconds, {k: (a.detach(), b.detach()) for k, (a, b) in lora.items()}):
            break
    return {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in lora.items()}, seconds
