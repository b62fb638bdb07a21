"""Faults on the way from the coordinator to a worker's disk, with real processes on loopback and the tiny Llama:

1. the coordinator killed by SIGKILL mid-stream and restarted on its cache directory: the worker resumes the
   transfer from the bytes it has, and installs exactly the coordinator's adapter;
2. the TCP connection cut mid-stream, or one byte of it flipped, by a proxy between worker and coordinator:
   detected, retried, a wrong adapter never installed (a corrupt payload on an intact connection is
   tests/test_worker.py::test_a_corrupted_chunk_is_detected_and_never_applied);
3. a worker killed by SIGKILL mid-transfer, or mid-install, and restarted: its cache is intact and served with no
   call to the coordinator, the interrupted transfer resumed or started again, never a torn adapter;
4. the worker's disk full while it writes an adapter (a real tmpfs, mounted in the worker's own user and mount
   namespaces): one clear RESOURCE_EXHAUSTED, nothing half-written left in the cache.

The coordinator serves a seeded rank-1024 adapter of 448 KiB: two FetchAdapter chunks, so a stream can be
broken with one chunk on the worker's disk. Each test prints what it saw (offsets, bytes, timings).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support import STARTUP_S, Server, installed, launch_coordinator, launch_worker, metric, poll, ready, worker_command

from coordinator.local_store import LocalStore
from edge_client.client import Answer, EdgeClient, EdgeError
from loracast import adapter_format, adapter_wire
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb
from loracast_cli.launch import LORACAST, ServerProcess
from worker import metrics
from worker import server as worker_server
from worker.adapter_store import read_installed

CHUNK = adapter_wire.DEFAULT_CHUNK  # the coordinator's chunk size when the worker asks none
BIG_RANK = 1024  # q_proj and v_proj of the tiny Llama at this rank: 448 KiB in fp16, two chunks
BREAK_AT = CHUNK + 40_000  # bytes of a response forwarded before a hold: the first chunk whole, not the second
FLIP_AT = CHUNK // 2  # well inside the first chunk's data
TASK = "Reverse the given list."
PROMPT = "[1, 2, 3]"
DEADLINE = 150.0  # one ask
RESTART_S = 2 * STARTUP_S  # how long the worker waits for a killed coordinator's restart (ready() allows STARTUP_S)
SMALL_DISK = 256 * 1024  # the worker's tmpfs: room for a task's adapter (under 2 KiB), not for the seeded one


# ---------------------------------------------------------------------------------------------------------
# A TCP proxy that holds, cuts or corrupts the coordinator's bytes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What the proxy does to the coordinator's bytes `after` bytes into the next response once armed: "hold"
    stops forwarding until released, then closes the connection (a cut); "flip" corrupts that one byte."""

    kind: str
    after: int


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it
    sock.close()


