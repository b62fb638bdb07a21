"""`loracast eval d2l`: does a document's adapter answer questions about it without the document?

On documents never used in training nor in designing the probe writer (held-out fictional profiles,
held-out reading-comprehension passages and needle documents, see `hypernet.d2l_data`), whose questions
come from `d2l_data`'s templates, which the probe writer never uses, these conditions answer the same
questions greedily, the user turn holding only the question except in (b):

  (a) base, no document (floor)             (b) base, document in the prompt (target)
  (p) the one pass alone (budget 0)         (c) LoraCast: the one pass refined for the default budget
  (e) another document's (c) adapter (control)

Gap closed is (c - a) / (b - a), on answer-contained accuracy and ROUGE-L.

The curve (`sets` "curve"): on held-out profiles, one job of the largest budget per start (zero: the base
model itself; bias: the D2L checkpoint's document-independent adapter; d2l: the one pass), its adapter
scored after 0, 2, 5, ... seconds (the scoring is off the clock). A job's budget only ends its training, so
the adapter after t seconds is what a job with budget t returns. Beside them, distillation on the test
questions themselves, the labelled ceiling no deployed system has. From the curves, `d2l_vs_context_
distillation`: the seconds distillation from zero init needs to reach (c)'s score, over (c)'s seconds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from hypernet import checkpoint, d2l_data
from hypernet.answering import answer
from hypernet.d2l_data import Document
from hypernet.eval_t2l import score
from hypernet.makers import DocToLoRAMaker
from hypernet.self_distill import DistillConfig, distill_document, zero_start
from hypernet.t2l import Adapter
from hypernet.teacher import teach
from loracast import base_model

CONDITIONS = {
    "a": "base, no document",
    "b": "base + document in prompt",
    "p": "one pass (budget 0)",
    "c": "LoraCast (default budget)",
    "e": "other document's adapter (control)",
}
STARTS = ("zero", "bias", "d2l")
CEILING = "ceiling"  # distillation on the test questions: labelled, never a deployed condition
METRICS = ("rougeL", "contained")
TEACHER_BATCH_TOKENS = 8192


@dataclass
class EvalArgs:
    data_dir: Path
    d2l_path: Path = checkpoint.DEFAULT_D2L
    base: str = base_model.DEFAULT_BASE
    distill: DistillConfig = field(default_factory=DistillConfig)
    fictional: int = 12
    composites: int = 4  # held-out composites of profiles, ~composite_tokens each
    composite_tokens: int = 512
    passages: int = 12
    needles: int = 4  # per length
    needle_lengths: tuple[int, ...] = (256, 1024)
    curve_documents: int = 6
    budgets: tuple[float, ...] = (0, 2, 5, 10, 15, 20, 40, 60, 80)
    starts: tuple[str, ...] = STARTS
    max_new_tokens: int = 48
    seed: int = 0
    threads: int | None = None
    sets: tuple[str, ...] = ("fictional", "composites", "passages", "needle", "curve")


class Evaluator:
    """The loaded base model and D2L maker (its LoRA wrappers), shared by every document set."""

    def __init__(self, args: EvalArgs) -> None:
        self.args = args
        self.base = base_model.load(args.base)
        self.maker = DocToLoRAMaker(args.d2l_path, self.base, distill=args.distill)
        self.wrappers = self.maker.wrappers
        self.tok = self.base.tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def answers(self, adapter: Adapter | None, doc: Document) -> list[str]:
        return answer(self.base, self.wrappers, adapter, [qa.question for qa in doc.qas], self.args.max_new_tokens)

    def in_context(self, doc: Document) -> list[str]:
        """(b): the base model with the document in its prompt, in batches of at most TEACHER_BATCH_TOKENS
        document tokens (eight 4k-token prompts at once would need all their attention at once)."""
        per_batch = max(1, TEACHER_BATCH_TOKENS // max(1, self.count_tokens(doc.text)))
        questions = [qa.question for qa in doc.qas]
        targets = teach(self.base, doc.text, questions, 1, self.args.max_new_tokens, per_batch)
        return [self.tok.decode(t.answer_ids, skip_special_tokens=True).strip() for t in targets]

    def start(self, name: str, doc: Document) -> Callable[[], Adapter]:
        if name == "zero":
            return lambda: zero_start(self.wrappers, self.maker.spec.r, self.args.distill.seed)
        if name == "bias":
            return self.bias_adapter
        return lambda: self.maker.make_adapter(doc.text)

    def bias_adapter(self) -> Adapter:
        hyper = self.maker.hyper
        return {
            (layer, m): (hyper.bias_A[m][layer].detach(), hyper.bias_B[m][layer].detach())
            for m in hyper.bias_A
            for layer in range(hyper.cfg.num_layers)
        }

    def internalize(self, doc: Document, budget: float, start: str = "d2l", **kw) -> tuple[Adapter, dict]:
        cfg = replace(self.args.distill, budget_s=budget)
        adapter, report = distill_document(self.base, self.wrappers, doc.text, self.start(start, doc), cfg, **kw)
        return adapter, {**vars(report), "budget_s": budget}

    def conditions(self, name: str, docs: list[Document]) -> dict:
        """Every condition on every question of `docs`; (e) takes the next document's (c) adapter."""
        preds: dict[str, list[list[str]]] = {c: [] for c in CONDITIONS}
        adapters, reports = [], []
        for doc in tqdm(docs, desc=f"{name}: (a) (b) (p) (c)"):
            preds["a"].append(self.answers(None, doc))
            preds["b"].append(self.in_context(doc))
            preds["p"].append(self.answers(self.maker.make_adapter(doc.text), doc))
            adapter, report = self.internalize(doc, self.maker.budget_for(None, doc.text))
            adapters.append(adapter)
            reports.append(report)
            preds["c"].append(self.answers(adapter, doc))
        for i, doc in enumerate(tqdm(docs, desc=f"{name}: (e)")):
            preds["e"].append(self.answers(adapters[(i + 1) % len(docs)], doc))
        result = summarize(preds, docs)
        result["budget_s"] = statistics.median(r["budget_s"] for r in reports)
        result["tokens_median"] = statistics.median(self.count_tokens(d.text) for d in docs)
        result["job"] = {
            k: round(statistics.median(r[k] for r in reports), 2)
            for k in ("budget_s", "probes", "taught", "steps", "teacher_s", "train_s", "elapsed_s", "probe_loss")
        }
        return result

    def needle(self) -> dict:
        a = self.args
        buckets = {}
        for length in a.needle_lengths:
            docs = d2l_data.needle_documents(a.needles, a.seed, length, self.count_tokens, part="heldout")
            preds: dict[str, list[list[str]]] = {"a": [], "b": [], "c": []}
            for doc in tqdm(docs, desc=f"needle {length} tokens"):
                preds["a"].append(self.answers(None, doc))
                preds["b"].append(self.in_context(doc))
                preds["c"].append(self.answers(self.internalize(doc, self.maker.budget_for(None, doc.text))[0], doc))
            buckets[str(length)] = summarize(preds, docs)
        return {"budget_per_512_tokens_s": a.distill.budget_s, "buckets": buckets}

    def curve(self, docs: list[Document]) -> dict:
        """Mean scores against seconds per start, and the ceiling: snapshots of one job of the largest budget."""
        a = self.args
        budgets = sorted(a.budgets)
        runs = [(s, None) for s in a.starts] + [(CEILING, "test")]
        out: dict = {"budgets_s": budgets, "documents": len(docs), "starts": {}}
        floor = [mean_scores(self.answers(None, d), d) for d in docs]
        target = [mean_scores(self.in_context(d), d) for d in docs]
        out["floor"] = {m: round(statistics.mean(f[m] for f in floor), 2) for m in METRICS}
        out["target"] = {m: round(statistics.mean(t[m] for t in target), 2) for m in METRICS}
        for name, questions in runs:
            per_doc: list[list[dict[str, float]]] = []
            for doc in tqdm(docs, desc=f"curve: {name}"):
                snaps = self.snapshots(doc, budgets, "zero" if questions else name, questions is not None)
                per_doc.append(snaps)
            out["starts"][name] = [
                {m: round(statistics.mean(s[i][m] for s in per_doc), 2) for m in METRICS} for i in range(len(budgets))
            ]
        out["vs_context_distillation"] = ratio_vs_context_distillation(out, a.distill.budget_s)
        return out

    def snapshots(self, doc: Document, budgets: Sequence[float], start: str, on_test: bool) -> list[dict[str, float]]:
        """The adapter's scores at each budget t, from one job of the largest: the adapter after the last step
        that ended by t (the start itself before the first one), which a job of budget t returns give or take
        the one step it lets finish."""
        pending = list(budgets)
        scores: list[dict[str, float]] = []
        held = {"adapter": self.start(start, doc)(), "score": None}

        def score_held() -> None:
            if held["score"] is None:
                held["score"] = mean_scores(self.answers(held["adapter"], doc), doc)
            scores.append(held["score"])

        def on_step(step: int, seconds: float, adapter: Adapter) -> None:
            while pending and pending[0] < seconds:
                pending.pop(0)
                score_held()
            held.update(adapter={k: (a.clone(), b.clone()) for k, (a, b) in adapter.items()}, score=None)

        questions = [qa.question for qa in doc.qas] if on_test else None
        self.internalize(doc, max(budgets), start, on_step=on_step, questions=questions)
        while pending:  # budgets past the job's end (a flat probe loss may stop it early): its final adapter
            pending.pop(0)
            score_held()
        return scores


