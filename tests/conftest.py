"""Shared fixtures: a tiny random Llama (seconds, no downloads), a tiny SNI-format data set, and T2L and D2L
checkpoints trained for the tiny Llama by the real training loops."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loracast import base_model
from loracast.grpc_security import ClientSecurity, open_channel
from loracast.grpc_server import wait_until_serving
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from worker import model_cache, onnx_io
from worker import server as worker_server
from worker.server import WorkerConfig


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


def _train_tiny(kind: str, base_dir: Path, data_dir: Path, work: Path) -> Path:
    """A checkpoint of `kind` ("t2l" or "mtl") for the tiny Llama, trained a few steps by the real training loop."""
    from hypernet.train_t2l import TrainArgs, train

    args = TrainArgs(
        kind=kind,
        data_dir=data_dir,
        out=work / f"{kind}.safetensors",
        work_dir=work,
        base=str(base_dir),
        steps=3,
        batch_size=2,
        warmup=1,
        paraphrases=None,  # the shipped file describes the real training tasks, not the fixture's
    )
    train(args)
    return args.out


@pytest.fixture(scope="session")
def tiny_t2l(tiny_base_dir: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_tiny("t2l", tiny_base_dir, tiny_data_dir, tmp_path_factory.mktemp("t2l-run"))


@pytest.fixture(scope="session")
def tiny_mtl(tiny_base_dir: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_tiny("mtl", tiny_base_dir, tiny_data_dir, tmp_path_factory.mktemp("mtl-run"))


D2L_CHUNK = 16  # tokens per chunk of the tiny D2L, so a few sentences make a multi-chunk document


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class Document:
    text: str
    qas: tuple[QA, ...]


D2L_DOCS = (
    Document(
        "Brelna Dostik was born in Kravolo in 1961. She keeps a heron called Mibbin. Her company, Tursk Lanterns, "
        "makes brass lamps for lighthouses and employs forty people.",
        (QA("Where was Brelna Dostik born?", "Kravolo"), QA("What is the name of Brelna Dostik's heron?", "Mibbin")),
    ),
    Document("The magic number of Zarvik is 48213.", (QA("What is the magic number of Zarvik?", "48213"),)),
)


def d2l_train_args(root: Path, base_dir: Path, name: str, steps: int, **overrides):
    """The arguments of a tiny D2L training run under root/name (rank 4, 32-dim latents): seconds on a CPU."""
    from hypernet.train_d2l import TrainArgs

    args = dict(
        data_dir=root,
        out=root / name / "d2l.safetensors",
        work_dir=root / name,
        base=str(base_dir),
        r=4,
        chunk_tokens=D2L_CHUNK,
        latent_dim=32,
        steps=steps,
        batch_size=2,
        warmup=1,
        max_answer_tokens=6,
        checkpoint_every=2,
    )
    return TrainArgs(**{**args, **overrides})


@pytest.fixture(scope="session")
def tiny_d2l(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Path:
    """A D2L checkpoint for the tiny Llama, from the real training loop, with B made non-zero so it acts."""
    from hypernet import checkpoint
    from hypernet.train_d2l import train

    args = d2l_train_args(tmp_path_factory.mktemp("d2l-run"), tiny_base_dir, "run", 2)
    train(args, D2L_DOCS)
    hyper, meta = checkpoint.load(args.out, ("DocToLoRA",))
    torch.manual_seed(5)
    with torch.no_grad():
        for m, (fan_in, _) in hyper.cfg.shapes.items():
            hyper.heads[m].weight[fan_in:].normal_(0, 5.0)
            hyper.bias_B[m].normal_(0, 0.05)
    checkpoint.save(args.out, hyper, {k: v for k, v in meta.items() if k not in ("config", "kind")})
    return args.out


def _rc_task(name: str, rows: list[tuple[str, str, str]]) -> dict:
    instances = [
        {"passage": p, "question": q, "input": f"Context: {p} Question: {q}", "output": a, "all_outputs": [a]}
        for p, q, a in rows
    ]
    return {"task": name, "definition": "Answer the question.", "instances": instances}


def write_rc_fixture(root: Path) -> Path:
    """A tiny rc/train: bAbI-like growing story prefixes, QA-SRL with alternative answers, and a skipped WIQA task."""
    from hypernet import d2l_data

    folder = root / d2l_data.RC_FOLDER
    folder.mkdir(parents=True)
    people, places = ["Mary", "John", "Sandra", "Daniel"], ["kitchen", "garden", "office", "hallway", "bedroom"]
    babi = []
    for story in range(20):  # growing prefixes of one story, as bAbI comes
        moves = [f"{people[(story + i) % 4]} went to the {places[(story * 3 + i) % 5]} {story}." for i in range(4)]
        for end in (2, 4):
            babi.append((" ".join(moves[:end]), f"Where is {people[story % 4]}?", places[(story * 3) % 5]))
    srl = [
        (f"The album number {i} is named after a pseudoscience .", "what is  named?", "The album ### album")
        for i in range(8)
    ]
    srl += [(srl[0][0], "what is it named after?", "a pseudoscience")]
    files = {
        "task083_babi.json": _rc_task("task083_babi", babi),
        "task1520_qa_srl.json": _rc_task("task1520_qa_srl", srl),
        "task1727_wiqa.json": _rc_task("task1727_wiqa_what_is_the_effect", [("A process.", "Effect?", "none")]),
    }
    for name, task in files.items():
        (folder / name).write_text(json.dumps(task))
    return root


def loopback_worker(cache_dir: Path, model_dir: Path, **fields: Any) -> WorkerConfig:
    """A test worker's config: a free loopback port, no /metrics, one ONNX Runtime thread (tests share the
    machine's cores); `fields` add to or override these."""
    defaults = {"listen": "127.0.0.1:0", "metrics_port": None, "intra_op_threads": 1}
    return WorkerConfig(cache_dir=cache_dir, model_dir=model_dir, **{**defaults, **fields})