class Proxy:
    """Plain sockets and threads on loopback: forwards both ways, to `upstream` (changeable) for new connections."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.connections = 0
        self.held = threading.Event()
        self._released = threading.Event()
        self._armed: list[Fault] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._released.set()
        _shut(self._listener)

    def arm(self, fault: Fault) -> None:
        with self._lock:
            self._armed.append(fault)

    def release(self) -> None:
        """End a hold: the held connection is closed, as if the network had failed."""
        self._released.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        host, port = self.upstream.rsplit(":", 1)
        try:
            upstream = socket.create_connection((host, int(port)))
        except OSError:
            _shut(client)
            return
        threading.Thread(target=self._forward_up, args=(client, upstream), daemon=True).start()
        self._forward_down(upstream, client)

    @staticmethod
    def _forward_up(client: socket.socket, upstream: socket.socket) -> None:
        # A dead upstream ends this direction only: a held connection stays open to the worker until released.
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _shut(upstream)

    def _forward_down(self, upstream: socket.socket, client: socket.socket) -> None:
        fault, at, sent = None, 0, 0
        try:
            while data := upstream.recv(65536):
                with self._lock:
                    if fault is None and self._armed:
                        fault = self._armed.pop(0)
                        at = sent + fault.after
                if fault is not None and sent + len(data) > at:
                    cut = at - sent
                    if fault.kind == "flip":
                        data = data[:cut] + bytes([data[cut] ^ 0x40]) + data[cut + 1 :]
                        fault = None
                    else:
                        client.sendall(data[:cut])
                        self.held.set()
                        self._released.wait()
                        return
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            _shut(client)
            _shut(upstream)


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


def seed_big_adapter(cache_dir: Path, base_dir: Path, fingerprint: str) -> adapter_wire.WireAdapter:
    """Store a random rank-1024 adapter for the tiny Llama in a coordinator cache directory, as making one
    would; returns it as the coordinator serves it to workers (fp16)."""
    config = json.loads((base_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    rng = np.random.default_rng(7)
    adapter = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            a = rng.standard_normal((BIG_RANK, hidden)) * 0.01
            b = rng.standard_normal((out, BIG_RANK)) * 0.01
            adapter[layer, module] = (a.astype(np.float32), b.astype(np.float32))
    spec = LoraSpec(("q_proj", "v_proj"), r=BIG_RANK, alpha=16.0)
    metadata = {adapter_format.META_FINGERPRINT: fingerprint, adapter_wire.META_HYPERNET_VERSION: "seeded-1"}
    cache = LocalStore(cache_dir)
    try:
        wire = cache.put(hashlib.sha256(b"seeded").hexdigest(), adapter, spec, metadata, pb.FLOAT16)
    finally:
        cache.close()
    assert CHUNK < wire.manifest.total_size <= 2 * CHUNK
    return wire


@pytest.fixture(scope="module")
def coordinator(
    tiny_base_dir: Path, tiny_t2l: Path, tiny_d2l: Path, fingerprint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, adapter_wire.WireAdapter]]:
    """A coordinator process whose cache holds the big adapter; and that adapter."""
    root = tmp_path_factory.mktemp("faults-coordinator")
    big = seed_big_adapter(root / "cache", tiny_base_dir, fingerprint)
    process = launch_coordinator(
        root, "coordinator", cache_dir=root / "cache", base_dir=tiny_base_dir, t2l=tiny_t2l, d2l=tiny_d2l
    )
    try:
        yield ready(process, "coordinator"), big
    finally:
        process.kill()


@pytest.fixture
def proxy(coordinator) -> Iterator[Proxy]:
    with Proxy(coordinator[0].address) as running:
        yield running


def record_fetches(worker: worker_server.RunningWorker) -> list[int]:
    """The offset of every FetchAdapter call an in-process worker makes from now on."""
    offsets: list[int] = []
    make_source = worker.coordinator.fetch_source

    def recording(context):
        fetch = make_source(context)

        def recorded(adapter_id: str, offset: int):
            offsets.append(offset)
            return fetch(adapter_id, offset)

        return recorded

    worker.coordinator.fetch_source = recording
    return offsets


def ask(target: str, timeout: float = DEADLINE, **adapter: str) -> Answer:
    with EdgeClient(target) as client:
        return client.ask(PROMPT, max_new_tokens=4, timeout=timeout, **adapter)


def ask_refused(target: str, **adapter: str) -> EdgeError:
    with pytest.raises(EdgeError) as refused:
        ask(target, **adapter)
    return refused.value


def assert_installed_exactly(cache_dir: Path, wire: adapter_wire.WireAdapter, fingerprint: str) -> None:
    """The worker holds the coordinator's bytes for this adapter, verified, and nothing half-done."""
    adapter_id = wire.manifest.adapter_id
    payload = (cache_dir / "adapters" / adapter_id / "payload.bin").read_bytes()
    assert hashlib.sha256(payload).hexdigest() == wire.manifest.payload_sha256 and payload == wire.payload
    assert read_installed(cache_dir, adapter_id, fingerprint).manifest.adapter_id == adapter_id
    assert list((cache_dir / "partial").iterdir()) == []


@contextlib.contextmanager
def held_mid_stream(proxy: Proxy, cache_dir: Path, adapter_id: str) -> Iterator[int]:
    """Waits until the worker has written the first chunk and the proxy holds the rest; yields the bytes on the
    worker's disk, and cuts the connection on the way out (on a failure too: nothing may wait on a hold)."""
    part = cache_dir / "partial" / f"{adapter_id}.part"

    def on_disk() -> int:
        return part.stat().st_size if part.exists() else 0

    try:
        poll(
            "the first chunk on the worker's disk, the rest held",
            lambda: proxy.held.is_set() and on_disk() == CHUNK,
            DEADLINE,
        )
        yield on_disk()
    finally:
        proxy.release()


