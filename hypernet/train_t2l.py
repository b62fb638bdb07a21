"""Train Text-to-LoRA (or a multi-task LoRA baseline) by SFT through the frozen base model.

Training tasks are `sni/train` without the held-out split (`hypernet/sni_splits.py`); `sni/dev` is never read.
Batches follow the anchor (SakanaAI/text-to-lora, its hierarchical sampler): every epoch is a fresh permutation
of the training tasks, a step takes the next `batch_size` of them and one instance of each, and every instance
gets a description drawn uniformly from its task's pool: the SNI definition, the shipped paraphrases (six per
task, for the 151 tasks of before 2026-12-07) and the anchor's own GPT-4o-written descriptions (200 per task,
for 393 tasks). The loss is the base model's cross-entropy on the answer tokens; only the hypernetwork learns.

Two multi-task LoRAs answer to the same loop (kind "mtl"): the baseline (c), blind to descriptions, and with
`describe` the evaluation's condition (f), an ordinary LoRA trained with the drawn description before the input
in the prompt, as the base model is prompted in condition (b).
"""

from __future__ import annotations

import hashlib
import json
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
    Instance,
    collate,
    description_files,
    description_pool,
    encode_example,
    files_hash,
    load_descriptions,
    load_paraphrases,
    task_files,
    user_turn,
)
from hypernet.sni_splits import heldout_names, training_tasks
from hypernet.t2l import MultiTaskLoRA, T2LConfig, TextToLoRA
from loracast import base_model
from loracast.errors import UserError
from loracast.lora import LoraSpec, inject, set_adapter, targets_of
from loracast.paths import cache_root, replacing

Example = tuple[list[int], list[int]]


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
    steps: int = 1600  # ~30 draws per task over 426 tasks (800 steps gave each of 151 tasks ~42)
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 30
    max_len: int = 128
    paraphrases: Path | None = DEFAULT_PARAPHRASES  # joins the pool; unused by the blind multi-task LoRA
    describe: bool = False  # mtl only: the drawn description goes before the input, condition (f)
    embed_noise: float = 0.02
    seed: int = 0
    checkpoint_every: int = 100
    threads: int | None = None

    @property
    def run_name(self) -> str:
        """Names the run's files in the work dir, so (c), (f) and T2L runs can share one."""
        return f"{self.kind}-described" if self.describe else self.kind

    @property
    def reads_descriptions(self) -> bool:
        return self.kind == "t2l" or self.describe


@dataclass(frozen=True)
class Draw:
    task: int  # index into the training tasks
    example: Example  # the instance's tokens without a description
    instance: Instance
    description: int | None  # index into the task's description pool; None for the blind multi-task LoRA


