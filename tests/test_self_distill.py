"""The probe writer, the shared-prefix teacher and test-time self-distillation, on the tiny random Llama."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from hypernet import d2l_data, probes
from hypernet.makers import DocToLoRAMaker, InputError
from hypernet.self_distill import (
    Cancelled,
    DistillConfig,
    FrozenBelow,
    Progress,
    distill_document,
    windows,
    zero_start,
)
from hypernet.sni_data import chat_prompt
from hypernet.teacher import Teacher, teach, teacher_turn
from hypernet.train_d2l import run_teacher
from loracast.lora import applied

DOC = (
    "Mara Quintell was born on 4 March 1961. She grew up in Velmora and studied at the University of Ostrand. "
    "Quintell works for a company called Brisk Harbor, which has 6,120 employees and earned $12.5 million in 2019."
)
# budget_s is a ceiling only: max_steps ends these jobs, on a busy machine too.
TINY = DistillConfig(
    budget_s=300, max_steps=3, batch_size=4, max_new_tokens=4, top_k=4, lr=1e-2, frozen_share=0, teacher_share=1.0
)


def test_the_probe_writer_is_deterministic_and_covers_names_dates_and_numbers():
    first, again = probes.write_probes(DOC), probes.write_probes(DOC)
    assert first == again
    text = " ".join(p.question for p in first)
    for span in ("Mara Quintell", "4 March 1961", "Velmora", "University of Ostrand", "Brisk Harbor", "6,120"):
        assert span in text, span
    assert "$12.5 million" in text
    assert {p.family for p in first} == {"cloze", "span", "relation", "seed"}
    assert any(p.shuffled for p in first) and not all(p.shuffled for p in first)
    assert probes.shuffled_document(DOC) == probes.shuffled_document(DOC) != DOC
    assert sorted(probes.sentences(probes.shuffled_document(DOC))) == sorted(probes.sentences(DOC))


def test_a_cloze_stops_before_the_fact():
    assert probes.cloze("Mara Quintell was born on 4 March 1961.").endswith('"Mara Quintell was born on ..."')


def test_sentences_stated_once_are_taught_before_the_prose_repeated_around_them():
    filler = "The square in Lomtral was quiet in the morning fog. " * 6
    doc = filler + "The magic number of Ada Vey is 48213. " + filler
    first = probes.write_probes(doc)[0]
    assert first.family == "cloze" and "The magic number of Ada Vey is" in first.question


def test_probes_never_use_the_evaluation_question_templates():
    """The evaluation asks with d2l_data's templates; no probe of any held-out document is one of its questions."""
    for doc in d2l_data.fictional_documents(20, 0, part="heldout"):
        written = {p.question for p in probes.write_probes(doc.text, probes.FAMILIES)}
        assert not written & {qa.question for qa in doc.qas}


def test_unknown_probe_families_are_refused_by_name():
    with pytest.raises(ValueError, match="nonsense"):
        probes.write_probes(DOC, ("cloze", "nonsense"))


def test_self_written_questions_are_parsed_from_a_numbered_reply():
    reply = "1. Who is Mara?\n2) Where did she grow up?\nSome text.\n- Why?\n* What does she do for work?"
    assert probes.parse_questions(reply) == ["Who is Mara?", "Where did she grow up?", "What does she do for work?"]