def resumed_from_the_first_chunk(offsets: list[int]) -> bool:
    """A fetch from 0, then retries, each from the end of the first chunk (more than one when the retry itself
    races the dying connection: the worker tries again at once)."""
    return len(offsets) >= 2 and offsets[0] == 0 and set(offsets[1:]) == {CHUNK}


def coordinator_calls(server: Server) -> float:
    return metric(server, "loracast_rpc_total", component="coordinator")


# ---------------------------------------------------------------------------------------------------------
# 1. The coordinator killed mid-stream
# ---------------------------------------------------------------------------------------------------------


def test_a_coordinator_killed_mid_stream_and_restarted_is_resumed_from_the_workers_offset(
    tiny_base_dir, tiny_t2l, tiny_d2l, fingerprint, start_worker, processes, tmp_path
):
    cache = tmp_path / "coordinator-cache"
    big = seed_big_adapter(cache, tiny_base_dir, fingerprint)
    adapter_id, total = big.manifest.adapter_id, big.manifest.total_size
    models = dict(cache_dir=cache, base_dir=tiny_base_dir, t2l=tiny_t2l, d2l=tiny_d2l)
    processes.append(launch_coordinator(tmp_path, "coordinator", **models))
    first = ready(processes[-1], "coordinator")
    with futures.ThreadPoolExecutor(1) as pool, Proxy(first.address) as proxy:
        proxy.arm(Fault("hold", BREAK_AT))
        worker = start_worker(coordinator=proxy.address, coordinator_timeout=RESTART_S)
        offsets = record_fetches(worker)
        asked = time.perf_counter()
        asking = pool.submit(ask, f"127.0.0.1:{worker.port}", RESTART_S + DEADLINE, adapter_id=adapter_id)
        with held_mid_stream(proxy, tmp_path / "cache", adapter_id) as kept:
            first.process.kill()  # SIGKILL: the stream dies with the process
            killed = time.perf_counter()
            processes.append(launch_coordinator(tmp_path, "coordinator-restarted", **models))
            second = ready(processes[-1], "coordinator")
            restarted = time.perf_counter()
            proxy.upstream = second.address
        # The connection to the dead coordinator is cut only now: the worker's retry finds the new one.
        answer = asking.result(RESTART_S + DEADLINE)
    assert first.process.proc.returncode == -signal.SIGKILL
    sent = metric(second, "loracast_adapter_bytes_streamed_total", component="coordinator")
    print(
        f"\ncoordinator SIGKILLed with {kept} of {total} bytes on the worker's disk, restarted in "
        f"{restarted - killed:.1f} s; worker fetched from offsets {offsets}, the new coordinator sent {sent:.0f} "
        f"bytes; answered {time.perf_counter() - asked:.1f} s after the ask"
    )
    assert (answer.adapter_id, answer.resident) == (adapter_id, False) and answer.tokens >= 1
    assert resumed_from_the_first_chunk(offsets)
    assert sent == total - CHUNK  # the restarted coordinator sent only what the worker lacked
    assert_installed_exactly(tmp_path / "cache", big, fingerprint)


# ---------------------------------------------------------------------------------------------------------
# 2. The connection cut, a byte flipped
# ---------------------------------------------------------------------------------------------------------


def test_a_connection_cut_mid_stream_is_resumed_from_the_workers_offset(
    coordinator, proxy, start_worker, fingerprint, tmp_path
):
    _, big = coordinator
    proxy.arm(Fault("hold", BREAK_AT))
    worker = start_worker(coordinator=proxy.address)
    offsets = record_fetches(worker)
    received = metrics.BYTES_RECEIVED._value.get()
    with futures.ThreadPoolExecutor(1) as pool:
        asking = pool.submit(ask, f"127.0.0.1:{worker.port}", adapter_id=big.manifest.adapter_id)
        with held_mid_stream(proxy, tmp_path / "cache", big.manifest.adapter_id) as kept:
            pass  # leaving it cuts the connection
        answer = asking.result(DEADLINE)
    received = metrics.BYTES_RECEIVED._value.get() - received
    print(f"\nconnection cut with {kept} bytes on disk: fetches from offsets {offsets}, {received:.0f} bytes received")
    assert answer.adapter_id == big.manifest.adapter_id and not answer.resident
    assert resumed_from_the_first_chunk(offsets) and proxy.connections >= 2  # retried on a new connection
    assert received == big.manifest.total_size  # no byte twice
    assert_installed_exactly(tmp_path / "cache", big, fingerprint)


