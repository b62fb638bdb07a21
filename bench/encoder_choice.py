"""Which description encoder should T2L use? Two cheap, training-free measurements.

    .venv/bin/python bench/encoder_choice.py

1. category neighbours: for each training task, is its nearest other task (cosine) one that
   shares an SNI category? Tasks that are alike should embed alike.
2. variant retrieval: a description with sentences dropped (as in training) must still be
   nearest to its own full description among all tasks, or the hypernetwork sees a different task.
Writes bench/results/encoder_choice.json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from hypernet.encoder import ENCODERS, DescriptionEncoder
from hypernet.sni_data import default_data_dir, description_variants
from loracast import base_model

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    data = default_data_dir()
    raw = [
        json.loads(p.read_text()) for split in ("train", "dev") for p in sorted((data / "sni" / split).glob("*.json"))
    ]
    definitions = [r["definition"] for r in raw]
    categories = [set(r.get("categories") or []) for r in raw]
    rng = random.Random(0)
    variants = [description_variants(d, 2, rng)[1] for d in definitions]
    base = base_model.load()
    result = {}
    for kind in ENCODERS:
        enc = DescriptionEncoder(kind, base)
        full = torch.cat([enc(definitions[i : i + 16]) for i in range(0, len(definitions), 16)])
        var = torch.cat([enc(variants[i : i + 16]) for i in range(0, len(variants), 16)])
        sim = full @ full.T
        sim.fill_diagonal_(-2)
        labelled = [i for i, c in enumerate(categories) if c]
        neighbour = sum(bool(categories[i] & categories[int(sim[i].argmax())]) for i in labelled) / len(labelled)
        retrieval = ((var @ full.T).argmax(1) == torch.arange(len(raw))).float().mean().item()
        result[kind] = {
            "dim": enc.dim,
            "category_neighbour_acc": round(neighbour, 3),
            "variant_retrieval_acc": round(retrieval, 3),
            "tasks": len(raw),
            "labelled_tasks": len(labelled),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "encoder_choice.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