def test_the_shared_prefix_teacher_matches_generate_row_by_row(tiny_base):
    questions = ["Who is Mara?", "Where did Mara Quintell grow up, and when was she born?", "Which company?"]
    targets = teach(tiny_base, DOC, questions, k=5, max_new_tokens=6, batch_size=2)
    tok = tiny_base.tokenizer
    for q, t in zip(questions, targets, strict=True):
        ids = tok(chat_prompt(tok, teacher_turn(DOC, q)), add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = tiny_base.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = out[0, ids.shape[1] :]
        assert t.answer_ids.tolist() == expected[: len(t.answer_ids)].tolist()
        assert t.topk_ids.shape == (len(t.answer_ids), 5)


def test_training_targets_come_from_the_same_teacher(tiny_base):
    doc = d2l_data.fictional_documents(1, 0)[0]
    assert [t.answer_ids.tolist() for t in run_teacher(tiny_base, doc, 4, 5)] == [
        t.answer_ids.tolist() for t in teach(tiny_base, doc.text, [qa.question for qa in doc.qas], 4, 5)
    ]


@pytest.fixture()
def wrappers(tiny_d2l, tiny_base):
    return DocToLoRAMaker(tiny_d2l, tiny_base).wrappers


def test_distillation_lowers_the_probe_loss_and_reports_progress_in_phase_order(tiny_base, wrappers):
    events: list[Progress] = []
    cfg = replace(TINY, max_steps=12)
    adapter, report = distill_document(
        tiny_base, wrappers, DOC, lambda: zero_start(wrappers, 4), cfg, on_progress=events.append
    )
    assert report.steps == 12 and report.taught == report.probes > 0
    assert report.losses[-1] < report.losses[0]
    phases = [e.phase for i, e in enumerate(events) if i == 0 or events[i - 1].phase != e.phase]
    assert phases == ["start", "probes", "teacher", "distill", "done"]  # TINY's teacher may take all the time
    assert [e.step for e in events if e.phase == "distill"] == list(range(1, 13))
    assert all(e.estimate_s >= e.elapsed_s for e in events)
    assert set(adapter) == set(wrappers)
    assert any(float(b.abs().sum()) > 0 for _, b in adapter.values())  # B moved from zero


def test_a_zero_budget_returns_the_start_unchanged(tiny_base, wrappers):
    start = zero_start(wrappers, 4)
    adapter, report = distill_document(tiny_base, wrappers, DOC, lambda: start, replace(TINY, budget_s=0))
    assert report.steps == 0 and report.probes == 0
    assert all(torch.equal(adapter[k][0], start[k][0]) for k in start)


def test_only_the_layers_above_the_frozen_share_are_trained(tiny_base, wrappers):
    start = zero_start(wrappers, 4)
    adapter, _ = distill_document(tiny_base, wrappers, DOC, lambda: start, replace(TINY, frozen_share=0.5))
    for (layer, m), (_, b) in adapter.items():
        assert torch.equal(b, start[(layer, m)][1]) == (layer < 1)


def test_a_teacher_asked_batch_by_batch_answers_as_one_call_even_when_later_batches_share_less(tiny_base):
    """The first batch (one question) shares its whole prompt but the last token: the next must cut that prefix back."""
    questions = ["Who is Mara Quintell?", "Where did Mara grow up?", "What is Brisk Harbor?"]
    teacher = Teacher(tiny_base, DOC, k=4, max_new_tokens=5)
    batched = teacher.answer(questions[:1]) + teacher.answer(questions[1:]) + teacher.answer(questions[:1])
    whole = teach(tiny_base, DOC, questions + questions[:1], k=4, max_new_tokens=5)
    for got, want in zip(batched, whole, strict=True):
        assert got.answer_ids.tolist() == want.answer_ids.tolist()
        assert torch.allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-4)


def test_the_frozen_layers_below_are_computed_once_and_give_the_full_forward(tiny_base, wrappers):
    """Training from layer 1 must see the same logits as the whole model: the cache is an optimization only."""
    tok = tiny_base.tokenizer
    rows = [(tok("a b c d e")["input_ids"], [-100, -100, 5, 6, 7]), (tok("x y")["input_ids"], [-100, 9])]
    start = zero_start(wrappers, 4)
    start = {k: (a, torch.randn_like(b) * 0.1) for k, (a, b) in start.items()}
    with applied(wrappers, start), torch.no_grad():
        split, whole = FrozenBelow(tiny_base.model, 1, tok.pad_token_id), FrozenBelow(tiny_base.model, 0, 0)
        split.add(rows[:1])  # rows arrive in two batches, as the teacher answers them
        split.add(rows[1:])
        whole.add(rows)
        split_logits, split_labels = split.answer_logits([1, 0])
        whole_logits, whole_labels = whole.answer_logits([1, 0])
    assert torch.allclose(split_logits, whole_logits, atol=1e-5)
    assert split_labels.tolist() == whole_labels.tolist() == [9, 5, 6, 7]


def test_cancellation_stops_the_job_between_steps(tiny_base, wrappers):
    seen: list[str] = []

    def cancelled() -> bool:
        return "distill" in seen

    with pytest.raises(Cancelled):
        distill_document(
            tiny_base,
            wrappers,
            DOC,
            lambda: zero_start(wrappers, 4),
            replace(TINY, max_steps=50),
            on_progress=lambda e: seen.append(e.phase),
            cancelled=cancelled,
        )
    assert seen.count("distill") == 1


def test_the_ceiling_trains_on_the_questions_it_is_given(tiny_base, wrappers):
    _, report = distill_document(tiny_base, wrappers, DOC, lambda: zero_start(wrappers, 4), TINY, questions=["Q?"])
    assert report.probes == report.taught == 1


