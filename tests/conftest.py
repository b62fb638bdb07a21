"""Shared fixtures: a tiny random Llama (seconds, no downloads), a tiny SNI-format data set, T2L and D2L
checkpoints trained for the tiny Llama by the real training loops, its ONNX export and workers on it, a scripted
coordinator and random adapters for it. Helpers that are not fixtures are in support.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import onnx
import pytest
import torch
from support import D2L_DOCS, ScriptedCoordinator, d2l_train_args, loopback_worker, random_wire
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hypernet.makers import TextToLoRAMaker
from loracast import adapter_wire, base_model
from loracast.grpc_security import ClientSecurity, open_channel
from loracast.grpc_server import wait_until_serving
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from loracast_cli.launch import ServerProcess
from worker import model_cache, onnx_io
from worker import server as worker_server


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


# A coordinator in this process (the coordinator, adapter store, cluster, fuzz and security tests).
@pytest.fixture(scope="module")
def maker(tiny_t2l: Path) -> TextToLoRAMaker:
    return TextToLoRAMaker(tiny_t2l)


# A scripted coordinator and random adapters for the tiny Llama (the worker and security tests).
@pytest.fixture(scope="module")
def wires(tiny_base_dir: Path, fingerprint: str) -> dict[str, adapter_wire.WireAdapter]:
    return {
        "a": random_wire(tiny_base_dir, fingerprint, 1),
        "b": random_wire(tiny_base_dir, fingerprint, 2),
        "c": random_wire(tiny_base_dir, fingerprint, 3),
        "other-base": random_wire(tiny_base_dir, "0" * 64, 4),
    }


@pytest.fixture
def coordinator() -> Iterator[tuple[ScriptedCoordinator, str, grpc.Server]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    script = ScriptedCoordinator()
    pb_grpc.add_CoordinatorServicer_to_server(script, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield script, f"127.0.0.1:{port}", server
    if script.gate is not None:
        script.gate.set()
    server.stop(None)


# Servers as processes (the system, deploy and fault tests).
@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    """Started processes; whatever a failing test left running is killed."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.kill()
