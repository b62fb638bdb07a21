"""Adapter makers: text -> adapter, in memory or as a PEFT directory; a description through Text-to-LoRA, a document
through Doc-to-LoRA, each with its shipped checkpoint by default.

Words: a hypernetwork *makes* an adapter (`make_adapter`); *generate* is decoding text with the base model (the
worker's Generate RPC, `OnnxDecoder.generate`). The coordinator's GenerateFromDescription RPC makes an adapter: its
name is kept for wire compatibility."""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from hypernet import checkpoint
from hypernet.d2l import chunk_ids, internalize
from hypernet.encoder import DescriptionEncoder
from hypernet.self_distill import DistillConfig, Progress, distill_document
from hypernet.t2l import Adapter
from loracast import adapter_format
from loracast.base_model import BaseModel
from loracast.errors import UserError
from loracast.lora import inject
from loracast.lora_spec import LoraSpec

MAX_DESCRIPTION_CHARS = 4000
MAX_DOCUMENT_BYTES = 2**20
MAX_BUDGET_S = 3600.0
BUDGET_TOKENS = 512  # the default budget buys this many document tokens; longer documents get more, in proportion


class InputError(UserError, ValueError):
    """The request itself is unusable (empty description, ...); the message says what to fix."""


def check_description(description: str) -> str:
    text = description.strip()
    if not text:
        raise InputError("the description is empty: describe the task in a sentence or more")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise InputError(f"the description has {len(text)} characters; at most {MAX_DESCRIPTION_CHARS} are accepted")
    return text


def check_document(document: str) -> str:
    if not document.strip():
        raise InputError("the document is empty: give a file with text in it")
    return document


