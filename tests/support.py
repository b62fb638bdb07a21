"""Helpers several test modules use; the fixtures they share are in conftest.py. No test module imports another:
what two of them need lives here (tests/test_layers.py checks).

Sections: servers started as processes, as `loracast` runs them, their /metrics, and what a worker's adapter cache
holds; Prometheus and Redis run for real; coordinators and workers in this process, a scripted coordinator and
random adapters; PyTorch references; an audit of file operations; tiny Doc-to-LoRA data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import torch
import yaml
from peft import PeftModel
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from transformers import AutoModelForCausalLM

from coordinator.server import CoordinatorConfig, RunningCoordinator
from coordinator.server import start as start_coordinator
from hypernet.makers import DocToLoRAMaker, TextToLoRAMaker
from loracast import adapter_format, adapter_wire
from loracast.adapter_format import Adapter
from loracast.grpc_errors import RETRY_AFTER_MS
from loracast.grpc_security import ClientSecurity, open_channel
from loracast.grpc_server import wait_until_serving
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from loracast_cli.launch import ServerProcess, coordinator_argv, worker_argv
from worker.server import WorkerConfig

STARTUP_S = 180.0  # a server's start on a busy 2-core machine (the coordinator imports torch and loads models)


@dataclass
class Server:
    """A server process that printed its ready line."""

    process: ServerProcess
    address: str  # HOST:PORT of its gRPC service
    metrics_port: int


def server_env(log_dir: Path) -> dict[str, str]:
    return {**os.environ, "LORACAST_CACHE": str(log_dir / "loracast-cache")}


def launch_coordinator(
    log_dir: Path, name: str, *, cache_dir: Path, base_dir: Path, t2l: Path, d2l: Path, listen: str = "127.0.0.1:0"
) -> ServerProcess:
    """A coordinator on the tiny Llama with Text-to-LoRA and Doc-to-LoRA (a document gets the one pass: load, not
    distillation, is the point here); `ready` waits for it."""
    argv = coordinator_argv(
        listen=listen, metrics_port=0, cache_dir=str(cache_dir), base=str(base_dir), checkpoint=str(t2l)
    )
    argv += ["--d2l-checkpoint", str(d2l), "--budget-seconds", "0"]
    return ServerProcess.loracast(name, argv, log_dir, server_env(log_dir))


def worker_command(
    *, model_dir: Path, base_dir: Path, cache_dir: Path, coordinator: str, max_concurrent_answers: int = 2
) -> list[str]:
    """`loracast` arguments of a worker serving the exported tiny Llama with one ONNX Runtime thread."""
    argv = worker_argv(
        listen="127.0.0.1:0",
        coordinator=coordinator,
        metrics_port=0,
        cache_dir=str(cache_dir),
        capacity_mb=64,
        base=str(base_dir),
    )
    return [*argv, "--model", str(model_dir), "--threads", "1", "--max-concurrent-answers", str(max_concurrent_answers)]


def launch_worker(log_dir: Path, name: str, **command: Any) -> ServerProcess:
    return ServerProcess.loracast(name, worker_command(**command), log_dir, server_env(log_dir))


def ready(process: ServerProcess, component: str) -> Server:
    line = process.wait_ready(component, STARTUP_S)
    return Server(process, line["grpc"], int(line["metrics"]))


def scrape(server: Server) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as page:
        text = page.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    return sum(s.value for s in scrape(server) if s.name == name and labels.items() <= s.labels.items())


def installed(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "adapters").iterdir())


# ---------------------------------------------------------------------------------------------------------
# Prometheus, run for real (the system and deploy tests)
# ---------------------------------------------------------------------------------------------------------

COORDINATOR_JOB, WORKER_JOB = "loracast-coordinator", "loracast-worker"

SCRAPE_S = 120.0  # for Prometheus to start, find the targets up and scrape what the asks did

INSTALL_PROMETHEUS = "Prometheus is missing: install it with `apt-get install -y prometheus` (.ci/run does)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(what: str, check: Callable[[], Any], timeout: float, log: Callable[[], str] = str) -> Any:
    """`check()` again and again until it returns something true; fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # Prometheus still starting: connection refused
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last})\n{log()}")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def scraped_since(self, moment: float, jobs: set[str]) -> bool:
        """Every target of `jobs` is up and was last scraped after `moment` (a time.time())."""
        if self.query("up == 0"):
            return False
        # timestamp() of the selector itself: the scrape's time (of any other expression: the evaluation's).
        scrapes = self.query("timestamp(up) and on (job, instance) up == 1")
        return {s["metric"]["job"] for s in scrapes} == jobs and all(float(s["value"][1]) > moment for s in scrapes)


