"""Test-time self-distillation: a document's adapter, refined for a time budget on probes written from it.

    probes   = write_probes(document)                              hypernet/probes.py, from the text alone
    adapter  = start                                               the hypernetwork's pass (or zero, or a mean)
    repeat until the budget, `max_steps` or a flat probe loss:
        targets += teacher(base | document in prompt, next probes) hypernet/teacher.py, each probe once
        loss = KL(targets || base + adapter | probe alone)         top-k KL, or cross-entropy on the answers
        adapter -= Adam step

The adapted model *without* the document learns to answer as the model *with* it does. A document longer
than the teacher's window (WINDOW_TOKENS) is taught window by window, each with its own probes. Only the top
layers are trained: the frozen layers below see the same probe tokens at every step, so their
output is computed once (`FrozenBelow`) and each step runs and back-propagates through the top layers only
(`frozen_share` of the layers are frozen: 12 of SmolLM2's 30 by default).

The budget counts everything from the document's arrival: the one pass, the probe writer, the teacher and
the training steps. Teacher and student take turns: the teacher answers a batch of probes (a batch from each
window in turn) whenever the student has too few rows or the teacher has used less than `teacher_share` of the
time so far, and stops at `teacher_share` of the budget, so a long document keeps time to train; the student
trains on what has been answered, newest rows first. Learning starts after one batch rather than after the
whole teacher (measured on three design profiles: 13.7 vs 0 answer-contained at 15 s, 39.9 vs 14.3 at 60 s).
The teacher also stops adding probes once the student could no longer train on each MIN_PASSES times in the
budget left: a long document's probes past that only thin out the passes (probes.py puts the best first).
A job with budget t returns what a longer job holds after t seconds: one long run gives the curve. Progress
goes to `on_progress`; `cancelled()` is polled between steps and teacher batches and raises `Cancelled`.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import create_causal_mask

from hypernet import probes as probe_writer
from hypernet.d2l import encode
from hypernet.sni_data import collate
from hypernet.t2l import Adapter
from hypernet.teacher import Target, Teacher, student_rows, teach, topk_kl
from loracast.base_model import BaseModel
from loracast.lora import LoRALinear, applied

LOSSES = ("kl", "ce")
TEACHER_BATCH = 16  # probes decoded together: bigger batches are faster per probe, smaller ones stop sooner
WINDOW_TOKENS = 1024  # the most document the teacher reads at once: longer documents are taught window by window
MAX_ROWS = 2048  # training rows kept per document (their frozen-below states are held in memory)
MIN_PASSES = 4  # the teacher adds probes only while the student can still train on each this often
KEPT_TEACHERS = 4  # texts whose prefix stays cached between teacher batches (~47 MB each for 1,024 tokens)
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
    """Training rows and their hidden states after the frozen layers below `first_layer`, each computed once,
    when the teacher's answer for it arrives (run it with the start adapter applied: it holds those layers')."""

    def __init__(self, model: torch.nn.Module, first_layer: int, pad_id: int) -> None:
        self.model, self.first_layer, self.pad_id = model, first_layer, pad_id
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # per row: hidden (n, d), labels (n,)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, rows: Sequence[tuple[list[int], list[int]]]) -> None:
        batch = collate(list(rows), self.pad_id)
        hidden = encode(self.model, batch["input_ids"], batch["attention_mask"], self.first_layer)
        for i, (ids, _) in enumerate(rows):
            self.rows.append((hidden[i, : len(ids)], batch["labels"][i, : len(ids)]))

    def answer_logits(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the answer positions of rows `idx` (in order) and the answer tokens, as train_t2l.answer_logits."""
        chosen = [self.rows[i] for i in idx]
        width = max(len(labels) for _, labels in chosen)
        hidden = chosen[0][0].new_zeros(len(chosen), width, chosen[0][0].shape[-1])
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (h, lab) in enumerate(chosen):
            hidden[row, : len(lab)], labels[row, : len(lab)], mask[row, : len(lab)] = h, lab, 1
        inner = self.model.model
        kwargs = self._layer_kwargs(hidden, mask)
        for layer in inner.layers[self.first_layer :]:
            hidden = layer(hidden, **kwargs)
        hidden = inner.norm(hidden)
        keep = labels[:, 1:] != -100
        return self.model.lm_head(hidden[:, :-1][keep]).float(), labels[:, 1:][keep]

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
    plan = _teaching_plan(base, document, cfg, questions, report)
    student = _Student(base, wrappers, adapter, cfg)
    teachers: OrderedDict[str, Teacher] = OrderedDict()
    # Teach a batch whenever the student has too few rows or the teacher is under its share of the time so far;
    # train otherwise. Learning starts after one batch, not after every probe is answered.
    while clock.elapsed() < cfg.budget_s and student.step < cfg.max_steps:
        teaching = (
            bool(plan)
            and clock.elapsed() < cfg.teacher_share * cfg.budget_s
            and student.has_room(len(plan[0][1]), cfg.budget_s - clock.elapsed())
        )
        if teaching and (len(student.rows) < cfg.batch_size or report.teacher_s <= cfg.teacher_share * clock.elapsed()):
            text, batch = plan.pop(0)
            clock.tick("teacher", student.step, student.loss)
            t = time.perf_counter()
            with applied(wrappers, None):
                targets = _teacher(teachers, base, text, cfg).answer(batch, TEACHER_BATCH)
            student.learn(batch, targets)
            report.teacher_s += time.perf_counter() - t
            continue
        if not student.rows:
            break
        student.train_step()
        report.train_s = student.train_s
        clock.tick("distill", student.step, student.loss, report.train_s / student.step, cfg.max_steps)
        if on_step is not None:
            with clock.paused():
                on_step(student.step, clock.elapsed(), student.adapter())
        if not teaching and student.plateaued():
            break
    adapter = student.adapter() if student.step else adapter
    report.taught, report.steps, report.losses = len(student.rows), student.step, student.losses
    report.probe_loss = student.loss
    report.elapsed_s = clock.elapsed()
    clock.tick("done", report.steps, report.probe_loss)
    return adapter, report


