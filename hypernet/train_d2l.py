"""Train Doc-to-LoRA by context distillation: the adapted model without the document must answer like
the base model with the document in its prompt.

For every (document, question) the teacher is the frozen base model prompted (chat template) with the
document and the question in the user turn. It answers greedily (self-generated answers, as the anchor
does), and its top-k log-probs at each answer position are computed once and cached on disk, so training
runs only the student: the base model plus the adapter D2L makes from the document, prompted with the
question alone, teacher-forced on the teacher's answer. The loss, averaged over answer tokens t, is

    KL_t = sum_{i in topk_t} p_t(i) * (log p_t(i) - log q_t(i))

where p_t is the teacher's distribution renormalized over its top-k tokens and q_t the student's full
softmax (not renormalized), so the student is also pushed to put no mass outside the teacher's top-k.
It is >= 0 and 0 exactly when q_t equals p_t on the top-k. Only the hypernetwork learns.

The documents mix generated fictional profiles, composites of several of them (multi-chunk documents with
facts in every chunk, so chunk combination is trained), reading-comprehension passages from `rc/train`,
and needle-in-a-haystack documents of one to a few chunks.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hypernet import checkpoint, d2l_data
from hypernet.d2l import D2LConfig, DocToLoRA, chunk_ids, encode, pad_chunks
from hypernet.sni_data import collate
from hypernet.teacher import Target, student_rows, teach, teacher_turn, topk_kl
from hypernet.train_t2l import answer_logits, lr_at
from loracast import base_model
from loracast.base_model import BaseModel
from loracast.lora import LoraSpec, inject, set_adapter, targets_of
from loracast.paths import replacing

TEACHER_FORMAT = 1  # part of every cache key: bump when what the teacher computes changes


class QALike(Protocol):
    question: str
    answer: str


class DocumentLike(Protocol):
    """What training needs of a document (hypernet.d2l_data.Document is one)."""

    text: str
    qas: Sequence[QALike]


@dataclass
class TrainArgs:
    data_dir: Path
    out: Path
    work_dir: Path
    base: str = base_model.DEFAULT_BASE
    target_modules: tuple[str, ...] = ("down_proj",)
    r: int = 8
    encoder_layers: int | None = None  # None: a quarter of the base model's layers
    chunk_tokens: int = 256
    chunk_scaler: str = "sqrt"
    latent_dim: int = 256
    steps: int = 1000
    batch_size: int = 4
    lr: float = 3e-4
    warmup: int = 30
    top_k: int = 16
    max_answer_tokens: int = 48
    fictional: int = 400
    composites: int = 60  # documents made of `composite_size` fictional ones: several chunks, facts in each
    composite_size: int = 8
    composite_questions: int = 12
    needles: int = 40  # per length in needle_chunks
    needle_chunks: tuple[int, ...] = (1, 2, 3)
    seed: int = 0
    checkpoint_every: int = 100
    threads: int | None = None


def run_teacher(base: BaseModel, document: DocumentLike, k: int, max_new_tokens: int) -> list[Target]:
    """The base model with the document in its prompt answers every question greedily."""
    return teach(base, document.text, [qa.question for qa in document.qas], k, max_new_tokens)


class TeacherCache:
    """Teacher targets on disk, one safetensors file per document, keyed by everything they depend on."""

    def __init__(self, root: Path, base: BaseModel, k: int, max_new_tokens: int) -> None:
        self.base, self.k, self.max_new_tokens = base, k, max_new_tokens
        self.dir = Path(root) / f"teacher-{base.fingerprint[:16]}-k{k}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def key(self, document: DocumentLike) -> str:
        source = {
            "format": TEACHER_FORMAT,
            "base": self.base.fingerprint,
            "k": self.k,
            "max_new_tokens": self.max_new_tokens,
            "prompts": [teacher_turn(document.text, qa.question) for qa in document.qas],
        }
        return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()

    def get(self, document: DocumentLike) -> list[Target]:
        path = self.dir / f"{self.key(document)}.safetensors"
        if path.is_file():
            raw = load_file(path)
            return [
                Target(raw[f"{i}.answer_ids"].long(), raw[f"{i}.topk_ids"].long(), raw[f"{i}.topk_logprobs"])
                for i in range(len(document.qas))
            ]
        targets = run_teacher(self.base, document, self.k, self.max_new_tokens)
        tensors = {}
        for i, t in enumerate(targets):
            tensors[f"{i}.answer_ids"] = t.answer_ids.int()
            tensors[f"{i}.topk_ids"] = t.topk_ids.int()
            tensors[f"{i}.topk_logprobs"] = t.topk_logprobs.contiguous()
        with replacing(path) as tmp:  # two runs sharing a work dir each write whole files
            save_file(tensors, tmp)
        return targets


def build_model(spec: LoraSpec, model: torch.nn.Module, args: TrainArgs) -> DocToLoRA:
    targets = targets_of(model, spec)
    cfg = D2LConfig(
        hidden_size=model.config.hidden_size,
        num_layers=targets.num_layers,
        shapes={m: (s.in_features, s.out_features) for m, s in targets.shapes.items()},
        encoder_layers=args.encoder_layers or max(1, targets.num_layers // 4),
        r=spec.r,
        alpha=spec.alpha,
        use_rslora=spec.use_rslora,
        chunk_tokens=args.chunk_tokens,
        chunk_scaler=args.chunk_scaler,
        latent_dim=args.latent_dim,
    )
    return DocToLoRA(cfg)


def training_documents(args: TrainArgs, count_tokens: Callable[[str], int]) -> list[DocumentLike]:
    docs: list[DocumentLike] = list(d2l_data.fictional_documents(args.fictional, args.seed))
    parts = d2l_data.fictional_documents(args.composites * args.composite_size, args.seed + 1)
    docs += d2l_data.composite_documents(parts, args.composite_size, args.composite_questions, args.seed)
    docs += d2l_data.rc_documents(args.data_dir, "train", args.seed)
    for chunks in args.needle_chunks:
        docs += d2l_data.needle_documents(args.needles, args.seed, chunks * args.chunk_tokens, count_tokens)
    return docs


def documents_hash(documents: Sequence[DocumentLike]) -> str:
    """SHA-256 over the training documents and their questions and answers, in order."""
    h = hashlib.sha256()
    for doc in documents:
        h.update(json.dumps([doc.text, [[qa.question, qa.answer] for qa in doc.qas]]).encode())
    return h.hexdigest()


def train(args: TrainArgs, documents: Sequence[DocumentLike] | None = None) -> dict:
    """Train (or resume) and write the checkpoint; `documents` replaces the generated training set."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    base = base_model.load(args.base)
    tok = base.tokenizer
    if documents is None:
        documents = training_documents(args, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    documents = [d for d in documents if d.qas and d.text.strip()]

    t_teacher = time.time()
    cache = TeacherCache(args.work_dir, base, args.top_k, args.max_answer_tokens)
    targets = [cache.get(d) for d in tqdm(documents, desc="teacher targets")]
    teacher_s = round(time.time() - t_teacher, 1)

    spec = LoraSpec(tuple(args.target_modules), args.r, 2.0 * args.r, True)
    wrappers = inject(base.model, spec)
    hyper = build_model(spec, base.model, args)
    cfg = hyper.cfg
    doc_chunks = [chunk_ids(tok, d.text, cfg.chunk_tokens) for d in documents]
    # Student examples: the question alone in the user turn, teacher-forced on the teacher's answer.
    students = [
        student_rows(tok, [qa.question for qa in doc.qas], doc_targets)
        for doc, doc_targets in zip(documents, targets, strict=True)
    ]
    pad_id = tok.pad_token_id or 0
    opt = torch.optim.AdamW(hyper.parameters(), lr=args.lr, weight_decay=0.01)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / "d2l-state.pt"
    start, log = checkpoint.resume_training(state_path, hyper, opt, rng)

    hyper.train()
    t0 = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train d2l")
    for step in bar:
        t_step = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        # A document, then one of its questions: passages with one question weigh as much as long profiles.
        docs = [rng.randrange(len(documents)) for _ in range(args.batch_size)]
        picks = [(d, rng.randrange(len(students[d]))) for d in docs]
        ids, mask = pad_chunks([c for d, _ in picks for c in doc_chunks[d]], pad_id)
        states = encode(base.model, ids, mask, cfg.encoder_layers)  # before the adapter is set: the plain base
        adapter = hyper(states, mask == 0, [len(doc_chunks[d]) for d, _ in picks])
        batch = collate([students[d][q] for d, q in picks], pad_id)
        set_adapter(wrappers, adapter)
        logits, _ = answer_logits(base.model, batch)
        set_adapter(wrappers, None)
        loss = topk_kl(
            logits,
            torch.cat([targets[d][q].topk_ids for d, q in picks]),
            torch.cat([targets[d][q].topk_logprobs for d, q in picks]),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), 1.0)
        opt.step()
        log.append({"step": step + 1, "loss": round(loss.item(), 4), "s": round(time.time() - t_step, 3)})
        recent = [e["loss"] for e in log[-50:]]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            checkpoint.save_training(state_path, hyper, opt, rng, step + 1, log)

    meta = {
        "hypernet_version": checkpoint.D2L_VERSION,
        "base_fingerprint": base.fingerprint,
        "data_sha256": documents_hash(documents),
        "documents": len(documents),
        "questions": sum(len(s) for s in students),
        "teacher_s_this_run": teacher_s,
        "wall_s_this_run": round(time.time() - t0, 1),
        "train_s_all_runs": round(sum(e["s"] for e in log), 3),  # to the ms: a tiny test run takes under 0.05 s
    }
    return checkpoint.save_trained(hyper, meta, args, log, args.work_dir / "d2l-log.json")
