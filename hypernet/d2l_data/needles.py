"""Needle-in-a-haystack documents: one "magic number" sentence at a random depth in filler prose about invented
towns. The needle's number is the only number in the text and its QAs' answer."""

from __future__ import annotations

import random
from collections.abc import Callable

from hypernet.d2l_data.documents import QA, Document, check_part, document_id
from hypernet.d2l_data.names import Names

_FILLER_TEMPLATES = (
    "{Time}, the {market} in {town} was {quiet}.",
    "A {color} {vehicle} moved slowly along the {road} towards {town}.",
    "The {weather} kept most people in {town} indoors {time}.",
    "Someone had left a {color} {thing} on the bench beside the {road}.",
    "The {market} sold {goods} and little else {time}.",
    "Travellers from {town} often stopped at the {market} for {goods}.",
    "{Time}, a {animal} wandered across the {road} and disappeared into the trees.",
    "Nobody in {town} remembered when the old {thing} had last been repaired.",
    "The {weather} made the {road} to {town} {quiet}.",
    "A small group gathered near the {market} to talk about the {weather}.",
    "The {color} shutters of the houses in {town} had faded in the sun.",
    "{Time}, the bells of {town} rang once and then fell silent.",
    "Children in {town} liked to watch the {animal} near the {road}.",
    "The baker in {town} sold out of {goods} before noon.",
    "A {vehicle} carrying {goods} arrived in {town} {time}.",
    "The path behind the {market} was {quiet} after the {weather}.",
    "Visitors described {town} as {quiet}, especially {time}.",
    "An old map of {town} hung crooked in the hall of the {market}.",
)
_FILLER_SLOTS = {
    "time": ("in the early morning", "late in the evening", "on most afternoons", "during the winter", "at dusk"),
    "market": ("fish market", "flower market", "town square", "railway station", "harbour", "covered market"),
    "quiet": ("quiet", "busy", "crowded", "almost empty", "peaceful", "noisy"),
    "color": ("green", "red", "blue", "grey", "yellow", "white", "brown"),
    "vehicle": ("cart", "bus", "tractor", "delivery van", "bicycle", "wagon"),
    "road": ("river road", "main street", "canal", "hill path", "coast road", "old bridge"),
    "weather": ("rain", "fog", "heat", "wind", "snow", "drizzle"),
    "thing": ("umbrella", "lantern", "basket", "wheelbarrow", "fountain", "clock", "gate"),
    "goods": ("apples", "bread", "wool", "candles", "cheese", "pottery", "honey"),
    "animal": ("fox", "heron", "goat", "stray dog", "hedgehog", "crow"),
}
_NEEDLE_TEMPLATE = "The magic number of {name} is {number}."
_NEEDLE_QUESTIONS = (
    "What is the magic number of {name}?",
    "What is {name}'s magic number?",
    "Which number is the magic number of {name}?",
)
NEEDLE_TOLERANCE = 0.1


def _filler_sentence(rng: random.Random, towns: list[str]) -> str:
    template = rng.choice(_FILLER_TEMPLATES)
    slots = {key: rng.choice(values) for key, values in _FILLER_SLOTS.items()}
    sentence = template.format(town=rng.choice(towns), Time=slots["time"].capitalize(), **slots)
    return sentence[0].upper() + sentence[1:]


def _haystack(sentences: list[str], needle: str, depth: float) -> str:
    at = round(depth * len(sentences))
    return " ".join([*sentences[:at], needle, *sentences[at:]])


def _needle_document(
    rng: random.Random, names: Names, target_tokens: int, count_tokens: Callable[[str], int]
) -> Document:
    name = names.person()
    towns = [names.word("place") for _ in range(6)]
    number = str(rng.randint(10000, 99999))
    needle = _NEEDLE_TEMPLATE.format(name=name, number=number)
    depth = rng.random()
    sentences = [_filler_sentence(rng, towns)]
    # Count the whole text each round (tokenizers merge across sentence boundaries and may add
    # special tokens per call), and step by the measured tokens per sentence; a few rounds converge.
    for _ in range(20):
        have = count_tokens(_haystack(sentences, needle, depth))
        step = round((target_tokens - have) / (have / (len(sentences) + 1)))
        if step > 0:
            sentences.extend(_filler_sentence(rng, towns) for _ in range(step))
        elif step < 0 and len(sentences) > 1:
            del sentences[max(1, len(sentences) + step) :]
        else:
            break
    text = _haystack(sentences, needle, depth)
    if abs(count_tokens(text) - target_tokens) > NEEDLE_TOLERANCE * target_tokens:
        raise ValueError(
            f"cannot build a haystack of {target_tokens} tokens ±{NEEDLE_TOLERANCE:.0%} from whole sentences"
        )
    qas = tuple(QA(q.format(name=name), number, fact="magic_number") for q in _NEEDLE_QUESTIONS)
    return Document(text, qas, "needle", document_id(text), entities=(name, *towns))


def needle_documents(
    n: int, seed: int, target_tokens: int, count_tokens: Callable[[str], int], part: str = "train"
) -> list[Document]:
    """`n` haystacks of about `target_tokens` tokens (±10% by `count_tokens`), each hiding one
    "The magic number of <name> is <5 digits>." at a uniformly random depth.

    The filler is recombined neutral prose about invented towns, with no digits, so the needle's
    number is the only one in the text. Deterministic in (part, seed, target_tokens, count_tokens).
    """
    check_part(part)
    rng = random.Random(f"d2l-needle/{part}/{seed}/{target_tokens}")
    names = Names(part, rng)
    return [_needle_document(rng, names, target_tokens, count_tokens) for _ in range(n)]
