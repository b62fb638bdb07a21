"""The `Document` every D2L data source makes, with the questions (`QA`) it answers, and the hashes that put a
document, or a word it is made of, in the "train" or the "heldout" part whatever seed a caller picks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PARTS = ("train", "heldout")
HELDOUT_FRACTION = 0.15


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # short gold answer, checkable by containment
    alternatives: tuple[str, ...] = ()  # further accepted answers (QA-SRL lists several spans)
    fact: str = ""  # which fact it asks about; the paraphrases of one fact share it

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.alternatives)


@dataclass(frozen=True)
class Document:
    text: str
    qas: tuple[QA, ...]
    kind: str  # "fictional" | "rc" | "needle"
    doc_id: str  # sha256 of the text, first 16 hex digits
    entities: tuple[str, ...] = ()  # invented names in the text (fictional, needle)
    source: str = ""  # fictional: person/company/place; rc: the SNI task; needle: empty


def document_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for a key; no seed enters it, so splits never move."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")


def part_of(key: str) -> str:
    return "heldout" if hash_fraction(key) < HELDOUT_FRACTION else "train"
