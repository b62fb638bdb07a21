"""Train Text-to-LoRA (or the multi-task LoRA baseline) by SFT through the frozen base model.

Each step draws examples from random training tasks; every example gets the adapter the
hypernetwork generates from one description of its task (the SNI definition, a subset of its
sentences, or one of the paraphrases in `paraphrases`), and the loss is the base model's
cross-entropy on the answer tokens. Only the hypernetwork learns. Paraphrases are what made the
description matter on unseen tasks (README): SNI has one definition per task, the anchor many.

Contrast (T2L with `contrast` > 0): the first `contrast_rows` examples of a step also run with the
adapter of another training task's description, and each adds contrast * relu(margin - (CE_other -
CE_own)) to the loss: an adapter must do its own task better than another task's adapter does it, so
the description has to matter (what the evaluation's control (e) measures). With contrast, the own-task
term is the mean of per-example answer losses (without, the mean over all answer tokens).

Description distillation (T2L with `distill` > 0): the first `distill_rows` examples of a step also run
through the base model *with the description in the prompt* (the evaluation's condition (b)), and
distill * KL(that teacher || the adapted student) over the answer tokens is added. SFT labels say what
a training task's answers are; the teacher says how the base model reads its description, a function of
the description text that exists for unseen descriptions too.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hypernet import checkpoint
from hypernet.encoder import DescriptionEncoder
from hypernet.sni_data import (
    DEFAULT_PARAPHRASES,
    collate,
    data_hash,
    description_variants,
    encode_example,
    load_paraphrases,
    load_tasks,
    user_turn,
)
from hypernet.t2l import MultiTaskLoRA, T2LConfig, TextToLoRA
from loracast import base_model
from loracast.errors import UserError
from loracast.lora import LoraSpec, inject, set_adapter, targets_of


@dataclass
class TrainArgs:
    kind: str  # "t2l" or "mtl"
    data_dir: Path
    out: Path
    work_dir: Path
    base: str = base_model.DEFAULT_BASE
    encoder: str = "minilm"
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    r: int = 8
    steps: int = 800
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 30
    max_len: int = 128
    variants: int = 8
    paraphrases: Path | None = DEFAULT_PARAPHRASES  # t2l only: the multi-task LoRA never sees a description
    embed_noise: float = 0.02
    contrast: float = 0.0
    contrast_rows: int = 4
    contrast_margin: float = 1.0
    shared_adapter: bool = False
    distill: float = 0.0
    distill_rows: int = 4
    teacher_max_len: int = 320
    seed: int = 0
    checkpoint_every: int = 100
    threads: int | None = None


def build_model(
    kind: str, embed_dim: int, spec: LoraSpec, model: torch.nn.Module, shared_adapter: bool = False
) -> TextToLoRA | MultiTaskLoRA:
    targets = targets_of(model, spec)
    cfg = T2LConfig(
        embed_dim=embed_dim,
        num_layers=targets.num_layers,
        shapes={m: (s.in_features, s.out_features) for m, s in targets.shapes.items()},
        r=spec.r,
        alpha=spec.alpha,
        use_rslora=spec.use_rslora,
        shared_adapter=shared_adapter,
    )
    return TextToLoRA(cfg) if kind == "t2l" else MultiTaskLoRA(cfg)


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict answer tokens (row by row, in order), and those tokens.

    Answers are a few tokens of sequences of ~100, so only their positions go through the 49k-wide head.
    """
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return model.lm_head(hidden[:, :-1][keep]).float(), targets[keep]


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on answer tokens."""
    return torch.nn.functional.cross_entropy(*answer_logits(model, batch))


def answer_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch row of each of `answer_logits`' positions, in the same order."""
    return (batch["labels"][:, 1:] != -100).nonzero()[:, 0]