def test_a_flipped_byte_in_the_stream_is_detected_and_never_installed(
    coordinator, proxy, start_worker, fingerprint, tmp_path, caplog
):
    _, big = coordinator
    proxy.arm(Fault("flip", FLIP_AT))
    worker = start_worker(coordinator=proxy.address)
    offsets = record_fetches(worker)
    received = metrics.BYTES_RECEIVED._value.get()
    answer = ask(f"127.0.0.1:{worker.port}", adapter_id=big.manifest.adapter_id)
    received = metrics.BYTES_RECEIVED._value.get() - received
    log = caplog.text  # the worker's log
    # Where the byte lands decides how it shows: in the payload, the SHA-256 check fails and the adapter is
    # fetched again from 0; in HTTP/2 framing, the connection fails and the transfer resumes.
    detected = [line for line in log.splitlines() if "SHA-256" in line or "resuming" in line]
    print(f"\nbyte {FLIP_AT} flipped: {detected}; fetches from offsets {offsets}, {received:.0f} bytes received")
    assert answer.adapter_id == big.manifest.adapter_id
    # Either way the first chunk never reached the disk intact: it was fetched again, from 0.
    assert detected and len(offsets) >= 2 and set(offsets) == {0}
    assert received in (big.manifest.total_size, 2 * big.manifest.total_size)
    assert_installed_exactly(tmp_path / "cache", big, fingerprint)


# ---------------------------------------------------------------------------------------------------------
# 3. A worker killed
# ---------------------------------------------------------------------------------------------------------

