"""Doc-to-LoRA (Sakana AI): a document becomes a LoRA adapter that holds its facts.

    states_c   = base.layers[:k](chunk_c)                 frozen base, early exit (k = L/4), no grad
    z_c        = Perceiver(latents | states_c)             one latent per (module, layer, rank row)
    a_c, b_c   = head_m(z_c)                               that rank row's A row (in) and B column (out)
    A          = [A_1; ...; A_C; A_bias]                   rank concatenation over chunks,
    B          = [s(C) B_1, ..., s(C) B_C, B_bias]         plus the learned bias adapter as its own block

so the combined delta is  B A = s(C) * sum_c B_c A_c + B_bias A_bias,  of rank r * (C + 1) (r * C without
the bias adapter), capped at `max_rank` when a document is internalized (below). s(C) is the chunk scaler
(1, 1/sqrt(C) or 1/C): concatenating many chunks grows the delta, which the anchor's users saw garble answers
at 4-5k tokens, so it is configurable and measured.

Chunks stream through the encoder one at a time (`internalize`): only one chunk's hidden states are alive
at once. The adapter would still grow by r rows per chunk (a 1 MB text, ~1,000 chunks, is rank ~8,000), so
`internalize` keeps one running (A, B) per module and, whenever its rank passes `max_rank`, replaces it with
the best rank-`max_rank` approximation of its product B A (`truncate`, an SVD computed on the factors). Peak
memory is then flat in the document's length. Each truncation is optimal for the running sum it sees, so a
document truncated at most once (r * C <= max_rank) gets exactly the best approximation of the uncapped
delta; longer ones get a streaming approximation of it. Training (`forward`) combines without a cap:
its documents are a few chunks, far below it.

B's head weights and the bias adapter's B start at zero, so an untrained D2L leaves the base model exactly
unchanged; A starts live (Kaiming-scale rows) so B gets gradients from the first step. Head outputs are
multiplied by 1/latent_dim for the same reason as in T2L (hypernet/t2l.py): one Adam step moves every head
weight by ~lr, and latent_dim of them add up in each output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask

from hypernet.t2l import Adapter, ShapesConfig

CHUNK_SCALERS = ("none", "sqrt", "linear")

# Per module: A (..., layers, rank, in), B (..., layers, out, rank).
ModuleLoras = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class D2LConfig(ShapesConfig):
    hidden_size: int  # the base model's: its hidden states are the document encoding
    num_layers: int
    shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features)
    encoder_layers: int  # early exit: base layers run to encode a chunk (anchor: L/4)
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = True
    chunk_tokens: int = 256
    chunk_scaler: str = "sqrt"  # one of CHUNK_SCALERS: B of each chunk is scaled by 1, 1/sqrt(C) or 1/C
    latent_dim: int = 256
    num_heads: int = 4
    num_blocks: int = 2
    bias_adapter: bool = True
    max_rank: int = 64  # per module: `internalize` compresses a longer document's adapter to this rank

    def __post_init__(self) -> None:
        if self.chunk_scaler not in CHUNK_SCALERS:
            raise ValueError(f"unknown chunk scaler {self.chunk_scaler!r}; choose one of {CHUNK_SCALERS}")
        if not 1 <= self.encoder_layers <= self.num_layers:
            raise ValueError(f"encoder_layers must be in 1..{self.num_layers}, not {self.encoder_layers}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, not {self.max_rank}")

    def chunk_scale(self, chunks: int) -> float:
        return {"none": 1.0, "sqrt": 1 / math.sqrt(chunks), "linear": 1 / chunks}[self.chunk_scaler]

    def rank(self, chunks: int) -> int:
        """The rank of a combined adapter of `chunks` chunks, before any cap."""
        return self.r * (chunks + int(self.bias_adapter))


class PerceiverBlock(nn.Module):
    """Latents attend to the chunk's tokens and to each other (as in Idefics2's resampler), then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_tokens(tokens), q], dim=1)
        if padding is not None:
            padding = torch.cat([padding, padding.new_zeros(q.shape[:2])], dim=1)
        latents = latents + self.attn(q, kv, kv, key_padding_mask=padding, need_weights=False)[0]
        return latents + self.mlp(self.norm_mlp(latents))


