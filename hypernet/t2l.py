"""Text-to-LoRA (Charakorn et al., 2025): a task embedding becomes a LoRA for every layer and module.

    z      = task_proj(embedding(description))
    h_lm   = trunk([z ; layer_emb[l] ; module_emb[m]])      for every layer l, module m
    A, B   = split(head_m(h_lm))                           one head per module type

All layers of one module type come out of one batched pass. B's head starts at zero, so a fresh
hypernetwork makes adapters that leave the base model unchanged. Head outputs are multiplied by
1/hidden_dim: one Adam step moves every head weight by ~lr, and without the factor the hidden_dim
of them would add up to a step in A and B hundreds of times an ordinary LoRA step (training diverged).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Self

import torch
from torch import nn

from loracast.lora_spec import LoraSpec, LoraTargets, ModuleShape

Adapter = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


class ShapesConfig:
    """What every hypernetwork config shares: the adapter it makes, and a JSON-safe round trip."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features)
    r: int
    alpha: float
    use_rslora: bool

    @property
    def spec(self) -> LoraSpec:
        return LoraSpec(tuple(self.shapes), self.r, self.alpha, self.use_rslora)

    @property
    def targets(self) -> LoraTargets:
        return LoraTargets(self.num_layers, {m: ModuleShape(*s) for m, s in self.shapes.items()})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = {m: list(s) for m, s in self.shapes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        return cls(**{**d, "shapes": {m: tuple(s) for m, s in d["shapes"].items()}})


@dataclass(frozen=True)
class T2LConfig(ShapesConfig):
    embed_dim: int  # the description encoder's output size
    num_layers: int
    shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features)
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = True
    latent_dim: int = 128
    hidden_dim: int = 512
    dropout: float = 0.05

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        # Checkpoints written before the --shared-adapter experiment left (docs/t2l.md) record it, off in all
        # shipped ones; one trained with it has weights this class does not hold.
        if d.get("shared_adapter"):
            raise ValueError("a --shared-adapter checkpoint: that experiment was removed, see docs/t2l.md")
        return super().from_dict({k: v for k, v in d.items() if k != "shared_adapter"})


class TextToLoRA(nn.Module):
    def __init__(self, cfg: T2LConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.latent_dim
        self.task_proj = nn.Sequential(nn.Linear(cfg.embed_dim, d), nn.LayerNorm(d))
        self.layer_emb = nn.Embedding(cfg.num_layers, d)
        self.module_emb = nn.Embedding(len(cfg.shapes), d)
        self.trunk = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(3 * d, cfg.hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.hidden_dim, cfg.hidden_dim),
            nn.SiLU(),
            nn.LayerNorm(cfg.hidden_dim),
        )
        self.heads = nn.ModuleDict({m: nn.Linear(cfg.hidden_dim, cfg.r * (i + o)) for m, (i, o) in cfg.shapes.items()})
        self.out_scale = 1.0 / cfg.hidden_dim
        for m, (i, _) in cfg.shapes.items():
            head = self.heads[m]
            n_a = cfg.r * i
            with torch.no_grad():
                # A starts as an ordinary LoRA A (Kaiming-uniform), B at exactly zero.
                bound = 1 / math.sqrt(i)
                head.bias[:n_a].uniform_(-bound / self.out_scale, bound / self.out_scale)
                head.weight[n_a:].zero_()
                head.bias[n_a:].zero_()

    def forward(self, task_embedding: torch.Tensor) -> Adapter:
        """(batch, embed_dim) -> {(layer, module): (A (batch, r, in), B (batch, out, r))}."""
        cfg = self.cfg
        batch = task_embedding.shape[0]
        z = self.task_proj(task_embedding)  # (batch, d)
        layers = self.layer_emb.weight  # (L, d)
        adapter: Adapter = {}
        for idx, (module, (fan_in, fan_out)) in enumerate(cfg.shapes.items()):
            mod = self.module_emb.weight[idx].expand(batch, cfg.num_layers, -1)
            x = torch.cat([z[:, None].expand(-1, cfg.num_layers, -1), layers.expand(batch, -1, -1), mod], dim=-1)
            out = self.out_scale * self.heads[module](self.trunk(x))  # (batch, L, r*(in+out))
            a = out[..., : cfg.r * fan_in].reshape(batch, cfg.num_layers, cfg.r, fan_in)
            b = out[..., cfg.r * fan_in :].reshape(batch, cfg.num_layers, fan_out, cfg.r)
            for layer in range(cfg.num_layers):
                adapter[(layer, module)] = (a[:, layer], b[:, layer])
        return adapter


class MultiTaskLoRA(nn.Module):
    """The strongest baseline: one ordinary LoRA trained on every task, blind to the description.

    It answers to the same call as TextToLoRA (and ignores the embedding) so one training loop
    and one evaluation serve both.
    """

    def __init__(self, cfg: T2LConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for m, (i, o) in cfg.shapes.items():
            bound = 1 / math.sqrt(i)
            self.A[m] = nn.Parameter(torch.empty(cfg.num_layers, cfg.r, i).uniform_(-bound, bound))
            self.B[m] = nn.Parameter(torch.zeros(cfg.num_layers, o, cfg.r))

    def forward(self, task_embedding: torch.Tensor) -> Adapter:
        batch = task_embedding.shape[0]
        return {
            (layer, m): (self.A[m][layer].expand(batch, -1, -1), self.B[m][layer].expand(batch, -1, -1))
            for m in self.cfg.shapes
            for layer in range(self.cfg.num_layers)
        }