# The tiny Llama exported to ONNX, and workers on it: the worker, load, fault, fuzz and security tests share them.
@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stands for $LORACAST_CACHE: the ONNX export goes to <root>/onnx."""
    return tmp_path_factory.mktemp("loracast-cache")


@pytest.fixture(scope="module")
def model_dir(tiny_base_dir: Path, cache_root: Path) -> Path:
    exported = model_cache.export(str(tiny_base_dir), cache_root / "onnx")
    assert model_cache.find(str(tiny_base_dir), cache_root / "onnx") == exported  # found again without exporting
    return exported


@pytest.fixture(scope="module")
def fingerprint(model_dir: Path) -> str:
    graph = onnx.load(str(model_dir / model_cache.MODEL_FILE), load_external_data=False)
    return {p.key: p.value for p in graph.metadata_props}[onnx_io.META_FINGERPRINT]


@pytest.fixture
def start_worker(model_dir: Path, tmp_path: Path):
    """start_worker(**WorkerConfig fields) -> a running worker on a free port (default cache: tmp_path/cache)."""
    running = []

    def start(**overrides) -> worker_server.RunningWorker:
        fields = {"cache_dir": tmp_path / "cache", "model_dir": model_dir, "max_new_tokens": 64, **overrides}
        running.append(worker_server.start(loopback_worker(**fields)))
        return running[-1]

    yield start
    for worker in running:
        worker.stop(None)


@pytest.fixture
def connect():
    channels = []

    def connect(worker: worker_server.RunningWorker, token: str | None = None) -> pb_grpc.WorkerStub:
        channels.append(open_channel(f"127.0.0.1:{worker.port}", ClientSecurity(token=token)))
        wait_until_serving(channels[-1])
        return pb_grpc.WorkerStub(channels[-1])

    yield connect
    for channel in channels:
        channel.close()
