"""The worker's tokenizer and chat prompt, without transformers or torch.

`ChatTokenizer` reads a Hugging Face tokenizer directory (`tokenizer.json`, `tokenizer_config.json` and the
chat template, `chat_template.jinja` or the `chat_template` key of `tokenizer_config.json`) with the
`tokenizers` package, and renders the chat template with jinja2 the way transformers'
`apply_chat_template` does (sandboxed environment, trim_blocks, lstrip_blocks, the special tokens as
template variables, no special tokens added when encoding), so prompts are the same token ids the model
saw in PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: object, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    # As in transformers: jinja's own tojson escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _token_text(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTokenizer:
    """Encode chat prompts and decode generated ids for the model whose tokenizer lives in `model_dir`."""

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        config = json.loads((model_dir / CONFIG_FILE).read_text()) if (model_dir / CONFIG_FILE).is_file() else {}
        if (model_dir / TEMPLATE_FILE).is_file():
            template = (model_dir / TEMPLATE_FILE).read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        else:
            raise FileNotFoundError(f"{model_dir} has no chat template ({TEMPLATE_FILE} or {CONFIG_FILE})")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(template)
        self.special_tokens = {
            key: text for key in SPECIAL_TOKENS if (text := _token_text(config.get(key))) is not None
        }
        eos = self.special_tokens.get("eos_token")
        self.eos_id: int | None = self.tokenizer.token_to_id(eos) if eos is not None else None

    def render(self, messages: Iterable[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text, as `tokenizer.apply_chat_template(messages, tokenize=False, ...)` renders it."""
        return self._template.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens in it recognized, none added (as apply_chat_template does)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_chat(self, user: str, system: str | None = None) -> list[int]:
        """The ids of a one-turn chat prompt ending with the assistant's generation prompt."""
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}
        ]
        return self.encode(self.render(messages))

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Text pieces as ids arrive; a piece is held back until its UTF-8 bytes are complete.

        The pieces join to `decode(ids)`.
        """
        stream = DecodeStream(skip_special_tokens=True)
        for token in ids:
            piece = stream.step(self.tokenizer, token)
            if piece:
                yield piece
