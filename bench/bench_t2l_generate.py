"""Description -> adapter in memory: latency of one T2L pass once models are loaded.

    .venv/bin/python bench/bench_t2l_generate.py [--repeats 50]

Times the encoder and the hypernetwork separately and together on the dev task descriptions
(unseen in training), after one warm-up call. Writes bench/results/t2l_generate.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hypernet.makers import TextToLoRAMaker
from hypernet.sni_data import default_data_dir, load_tasks

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--data", type=Path, default=default_data_dir())
    args = p.parse_args()

    maker = TextToLoRAMaker()
    descriptions = [t.definition for t in load_tasks(args.data, "dev")]
    maker.make_adapter(descriptions[0])  # warm-up: first-call allocations are not what users wait for
    total, encode, hyper = [], [], []
    with torch.no_grad():
        for i in range(args.repeats):
            text = descriptions[i % len(descriptions)]
            t0 = time.perf_counter()
            emb = maker.encoder([text])
            t1 = time.perf_counter()
            maker.hyper(emb)
            t2 = time.perf_counter()
            maker.make_adapter(text)
            t3 = time.perf_counter()
            encode.append(t1 - t0)
            hyper.append(t2 - t1)
            total.append(t3 - t2)

    def ms(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"median_ms": round(1000 * statistics.median(xs), 2), "p90_ms": round(1000 * xs[int(0.9 * len(xs))], 2)}

    result = {
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "generate": ms(total),
        "encoder": ms(encode),
        "hypernet": ms(hyper),
        "adapter_params": sum(a.numel() + b.numel() for a, b in maker.make_adapter(descriptions[0]).values()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "t2l_generate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