def ratio_vs_context_distillation(curve: dict, budget: float, metric: str = "contained") -> dict:
    """Seconds distillation from zero init needs to reach LoraCast's score at its default budget (the d2l
    start's), over that budget. Never reached within the curve: the largest budget stands in, and the ratio is
    a lower bound. Empty when the curve lacks either start or the budget."""
    zero, ours = curve["starts"].get("zero"), curve["starts"].get("d2l")
    if not zero or not ours or budget not in curve["budgets_s"]:
        return {}
    lora_cast = ours[curve["budgets_s"].index(budget)][metric]
    reached = next((t for t, s in zip(curve["budgets_s"], zero, strict=True) if s[metric] >= lora_cast), None)
    seconds = reached if reached is not None else curve["budgets_s"][-1]
    return {
        "d2l_vs_context_distillation": round(seconds / budget, 2) if budget else None,
        "zero_init_seconds_to_reach": seconds,
        "lora_cast_score": lora_cast,
        "lora_cast_seconds": budget,
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
    profiles = [one_per_fact(d) for d in d2l_data.fictional_documents(args.fictional, args.seed, part="heldout")]
    if "fictional" in args.sets:
        result["fictional"] = ev.conditions("fictional", profiles)
    if "composites" in args.sets:
        docs = speed_documents(args.composites, args.composite_tokens, args.seed, ev.count_tokens)
        result["composites"] = ev.conditions("composites", docs)
    if "passages" in args.sets:
        docs = d2l_data.rc_documents(args.data_dir, "heldout", args.seed)[: args.passages]
        result["passages"] = ev.conditions("passages", docs)
    if "needle" in args.sets:
        result["needle"] = ev.needle()
    if "curve" in args.sets:
        result["curve"] = ev.curve(profiles[: args.curve_documents])
    result["d2l_checkpoint"] = str(args.d2l_path)
    result["base_fingerprint"] = ev.base.fingerprint
    return result


def table(result: dict) -> str:
    """Markdown: per document set, ROUGE-L / answer-contained per condition and the gap (c) closes; needles;
    the quality-time curve."""
    out = []
    head = "| documents | " + " | ".join(f"({c}) {d}" for c, d in CONDITIONS.items()) + " | gap closed by (c) |"
    rows = [head, "|" + "---|" * (len(CONDITIONS) + 2)]
    for name in ("fictional", "composites", "passages"):
        if name not in result:
            continue
        r = result[name]
        cells = [f"{r['mean'][c]['rougeL']:.1f} / {r['mean'][c]['contained']:.0f}" for c in CONDITIONS]
        gap = " / ".join("-" if g is None else f"{100 * g:.0f}%" for g in r["gap_closed"].values())
        rows.append(
            f"| {name} ({r['documents']} docs, {r['questions']} q, ~{r['tokens_median']:.0f} tokens) | "
            + " | ".join(cells)
            + f" | {gap} |"
        )
    if len(rows) > 2:
        out += [*rows, "", "Cells: ROUGE-L F1 / answer contained, percent; gap closed: ROUGE-L / contained.", ""]
    if "needle" in result:
        out += ["| needle document tokens | (a) base | (b) in context | (c) LoraCast |", "|---|---|---|---|"]
        for length, r in result["needle"]["buckets"].items():
            out.append(f"| {length} | " + " | ".join(f"{r['mean'][c]['contained']:.0f}" for c in "abc") + " |")
        out += ["", "Needle accuracy (answer contained), percent.", ""]
    if "curve" in result:
        c = result["curve"]
        out += [
            "| start | " + " | ".join(f"{t:g} s" for t in c["budgets_s"]) + " |",
            "|---|" + "---|" * len(c["budgets_s"]),
        ]
        for name, points in c["starts"].items():
            label = "test questions (ceiling)" if name == CEILING else name
            out.append(f"| {label} | " + " | ".join(f"{p['contained']:.0f}" for p in points) + " |")
        out += [
            "",
            f"Answer contained, percent, on {c['documents']} held-out profiles; floor {c['floor']['contained']:.0f}, "
            f"document in prompt {c['target']['contained']:.0f}.",
        ]
        if r := c.get("vs_context_distillation"):
            bound = ">=" if r["ratio_is_lower_bound"] else ""
            out.append(
                f"d2l_vs_context_distillation: {bound}{r['d2l_vs_context_distillation']}x (zero init needs "
                f"{bound}{r['zero_init_seconds_to_reach']:g} s for LoraCast's {r['lora_cast_score']:.0f} at "
                f"{r['lora_cast_seconds']:g} s)."
            )
    return "\n".join(out)
