"""`loracast eval d2l`: does a document's adapter answer questions about it without the document?

On documents never used in training (held-out fictional profiles and held-out reading-comprehension passages,
see `hypernet.d2l_data`), five conditions answer the same questions greedily, the user turn holding only the
question except in (b):
  (a) base, no document (floor)                 (b) base, document in the prompt (reference)
  (c) D2L adapter, no document                  (d) per-document context distillation LoRA, no document
  (e) D2L adapter of another document (control)

(b) is also the teacher of (d): its greedy answers and top-k log-probs are what (d)'s LoRA (D2L's target
modules and rank) is trained on, `cd_steps` Adam steps on that document's questions. (d) thus trains on the
very questions it is scored on, an oracle query set that makes it stronger and faster than generated
questions would, so every speed ratio against it is conservative. Gap closed is (c - a) / (b - a).

Needle in a haystack: "magic number" documents of several lengths, up to 4x the training chunk; accuracy is
the answer contained in the reply, for (a), (b) and (c).

Speed: on held-out composite documents of ~512 tokens, the wall time D2L takes to internalize a document vs
the training time (d) needs to first reach D2L's mean score (checked after 1, 2, 4, ... steps, the checks not
counted), alone and plus the teacher's generation, which (d) cannot do without.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from hypernet import checkpoint, d2l_data
from hypernet.answering import answer
from hypernet.d2l_data import Document
from hypernet.eval_t2l import score
from hypernet.generate import DocToLoRAGenerator
from hypernet.sni_data import collate
from hypernet.t2l import Adapter
from hypernet.train_d2l import Target, run_teacher, student_rows, topk_kl
from hypernet.train_t2l import answer_logits
from loracast import base_model
from loracast.base_model import BaseModel
from loracast.lora import LoRALinear, LoraSpec, inject, train_lora

CONDITIONS = {
    "a": "base, no document",
    "b": "base + document in prompt",
    "c": "D2L adapter",
    "d": "context distillation",
    "e": "D2L, other document (control)",
}
METRICS = ("rougeL", "contained")
TEACHER_BATCH_TOKENS = 8192


@dataclass
class EvalArgs:
    data_dir: Path
    d2l_path: Path = checkpoint.DEFAULT_D2L
    base: str = base_model.DEFAULT_BASE
    fictional: int = 24
    passages: int = 60
    needles: int = 10  # per length
    needle_lengths: tuple[int, ...] = ()  # tokens; empty: 1, 2 and 4 training chunks
    speed_documents: int = 6
    speed_tokens: int = 512
    cd_steps: int = 32
    cd_lr: float = 2e-3
    top_k: int = 16
    max_new_tokens: int = 48
    seed: int = 0
    threads: int | None = None
    sets: tuple[str, ...] = field(default=("fictional", "passages", "needle", "speed"))


def context_distill(
    base: BaseModel,
    wrappers: dict[tuple[int, str], LoRALinear],
    spec: LoraSpec,
    document: Document,
    targets: Sequence[Target],
    steps: int,
    lr: float,
    on_step: Callable[[int, float, Adapter], None] | None = None,
) -> tuple[Adapter, float]:
    """Gradient-train one LoRA (spec's modules and rank) so the base model without the document matches the
    teacher's top-k on the document's questions. Returns it and its training seconds. `on_step(step,
    seconds_so_far, adapter)` runs after every step, outside the timing."""
    tok = base.tokenizer
    batch = collate(student_rows(tok, document, targets), tok.pad_token_id or 0)
    topk_ids = torch.cat([t.topk_ids for t in targets])
    topk_logprobs = torch.cat([t.topk_logprobs for t in targets])

    def loss(step: int) -> torch.Tensor:
        logits, _ = answer_logits(base.model, batch)
        return topk_kl(logits, topk_ids, topk_logprobs)

    return train_lora(wrappers, spec.r, steps, lr, loss, on_step)


class Evaluator:
    """The loaded base, D2L generator and LoRA wrappers, shared by every document set."""

    def __init__(self, args: EvalArgs) -> None:
        self.args = args
        self.base = base_model.load(args.base)
        self.generator = DocToLoRAGenerator(args.d2l_path, self.base)
        self.wrappers = inject(self.base.model, self.generator.spec)
        self.tok = self.base.tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def answers(self, adapter: Adapter | None, doc: Document) -> list[str]:
        return answer(self.base, self.wrappers, adapter, [qa.question for qa in doc.qas], self.args.max_new_tokens)

    def teacher(self, doc: Document) -> tuple[list[Target], list[str]]:
        """(b): the base model with the document in its prompt; its targets also teach (d).

        Questions go in batches of at most TEACHER_BATCH_TOKENS document tokens: a batch of eight 8k-token
        prompts would need the attention of all of them at once."""
        per_batch = max(1, TEACHER_BATCH_TOKENS // max(1, self.count_tokens(doc.text)))
        targets = [
            target
            for i in range(0, len(doc.qas), per_batch)
            for target in run_teacher(
                self.base, replace(doc, qas=doc.qas[i : i + per_batch]), self.args.top_k, self.args.max_new_tokens
            )
        ]
        replies = [self.tok.decode(t.answer_ids, skip_special_tokens=True).strip() for t in targets]
        return targets, replies

    def internalize(self, doc: Document) -> tuple[Adapter, float]:
        t0 = time.perf_counter()
        adapter = self.generator.generate(doc.text)
        return adapter, time.perf_counter() - t0

    def conditions(self, name: str, docs: list[Document], with_cd: bool = True) -> dict:
        """Every condition on every question of `docs`; (e) takes the next document's adapter."""
        a = self.args
        preds: dict[str, list[list[str]]] = {c: [] for c in CONDITIONS if with_cd or c != "d"}
        d2l_s, cd_s, teacher_s, adapters = [], [], [], []
        for doc in tqdm(docs, desc=f"{name}: (a) (b) (c)"):
            preds["a"].append(self.answers(None, doc))
            t0 = time.perf_counter()
            targets, replies = self.teacher(doc)
            teacher_s.append(time.perf_counter() - t0)
            preds["b"].append(replies)
            adapter, seconds = self.internalize(doc)
            d2l_s.append(seconds)
            adapters.append(adapter)
            preds["c"].append(self.answers(adapter, doc))
            if with_cd:
                lora, seconds = context_distill(
                    self.base, self.wrappers, self.generator.spec, doc, targets, a.cd_steps, a.cd_lr
                )
                cd_s.append(seconds)
                preds["d"].append(self.answers(lora, doc))
        for i, doc in enumerate(tqdm(docs, desc=f"{name}: (e)")):
            preds["e"].append(self.answers(adapters[(i + 1) % len(docs)], doc))
        result = summarize(preds, docs)
        result["timing_s"] = {
            "d2l_internalize_median": round(statistics.median(d2l_s), 3),
            "teacher_median": round(statistics.median(teacher_s), 3),
            **({"cd_train_median": round(statistics.median(cd_s), 3)} if cd_s else {}),
        }
        return result

    def needle(self) -> dict:
        a = self.args
        chunk = self.generator.hyper.cfg.chunk_tokens
        lengths = a.needle_lengths or (chunk, 2 * chunk, 4 * chunk)
        buckets = {}
        for length in lengths:
            docs = d2l_data.needle_documents(a.needles, a.seed, length, self.count_tokens, part="heldout")
            preds: dict[str, list[list[str]]] = {"a": [], "b": [], "c": []}
            for doc in tqdm(docs, desc=f"needle {length} tokens"):
                preds["a"].append(self.answers(None, doc))
                preds["b"].append(self.teacher(doc)[1])
                preds["c"].append(self.answers(self.internalize(doc)[0], doc))
            buckets[str(length)] = summarize(preds, docs)
        return {"chunk_tokens": chunk, "buckets": buckets}

    def speed(self, tokens: int | None = None, documents: int | None = None, questions: int | None = None) -> dict:
        """D2L's internalization time vs the time (d) needs to reach D2L's mean ROUGE-L on documents of ~`tokens`
        tokens (default: the args'), at most `questions` questions each (one per fact, then the first ones).

        (d)'s time is reported twice: training alone, and with its teacher's generation (the base model reading
        the document once per question), which is what grows with the document's length."""
        a = self.args
        tokens = tokens or a.speed_tokens
        docs = speed_documents(documents or a.speed_documents, tokens, a.seed, self.count_tokens)
        if questions:
            docs = [replace(d, qas=d.qas[:questions]) for d in map(one_per_fact, docs)]
        checks = {2**i for i in range(int(math.log2(a.cd_steps * 4)) + 1)}
        d2l_s, d2l_scores, base_scores, teacher_s, curves = [], [], [], [], []
        for doc in tqdm(docs, desc=f"speed ({tokens} tokens)"):
            base_scores.append(mean_scores(self.answers(None, doc), doc)["rougeL"])
            adapter, seconds = self.internalize(doc)
            d2l_s.append(seconds)
            d2l_scores.append(mean_scores(self.answers(adapter, doc), doc)["rougeL"])
            t0 = time.perf_counter()
            targets = self.teacher(doc)[0]
            teacher_s.append(time.perf_counter() - t0)
            curve: list[tuple[int, float, float]] = []

            def check(step: int, seconds: float, lora: Adapter, doc: Document = doc, curve: list = curve) -> None:
                if step in checks:
                    curve.append((step, seconds, mean_scores(self.answers(lora, doc), doc)["rougeL"]))

            context_distill(
                self.base, self.wrappers, self.generator.spec, doc, targets, max(checks), a.cd_lr, on_step=check
            )
            curves.append(curve)
        target = statistics.mean(d2l_scores)
        steps = [step for step, _, _ in curves[0]]
        mean_curve = [
            {
                "step": step,
                "train_s": round(statistics.mean(c[i][1] for c in curves), 3),
                "rougeL": round(statistics.mean(c[i][2] for c in curves), 2),
            }
            for i, step in enumerate(steps)
        ]
        reached = next((p for p in mean_curve if p["rougeL"] >= target), None)
        d2l_median = statistics.median(d2l_s)
        # Not reached within the budget: the budget's time, so the ratios are lower bounds.
        cd_s = reached["train_s"] if reached else mean_curve[-1]["train_s"]
        teacher_median = statistics.median(teacher_s)
        return {
            "documents": len(docs),
            "questions_per_document": statistics.median(len(d.qas) for d in docs),
            "tokens_median": statistics.median(self.count_tokens(d.text) for d in docs),
            "d2l_rougeL": round(target, 2),
            "base_rougeL": round(statistics.mean(base_scores), 2),  # (a): what "the same score" stands above
            "d2l_internalize_s_median": round(d2l_median, 3),
            "cd_curve": mean_curve,
            "cd_reached_at_step": reached["step"] if reached else None,
            "cd_train_s_to_reach": round(cd_s, 3),
            "cd_teacher_s_median": round(teacher_median, 3),
            "ratio_cd_over_d2l": round(cd_s / d2l_median, 1),
            "ratio_cd_with_teacher_over_d2l": round((cd_s + teacher_median) / d2l_median, 1),
            "ratio_is_lower_bound": reached is None,
        }


def speed_documents(n: int, tokens: int, seed: int, count_tokens: Callable[[str], int]) -> list[Document]:
    """`n` held-out composites of as many fictional profiles as it takes to reach about `tokens` tokens."""
    pool = d2l_data.fictional_documents(400 + 64 * n, seed + 1, part="heldout")[400:]
    size = max(1, round(tokens / statistics.mean(count_tokens(d.text) for d in pool[:32])))
    return d2l_data.composite_documents(pool[: n * size], size, 12, seed)


def one_per_fact(doc: Document) -> Document:
    """The document with one question per fact: its paraphrases cost a pass each and ask nothing new."""
    seen: set[str] = set()
    qas = tuple(qa for qa in doc.qas if not (qa.fact in seen or seen.add(qa.fact)))
    return Document(doc.text, qas, doc.kind, doc.doc_id, doc.entities, doc.source)


def mean_scores(preds: list[str], doc: Document) -> dict[str, float]:
    scores = [score(p, qa.answers) for p, qa in zip(preds, doc.qas, strict=True)]
    return {m: statistics.mean(s[m] for s in scores) for m in METRICS}


def summarize(preds: dict[str, list[list[str]]], docs: list[Document]) -> dict:
    """Mean scores per condition (over questions), the gap (c) closes, and a few examples."""
    mean = {}
    for cond, per_doc in preds.items():
        pairs = [(p, qa) for ps, doc in zip(per_doc, docs, strict=True) for p, qa in zip(ps, doc.qas, strict=True)]
        scores = [score(p, qa.answers) for p, qa in pairs]
        mean[cond] = {m: round(statistics.mean(s[m] for s in scores), 2) for m in METRICS}
    gap = {}
    for m in METRICS:
        width = mean["b"][m] - mean["a"][m]
        gap[m] = round((mean["c"][m] - mean["a"][m]) / width, 3) if width > 0 else None
    examples = [
        {"question": qa.question, "gold": qa.answer, **{c: preds[c][i][0] for c in preds}}
        for i, doc in enumerate(docs[:3])
        for qa in doc.qas[:1]
    ]
    return {
        "documents": len(docs),
        "questions": sum(len(d.qas) for d in docs),
        "mean": mean,
        "gap_closed": gap,
        "examples": examples,
    }


def evaluate(args: EvalArgs) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    ev = Evaluator(args)
    result: dict = {"conditions": CONDITIONS, "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.time()
    if "fictional" in args.sets:
        docs = [one_per_fact(d) for d in d2l_data.fictional_documents(args.fictional, args.seed, part="heldout")]
        result["fictional"] = ev.conditions("fictional", docs)
    if "passages" in args.sets:
        docs = d2l_data.rc_documents(args.data_dir, "heldout", args.seed)[: args.passages]
        result["passages"] = ev.conditions("passages", docs)
    if "needle" in args.sets:
        result["needle"] = ev.needle()
    if "speed" in args.sets:
        result["speed"] = ev.speed()
    result["d2l_checkpoint"] = str(args.d2l_path)
    result["base_fingerprint"] = ev.base.fingerprint
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def table(result: dict) -> str:
    """Markdown: per document set, ROUGE-L / answer-contained per condition and the gap (c) closes; needles; speed."""
    out = []
    head = "| documents | " + " | ".join(f"({c}) {d}" for c, d in CONDITIONS.items()) + " | gap closed by (c) |"
    rows = [head, "|" + "---|" * (len(CONDITIONS) + 2)]
    for name in ("fictional", "passages"):
        if name not in result:
            continue
        r = result[name]
        cells = [
            f"{r['mean'][c]['rougeL']:.1f} / {r['mean'][c]['contained']:.0f}" if c in r["mean"] else "-"
            for c in CONDITIONS
        ]
        gap = " / ".join("-" if g is None else f"{100 * g:.0f}%" for g in r["gap_closed"].values())
        rows.append(f"| {name} ({r['documents']} docs, {r['questions']} q) | " + " | ".join(cells) + f" | {gap} |")
    if len(rows) > 2:
        out += [*rows, "", "Cells: ROUGE-L F1 / answer contained, percent; gap closed: ROUGE-L / contained.", ""]
    if "needle" in result:
        out += ["| needle document tokens | (a) base | (b) in context | (c) D2L |", "|---|---|---|---|"]
        for length, r in result["needle"]["buckets"].items():
            out.append(f"| {length} | " + " | ".join(f"{r['mean'][c]['contained']:.0f}" for c in "abc") + " |")
        chunk = result["needle"]["chunk_tokens"]
        out += ["", f"Needle accuracy (answer contained), percent; training chunk = {chunk} tokens.", ""]
    if "speed" in result:
        s = result["speed"]
        reach = f"step {s['cd_reached_at_step']}" if s["cd_reached_at_step"] else "not reached (lower bound)"
        out.append(
            f"Speed, {s['documents']} documents of ~{s['tokens_median']} tokens: D2L internalizes in "
            f"{s['d2l_internalize_s_median']:.2f} s (ROUGE-L {s['d2l_rougeL']:.1f}); context distillation reaches "
            f"it at {reach} after {s['cd_train_s_to_reach']:.1f} s of training: {s['ratio_cd_over_d2l']:.0f}x "
            f"({s['ratio_cd_with_teacher_over_d2l']:.0f}x with its teacher's {s['cd_teacher_s_median']:.1f} s)."
        )
    return "\n".join(out)
