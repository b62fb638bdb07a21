"""D2L data: generated fictional and needle documents, reading-comprehension passages, and splits."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from support import write_rc_fixture

from hypernet.d2l_data import (
    RC_FOLDER,
    RC_SKIPPED_TASKS,
    Document,
    fictional_documents,
    needle_documents,
    rc_documents,
)
from hypernet.sni_data import DataError, default_data_dir


def words(text: str) -> int:
    return len(text.split())


def test_fictional_documents_are_deterministic_and_seeds_differ():
    first = fictional_documents(30, seed=7)
    assert first == fictional_documents(30, seed=7)
    assert fictional_documents(10, seed=7) == first[:10]  # asking for more never changes the first ones
    other = fictional_documents(30, seed=8)
    assert not {d.doc_id for d in first} & {d.doc_id for d in other}
    assert fictional_documents(30, seed=7, part="heldout") != first


def test_fictional_documents_state_every_answer_and_ask_each_fact_several_ways():
    docs = fictional_documents(300, seed=0)
    assert len({d.doc_id for d in docs}) == len(docs)
    assert Counter(d.source for d in docs).keys() == {"person", "company", "place"}
    for doc in docs:
        assert doc.kind == "fictional"
        assert doc.doc_id == hashlib.sha256(doc.text.encode()).hexdigest()[:16]
        # ~80-250 base-model tokens; SmolLM2's tokenizer gives 1.2-2.4 tokens per word of these profiles.
        assert 40 <= words(doc.text) <= 150, doc.text
        per_fact = Counter(qa.fact for qa in doc.qas)
        assert 4 <= len(per_fact) <= 8
        assert set(per_fact.values()) <= {2, 3}
        for qa in doc.qas:
            assert qa.answer in doc.text
            assert doc.entities[0] in qa.question  # asked without the document, so the question names it
        # Paraphrases of one fact share its answer and differ in wording.
        for fact in per_fact:
            same = [qa for qa in doc.qas if qa.fact == fact]
            assert len({qa.answer for qa in same}) == 1 and len({qa.question for qa in same}) == len(same)


def test_no_held_out_entity_name_appears_in_any_training_document():
    training = [d.text for seed in (0, 1) for d in fictional_documents(400, seed)]
    heldout = [d for seed in (0, 1) for d in fictional_documents(100, seed, part="heldout")]
    names = {name for doc in heldout for name in doc.entities}
    assert len(names) > 300
    # Names are runs of letters; any occurrence in a training text is the same run among its word n-grams.
    tokens = [re.findall(r"[A-Za-z]+", text) for text in training]
    longest = max(len(name.split()) for name in names)
    ngrams = {tuple(t[i : i + n]) for t in tokens for n in range(1, longest + 1) for i in range(len(t) - n + 1)}
    leaked = [name for name in names if tuple(re.findall(r"[A-Za-z]+", name)) in ngrams]
    assert leaked == []
    # Stronger: no invented word at all crosses over, only the fixed words around some names.
    fixed = {"University", "of", "River", "Medal", "Prize", "Award", "Cup", "Bridge", "Tower"}
    fixed |= {"Cathedral", "Lighthouse", "Gate", "Clock", "Market", "Hall"}
    assert {w for name in names for w in name.split()} & {w for t in tokens for w in t} <= fixed


def test_parts_are_checked():
    with pytest.raises(ValueError, match="part must be one of"):
        fictional_documents(1, 0, part="dev")


def test_needle_documents_hit_the_length_and_hide_one_number_at_varying_depths():
    for target in (256, 1024, 4096):
        docs = needle_documents(12, seed=3, target_tokens=target, count_tokens=words)
        depths = []
        for doc in docs:
            assert doc.kind == "needle"
            assert abs(words(doc.text) - target) <= 0.1 * target
            number = doc.qas[0].answer
            assert re.findall(r"\d+", doc.text) == [number]  # the filler carries no competing number
            assert {qa.answer for qa in doc.qas} == {number} and len(doc.qas) >= 2
            needle = f"The magic number of {doc.entities[0]} is {number}."
            assert doc.text.count(needle) == 1
            depths.append(doc.text.index(needle) / len(doc.text))
        assert min(depths) < 0.3 and max(depths) > 0.7
        # Varied filler, not one sentence repeated.
        sentences = docs[0].text.split(". ")
        assert len(set(sentences)) > 0.8 * len(sentences)


def test_needle_documents_are_deterministic_and_check_their_length():
    docs = needle_documents(3, seed=1, target_tokens=512, count_tokens=words)
    assert docs == needle_documents(3, seed=1, target_tokens=512, count_tokens=words)
    assert docs != needle_documents(3, seed=2, target_tokens=512, count_tokens=words)
    with pytest.raises(ValueError, match="cannot build a haystack"):
        needle_documents(1, seed=1, target_tokens=5, count_tokens=words)


def rc_dirs() -> list[Path | None]:
    """The fixture always; the real data set as well where it is present (a second case, not a skip)."""
    real = default_data_dir()
    return [None] + ([real] if real and (real / RC_FOLDER).is_dir() else [])


@pytest.fixture(params=rc_dirs(), ids=lambda p: "fixture" if p is None else "shared-data")
def rc_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return request.param or write_rc_fixture(tmp_path)


def test_rc_split_is_disjoint_stable_and_keeps_stories_together(rc_dir: Path):
    train, heldout = rc_documents(rc_dir, "train"), rc_documents(rc_dir, "heldout")
    assert train and heldout
    assert not {d.text for d in train} & {d.text for d in heldout}
    # A held-out passage never sits inside a training one (bAbI passages are prefixes of longer ones).
    assert not any(h.text in t.text or t.text in h.text for h in heldout for t in train)
    assert len(heldout) < len(train)
    assert not {d.source for d in train + heldout} & RC_SKIPPED_TASKS
    # Every task keeps some passages for evaluation.
    assert {d.source for d in heldout} == {d.source for d in train}
    # The seed orders the documents; it never moves one across the split.
    reordered = rc_documents(rc_dir, "train", seed=5)
    assert sorted(d.doc_id for d in reordered) == sorted(d.doc_id for d in train)
    assert [d.doc_id for d in reordered] != [d.doc_id for d in train]
    assert rc_documents(rc_dir, "train") == train
    for doc in train + heldout:
        assert doc.kind == "rc" and doc.qas and doc.source
        assert len({qa.question for qa in doc.qas}) == len(doc.qas)


def test_rc_documents_group_questions_by_passage_and_split_alternative_answers(tmp_path: Path):
    root = write_rc_fixture(tmp_path)
    docs = {d.text: d for part in ("train", "heldout") for d in rc_documents(root, part)}
    assert len(docs) == 40 + 8
    album: Document = docs["The album number 0 is named after a pseudoscience ."]
    assert [(qa.question, qa.answers) for qa in album.qas] == [
        ("what is named?", ("The album", "album")),
        ("what is it named after?", ("a pseudoscience",)),
    ]
    assert all(qa.answer in d.text for d in docs.values() for qa in d.qas)


def test_rc_documents_report_a_missing_or_broken_directory(tmp_path: Path):
    with pytest.raises(DataError, match="no reading-comprehension files"):
        rc_documents(tmp_path, "train")
    (tmp_path / RC_FOLDER).mkdir(parents=True)
    (tmp_path / RC_FOLDER / "task1_x.json").write_text(json.dumps({"task": "task1_x", "instances": [{"input": "x"}]}))
    with pytest.raises(DataError, match="not a reading-comprehension task file"):
        rc_documents(tmp_path, "train")
