"""Reading-comprehension passages from `rc/train` of the data directory: real text, with the data set's gold
answers as it gives them."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from hypernet.d2l_data.documents import HELDOUT_FRACTION, QA, Document, check_part, document_id, hash_fraction
from hypernet.sni_data import DataError

RC_FOLDER = Path("rc") / "train"

# WIQA's answers are the labels for/against/none: a classification whose instruction the D2L prompt
# contract (the user turn holds only the question) never gives, and which no passage states. Neither
# the teacher nor the student can answer them from the passage, so they would teach the label format,
# not the passage, and add noise to answer-contained accuracy.
RC_SKIPPED_TASKS = frozenset({"task1727_wiqa_what_is_the_effect"})


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def rc_documents(data_dir: Path, part: str, seed: int = 0) -> list[Document]:
    """The passages of `rc/train` as documents, one per passage with all of its questions.

    The held-out part is ~15% of each task's passages, chosen by a hash of the passage's first
    sentence rather than of its whole text: bAbI's passages come as growing prefixes of one story,
    and a held-out passage would otherwise sit word for word inside a training one. A first sentence
    held out in one task is held out in all. The split does not depend on `seed`, which only orders
    the documents.
    """
    check_part(part)
    folder = Path(data_dir) / RC_FOLDER
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataError(f"no reading-comprehension files in {folder}: pass --data DIR holding {RC_FOLDER}/*.json")
    questions: dict[str, dict[str, QA]] = {}
    sources: dict[str, str] = {}
    for path in files:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw["task"] in RC_SKIPPED_TASKS:
                continue
            for inst in raw["instances"]:
                passage = inst["passage"].strip()
                question = " ".join(inst["question"].split())  # QA-SRL's questions carry doubled spaces
                answers = [a.strip() for out in inst.get("all_outputs") or [inst["output"]] for a in out.split("###")]
                answers = list(dict.fromkeys(a for a in answers if a))
                if not passage or not question or not answers:
                    continue
                questions.setdefault(passage, {}).setdefault(question, QA(question, answers[0], tuple(answers[1:])))
                sources.setdefault(passage, raw["task"])
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a reading-comprehension task file with passage/question ({exc!r})") from exc
    # Per task, the ~15% of story groups with the smallest hashes: a plain hash threshold left some
    # tasks (bAbI has 16 stories) without a single held-out passage.
    groups: dict[str, set[str]] = {}
    for passage, task in sources.items():
        groups.setdefault(task, set()).add(_first_sentence(passage))
    heldout: set[str] = set()
    for keys in groups.values():
        ranked = sorted(keys, key=lambda key: hash_fraction(f"rc:{key}"))
        heldout.update(ranked[: math.ceil(HELDOUT_FRACTION * len(ranked))])
    docs = [
        Document(passage, tuple(qas.values()), "rc", document_id(passage), source=sources[passage])
        for passage, qas in questions.items()
        if (_first_sentence(passage) in heldout) == (part == "heldout")
    ]
    docs.sort(key=lambda d: d.doc_id)
    random.Random(f"d2l-rc/{seed}").shuffle(docs)
    return docs