def build_model(kind: str, embed_dim: int, spec: LoraSpec, model: torch.nn.Module) -> TextToLoRA | MultiTaskLoRA:
    targets = targets_of(model, spec)
    cfg = T2LConfig(
        embed_dim=embed_dim,
        num_layers=targets.num_layers,
        shapes={m: (s.in_features, s.out_features) for m, s in targets.shapes.items()},
        r=spec.r,
        alpha=spec.alpha,
        use_rslora=spec.use_rslora,
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


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


class TaskStream:
    """Training tasks in the anchor's order: epoch after epoch, each a permutation seeded by (seed, epoch).

    Position k of the stream is a function of the seed alone, so a resumed run continues the same order.
    """

    def __init__(self, n_tasks: int, seed: int) -> None:
        self.n, self.seed = n_tasks, seed
        self._epoch, self._order = -1, list(range(n_tasks))

    def __getitem__(self, k: int) -> int:
        epoch = k // self.n
        if epoch != self._epoch:
            self._order = list(range(self.n))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order[k % self.n]


def draw_batch(
    rng: random.Random,
    stream: TaskStream,
    step: int,
    batch_size: int,
    examples: list[list[tuple[Example, Instance]]],
    pool_sizes: list[int] | None,
) -> list[Draw]:
    """Step `step`'s rows: the stream's next `batch_size` tasks, an instance of each, and (with `pool_sizes`,
    the size of each task's description pool) one description of each."""
    rows = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        task = stream[k]
        example, instance = rng.choice(examples[task])
        description = rng.randrange(pool_sizes[task]) if pool_sizes is not None else None
        rows.append(Draw(task, example, instance, description))
    return rows


@torch.no_grad()
def embed_pools(encoder: DescriptionEncoder, pools: list[list[str]], batch: int = 64) -> list[torch.Tensor]:
    """Each pool's descriptions embedded, (len(pool), dim) per task. ~80,000 texts take ~30 min on one busy core,
    so the result is cached under the LoraCast cache by content (seeds and resumed runs share it)."""
    key = hashlib.sha256(json.dumps([encoder.kind, pools]).encode()).hexdigest()[:32]
    cache = cache_root() / "t2l-description-embeddings" / f"{key}.pt"
    if cache.is_file():
        flat = torch.load(cache, weights_only=True)
    else:
        texts = [t for pool in pools for t in pool]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # one long definition would pad a batch
        flat = torch.empty(len(texts), encoder.dim)
        for i in tqdm(range(0, len(texts), batch), desc="embed descriptions"):
            rows = order[i : i + batch]
            flat[rows] = encoder([texts[j] for j in rows])
        with replacing(cache) as tmp:
            torch.save(flat, tmp)
    return list(flat.split([len(p) for p in pools]))


def provenance(args: TrainArgs, tasks: list, sources: dict[str, dict[str, list[str]]]) -> dict:
    """What a run trained on: recorded in the checkpoint and checked when a run resumes."""
    return {
        "data_sha256": files_hash([f for f in task_files(args.data_dir, "train") if f.stem in {t.name for t in tasks}]),
        "descriptions_sha256": files_hash(description_files(args.data_dir, tasks)) if "anchor" in sources else None,
        "paraphrases_sha256": hashlib.sha256(args.paraphrases.read_bytes()).hexdigest()
        if "paraphrases" in sources
        else None,
        "training_tasks": len(tasks),
        "heldout_tasks": sorted(set(heldout_names()) & {p.stem for p in task_files(args.data_dir, "train")}),
        "description_sources": {name: len(texts) for name, texts in sources.items()},
        "seed": args.seed,
        "batch_size": args.batch_size,
        "describe": args.describe,
    }


def check_resumable(path: Path, record: dict, has_state: bool) -> None:
    """A resumed run must train on what it started on; a fresh one records it."""
    if has_state and path.is_file():
        before = json.loads(path.read_text())
        if changed := sorted(k for k in record if before.get(k) != record[k]):
            raise UserError(
                f"{path.parent} holds a run with other {', '.join(changed)}: resume it with the same data and "
                "options, or give another --work-dir"
            )
    path.write_text(json.dumps(record, indent=1))


def train(args: TrainArgs) -> dict:
    if args.kind not in ("t2l", "mtl"):
        raise UserError(f"unknown kind {args.kind!r}: t2l or mtl")
    if args.describe and args.kind != "mtl":
        raise UserError("--describe is for `train mtl` (condition (f)); T2L always reads the description")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    base = base_model.load(args.base)
    tok = base.tokenizer
    spec = LoraSpec(tuple(args.target_modules), args.r, 2.0 * args.r, True)
    wrappers = inject(base.model, spec)
    tasks = training_tasks(args.data_dir)

    # Examples longer than max_len (without a description) are left out rather than cut: padding to one long
    # example would cost more than the rest of the batch, and a cut prompt loses the chat template.
    examples = []
    for task in tasks:
        fits = [
            (e, i)
            for i in task.instances
            if len((e := encode_example(tok, user_turn(i.input), i.output, 10**6))[0]) <= args.max_len
        ]
        first = task.instances[0]
        examples.append(fits or [(encode_example(tok, user_turn(first.input), first.output, args.max_len), first)])
    sources: dict[str, dict[str, list[str]]] = {}
    if args.reads_descriptions:
        if args.paraphrases:
            sources["paraphrases"] = load_paraphrases(args.paraphrases, tasks, args.data_dir)
        if anchor := load_descriptions(args.data_dir, tasks):
            sources["anchor"] = anchor
    pools = [description_pool(t, *sources.values()) for t in tasks] if args.reads_descriptions else None

    encoder = DescriptionEncoder(args.encoder, base)
    pool_emb = embed_pools(encoder, pools) if args.kind == "t2l" else None
    hyper = build_model(args.kind, encoder.dim, spec, base.model)
    opt = torch.optim.AdamW(hyper.parameters(), lr=args.lr, weight_decay=0.01)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / f"{args.run_name}-state.pt"
    record = provenance(args, tasks, sources)
    check_resumable(args.work_dir / f"{args.run_name}-data.json", record, state_path.is_file())
    start, log = checkpoint.resume_training(state_path, hyper, opt, rng)
    stream = TaskStream(len(tasks), args.seed)
    blank = torch.zeros(args.batch_size, encoder.dim)  # the blind multi-task LoRA's (ignored) embedding

    hyper.train()
    t0 = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"train {args.run_name}")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        rows = draw_batch(rng, stream, step, args.batch_size, examples, [len(p) for p in pools] if pools else None)
        if args.describe:
            batch_examples = [
                encode_example(tok, user_turn(d.instance.input, pools[d.task][d.description]), d.instance.output, 10**6)
                for d in rows
            ]
        else:
            batch_examples = [d.example for d in rows]
        batch = collate(batch_examples, tok.pad_token_id or 0)
        if pool_emb is not None:
            emb = torch.stack([pool_emb[d.task][d.description] for d in rows])
            emb = emb + args.embed_noise * torch.randn_like(emb)
        else:
            emb = blank
        set_adapter(wrappers, hyper(emb))
        loss = answer_loss(base.model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), 1.0)
        opt.step()
        set_adapter(wrappers, None)
        log.append({"step": step + 1, "loss": round(loss.item(), 4)})
        recent = [e["loss"] for e in log[-50:]]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            checkpoint.save_training(state_path, hyper, opt, rng, step + 1, log)

    meta = {
        "hypernet_version": checkpoint.HYPERNET_VERSION,
        "encoder": args.encoder,
        "base_fingerprint": base.fingerprint,
        **record,
        "wall_s_this_run": round(time.time() - t0, 1),
    }
    return checkpoint.save_trained(hyper, meta, args, log, args.work_dir / f"{args.run_name}-log.json")
