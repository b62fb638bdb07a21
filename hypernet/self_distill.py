"""Test-time self-distillation: a document's adapter, refined for a time budget on probes written from it.

    probes   = write_probes(document)                              hypernet/probes.py, from the text alone
    targets  = teacher(base | document in prompt, probes)          hypernet/teacher.py, once per document
    adapter  = start                                               the hypernetwork's pass (or zero, or a mean)
    repeat until the budget, `max_steps` or a flat probe loss:
        loss = KL(targets || base + adapter | probe alone)         top-k KL, or cross-entropy on the answers
        adapter -= Adam step

The adapted model *without* the document learns to answer as the model *with* it does. A document longer
than the teacher's window (WINDOW_TOKENS) is taught window by window, each with its own probes. Only the top
layers are trained: the frozen layers below see the same probe tokens at every step, so their
output is computed once (`FrozenBelow`) and each step runs and back-propagates through the top layers only
(`frozen_share` of the layers are frozen: 12 of SmolLM2's 30 by default).

The budget counts everything from the document's arrival: the one pass, the probe writer, the teacher and
the training steps. The teacher takes batches of probes (family by family in turn) until `teacher_share` of
the budget has passed, so a long document keeps time to train (measured: 105 probes of a 524-token document
took 53 of 61 s, leaving 3 steps). When the teacher finishes sooner, only training stops at the budget,
and a job with budget t returns what a longer job holds after t seconds: one long run gives the curve.
Progress goes to `on_progress`; `cancelled()` is polled between steps and teacher batches and raises
`Cancelled`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import create_causal_mask

from hypernet import probes as probe_writer
from hypernet.d2l import encode
from hypernet.sni_data import collate
from hypernet.t2l import Adapter
from hypernet.teacher import Target, student_rows, teach, topk_kl
from loracast.base_model import BaseModel
from loracast.lora import LoRALinear, applied

LOSSES = ("kl", "ce")
TEACHER_BATCH = 16  # probes decoded together: bigger batches are faster per probe, smaller ones stop sooner
WINDOW_TOKENS = 1024  # the most document the teacher reads at once: longer documents are taught window by window
MAX_ROWS = 2048  # training rows kept per document (their frozen-below states are held in memory)
PHASES = ("start", "probes", "teacher", "distill", "done")


class Cancelled(Exception):
    """The caller went away: the job stops between two steps and leaves no adapter."""


@dataclass(frozen=True)
class DistillConfig:
    budget_s: float = 60.0  # 0: the start alone
    max_steps: int = 400
    lr: float = 4e-3
    batch_size: int = 8
    frozen_share: float = 0.4  # of the layers, from the bottom: frozen, run once per document (measured)
    loss: str = "kl"
    families: tuple[str, ...] = probe_writer.DEFAULT_FAMILIES
    max_new_tokens: int = 32
    top_k: int = 16
    plateau_loss: float = 0.02  # stop when the mean probe loss of the last steps is below it
    teacher_share: float = 0.4  # of the budget, at most, for the teacher: a long document's probes are cut short
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if not 0 <= self.frozen_share < 1:
            raise ValueError(f"frozen_share must be in [0, 1), not {self.frozen_share}")
        if self.budget_s < 0:
            raise ValueError(f"the budget must be at least 0 seconds, not {self.budget_s}")


@dataclass(frozen=True)
class Progress:
    phase: str  # one of PHASES
    step: int
    probe_loss: float
    elapsed_s: float
    estimate_s: float  # total seconds the job expects to take


@dataclass
class Report:
    probes: int = 0
    taught: int = 0
    steps: int = 0
    probe_loss: float = float("nan")
    teacher_s: float = 0.0
    train_s: float = 0.0
    elapsed_s: float = 0.0
    losses: list[float] = field(default_factory=list)


class FrozenBelow:
    """The probe rows' hidden states after the frozen layers below `first_layer`, computed once."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], first_layer: int) -> None:
        self.model, self.first_layer = model, first_layer
        self.batch = batch
        self.hidden = encode(model, batch["input_ids"], batch["attention_mask"], first_layer)

    def _layer_kwargs(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        inner = self.model.model
        position_ids = torch.arange(hidden.shape[1])[None]
        mask = create_causal_mask(
            config=inner.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": inner.rotary_emb(hidden, position_ids=position_ids),
        }

    def answer_logits(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the answer positions of `rows` (in order) and the answer tokens, as train_t2l.answer_logits."""
        mask = self.batch["attention_mask"][rows]
        width = int(mask.sum(-1).max())
        hidden, mask = self.hidden[rows, :width], mask[:, :width]
        inner = self.model.model
        kwargs = self._layer_kwargs(hidden, mask)
        for layer in inner.layers[self.first_layer :]:
            hidden = layer(hidden, **kwargs)
        hidden = inner.norm(hidden)
        labels = self.batch["labels"][rows, 1:width]
        keep = labels != -100
        return self.model.lm_head(hidden[:, :-1][keep]).float(), labels[keep]


def zero_start(wrappers: dict[tuple[int, str], LoRALinear], rank: int, seed: int = 0) -> Adapter:
    """PEFT's init: A Kaiming-uniform, B zero, so the start is the base model itself."""
    gen = torch.Generator().manual_seed(seed)
    out: Adapter = {}
    for key, lin in wrappers.items():
        bound = 1 / math.sqrt(lin.base.in_features)
        a = (torch.rand(rank, lin.base.in_features, generator=gen) * 2 - 1) * bound
        out[key] = (a, torch.zeros(lin.base.out_features, rank))
    return out


def windows(document: str, count_tokens: Callable[[str], int], max_tokens: int = WINDOW_TOKENS) -> list[str]:
    """The document cut at sentence ends into pieces of at most ~`max_tokens` tokens (a longer sentence alone)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for sentence in re.split(r"(?<=[.!?])\s+", document.strip()):
        n = count_tokens(sentence) + 1
        if current and size + n > max_tokens:
            pieces.append(" ".join(current))
            current, size = [], 0
        current.append(sentence)
        size += n
    if current:
        pieces.append(" ".join(current))
    return pieces


def self_questions(base: BaseModel, document: str, max_new_tokens: int = 96) -> list[str]:
    """Questions the base model writes itself with the document in its prompt (the "self" probe family)."""
    reply = teach(base, document, [probe_writer.SELF_QUESTION_PROMPT], k=1, max_new_tokens=max_new_tokens)[0]
    return probe_writer.parse_questions(base.tokenizer.decode(reply.answer_ids, skip_special_tokens=True))


def distill_document(
    base: BaseModel,
    wrappers: dict[tuple[int, str], LoRALinear],
    document: str,
    start: Callable[[], Adapter],
    cfg: DistillConfig,
    on_progress: Callable[[Progress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    on_step: Callable[[int, float, Adapter], None] | None = None,
    questions: Sequence[str] | None = None,
) -> tuple[Adapter, Report]:
    """The document's adapter after at most `cfg.budget_s` seconds, and what the job did.

    `start()` makes the starting adapter (timed). `questions` replaces the probe writer (the labelled
    ceiling: the test questions themselves). `on_step(step, seconds, adapter)` runs after each step outside
    the clock, for curves of quality against time."""
    t0 = time.perf_counter()
    report = Report()
    clock = _Clock(t0, cfg.budget_s, on_progress, cancelled)
    clock.tick("start", 0, float("nan"))
    adapter = {k: (a.clone(), b.clone()) for k, (a, b) in start().items()}
    if cfg.budget_s == 0:
        report.elapsed_s = clock.elapsed()
        clock.tick("done", 0, float("nan"))
        return adapter, report

    clock.tick("probes", 0, float("nan"))
    views = windows(document, lambda t: len(base.tokenizer(t, add_special_tokens=False)["input_ids"]))
    taught: list[str] = []
    targets: list[Target] = []
    deadline = t0 + cfg.teacher_share * cfg.budget_s
    # Per (text the teacher reads, its probes): each window as it is, and shuffled for the probes marked so.
    queues: list[tuple[str, list[str]]] = []
    for view in views:
        if questions is None:
            written = probe_writer.write_probes(view, [f for f in cfg.families if f != "self"])
            if "self" in cfg.families:
                written += [probe_writer.Probe("self", q) for q in self_questions(base, view)]
        else:
            written = [probe_writer.Probe("test", q) for q in questions]
        report.probes += len(written)
        queues.append((view, [p.question for p in written if not p.shuffled]))
        if shuffled := [p.question for p in written if p.shuffled]:
            queues.append((probe_writer.shuffled_document(view), shuffled))
    clock.tick("teacher", 0, float("nan"))
    # A batch from each queue in turn, so a teacher cut short by its deadline still covers every window.
    for start in range(0, max((len(q) for _, q in queues), default=0), TEACHER_BATCH):
        for text, asked in queues:
            batch = asked[start : start + TEACHER_BATCH]
            if not batch or time.perf_counter() >= deadline:
                continue
            clock.check()
            with applied(wrappers, None):
                targets += teach(base, text, batch, cfg.top_k, cfg.max_new_tokens, TEACHER_BATCH)
            taught += batch
    if len(targets) > MAX_ROWS:  # a long document: an even spread of its probes keeps memory flat
        keep = [round(i * len(targets) / MAX_ROWS) for i in range(MAX_ROWS)]
        taught, targets = [taught[i] for i in keep], [targets[i] for i in keep]
    report.taught, report.teacher_s = len(targets), clock.elapsed()

    adapter, report.steps, report.losses, report.train_s = _train(
        base, wrappers, adapter, taught, targets, cfg, clock, on_step
    )
    report.probe_loss = report.losses[-1] if report.losses else float("nan")
    report.elapsed_s = clock.elapsed()
    clock.tick("done", report.steps, report.probe_loss)
    return adapter, report


def _train(
    base: BaseModel,
    wrappers: dict[tuple[int, str], LoRALinear],
    adapter: Adapter,
    questions: list[str],
    targets: list[Target],
    cfg: DistillConfig,
    clock: _Clock,
    on_step: Callable[[int, float, Adapter], None] | None,
) -> tuple[Adapter, int, list[float], float]:
    rows = student_rows(base.tokenizer, questions, targets)
    if not rows:
        return adapter, 0, [], 0.0
    batch = collate(rows, base.tokenizer.pad_token_id or 0)
    first_layer = int(cfg.frozen_share * len(base.model.model.layers))
    trained = {k for k in adapter if k[0] >= first_layer}
    params = {k: (a.requires_grad_(k in trained), b.requires_grad_(k in trained)) for k, (a, b) in adapter.items()}
    opt = torch.optim.Adam([t for k in trained for t in params[k]], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    with applied(wrappers, params):
        below = FrozenBelow(base.model, batch, first_layer)
    order: list[int] = []
    losses: list[float] = []
    train_s, step = 0.0, 0
    while step < cfg.max_steps and clock.elapsed() < cfg.budget_s:
        t_step = time.perf_counter()
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx = torch.tensor(sorted(order[: cfg.batch_size]))
        del order[: cfg.batch_size]
        with applied(wrappers, params):
            logits, labels = below.answer_logits(idx)
        if cfg.loss == "kl":
            value = topk_kl(
                logits,
                torch.cat([targets[i].topk_ids for i in idx]),
                torch.cat([targets[i].topk_logprobs for i in idx]),
            )
        else:
            value = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        step += 1
        losses.append(value.item())
        train_s += time.perf_counter() - t_step
        clock.tick("distill", step, losses[-1], train_s / step, cfg.max_steps)
        if on_step is not None:
            with clock.paused():
                on_step(step, clock.elapsed(), {k: (a.detach(), b.detach()) for k, (a, b) in params.items()})
        recent = losses[-max(1, len(rows) // cfg.batch_size) :]
        if len(losses) >= 2 * len(recent) and sum(recent) / len(recent) < cfg.plateau_loss:
            break
    return {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in params.items()}, step, losses, train_s


class _Clock:
    """Elapsed time from the document's arrival (less what `paused` excludes), progress and cancellation."""

    def __init__(
        self,
        t0: float,
        budget_s: float,
        on_progress: Callable[[Progress], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> None:
        self.t0, self.budget_s, self.excluded = t0, budget_s, 0.0
        self.on_progress, self.cancelled = on_progress, cancelled

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.excluded

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("the caller cancelled the internalization")

    def tick(self, phase: str, step: int, loss: float, step_s: float = 0.0, max_steps: int = 0) -> None:
        self.check()
        if self.on_progress is None:
            return
        elapsed = self.elapsed()
        estimate = self.budget_s
        if phase == "distill" and step_s > 0:
            estimate = min(self.budget_s, elapsed + (max_steps - step) * step_s)
        elif phase == "done":
            estimate = elapsed
        self.on_progress(Progress(phase, step, loss, elapsed, max(elapsed, estimate)))

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start
