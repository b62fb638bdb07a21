"""Shared fixtures: a tiny random Llama (seconds, no downloads) and a tiny SNI-format data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loracast import base_model


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with the real SmolLM2 tokenizer, saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(base_model.resolve())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir: Path) -> base_model.BaseModel:
    return base_model.load(str(tiny_base_dir))


def _task(name: str, definition: str, pairs: list[tuple[str, str]]) -> dict:
    return {
        "task": name,
        "definition": definition,
        "categories": [],
        "instances": [{"input": i, "output": o, "all_outputs": [o]} for i, o in pairs],
    }


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tasks = {
        "train": [
            _task("task1_reverse", "Reverse the given list.", [("[1, 2]", "[2, 1]"), ("[3, 4]", "[4, 3]")]),
            _task(
                "task2_sentiment",
                "Classify the sentiment as positive or negative.",
                [("I love it", "positive"), ("I hate it", "negative")],
            ),
        ],
        "dev": [_task("task3_upper", "Write the word in capitals.", [("cat", "CAT"), ("dog", "DOG")])],
    }
    for split, items in tasks.items():
        (root / "sni" / split).mkdir(parents=True)
        for t in items:
            (root / "sni" / split / f"{t['task']}.json").write_text(json.dumps(t))
    return root


@pytest.fixture(scope="session")
def tiny_t2l(tiny_base_dir: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A T2L checkpoint for the tiny Llama, trained for a few steps by the real training loop."""
    from hypernet.train_t2l import TrainArgs, train

    work = tmp_path_factory.mktemp("t2l-run")
    args = TrainArgs(
        kind="t2l",
        data_dir=tiny_data_dir,
        out=work / "t2l.safetensors",
        work_dir=work,
        base=str(tiny_base_dir),
        steps=3,
        batch_size=2,
        warmup=1,
    )
    train(args)
    return args.out
