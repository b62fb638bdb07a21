"""Does a Doc-to-LoRA adapter depend on its document? A diagnostic of the shipped D2L checkpoint.

    .venv/bin/python bench/d2l_adapter_diversity.py [--documents 6]

On held-out fictional documents of one chunk (so the adapter is exactly [chunk part; bias adapter], rank r + r,
no SVD), splits each layer's delta B A into the document's part (B_1 A_1, scaled by the chunk scaler) and the
learned bias adapter's (B_bias A_bias), the same for every document, and reports:

- ||document part|| / ||bias part|| over all layers and modules: how much of the adapter is the document's;
- the cosine similarity of the document parts of two different documents (all pairs): near 1 means the
  hypernetwork writes nearly the same delta whatever the document says, and the control of `loracast eval d2l`
  (another document's adapter) will score like the document's own;
- the cosine between a document's part and the bias part.

Writes bench/results/d2l_adapter_diversity.json.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch

from hypernet import checkpoint, d2l_data
from hypernet.makers import DocToLoRAMaker
from loracast import base_model
from loracast.paths import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def run(documents: int, d2l_path: Path) -> dict:
    base = base_model.load()
    maker = DocToLoRAMaker(d2l_path, base)
    cfg = maker.hyper.cfg
    if not cfg.bias_adapter:
        raise SystemExit("this checkpoint has no bias adapter: every delta is the document's")

    def tokens(text: str) -> int:
        return len(base.tokenizer(text, add_special_tokens=False)["input_ids"])

    pool = d2l_data.fictional_documents(10 * documents, seed=0, part="heldout")
    docs = [d for d in pool if tokens(d.text) <= cfg.chunk_tokens][:documents]
    parts = []
    for doc in docs:
        adapter = maker.make_adapter(doc.text)
        own, bias = [], []
        for key in sorted(adapter):
            a, b = (torch.as_tensor(x) for x in adapter[key])
            own.append((b[:, : cfg.r] @ a[: cfg.r]).flatten())
            bias.append((b[:, cfg.r :] @ a[cfg.r :]).flatten())
        parts.append((torch.cat(own), torch.cat(bias)))
    between = [_cosine(parts[i][0], parts[j][0]) for i, j in itertools.combinations(range(len(parts)), 2)]
    return {
        "checkpoint": str(d2l_path),
        "documents": len(docs),
        "rank_per_chunk": cfg.r,
        "document_over_bias_norm": [round(float(own.norm() / bias.norm()), 3) for own, bias in parts],
        "document_parts_cosine_between_documents": {
            "mean": round(statistics.mean(between), 3),
            "min": round(min(between), 3),
            "max": round(max(between), 3),
        },
        "document_vs_bias_cosine": [round(_cosine(own, bias), 3) for own, bias in parts],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=6)
    p.add_argument("--checkpoint", type=Path, default=checkpoint.DEFAULT_D2L)
    p.add_argument("--json", type=Path, default=RESULTS / "d2l_adapter_diversity.json")
    args = p.parse_args()
    result = run(args.documents, args.checkpoint)
    write_json(result, args.json)
    cos = result["document_parts_cosine_between_documents"]
    print(f"{result['documents']} one-chunk held-out documents, {args.checkpoint}")
    print(f"||document part|| / ||bias adapter||: {result['document_over_bias_norm']}")
    print(f"document parts of two different documents, cosine: mean {cos['mean']}, min {cos['min']}, max {cos['max']}")
    print(f"document part vs bias adapter, cosine: {result['document_vs_bias_cosine']}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
