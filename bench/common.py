"""What several benchmarks use: prompts to decode, a timed token stream, a random adapter, the long document with
its questions, and resident-memory readings. Scripts in bench/ import it as `common` (their folder is on the path
when they run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from loracast.lora_spec import LoraSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from worker.onnx_session import Adapter

PROMPTS = [
    "Write a long, detailed essay about the history of the Roman Empire.",
    "Explain step by step how a compiler turns source code into machine code.",
    "Describe a week-long trip through Japan, day by day, with food and places to see.",
]


def timed(tokens: Iterator[int]) -> tuple[list[int], float, float]:
    """Drain a token stream: (tokens, seconds to the first token, seconds from the first token to the last)."""
    start = time.perf_counter()
    out, first = [], start
    for token in tokens:
        if not out:
            first = time.perf_counter()
        out.append(token)
    return out, first - start, time.perf_counter() - first


def random_attention_adapter(model: PreTrainedModel, spec: LoraSpec, seed: int) -> Adapter:
    """A random adapter of the usual magnitude (A ~ Kaiming-like, B small but nonzero), as numpy arrays."""
    rng = np.random.default_rng(seed)
    adapter = {}
    for i, layer in enumerate(model.model.layers):
        for module in spec.target_modules:
            lin = getattr(layer.self_attn, module)
            a = rng.standard_normal((spec.r, lin.in_features), dtype=np.float32) / np.float32(lin.in_features) ** 0.5
            b = rng.standard_normal((lin.out_features, spec.r), dtype=np.float32) * 0.02
            adapter[(i, module)] = (a, b)
    return adapter


def the_document(tokens: int, questions: int) -> tuple[str, list[str]]:
    from hypernet.eval_d2l import speed_documents
    from worker.chat import ChatTokenizer
    from worker.model_cache import prepare

    tok = ChatTokenizer(prepare("smollm2"))
    doc = speed_documents(1, tokens, seed=7, count_tokens=lambda s: len(tok.encode(s)))[0]
    asked = [doc.qas[i % len(doc.qas)].question for i in range(questions)]
    return doc.text, asked


class PeakRss:
    """The largest resident set size of this process seen while active (a 2 ms sampling thread)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(0.002)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20
