"""The teacher of context distillation: the frozen base model with the document in its prompt answers
each question once, greedily, and its top-k log-probs at every answer token are kept.

Every prompt starts with the same tokens (system turn, then the document), so the document is read once:
its keys and values are computed for one row and repeated across the batch, and only the questions and
answers are decoded per row. Rows are left-padded *between* the shared prefix and the question (the mask
hides the padding, positions continue from the prefix), so one batch holds questions of any length. For a
500-token document and 40 questions this reads 500 + 40 x ~60 tokens instead of 40 x ~560.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from hypernet.sni_data import chat_prompt, user_turn
from loracast.base_model import BaseModel


@dataclass(frozen=True)
class Target:
    """One question's distillation target: the teacher's answer and its top-k log-probs at each answer token."""

    answer_ids: torch.Tensor  # (n,)
    topk_ids: torch.Tensor  # (n, k)
    topk_logprobs: torch.Tensor  # (n, k), the teacher's full-softmax log-probs (renormalized in the loss)


def topk_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of KL(teacher top-k, renormalized || student full softmax):

        KL_t = sum_{i in topk_t} p_t(i) * (log p_t(i) - log q_t(i))

    p_t renormalized over the teacher's top-k, q_t not, so the student is also pushed to put no mass outside
    it. It is >= 0, and 0 exactly when q_t equals p_t on the top-k."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, topk_ids)
    log_p = torch.log_softmax(topk_logprobs.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def teacher_turn(document: str, question: str) -> str:
    """The teacher's user turn: the document, then the question (the in-context reference condition)."""
    return user_turn(question, document)


class Teacher:
    """The base model with one document in its prompt, answering batches of questions as they come.

    The shared prefix's keys and values are computed once, at the first batch, and reused by every later
    one (cut back when a later batch shares less of it): a self-distillation job teaches its probes a batch
    at a time between training steps, and a 1,024-token window would otherwise be read again per batch."""

    def __init__(self, base: BaseModel, document: str, k: int = 16, max_new_tokens: int = 48) -> None:
        self.base, self.document, self.k, self.max_new_tokens = base, document, k, max_new_tokens
        self._prefix: list[int] = []
        self._cache: DynamicCache | None = None

    @torch.no_grad()
    def answer(self, questions: Sequence[str], batch_size: int = 16) -> list[Target]:
        """Targets for `questions`, in order."""
        tok = self.base.tokenizer
        rows = [
            tok(chat_prompt(tok, teacher_turn(self.document, q)), add_special_tokens=False)["input_ids"]
            for q in questions
        ]
        if not rows:
            return []
        shared = _common_prefix(rows)
        if self._cache is not None:
            pairs = zip(rows[0], self._prefix, strict=False)
            shared = min(shared, next((i for i, (a, b) in enumerate(pairs) if a != b), len(self._prefix)))
        if self._cache is None or shared != len(self._prefix):
            self._read_prefix(rows[0][:shared])
        targets: list[Target] = []
        for start in range(0, len(rows), batch_size):
            suffixes = [r[shared:] for r in rows[start : start + batch_size]]
            targets += _decode(self.base, self._cache, shared, suffixes, self.k, self.max_new_tokens)
        return targets

    def _read_prefix(self, prefix: list[int]) -> None:
        if self._cache is not None and len(prefix) < len(self._prefix):
            self._cache.crop(len(prefix) - len(self._prefix))  # a shorter prefix of what was read: keep its start
        else:
            self._cache = DynamicCache()
            self.base.model(input_ids=torch.tensor([prefix]), cache=self._cache, use_cache=True)
        self._prefix = prefix


def teach(
    base: BaseModel,
    document: str,
    questions: Sequence[str],
    k: int = 16,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[Target]:
    """Targets for `questions`, in order: one Teacher, used once."""
    return Teacher(base, document, k, max_new_tokens).answer(questions, batch_size)


def student_rows(
    tok: PreTrainedTokenizerBase, questions: Sequence[str], targets: Sequence[Target]
) -> list[tuple[list[int], list[int]]]:
    """The student's side: per question, the question alone in the user turn, teacher-forced on the teacher's
    answer, as (token ids, labels) with the prompt masked out."""
    rows = []
    for question, t in zip(questions, targets, strict=True):
        prompt = tok(chat_prompt(tok, question), add_special_tokens=False)["input_ids"]
        answer = t.answer_ids.tolist()
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    return rows


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own to decode from."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        n = next((i for i in range(n) if r[i] != first[i]), n)
    return n


def _decode(
    base: BaseModel, prefix_cache: DynamicCache, shared: int, suffixes: list[list[int]], k: int, max_new_tokens: int
) -> list[Target]:
    tok, model = base.tokenizer, base.model
    n, width = len(suffixes), max(len(s) for s in suffixes)
    pad = tok.pad_token_id or 0
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for row, s in enumerate(suffixes):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, shared + width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(n)
    tokens, logprobs = [], []
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits[
            :, -1
        ]
        step = torch.log_softmax(logits.float(), dim=-1)
        nxt = step.argmax(-1)
        tokens.append(nxt)
        logprobs.append(step.topk(k, dim=-1))
        done |= nxt == tok.eos_token_id
        if bool(done.all()):
            break
        ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
    answers = torch.stack(tokens, dim=1)
    top_ids = torch.stack([t.indices for t in logprobs], dim=1)
    top_values = torch.stack([t.values for t in logprobs], dim=1)
    targets = []
    for row in range(n):
        ends = (answers[row] == tok.eos_token_id).nonzero()
        length = int(ends[0]) + 1 if len(ends) else answers.shape[1]  # through the end-of-turn token: learn to stop
        targets.append(Target(answers[row, :length].clone(), top_ids[row, :length], top_values[row, :length]))
    return targets