def prometheus_program(program: str) -> str:
    """The path of a Prometheus program; a missing one fails the test (a skip would pass CI untested)."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(INSTALL_PROMETHEUS)
    return path


def run_prometheus(
    binary: str, config: dict, processes: list[ServerProcess], tmp_path: Path
) -> tuple[Prometheus, ServerProcess]:
    """A real Prometheus on a free port running `config`, once it says it is ready."""
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    argv = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={address}",
    ]
    process = ServerProcess("prometheus", argv, tmp_path)
    processes.append(process)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://{address}/-/ready", timeout=5) as reply:
            return reply.status == 200

    poll("Prometheus ready", ready, SCRAPE_S, process.stderr)
    return Prometheus(f"http://{address}"), process


# ---------------------------------------------------------------------------------------------------------
# Redis, run for real (the adapter store and cluster tests)
# ---------------------------------------------------------------------------------------------------------

INSTALL_REDIS = "redis-server is missing: run deploy/system-packages.sh (or apt-get install -y redis-server)"
REDIS_STARTUP_S = 30.0


class RedisServer:
    """A real redis-server on a loopback port, persisting to an append-only file in `directory`, so a restart keeps
    what it held (as a deployment's Redis does)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(INSTALL_REDIS)  # a skip would pass CI untested
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        directory.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        argv = [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
            *("--logfile", str(self.directory / "redis.log")),
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Waits on PING: refused connections and "loading" replies are retried with a short backoff.
        retry = Retry(ExponentialBackoff(cap=0.05, base=0.005), retries=int(REDIS_STARTUP_S / 0.05))
        with redis.Redis(port=self.port, retry=retry, socket_connect_timeout=1.0) as client:
            assert client.ping()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis writes its append-only file and exits; SIGKILL: a crash."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=REDIS_STARTUP_S)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


# ---------------------------------------------------------------------------------------------------------
# Coordinators in this process: a recording adapter maker, a served coordinator and its calls
# ---------------------------------------------------------------------------------------------------------

TIMEOUT = 60.0  # seconds for one call on a busy 2-core machine


class Recorder:
    """The real Text-to-LoRA maker, recording each pass; `gate` holds a pass until the test sets it, `after` runs
    after one."""

    def __init__(
        self,
        inner: TextToLoRAMaker,
        gate: threading.Event | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.inner, self.gate, self.after = inner, gate, after
        self.path, self.fingerprint, self.spec = inner.path, inner.fingerprint, inner.spec
        self.calls: list[str] = []
        self.started = threading.Event()

    def make_adapter(self, text: str) -> Adapter:
        self.calls.append(text)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        adapter = self.inner.make_adapter(text)
        if self.after is not None:
            self.after()
        return adapter

    def spec_for(self, adapter: Adapter) -> LoraSpec:
        return self.inner.spec_for(adapter)

    def metadata(self, text: str) -> dict[str, str]:
        return self.inner.metadata(text)


@contextmanager
def serving(
    cache_dir: Path,
    hypernet: Recorder,
    client: ClientSecurity | None = None,
    clock: Callable[[], float] = time.perf_counter,
    d2l: DocToLoRAMaker | None = None,
    **overrides,
) -> Iterator[tuple[RunningCoordinator, pb_grpc.CoordinatorStub]]:
    """A coordinator on 127.0.0.1:<free port>, SERVING, and a stub on a channel with `client` security.

    No Doc-to-LoRA unless given (`d2l`) or `overrides` name a checkpoint: a shipped one must not change what these
    tests see."""
    overrides = {"d2l_checkpoint": None, **overrides}
    config = CoordinatorConfig(cache_dir=cache_dir, listen="127.0.0.1:0", metrics_port=None, **overrides)
    running = start_coordinator(config, hypernet, d2l=d2l, clock=clock)
    channel = open_channel(f"127.0.0.1:{running.port}", client)
    try:
        wait_until_serving(channel, timeout=TIMEOUT)
        yield running, pb_grpc.CoordinatorStub(channel)
    finally:
        channel.close()
        running.stop(None)


def describe(stub: pb_grpc.CoordinatorStub, description: str, dtype: int = pb.FLOAT32, **kw) -> pb.GenerateResponse:
    request = pb.GenerateFromDescriptionRequest(description=description, dtype=dtype)
    return stub.GenerateFromDescription(request, timeout=kw.pop("timeout", TIMEOUT), **kw)


def fetch(stub: pb_grpc.CoordinatorStub, adapter_id: str, dtype: int = pb.FLOAT32, **kw) -> tuple:
    """(manifest, payload from the requested offset), checking the stream's shape on the way."""
    request = pb.FetchAdapterRequest(adapter_id=adapter_id, dtype=dtype, **kw)
    first, *rest = stub.FetchAdapter(request, timeout=TIMEOUT)
    assert first.WhichOneof("part") == "manifest"
    offset, parts = request.offset, []
    for message in rest:
        assert message.WhichOneof("part") == "data" and message.data.offset == offset
        offset += len(message.data.data)
        parts.append(message.data.data)
    assert offset == first.manifest.total_size
    return first.manifest, b"".join(parts)


def listed(stub: pb_grpc.CoordinatorStub, page_size: int = 0, page_token: str = "") -> tuple[list[str], str]:
    reply = stub.ListAdapters(pb.ListAdaptersRequest(page_size=page_size, page_token=page_token), timeout=TIMEOUT)
    return [a.adapter_id for a in reply.adapters], reply.next_page_token


def refused(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    error = info.value
    assert error.code() == code, error.details()
    assert "Traceback" not in (error.details() or "")
    return error


def big_adapter(rng: np.random.Generator) -> dict:
    """512 KiB in float32: several chunks of the smallest size."""
    return {
        (layer, "q_proj"): (rng.standard_normal((8, 4096), np.float32), rng.standard_normal((4096, 8), np.float32))
        for layer in range(2)
    }


def until(condition: Callable[[], bool]) -> None:
    """Wait for a condition another thread makes true; nothing to block on, so look every few milliseconds."""
    deadline, pause = time.monotonic() + TIMEOUT, threading.Event()
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        pause.wait(0.005)


def certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made by the openssl CLI."""
    directory.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=loracast test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    extensions = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in extensions.items():
        (directory / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=loracast test {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
    return {name: directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


# ---------------------------------------------------------------------------------------------------------
# Workers in this process: their config, a scripted coordinator to serve them, random adapters for the tiny Llama
# ---------------------------------------------------------------------------------------------------------

WIRE_SPEC = LoraSpec(("q_proj", "v_proj"), r=4, alpha=16.0)  # random_wire's adapters
SCRIPTED_CHUNK = 256  # the scripted coordinator's chunk size: the tiny adapters (1,792 bytes) span several chunks


def loopback_worker(cache_dir: Path, model_dir: Path, **fields: Any) -> WorkerConfig:
    """A test worker's config: a free loopback port, no /metrics, one ONNX Runtime thread (tests share the
    machine's cores); `fields` add to or override these."""
    defaults = {"listen": "127.0.0.1:0", "metrics_port": None, "intra_op_threads": 1}
    return WorkerConfig(cache_dir=cache_dir, model_dir=model_dir, **{**defaults, **fields})


def random_wire(tiny_base_dir: Path, fingerprint: str, seed: int) -> adapter_wire.WireAdapter:
    """A random adapter for the tiny Llama, as the coordinator would send it (fp16)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    rng = np.random.default_rng(seed)
    adapter = {}
    for i, layer in enumerate(model.model.layers):
        for module in WIRE_SPEC.target_modules:
            lin = getattr(layer.self_attn, module)
            adapter[(i, module)] = (
                rng.standard_normal((WIRE_SPEC.r, lin.in_features)) * 0.2,
                rng.standard_normal((lin.out_features, WIRE_SPEC.r)) * 0.2,
            )
    metadata = {adapter_format.META_FINGERPRINT: fingerprint, "loracast.hypernet_version": "test-1"}
    return adapter_wire.encode(adapter, WIRE_SPEC, metadata)


class ScriptedCoordinator(pb_grpc.CoordinatorServicer):
    """Serves fixed adapters; `faults` are consumed one per FetchAdapter call: None, ('cut', n) (UNAVAILABLE after
    n bytes) or 'flip' (one corrupt byte). `gate`, when set, holds GenerateFromDescription until released, and
    InternalizeDocument after its first progress event until released or its caller goes away."""

    def __init__(self) -> None:
        self.adapters: dict[str, adapter_wire.WireAdapter] = {}
        self.by_text: dict[bytes, str] = {}
        self.fetches: list[pb.FetchAdapterRequest] = []
        self.described: list[str] = []
        # (chunks, the first chunk's dtype and budget) per InternalizeDocument
        self.documents: list[tuple[int, int, float | None]] = []
        self.document_deadlines: list[float] = []  # seconds each InternalizeDocument call had left when it came
        self.abandoned = threading.Event()  # an InternalizeDocument caller went away while it was held
        self.faults: list = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def add(self, wire: adapter_wire.WireAdapter, text: bytes | None = None) -> str:
        self.adapters[wire.manifest.adapter_id] = wire
        if text is not None:
            self.by_text[text] = wire.manifest.adapter_id
        return wire.manifest.adapter_id

    def _answer(self, text: bytes, context: grpc.ServicerContext) -> pb.GenerateResponse:
        if text not in self.by_text:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no hypernetwork for this in the script")
        return pb.GenerateResponse(manifest=self.adapters[self.by_text[text]].manifest)

    def GenerateFromDescription(self, request, context):
        self.described.append(request.description)
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(TIMEOUT)
        if request.description == "busy":
            context.set_trailing_metadata(((RETRY_AFTER_MS, "1234"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many adapters being made")
        if request.description == "no time":
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "making this adapter takes longer: allow more time")
        if request.description.startswith("x" * 100):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the description is over the size limit")
        return self._answer(request.description.strip().encode(), context)

    def InternalizeDocument(self, request_iterator, context):
        chunks = list(request_iterator)
        budget = chunks[0].budget_seconds if chunks[0].HasField("budget_seconds") else None
        self.documents.append((len(chunks), chunks[0].dtype, budget))
        self.document_deadlines.append(context.time_remaining())
        yield pb.InternalizeEvent(progress=pb.InternalizeProgress(phase="start", estimate_seconds=budget or 0.0))
        if self.gate is not None:
            self.entered.set()
            while not self.gate.wait(0.01):
                if not context.is_active():
                    self.abandoned.set()
                    return
        yield pb.InternalizeEvent(progress=pb.InternalizeProgress(phase="done"))
        yield pb.InternalizeEvent(result=self._answer(b"".join(c.data for c in chunks), context))

    def FetchAdapter(self, request, context):
        self.fetches.append(request)
        wire = self.adapters.get(request.adapter_id)
        if wire is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter {request.adapter_id[:12]}")
        fault = self.faults.pop(0) if self.faults else None
        yield pb.AdapterChunk(manifest=wire.manifest)
        sent = 0
        for chunk in adapter_wire.chunks(wire.payload, request.offset, SCRIPTED_CHUNK):
            if isinstance(fault, tuple) and sent + len(chunk.data) > fault[1]:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the stream was cut")
            if fault == "flip":
                chunk.data, fault = bytes([chunk.data[0] ^ 0x40]) + chunk.data[1:], None
            sent += len(chunk.data)
            yield pb.AdapterChunk(data=chunk)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The error of a call expected to fail (a stream's comes while reading it); the caller checks its code."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if isinstance(result, grpc.Call):  # a stream: the error comes while reading it
            list(result)
    return info.value


# ---------------------------------------------------------------------------------------------------------
# PyTorch (+ PEFT) references for what ONNX Runtime computes
# ---------------------------------------------------------------------------------------------------------

TOL = 1e-3


def hf_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def peft_model(model_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    model = hf_model(model_dir)
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir).eval()


def reference_logits(model_dir: Path, adapter_dir: Path | None, ids: list[int]) -> np.ndarray:
    """PyTorch (+ PEFT) logits of the whole sequence in one pass, no cache."""
    with torch.no_grad():
        return peft_model(model_dir, adapter_dir)(torch.tensor([ids])).logits[0].numpy()


def max_diff(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


# ---------------------------------------------------------------------------------------------------------
# Every file operation of the process (the fuzz and security tests)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Touch:
    event: str  # the audit event: "open", "os.remove", "os.rename", ...
    path: str  # absolute
    writes: bool  # False only for an open for reading, a listing


class FileAudit:
    """Every file operation Python makes (open, remove, rename, mkdir, utime, ...) while `recording`, in any thread."""

    EVENTS = frozenset(
        {"open", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.utime", "os.chmod", "os.truncate"}
        | {"os.listdir", "os.scandir", "os.symlink", "os.link", "shutil.rmtree", "shutil.copyfile"}
    )
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self) -> None:
        self.touched: list[Touch] = []
        self.active = False
        self._lock = threading.Lock()
        sys.addaudithook(self._hook)  # hooks cannot be removed: it stays idle once the test is done

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active or event not in self.EVENTS:
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writes = bool((mode and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & self._WRITE_FLAGS))
        else:
            writes = event not in ("os.listdir", "os.scandir")
        two = event in ("os.rename", "os.symlink", "os.link", "shutil.copyfile")
        for arg in args[: 2 if two else 1]:
            if isinstance(arg, (str, bytes, os.PathLike)):
                with self._lock:
                    self.touched.append(Touch(event, os.path.abspath(os.fsdecode(arg)), writes))

    @contextmanager
    def recording(self) -> Iterator[list[Touch]]:
        self.touched, self.active = [], True
        try:
            yield self.touched
        finally:
            self.active = False


# ---------------------------------------------------------------------------------------------------------
# Tiny Doc-to-LoRA data: documents with questions, training arguments, a reading-comprehension folder
# ---------------------------------------------------------------------------------------------------------

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