def read_document(path: Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """A document file's text (UTF-8), or an InputError saying why it cannot be one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"document {path} does not exist or is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"document {path} has {size} bytes, over the {max_bytes}-byte limit: split it or raise it")
    data = path.read_bytes()
    if b"\x00" in data:
        raise InputError(f"document {path} looks like a binary file (it has NUL bytes): give UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"document {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if not text.strip():
        raise InputError(f"document {path} is empty: give a file with text in it")
    return text


def with_rank(spec: LoraSpec, rank: int) -> LoraSpec:
    """`spec` for an adapter of rank `rank`, alpha adjusted so that PEFT scales it exactly as `spec` does."""
    factor = math.sqrt(rank / spec.r) if spec.use_rslora else rank / spec.r
    return LoraSpec(spec.target_modules, rank, spec.alpha * factor, spec.use_rslora)


class AdapterMaker(ABC):
    """A loaded hypernetwork checkpoint that makes an adapter from a text; subclasses say how."""

    kinds: tuple[str, ...]  # checkpoint kinds it accepts
    source_key: str  # the metadata key holding the SHA-256 of the source text
    version: str  # stamped on adapters whose checkpoint does not record one

    def __init__(self, path: Path, base: BaseModel | None) -> None:
        self.hyper, self.meta = checkpoint.load(path, self.kinds)
        self.path = Path(path)
        self.fingerprint = self.meta.get("base_fingerprint", "")
        if base is not None and base.fingerprint != self.fingerprint:
            raise checkpoint.CheckpointError(
                f"{path} was trained for base model {self.fingerprint[:12]}…, not {base.fingerprint[:12]}…"
            )
        self.spec = self.hyper.cfg.spec

    @abstractmethod
    def make_adapter(self, text: str) -> Adapter: ...

    def source(self, text: str) -> str:
        """The text as hashed into the adapter's provenance."""
        return text

    def spec_for(self, adapter: Adapter) -> LoraSpec:
        """The spec of one adapter it made (Doc-to-LoRA's rank grows with the document, up to its cap)."""
        return with_rank(self.spec, next(iter(adapter.values()))[0].shape[0])

    def metadata(self, text: str) -> dict[str, str]:
        return {
            adapter_format.META_FINGERPRINT: self.fingerprint,
            "loracast.hypernet_version": self.meta.get("hypernet_version", self.version),
            self.source_key: hashlib.sha256(self.source(text).encode()).hexdigest(),
        }

    def save(self, text: str, out: Path, base_name: str = "smollm2") -> Path:
        adapter = self.make_adapter(text)
        return adapter_format.save(out, adapter, self.spec_for(adapter), base_name, self.metadata(text))


class TextToLoRAMaker(AdapterMaker):
    """Loads a T2L checkpoint and its encoder once; each `make_adapter` is one hypernetwork pass."""

    kinds = ("TextToLoRA", "MultiTaskLoRA")
    source_key = "loracast.description_sha256"
    version = checkpoint.HYPERNET_VERSION

    def __init__(self, path: Path = checkpoint.DEFAULT_T2L, base: BaseModel | None = None) -> None:
        super().__init__(path, base)
        self.encoder = DescriptionEncoder(self.meta.get("encoder", "minilm"), base)

    @torch.no_grad()
    def make_adapter(self, description: str) -> Adapter:
        """{(layer, module): (A (r, in), B (out, r))} for one description."""
        adapter = self.hyper(self.encoder([check_description(description)]))
        return {k: (a[0], b[0]) for k, (a, b) in adapter.items()}

    def source(self, text: str) -> str:
        return text.strip()


class DocToLoRAMaker(AdapterMaker):
    """Loads a D2L checkpoint; the base model is its document encoder and, with the document in its prompt, the
    teacher of test-time self-distillation (hypernet/self_distill.py).

    `make_adapter` is the one pass (budget 0): chunks stream through the encoder one at a time. `internalize` starts
    from it and distills the document into the adapter for a budget of seconds. Both use the shared base model
    with LoRA wrappers set, so they run one at a time (a lock), never beside each other."""

    kinds = ("DocToLoRA",)
    source_key = "loracast.document_sha256"
    version = checkpoint.D2L_VERSION

    def __init__(
        self,
        path: Path = checkpoint.DEFAULT_D2L,
        base: BaseModel | None = None,
        max_rank: int | None = None,
        distill: DistillConfig | None = None,
    ) -> None:
        if base is None:
            raise ValueError("Doc-to-LoRA encodes documents with the base model: pass the loaded base")
        super().__init__(path, base)
        self.base = base
        self.max_rank = self.hyper.cfg.max_rank if max_rank is None else max_rank  # None: the checkpoint's
        self.distill = distill or DistillConfig()
        self.wrappers = inject(base.model, self.spec)
        self._lock = threading.Lock()

    def make_adapter(self, document: str) -> Adapter:
        """The one pass: {(layer, module): (A (R, in), B (out, R))}, R = min(r x (chunks + 1), max_rank)."""
        with self._lock:
            return self._one_pass(document)

    def _one_pass(self, document: str) -> Adapter:
        chunks = iter(chunk_ids(self.base.tokenizer, check_document(document), self.hyper.cfg.chunk_tokens))
        first = next(chunks, None)
        if first is None:  # not blank, yet nothing the tokenizer reads (control characters only)
            raise InputError("the document has no text the model can read: give UTF-8 text with words in it")
        return internalize(self.hyper, self.base.model, itertools.chain([first], chunks), self.max_rank)

    def budget_for(self, budget_s: float | None, document: str = "") -> float:
        """The seconds a document gets: `budget_s`, or by default the configured budget per BUDGET_TOKENS tokens
        of `document` (at least the configured budget, at most MAX_BUDGET_S)."""
        if budget_s is None:
            tokens = len(self.base.tokenizer(document, add_special_tokens=False)["input_ids"]) if document else 0
            return min(MAX_BUDGET_S, self.distill.budget_s * max(1.0, tokens / BUDGET_TOKENS))
        if not 0 <= budget_s <= MAX_BUDGET_S:
            raise InputError(f"the budget must be between 0 and {MAX_BUDGET_S:.0f} seconds, not {budget_s:g}")
        return budget_s

    def internalize(
        self,
        document: str,
        budget_s: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Adapter:
        """The one pass, refined by self-distillation for `budget_s` seconds (None: the default; 0: the pass alone).
        Raises self_distill.Cancelled when `cancelled()` turns true; progress goes to `on_progress`."""
        cfg = replace(self.distill, budget_s=self.budget_for(budget_s, document))
        with self._lock:
            adapter, _ = distill_document(
                self.base,
                self.wrappers,
                check_document(document),
                lambda: self._one_pass(document),
                cfg,
                on_progress,
                cancelled,
            )
        return adapter
