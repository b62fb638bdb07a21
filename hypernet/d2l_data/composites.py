"""Composite documents: several fictional profiles joined into one document several chunks long, with facts in
every chunk."""

from __future__ import annotations

import random

from hypernet.d2l_data.documents import Document, document_id


def composite_documents(parts: list[Document], size: int, questions: int, seed: int) -> list[Document]:
    """Documents of `size` consecutive `parts` each (len(parts) // size of them), joined by blank lines:
    several chunks long, with facts in every chunk. Each keeps `questions` of its parts' questions,
    sampled with `seed`."""
    rng = random.Random(seed)
    docs = []
    for i in range(len(parts) // size):
        group = parts[i * size : (i + 1) * size]
        text = "\n\n".join(d.text for d in group)
        qas = [qa for d in group for qa in d.qas]
        qas = tuple(rng.sample(qas, min(questions, len(qas))))
        entities = tuple(e for d in group for e in d.entities)
        docs.append(Document(text, qas, group[0].kind, document_id(text), entities=entities, source="composite"))
    return docs
