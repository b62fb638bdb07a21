"""Invented words (first names, surnames, companies, towns, rivers) for the generated documents.

Every coined word belongs to "train" or "heldout" by a hash of the word, and a generator of one part coins only that
part's words, so no held-out entity name can appear in any training document.
"""

from __future__ import annotations

import random

from hypernet.d2l_data.documents import part_of

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "v")
_ENDINGS = {
    "first": ("in", "a", "el", "o", "is", "ek", "ira", "an"),
    "surname": ("abe", "enko", "ov", "ard", "elli", "qvist", "ine", "ash"),
    "company": ("ex", "ora", "ix", "ium", "ant", "etra", "yn", "ova"),
    "place": ("holm", "ford", "wick", "ava", "grad", "mere", "stad", "oria"),
    "river": ("na", "ra", "ssa", "le", "wen", "da"),
}


class Names:
    """Coined words from one part's share of the name space, never repeated within a generator."""

    def __init__(self, part: str, rng: random.Random) -> None:
        self.part = part
        self.rng = rng
        self.used: set[str] = set()

    def word(self, style: str, syllables: tuple[int, int] = (1, 2)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            stem = "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS) for _ in range(n)
            )
            if self.rng.random() < 0.3 and stem[1] in "aeiou":  # some names start with a vowel ("Ostabe")
                stem = stem[1:]
            word = (stem + self.rng.choice(_ENDINGS[style])).capitalize()
            # Short coined words can be real ones ("May", a month the dates use) and would leak across parts.
            if len(word) < 5 or word in self.used or part_of(f"name:{word.lower()}") != self.part:
                continue
            self.used.add(word)
            return word

    def person(self) -> str:
        return f"{self.word('first')} {self.word('surname')}"
