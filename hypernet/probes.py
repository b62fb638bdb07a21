"""The probe writer: training queries written from a document alone, for test-time self-distillation.

A deployed system never knows the questions it will be asked, so it writes its own from the text, in
families whose transfer to real questions is measured (`loracast eval d2l --sets probes`):

    cloze      "Complete this sentence from the text: "<first half of a sentence>""   one per sentence
    span       "What does the text say about <span>?" and "Tell me about <span>."     names, dates, numbers
    relation   "How are <span> and <span> related?"                                  spans sharing a sentence
    seed       "Summarize the text.", "List every fact in the text.", ...             a few per document
    self       questions the base model writes itself with the document in its prompt (`self_questions`)

The first four are deterministic functions of the text (no randomness at all; `shuffled_document` is
seeded by the text's own hash). Sentences a document states once come first, and their spans with them
(`_rarest_first`). Their wording is generic English: none of them uses the templates that
`hypernet.d2l_data` asks its evaluation questions with. Probe texts carry the document's content: like the
document, they live in memory only.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

FAMILIES = ("cloze", "span", "relation", "seed", "self")
DEFAULT_FAMILIES = ("cloze", "span", "relation", "seed")
FIRST_FAMILIES = ("cloze", "seed", "self")  # taught before the others (see write_probes)

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_SPAN_PATTERNS = (
    rf"\b\d{{1,2}} (?:{_MONTHS}) \d{{3,4}}\b",  # 11 July 1988
    rf"\b(?:{_MONTHS}) \d{{1,2}}, \d{{3,4}}\b",  # July 11, 1988
    r"\$\d[\d,.]*(?: (?:thousand|million|billion))?",  # $34.4 billion
    r"\b\d[\d,.]*\d(?: (?:percent|metres|meters|kilometres|people|years|km|kg))?\b|\b\d\b",  # 60,191 people
    # Capitalized names, with the small words names carry inside them (University of X, Bank of the Y)
    r"\b[A-Z][\w'-]*(?:(?: (?:of|the|de|van|von|and))* [A-Z][\w'-]*)*",
)
_SPAN_RE = re.compile("|".join(f"(?:{p})" for p in _SPAN_PATTERNS))
# Words capitalized only because a sentence starts with them, and other spans that name nothing.
_NOT_NAMES_TEXT = (
    "A An The This That These Those It Its He She His Her They Their Them We Our You Your I In On At By For "
    "From With Without Of To As And But Or If When While After Before Over Under Outside Inside Friends "
    "Colleagues Visitors Customers Analysts Many Few Some Most Every Each There Here Today Yesterday Then Also"
)
_NOT_NAMES = frozenset(_NOT_NAMES_TEXT.split())
SEEDS = (
    "Summarize the text.",
    "List every fact in the text.",
    "Repeat the text word for word.",
    "What is the text about?",
)
MAX_SPANS_PER_DOCUMENT = 48


@dataclass(frozen=True)
class Probe:
    family: str
    question: str
    shuffled: bool = False  # the teacher reads the document with its sentences in another order
    answer: str = ""  # unknown: the teacher writes it (kept so a Probe is QA-like for the teacher code)


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    return [s.strip() for s in parts if len(s.split()) >= 3]


def spans(sentence: str) -> list[str]:
    """Names, dates, numbers and amounts in a sentence, longest first where they overlap."""
    found = []
    for m in _SPAN_RE.finditer(sentence):
        span = m.group(0).strip(" ,.")
        words = span.split()
        while words and words[0] in _NOT_NAMES:  # "The Drawen River" -> "Drawen River"; "She" -> nothing
            words = words[1:]
        span = re.sub(r"'s?$", "", " ".join(words))
        if span and (len(span) > 1 or span.isdigit()):
            found.append(span)
    return found


def cloze(sentence: str) -> str:
    """The sentence cut before its last span (so the rest is the fact), or in half when no span is inside."""
    found = [sentence.rfind(s) for s in spans(sentence)]
    cut = max((at for at in found if at > len(sentence) // 4), default=-1)
    words = sentence[:cut].split() if cut > 0 else sentence.split()[: max(2, len(sentence.split()) // 2)]
    return f'Complete this sentence from the text: "{" ".join(words)} ..."'


def write_probes(text: str, families: Sequence[str] = DEFAULT_FAMILIES, shuffled_share: float = 0.25) -> list[Probe]:
    """The probes of `families` for one document, the families that teach most per probe first: cloze and seed
    questions interleaved, then span and relation questions interleaved (a job with little time per probe
    teaches only a prefix: measured on three design composites of ~490 tokens, cloze and seed alone reached 24.3
    answer-contained at 60 s, all four families 6.7). Every 1/shuffled_share-th probe is taught on a shuffled copy."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown probe families {unknown}; choose from {FAMILIES}")
    by_family: dict[str, list[str]] = {f: [] for f in families if f != "self"}
    seen_spans: dict[str, None] = {}
    pairs: dict[tuple[str, str], None] = {}
    for sentence in _rarest_first(sentences(text)):
        if "cloze" in by_family and len(sentence.split()) >= 5:
            by_family["cloze"].append(cloze(sentence))
        found = list(dict.fromkeys(spans(sentence)))
        for s in found:
            seen_spans.setdefault(s, None)
        for i in range(len(found) - 1):
            pairs.setdefault((found[i], found[i + 1]), None)
    for s in list(seen_spans)[:MAX_SPANS_PER_DOCUMENT]:
        if "span" in by_family:
            by_family["span"] += [f"What does the text say about {s}?", f"Tell me about {s}."]
    if "relation" in by_family:
        by_family["relation"] = [f"How are {a} and {b} related?" for a, b in list(pairs)[:MAX_SPANS_PER_DOCUMENT]]
    if "seed" in by_family:
        by_family["seed"] = list(SEEDS)
    order = [
        (f, q)
        for group in (FIRST_FAMILIES, set(FAMILIES) - set(FIRST_FAMILIES))
        for round_ in _round_robin([(f, qs) for f, qs in by_family.items() if f in group])
        for f, q in round_
    ]
    every = round(1 / shuffled_share) if shuffled_share > 0 else 0
    return [Probe(f, q, shuffled=bool(every) and i % every == every - 1) for i, (f, q) in enumerate(order)]