def _teaching_plan(
    base: BaseModel, document: str, cfg: DistillConfig, questions: Sequence[str] | None, report: Report
) -> list[tuple[str, list[str]]]:
    """(text the teacher reads, a batch of its probes), a batch from each text in turn: a teacher cut short by its
    share of the budget still covers every window. Texts are each window as it is, and shuffled for the probes
    marked so; past MAX_ROWS probes in all, each text keeps an even share (memory stays flat)."""
    views = windows(document, lambda t: len(base.tokenizer(t, add_special_tokens=False)["input_ids"]))
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
    if sum(len(q) for _, q in queues) > MAX_ROWS:
        share = max(1, MAX_ROWS // len(queues))
        queues = [(text, asked[:share]) for text, asked in queues]
    longest = max((len(q) for _, q in queues), default=0)
    return [
        (text, asked[i : i + TEACHER_BATCH])
        for i in range(0, longest, TEACHER_BATCH)
        for text, asked in queues
        if asked[i : i + TEACHER_BATCH]
    ]


def _teacher(teachers: OrderedDict[str, Teacher], base: BaseModel, text: str, cfg: DistillConfig) -> Teacher:
    """The text's Teacher, its prefix kept for the next batch; the least recently used go (their caches are big)."""
    if text not in teachers:
        teachers[text] = Teacher(base, text, cfg.top_k, cfg.max_new_tokens)
        while len(teachers) > KEPT_TEACHERS:
            teachers.popitem(last=False)
    teachers.move_to_end(text)
    return teachers[text]


class _Student:
    """The adapter being trained on the rows the teacher has answered so far; new rows are seen first."""

    def __init__(
        self, base: BaseModel, wrappers: dict[tuple[int, str], LoRALinear], adapter: Adapter, cfg: DistillConfig
    ) -> None:
        self.base, self.wrappers, self.cfg = base, wrappers, cfg
        first_layer = int(cfg.frozen_share * len(base.model.model.layers))
        trained = {k for k in adapter if k[0] >= first_layer}
        self.params = {
            k: (a.clone().requires_grad_(k in trained), b.clone().requires_grad_(k in trained))
            for k, (a, b) in adapter.items()
        }
        self.opt = torch.optim.Adam([t for k in trained for t in self.params[k]], lr=cfg.lr)
        self.rows = FrozenBelow(base.model, first_layer, base.tokenizer.pad_token_id or 0)
        self.targets: list[Target] = []
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.order: list[int] = []
        self.losses: list[float] = []
        self.step, self.train_s = 0, 0.0

    @property
    def loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    def has_room(self, more: int, remaining_s: float) -> bool:
        """Whether `more` rows can still each be trained on MIN_PASSES times in `remaining_s`, at the step time so
        far (unknown before the first step: yes). Past that, more probes only thin out the passes over each."""
        if self.step == 0:
            return True
        steps = self.step + remaining_s / (self.train_s / self.step)
        return len(self.rows) + more <= steps * self.cfg.batch_size / MIN_PASSES

    def learn(self, questions: Sequence[str], targets: Sequence[Target]) -> None:
        first = len(self.rows)
        with applied(self.wrappers, self.params):
            self.rows.add(student_rows(self.base.tokenizer, questions, targets))
        self.targets += targets
        fresh = torch.randperm(len(targets), generator=self.gen) + first
        self.order = fresh.tolist() + self.order

    def train_step(self) -> None:
        t = time.perf_counter()
        cfg = self.cfg
        if len(self.order) < cfg.batch_size:
            self.order += torch.randperm(len(self.rows), generator=self.gen).tolist()
        idx = sorted(self.order[: cfg.batch_size])
        del self.order[: cfg.batch_size]
        with applied(self.wrappers, self.params):
            logits, labels = self.rows.answer_logits(idx)
        if cfg.loss == "kl":
            value = topk_kl(
                logits,
                torch.cat([self.targets[i].topk_ids for i in idx]),
                torch.cat([self.targets[i].topk_logprobs for i in idx]),
            )
        else:
            value = torch.nn.functional.cross_entropy(logits, labels)
        self.opt.zero_grad(set_to_none=True)
        value.backward()
        self.opt.step()
        self.step += 1
        self.losses.append(value.item())
        self.train_s += time.perf_counter() - t

    def plateaued(self) -> bool:
        """The mean probe loss over about one pass through the rows is below `plateau_loss`."""
        recent = self.losses[-max(1, len(self.rows) // self.cfg.batch_size) :]
        return len(self.losses) >= 2 * len(recent) and sum(recent) / len(recent) < self.cfg.plateau_loss

    def adapter(self) -> Adapter:
        return {k: (a.detach(), b.detach()) for k, (a, b) in self.params.items()}


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