def test_the_maker_internalizes_within_its_budget_and_refuses_bad_budgets(tiny_d2l, tiny_base):
    maker = DocToLoRAMaker(tiny_d2l, tiny_base, distill=TINY)
    one_pass = maker.make_adapter(DOC)
    budget0 = maker.internalize(DOC, budget_s=0)
    assert all(torch.equal(one_pass[k][0], budget0[k][0]) for k in one_pass)
    refined = maker.internalize(DOC)
    assert any(not torch.equal(one_pass[k][1], refined[k][1]) for k in one_pass)
    for bad in (-1, math.inf, 10**6):
        with pytest.raises(InputError, match="budget"):
            maker.internalize(DOC, budget_s=bad)
    with pytest.raises(InputError, match="empty"):
        maker.internalize("   ")


def test_lora_wrappers_are_left_without_an_adapter(tiny_base, wrappers):
    distill_document(tiny_base, wrappers, DOC, lambda: zero_start(wrappers, 4), TINY)
    assert all(w.A is None and w.B is None for w in wrappers.values())


def test_long_documents_are_taught_window_by_window_at_sentence_ends():
    sentences = [f"Sentence number {i} names Kelvar {i}." for i in range(40)]
    pieces = windows(" ".join(sentences), lambda t: len(t.split()), max_tokens=30)
    assert len(pieces) > 1 and all(len(p.split()) <= 30 for p in pieces)
    assert " ".join(pieces).split(". ") == " ".join(sentences).split(". ")


def test_every_window_gets_its_own_probes(tiny_base, wrappers, monkeypatch):
    long_doc = " ".join(f"Kelvar {i} was founded in {1800 + i}." for i in range(60))
    one = len(probes.write_probes(long_doc))
    monkeypatch.setattr(windows, "__defaults__", (64,))  # windows of 64 tokens instead of 1024
    _, report = distill_document(
        tiny_base, wrappers, long_doc, lambda: zero_start(wrappers, 4), replace(TINY, max_steps=1)
    )
    assert report.probes > one  # seeds and spans repeat per window


def test_the_default_budget_grows_with_the_document(tiny_d2l, tiny_base):
    maker = DocToLoRAMaker(tiny_d2l, tiny_base, distill=replace(TINY, budget_s=10))
    short, long = "A short one.", " ".join(["Another sentence of the long document."] * 400)
    assert maker.budget_for(None, short) == 10
    assert maker.budget_for(None, long) > 10 * 2
    assert maker.budget_for(5, long) == 5  # a budget asked for is kept


def test_a_teacher_cut_short_by_its_share_of_the_budget_still_covers_every_window(tiny_base, wrappers, monkeypatch):
    long_doc = " ".join(f"Kelvar {i} was founded in {1800 + i}." for i in range(60))
    monkeypatch.setattr(windows, "__defaults__", (64,))
    monkeypatch.setattr("hypernet.self_distill.TEACHER_BATCH", 2)
    taught: list[str] = []
    real = Teacher.answer

    def recorded(self, questions, *args):
        taught.append(self.document)
        return real(self, questions, *args)

    monkeypatch.setattr(Teacher, "answer", recorded)
    cfg = replace(TINY, budget_s=1e-3, max_steps=1)  # the teacher's deadline passes before its first batch
    _, report = distill_document(tiny_base, wrappers, long_doc, lambda: zero_start(wrappers, 4), cfg)
    assert report.probes > 0 and report.taught == 0 and taught == [] and report.steps == 0

    cfg = replace(TINY, budget_s=60, max_steps=40, teacher_share=0.99, plateau_loss=0)
    taught.clear()
    _, report = distill_document(tiny_base, wrappers, long_doc, lambda: zero_start(wrappers, 4), cfg)
    first_round = taught[: len(windows(long_doc, lambda t: len(tiny_base.tokenizer(t)["input_ids"])))]
    assert len(set(first_round)) == len(first_round) > 1  # the first batches go to different windows


def test_training_starts_after_the_first_teacher_batch_not_after_the_last(tiny_base, wrappers, monkeypatch):
    """Teacher batches and steps interleave: the student learns from the first answers while later probes wait."""
    monkeypatch.setattr("hypernet.self_distill.TEACHER_BATCH", 2)
    phases: list[str] = []
    cfg = replace(TINY, budget_s=60, max_steps=40, plateau_loss=0, teacher_share=0.5)
    _, report = distill_document(
        tiny_base, wrappers, DOC, lambda: zero_start(wrappers, 4), cfg, on_progress=lambda p: phases.append(p.phase)
    )
    work = [p for p in phases if p in ("teacher", "distill")]
    assert work[0] == "teacher" and "teacher" in work[work.index("distill") :]
    assert report.steps == 40 and report.taught > 0