class DocToLoRA(nn.Module):
    def __init__(self, cfg: D2LConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, r, n_layers = cfg.latent_dim, cfg.r, cfg.num_layers
        self.token_proj = nn.Sequential(nn.LayerNorm(cfg.hidden_size), nn.Linear(cfg.hidden_size, d))
        self.latents = nn.Parameter(torch.randn(len(cfg.shapes) * n_layers * r, d))
        self.blocks = nn.ModuleList(PerceiverBlock(d, cfg.num_heads) for _ in range(cfg.num_blocks))
        self.norm_out = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({m: nn.Linear(d, i + o) for m, (i, o) in cfg.shapes.items()})
        self.out_scale = 1.0 / d
        self.bias_A = nn.ParameterDict()
        self.bias_B = nn.ParameterDict()
        for m, (i, o) in cfg.shapes.items():
            head = self.heads[m]
            with torch.no_grad():
                # Rows of A come out with std ~1/sqrt(in), an ordinary LoRA A init, from unit-scale latents.
                head.weight[:i].normal_(0, 1 / (self.out_scale * math.sqrt(i * d)))
                head.weight[i:].zero_()
                head.bias.zero_()
            if cfg.bias_adapter:
                bound = 1 / math.sqrt(i)
                self.bias_A[m] = nn.Parameter(torch.empty(n_layers, r, i).uniform_(-bound, bound))
                self.bias_B[m] = nn.Parameter(torch.zeros(n_layers, o, r))

    def chunk_loras(self, states: torch.Tensor, padding: torch.Tensor | None = None) -> ModuleLoras:
        """Encoded chunks (n, T, hidden) -> per module A (n, L, r, in), B (n, L, out, r); padding: True = pad."""
        cfg = self.cfg
        n = states.shape[0]
        tokens = self.token_proj(states)
        latents = self.latents.expand(n, -1, -1)
        for block in self.blocks:
            latents = block(latents, tokens, padding)
        latents = self.norm_out(latents).view(n, len(cfg.shapes), cfg.num_layers, cfg.r, -1)
        out: ModuleLoras = {}
        for idx, (m, (fan_in, _)) in enumerate(cfg.shapes.items()):
            ab = self.out_scale * self.heads[m](latents[:, idx])  # (n, L, r, in + out)
            out[m] = (ab[..., :fan_in], ab[..., fan_in:].transpose(-1, -2))
        return out

    def combine(self, chunks: ModuleLoras) -> ModuleLoras:
        """Per-chunk LoRAs of one document, (C, L, r, in) / (C, L, out, r) -> A (L, rank, in), B (L, out, rank)."""
        out: ModuleLoras = {}
        for m, (a, b) in chunks.items():
            c, n_layers, r, fan_in = a.shape
            a_cat = a.transpose(0, 1).reshape(n_layers, c * r, fan_in)
            b_cat = b.permute(1, 2, 0, 3).reshape(n_layers, b.shape[2], c * r)
            out[m] = self.finish(m, a_cat, b_cat, c)
        return out

    def finish(self, module: str, a: torch.Tensor, b: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unscaled sum of a document's `chunks` chunk deltas, A (L, R, in) / B (L, out, R), -> the
        document's adapter: B scaled by s(C), the bias adapter appended as its own block."""
        b = self.cfg.chunk_scale(chunks) * b
        if self.cfg.bias_adapter:
            a = torch.cat([a, self.bias_A[module]], dim=1)
            b = torch.cat([b, self.bias_B[module]], dim=2)
        return a, b

    def forward(self, states: torch.Tensor, padding: torch.Tensor | None, chunk_counts: Sequence[int]) -> Adapter:
        """A batch of documents whose chunks are stacked in `states` (sum(chunk_counts), T, hidden), in order.

        Returns {(layer, module): (A (batch, R, in), B (batch, out, R))}, R the largest rank in the batch:
        smaller ones are padded with zero rows of A and columns of B, which add nothing.
        """
        loras = self.chunk_loras(states, padding)
        per_doc: list[ModuleLoras] = []
        start = 0
        for count in chunk_counts:
            end = start + count
            per_doc.append(self.combine({m: (a[start:end], b[start:end]) for m, (a, b) in loras.items()}))
            start = end
        rank = self.cfg.rank(max(chunk_counts))
        adapter: Adapter = {}
        for m in self.cfg.shapes:
            a = torch.stack([nn.functional.pad(doc[m][0], (0, 0, 0, rank - doc[m][0].shape[1])) for doc in per_doc])
            b = torch.stack([nn.functional.pad(doc[m][1], (0, rank - doc[m][1].shape[2])) for doc in per_doc])
            for layer in range(self.cfg.num_layers):
                adapter[(layer, m)] = (a[:, layer], b[:, layer])
        return adapter


def chunk_ids(tokenizer: PreTrainedTokenizerBase, text: str, chunk_tokens: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]


@torch.no_grad()
def encode(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: int
) -> torch.Tensor:
    """The base model's hidden states after its first `layers` decoder layers; the rest never run.

    Written as the model's own loop rather than a truncated copy or a hook on the shared model, so
    concurrent forward passes on the same model (the coordinator serves several) are unaffected.
    """
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    mask = create_causal_mask(
        config=inner.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
    for layer in inner.layers[:layers]:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
    return hidden


def pad_chunks(chunks: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask) for a batch of chunks."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for row, c in enumerate(chunks):
        ids[row, : len(c)] = torch.tensor(c)
        mask[row, : len(c)] = 1
    return ids, mask


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the best rank-`rank` approximation (Eckart-Young) of B A, for A (..., R, in), B (..., out, R).

    Computed on the factors, never on the (out x in) product: with B = Q_B R_B and A^T = Q_A R_A (thin QR),
    B A = Q_B (R_B R_A^T) Q_A^T, so the SVD of the small (R x R) core gives that of B A. Each side takes the
    square root of the kept singular values, so B A keeps its scale and A and B stay balanced. At most
    `rank` rows come back (fewer if B A has fewer dimensions); a rank already within the cap is left as it is.
    """
    if a.shape[-2] <= rank:
        return a, b
    q_b, r_b = torch.linalg.qr(b.float())  # float: QR and SVD want it, and a half-precision core loses the tail
    q_a, r_a = torch.linalg.qr(a.float().transpose(-1, -2))
    u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(-1, -2), full_matrices=False)
    root = s[..., :rank].sqrt()
    b_kept = q_b @ (u[..., :rank] * root.unsqueeze(-2))
    a_kept = (root.unsqueeze(-1) * vh[..., :rank, :]) @ q_a.transpose(-1, -2)
    return a_kept.to(a.dtype), b_kept.to(b.dtype)


@torch.no_grad()
def internalize(
    hyper: DocToLoRA, model: PreTrainedModel, chunks: Iterable[Sequence[int]], max_rank: int | None = None
) -> Adapter:
    """One document, given as token-id chunks (consumed lazily), -> {(layer, module): (A (R, in), B (out, R))},
    R <= max_rank (default: the config's). Memory is flat in the number of chunks: see the module docstring."""
    cap = hyper.cfg.max_rank if max_rank is None else max_rank
    if cap < 1:
        raise ValueError(f"max_rank must be at least 1, not {cap}")
    # Per module, the sum of the chunk deltas so far, rank <= cap. Unscaled: s(C) needs the final chunk count,
    # and scaling B commutes with truncation, so `finish` applies it at the end.
    running: ModuleLoras = {}
    count = 0
    for ids in chunks:
        states = encode(model, torch.tensor([list(ids)]), None, hyper.cfg.encoder_layers)
        for m, (a, b) in hyper.chunk_loras(states).items():
            if m in running:
                a = torch.cat([running[m][0], a[0]], dim=1)
                b = torch.cat([running[m][1], b[0]], dim=2)
            else:
                a, b = a[0], b[0]
            running[m] = truncate(a, b, cap)
        count += 1
        del states  # before the next chunk is encoded: one chunk's states at a time
    if not count:
        raise ValueError("a document needs at least one token")
    adapter: Adapter = {}
    for m, (a, b) in running.items():
        a, b = truncate(*hyper.finish(m, a, b, count), cap)
        adapter.update({(layer, m): (a[layer], b[layer]) for layer in range(hyper.cfg.num_layers)})
    return adapter