def _rarest_first(parts: list[str]) -> list[str]:
    """Sentences whose words the document says least often first: a fact stated once (a magic number in a long
    report) is taught before the prose that repeats around it, which a job short of time may never reach."""
    words = [re.findall(r"\w+", s.lower()) for s in parts]
    counts: dict[str, int] = {}
    for ws in words:
        for w in set(ws):
            counts[w] = counts.get(w, 0) + 1
    rarity = [sum(counts[w] for w in ws) / max(1, len(ws)) for ws in words]
    return [parts[i] for i in sorted(range(len(parts)), key=rarity.__getitem__)]


def _round_robin(families: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    longest = max((len(qs) for _, qs in families), default=0)
    return [[(f, qs[i]) for f, qs in families if i < len(qs)] for i in range(longest)]


def shuffled_document(text: str) -> str:
    """The document's sentences in another order, the same order every time for the same text."""
    parts = sentences(text)
    rng = random.Random(hashlib.sha256(text.encode("utf-8")).digest())
    order = parts[:]
    rng.shuffle(order)
    if order == parts:  # a short document can shuffle back into itself; a variant should differ
        order = parts[1:] + parts[:1]
    return " ".join(order)


SELF_QUESTION_PROMPT = "Write five different questions that the text above answers, one per line."


def parse_questions(reply: str, limit: int = 8) -> list[str]:
    """Questions from the base model's reply to SELF_QUESTION_PROMPT: lines ending in '?', numbering removed."""
    out = []
    for line in reply.splitlines():
        q = re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", line).strip()
        if q.endswith("?") and len(q.split()) >= 3 and q not in out:
            out.append(q)
    return out[:limit]
