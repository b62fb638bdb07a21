"""What several benchmarks use: prompts to decode, a timed token stream, a random adapter, the long document with
its questions, resident-memory readings, and llama.cpp (llama-cpp-python) on the base model's GGUF. Scripts in bench/
import it as `common` (their folder is on the path when they run).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from loracast.lora_spec import LoraSpec

if TYPE_CHECKING:
    from llama_cpp import Llama
    from transformers import PreTrainedModel

    from worker.onnx_session import Adapter

INSTALL_LLAMACPP = ".venv/bin/pip install -e '.[bench]'"

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


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message (one line) says what to install or fix."""


def import_llama_cpp() -> ModuleType:
    """The `llama_cpp` module, or a one-line BenchError saying how to install it."""
    try:
        return importlib.import_module("llama_cpp")
    except (ImportError, OSError, RuntimeError) as e:  # RuntimeError: its shared library did not load
        raise BenchError(
            f"the llamacpp mode needs llama-cpp-python ({type(e).__name__}: {e}): run `{INSTALL_LLAMACPP}` "
            "(builds llama.cpp for this CPU, a few minutes), or pass --no-llamacpp to leave it out"
        ) from e


def gguf_path() -> Path:
    """The GGUF file the default base model ships in (what llama.cpp runs)."""
    from loracast import base_model

    return base_model.gguf_dir() / base_model.GGUF_FILE


# A prefill in a fresh process: llama.cpp with its extra buffer types (on x86 with AMX: AMX kernels for Q4_1).
_LLAMACPP_PROBE = """
import itertools, sys
import llama_cpp
ids = [int(x) for x in sys.argv[3].split(",")]
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=len(ids) + 8, n_threads=int(sys.argv[2]),
                      n_threads_batch=int(sys.argv[2]), logits_all=False, verbose=False)
print(list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0), 4)))
"""


def extra_buffer_types_work(threads: int, prompt: list[int]) -> tuple[bool, str]:
    """Whether llama.cpp survives a prefill with its extra buffer types, tried in a child process.

    llama-cpp-python 0.3.36 built with GCC 12 on a CPU with AMX crashes (SIGILL at `tilezero`): GCC 12's
    `_tile_loadconfig` declares that it reads 8 bytes of the tile config, so the stores of the tile shapes are
    dropped and the tiles are left unconfigured (llama.cpp pull request #26954).
    """
    cmd = [sys.executable, "-c", _LLAMACPP_PROBE, str(gguf_path()), str(threads), ",".join(map(str, prompt))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return False, "the probe timed out"
    if proc.returncode == 0:
        return True, "a prefill with them ran"
    how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
    last = proc.stderr.strip().splitlines()[-1:] or [""]
    return False, f"a prefill with them died ({how}) {last[0]}".strip()


@contextlib.contextmanager
def without_extra_buffer_types(llama_cpp: ModuleType) -> Iterator[None]:
    """`Llama(...)` made meanwhile loads its weights into plain CPU buffers (`use_extra_bufts = False`)."""
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def params() -> object:
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params  # what `Llama.__init__` calls
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llamacpp_stream(llm: Llama, prompt: list[int], n: int) -> Iterator[int]:
    """Exactly `n` greedy tokens from llama.cpp (end-of-sequence does not stop `Llama.generate`).

    `reset()` first: with no tokens known, `generate` reuses no prefix of the previous run's KV cache, and its
    first `eval` drops the whole cache, so every run pays for its prompt like the other modes.
    """
    llm.reset()
    return itertools.islice(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), n)
