"""Deprecated: the adapter makers under their old names, for code not yet moved to `hypernet.makers`.

"Generate" is decoding text in LoraCast; a hypernetwork *makes* an adapter (`make_adapter`). New code imports
`hypernet.makers`. These aliases remain while modules outside that change still use them (hypernet/eval_t2l.py,
hypernet/eval_d2l.py, bench/bench_d2l_answering.py, experiment scripts); remove this module once none does.
"""

from __future__ import annotations

from hypernet.makers import (
    BUDGET_TOKENS,
    MAX_BUDGET_S,
    MAX_DESCRIPTION_CHARS,
    MAX_DOCUMENT_BYTES,
    AdapterMaker,
    DocToLoRAMaker,
    InputError,
    TextToLoRAMaker,
    check_description,
    check_document,
    read_document,
    with_rank,
)
from hypernet.t2l import Adapter

__all__ = [
    "BUDGET_TOKENS",
    "MAX_BUDGET_S",
    "MAX_DESCRIPTION_CHARS",
    "MAX_DOCUMENT_BYTES",
    "DocToLoRAGenerator",
    "HypernetGenerator",
    "InputError",
    "TextToLoRAGenerator",
    "check_description",
    "check_document",
    "read_document",
    "with_rank",
]

HypernetGenerator = AdapterMaker


class TextToLoRAGenerator(TextToLoRAMaker):
    """Deprecated name of TextToLoRAMaker; `generate` is its `make_adapter`."""

    def generate(self, description: str) -> Adapter:
        return self.make_adapter(description)


class DocToLoRAGenerator(DocToLoRAMaker):
    """Deprecated name of DocToLoRAMaker; `generate` is its `make_adapter` (the one pass)."""

    def generate(self, document: str) -> Adapter:
        return self.make_adapter(document)