KILL_IN_INSTALL = """
import os, signal, sys
from loracast_cli.cli import main
from worker.adapter_store import AdapterStore

evict = AdapterStore._evict

def evict_then_die(self, incoming):
    # Called under the store's lock just before a verified adapter is renamed into adapters/.
    if incoming:
        os.kill(os.getpid(), signal.SIGKILL)
    evict(self, incoming)

AdapterStore._evict = evict_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_killed_mid_transfer_serves_its_cache_without_the_coordinator_and_resumes(
    coordinator, proxy, model_dir, tiny_base_dir, fingerprint, processes, tmp_path
):
    server, big = coordinator
    cache = tmp_path / "worker-cache"
    command = dict(model_dir=model_dir, base_dir=tiny_base_dir, cache_dir=cache, coordinator=proxy.address)
    processes.append(launch_worker(tmp_path, "worker", **command))
    first = ready(processes[-1], "worker")
    small = ask(first.address, task=TASK)
    proxy.arm(Fault("hold", BREAK_AT))
    with futures.ThreadPoolExecutor(1) as pool:
        broken = pool.submit(ask_refused, first.address, adapter_id=big.manifest.adapter_id)
        with held_mid_stream(proxy, cache, big.manifest.adapter_id) as kept:
            first.process.kill()
        assert broken.result(DEADLINE).code == "UNAVAILABLE"  # the client saw its worker die
    assert first.process.proc.returncode == -signal.SIGKILL

    processes.append(launch_worker(tmp_path, "worker-restarted", **command))
    second = ready(processes[-1], "worker")
    connections, calls = proxy.connections, coordinator_calls(server)
    again = ask(second.address, task=TASK)
    by_id = ask(second.address, adapter_id=small.adapter_id)
    assert (again.adapter_id, again.resident, again.text) == (small.adapter_id, True, small.text)
    assert by_id.resident and by_id.text == small.text
    contacted = (proxy.connections - connections, coordinator_calls(server) - calls)
    assert contacted == (0, 0), "the restarted worker called the coordinator for an adapter it holds"

    resumed = ask(second.address, adapter_id=big.manifest.adapter_id)
    received = metric(second, "loracast_adapter_bytes_streamed_total", component="worker")
    print(
        f"\nworker SIGKILLed with {kept} of {big.manifest.total_size} bytes on disk; restarted: the task's adapter "
        f"served with {contacted[0]} connections and {contacted[1]:.0f} calls to the coordinator; the big one "
        f"resumed with {received:.0f} bytes received"
    )
    assert resumed.adapter_id == big.manifest.adapter_id and not resumed.resident
    assert received == big.manifest.total_size - CHUNK  # resumed from the killed worker's offset
    assert installed(cache) == sorted([small.adapter_id, big.manifest.adapter_id])
    assert_installed_exactly(cache, big, fingerprint)


def test_a_worker_killed_mid_install_never_has_a_torn_adapter(
    coordinator, model_dir, tiny_base_dir, fingerprint, processes, tmp_path
):
    server, big = coordinator
    cache = tmp_path / "worker-cache"
    command = dict(model_dir=model_dir, base_dir=tiny_base_dir, cache_dir=cache, coordinator=server.address)
    processes.append(launch_worker(tmp_path, "worker", **command))
    first = ready(processes[-1], "worker")
    small = ask(first.address, task=TASK)
    first.process.kill()

    argv = [sys.executable, "-c", KILL_IN_INSTALL, *worker_command(**command)]
    processes.append(ServerProcess("worker-dies-installing", argv, tmp_path))
    dying = ready(processes[-1], "worker")
    assert ask_refused(dying.address, adapter_id=big.manifest.adapter_id).code == "UNAVAILABLE"
    assert dying.process.proc.wait(DEADLINE) == -signal.SIGKILL
    left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())

    processes.append(launch_worker(tmp_path, "worker-restarted", **command))
    second = ready(processes[-1], "worker")
    calls = coordinator_calls(server)
    again = ask(second.address, task=TASK)
    assert (again.adapter_id, again.resident) == (small.adapter_id, True)
    assert coordinator_calls(server) == calls, "the coordinator was asked for a resident adapter"
    assert installed(cache) == [small.adapter_id]  # the big one was verified, not yet installed: gone
    assert list((cache / "partial").glob("*.staging")) == []

    fetched = ask(second.address, adapter_id=big.manifest.adapter_id)
    received = metric(second, "loracast_adapter_bytes_streamed_total", component="worker")
    print(f"\nworker SIGKILLed installing, leaving {left}; restarted: fetched the adapter again ({received:.0f} bytes)")
    assert fetched.adapter_id == big.manifest.adapter_id and not fetched.resident
    assert_installed_exactly(cache, big, fingerprint)


# ---------------------------------------------------------------------------------------------------------
# 4. The disk full
# ---------------------------------------------------------------------------------------------------------


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_half_written(
    coordinator, model_dir, tiny_base_dir, fingerprint, processes, tmp_path
):
    server, big = coordinator
    mount = tmp_path / "small-disk"
    mount.mkdir()
    command = worker_command(
        model_dir=model_dir, base_dir=tiny_base_dir, cache_dir=mount / "cache", coordinator=server.address
    )
    # A tmpfs mounted in the worker's own user and mount namespaces: no privilege needed, nothing outside the
    # worker sees it, and the disk is really full (the kernel says ENOSPC, no write is faked).
    script = f'mount -t tmpfs -o size={SMALL_DISK} tmpfs "$1" && shift && exec "$@"'
    argv = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(mount), str(LORACAST)]
    processes.append(ServerProcess("worker-small-disk", [*argv, *command], tmp_path))
    worker = ready(processes[-1], "worker")
    # The tmpfs as the worker sees it, through its mount namespace.
    disk = Path(f"/proc/{worker.process.proc.pid}/root") / mount.relative_to("/")
    stat = os.statvfs(disk)
    assert stat.f_blocks * stat.f_frsize == SMALL_DISK, "the worker's cache is not on the small tmpfs"

    started = time.perf_counter()
    full = ask_refused(worker.address, adapter_id=big.manifest.adapter_id)
    seconds = time.perf_counter() - started
    files = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file())
    print(f"\ndisk full after {seconds:.2f} s: {full}; files left: {files}")
    assert full.code == "RESOURCE_EXHAUSTED" and full.retry_after_ms is None
    assert "disk is full" in full.message and "No space left on device" in full.message
    assert "\n" not in full.message
    assert files == []  # no partial payload, manifest, staging copy or temporary file
    assert installed(disk / "cache") == []

    # The space came back: an adapter that fits is stored and served.
    small = ask(worker.address, task=TASK)
    assert installed(disk / "cache") == [small.adapter_id]
    assert read_installed(disk / "cache", small.adapter_id, fingerprint).manifest.adapter_id == small.adapter_id