def example_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on answer tokens, averaged per example: (batch,)."""
    logits, targets = answer_logits(model, batch)
    rows = answer_rows(batch)
    token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    n = batch["labels"].shape[0]
    return torch.zeros(n).index_add(0, rows, token) / torch.bincount(rows, minlength=n).clamp(min=1)


def distill_loss(model: torch.nn.Module, student: torch.Tensor, teacher_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(teacher || student) per answer token, averaged: `student` holds the adapted model's logits at the
    answer positions of the distilled rows; the teacher (the base model, no adapter set, description in the
    prompt) is run here on the same answers."""
    with torch.no_grad():
        teacher, _ = answer_logits(model, teacher_batch)
    return torch.nn.functional.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
    )


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(args: TrainArgs) -> dict:
    if args.contrast > 0 and args.distill > 0:
        raise UserError("--contrast and --distill are separate experiments: give one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    base = base_model.load(args.base)
    tok = base.tokenizer
    spec = LoraSpec(tuple(args.target_modules), args.r, 2.0 * args.r, True)
    wrappers = inject(base.model, spec)
    tasks = load_tasks(args.data_dir, "train")

    # Examples longer than max_len are left out rather than cut: padding to one long example
    # would cost more than the rest of the batch, and a cut prompt loses the chat template.
    # Each example is kept with its instance's description-in-prompt form, the distillation teacher's input.
    encoded = []
    for task in tasks:
        fits = [
            (e, i)
            for i in task.instances
            if len((e := encode_example(tok, user_turn(i.input), i.output, 10**6))[0]) <= args.max_len
        ]
        first = task.instances[0]
        encoded.append(fits or [(encode_example(tok, user_turn(first.input), first.output, args.max_len), first)])
    encoder = DescriptionEncoder(args.encoder, base)
    paraphrases = args.paraphrases if args.kind == "t2l" else None
    extra = load_paraphrases(paraphrases, tasks, args.data_dir) if paraphrases else {}
    variant_emb = [
        encoder(description_variants(t.definition, args.variants, rng) + extra.get(t.name, []))
        for t in tqdm(tasks, desc="embed")
    ]
    hyper = build_model(args.kind, encoder.dim, spec, base.model, args.shared_adapter)
    opt = torch.optim.AdamW(hyper.parameters(), lr=args.lr, weight_decay=0.01)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / f"{args.kind}-state.pt"
    start, log = checkpoint.resume_training(state_path, hyper, opt, rng)

    hyper.train()
    t0 = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"train {args.kind}")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        picks = [rng.randrange(len(tasks)) for _ in range(args.batch_size)]
        examples, embs, instances = [], [], []
        for ti in picks:
            example, instance = rng.choice(encoded[ti])
            examples.append(example)
            instances.append((ti, instance))
            embs.append(variant_emb[ti][rng.randrange(len(variant_emb[ti]))])
        contrasted = picks[: args.contrast_rows] if args.contrast > 0 and args.kind == "t2l" else []
        for row, ti in enumerate(contrasted):  # the same example again, under another task's adapter
            other = rng.randrange(len(tasks) - 1)
            other += other >= ti
            examples.append(examples[row])
            embs.append(variant_emb[other][rng.randrange(len(variant_emb[other]))])
        batch = collate(examples, tok.pad_token_id or 0)
        emb = torch.stack(embs)
        emb = emb + args.embed_noise * torch.randn_like(emb)
        set_adapter(wrappers, hyper(emb))
        distilled = instances[: args.distill_rows] if args.distill > 0 and args.kind == "t2l" else []
        if contrasted:
            ce = example_losses(base.model, batch)
            own, other_ce = ce[: args.batch_size], ce[args.batch_size :]
            gap = other_ce - own[: len(contrasted)]
            loss = own.mean() + args.contrast * torch.relu(args.contrast_margin - gap).mean()
        elif distilled:
            logits, targets = answer_logits(base.model, batch)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            teacher_batch = collate(
                [
                    encode_example(tok, user_turn(i.input, tasks[ti].definition), i.output, args.teacher_max_len)
                    for ti, i in distilled
                ],
                tok.pad_token_id or 0,
            )
            set_adapter(wrappers, None)
            kl = distill_loss(base.model, logits[answer_rows(batch) < len(distilled)], teacher_batch)
            loss = loss + args.distill * kl
        else:
            loss = answer_loss(base.model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), 1.0)
        opt.step()
        set_adapter(wrappers, None)
        log.append({"step": step + 1, "loss": round(loss.item(), 4)})
        if contrasted:  # how much worse another task's adapter does these examples
            log[-1]["contrast_gap"] = round(gap.mean().item(), 4)
        if distilled:
            log[-1]["distill_kl"] = round(kl.item(), 4)
        recent = [e["loss"] for e in log[-50:]]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            checkpoint.save_training(state_path, hyper, opt, rng, step + 1, log)

    meta = {
        "hypernet_version": checkpoint.HYPERNET_VERSION,
        "encoder": args.encoder,
        "base_fingerprint": base.fingerprint,
        "data_sha256": data_hash(args.data_dir, "train"),
        "paraphrases_sha256": hashlib.sha256(paraphrases.read_bytes()).hexdigest() if paraphrases else None,
        "wall_s_this_run": round(time.time() - t0, 1),
    }
    return checkpoint.save_trained(hyper, meta, args, log, args.work_dir / f"{args.kind}-log.json")
