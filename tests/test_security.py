"""Security: who may call the servers, which adapters a worker accepts, and where a document may end up.

- Transport and auth. A coordinator and a worker with TLS and bearer tokens (the worker reaching the coordinator
  over TLS with a token of its own). Every RPC of both refuses a plaintext client and one that does not trust the
  server's CA (UNAVAILABLE: no TLS session, so no call), and a client with no token, a wrong one, the other
  server's, or a malformed `authorization` header (UNAUTHENTICATED, as the proto documents for "none or a wrong
  one"; there are no per-RPC permissions, so never PERMISSION_DENIED). The refused calls do no work. Health needs
  no token (orchestrators probe it); reflection, which lists the services, does. With mutual TLS, a client without
  a certificate is refused on every RPC (the coordinator's case is test_coordinator.py test_tls_and_mutual_tls).
- Verification. A worker installs nothing it could not verify: a scripted coordinator sends manifests that do not
  match the content under the id the worker asked for. Existing tests cover a corrupt chunk
  (test_worker.py test_a_corrupted_chunk_is_detected_and_never_applied), an honest adapter for another base
  (test_an_adapter_for_another_base_model_is_refused_before_any_data) and the parser alone
  (test_adapter_wire.py, test_fuzz.py); these add the forgeries a hostile or broken coordinator could send.
- Documents never reach disk or logs. A real coordinator (Doc-to-LoRA) and worker in this process take a document
  with a unique marker through the worker (Generate, Prefetch) and directly (InternalizeDocument), and refuse
  broken ones; then every file under their cache directories, the temporary directory and the model cache, the
  captured stdout/stderr, Python logs, /metrics pages and error messages are searched for the marker in many
  encodings. The search is proven first: it finds the marker planted in control files in each encoding.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import logging
import os
import tempfile
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import FileAudit, Recorder, ScriptedCoordinator, certificates, installed, loopback_worker, rpc_error

from coordinator.server import CoordinatorConfig, RunningCoordinator
from coordinator.server import start as start_coordinator
from hypernet.makers import TextToLoRAMaker
from loracast import adapter_wire
from loracast.grpc_security import ClientSecurity, ServerSecurity, open_channel
from loracast.grpc_server import wait_until_serving
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from worker.adapter_store import read_installed
from worker.chat import ChatTokenizer
from worker.server import RunningWorker
from worker.server import start as start_worker_server

TIMEOUT = 60.0
TASK = "Reverse the given list."
OTHER_TASK = "Write the word in capitals."
DOCUMENT = b"The magic number of Zarvik is 48213."
COORDINATOR_TOKEN = "worker-to-coordinator-3c1f"  # the worker's token for the coordinator
WORKER_TOKEN = "edge-client-9a7e"  # an edge client's token for the worker
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------------------------------------------------
# TLS and bearer tokens on both servers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Our CA with a server certificate for 127.0.0.1 and a client certificate, and another CA's certificate."""
    root = tmp_path_factory.mktemp("pki")
    certs = certificates(root / "ours")
    certs["other-ca.pem"] = certificates(root / "other")["ca.pem"]
    return certs


@dataclass
class Secured:
    coordinator: RunningCoordinator
    worker: RunningWorker
    recorder: Recorder  # the coordinator's Text-to-LoRA: which descriptions it made adapters for
    pki: dict[str, Path]

    def target(self, server: str) -> str:
        return f"127.0.0.1:{(self.coordinator if server == 'Coordinator' else self.worker).port}"

    def tls(self, token: str | None = None) -> ClientSecurity:
        return ClientSecurity(tls_ca=self.pki["ca.pem"], token=token)


@pytest.fixture(scope="module")
def secured(
    pki: dict[str, Path],
    tiny_t2l: Path,
    tiny_d2l: Path,
    tiny_base_dir: Path,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured")
    recorder = Recorder(TextToLoRAMaker(tiny_t2l))
    tls = {"tls_cert": pki["server.pem"], "tls_key": pki["server.key"]}
    coordinator_config = CoordinatorConfig(
        cache_dir=root / "coordinator-cache",
        listen="127.0.0.1:0",
        metrics_port=None,
        d2l_checkpoint=tiny_d2l,
        base=str(tiny_base_dir),
        budget_seconds=0.0,  # who may call is the point here: a document's one pass is enough
        security=ServerSecurity(**tls, tokens=frozenset({COORDINATOR_TOKEN})),
    )
    running_coordinator = start_coordinator(coordinator_config, recorder)
    try:
        running_worker = start_worker_server(
            loopback_worker(
                cache_dir=root / "worker-cache",
                coordinator=f"127.0.0.1:{running_coordinator.port}",
                coordinator_security=ClientSecurity(tls_ca=pki["ca.pem"], token=COORDINATOR_TOKEN),
                model_dir=model_dir,
                max_new_tokens=8,
                security=ServerSecurity(**tls, tokens=frozenset({WORKER_TOKEN})),
            )
        )
    except BaseException:
        running_coordinator.stop(None)
        raise
    servers = Secured(running_coordinator, running_worker, recorder, pki)
    try:
        for server in ("Coordinator", "Worker"):
            with open_channel(servers.target(server), servers.tls()) as channel:  # health needs no token
                wait_until_serving(channel, timeout=TIMEOUT)
        yield servers
    finally:
        running_worker.stop(None)
        running_coordinator.stop(None)


def rpcs(channel: grpc.Channel, server: str, adapter_id: str = "0" * 64) -> dict[str, Callable[..., Any]]:
    """Every RPC of `server`, each a call that does real work when allowed; keyword arguments go to the call."""
    if server == "Coordinator":
        stub = pb_grpc.CoordinatorStub(channel)
        return {
            "GenerateFromDescription": lambda **kw: stub.GenerateFromDescription(
                pb.GenerateFromDescriptionRequest(description=TASK), timeout=TIMEOUT, **kw
            ),
            "InternalizeDocument": lambda **kw: list(
                stub.InternalizeDocument(iter([pb.DocumentChunk(data=DOCUMENT)]), timeout=TIMEOUT, **kw)
            ),
            "FetchAdapter": lambda **kw: list(
                stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT, **kw)
            ),
            "ListAdapters": lambda **kw: stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT, **kw),
            "Describe": lambda **kw: stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT, **kw),
        }
    stub = pb_grpc.WorkerStub(channel)
    return {
        "Generate": lambda **kw: list(
            stub.Generate(
                pb.GenerateRequest(prompt="Hi", max_new_tokens=4, adapter=pb.AdapterRef(task=OTHER_TASK)),
                timeout=TIMEOUT,
                **kw,
            )
        ),
        "ListAdapters": lambda **kw: stub.ListAdapters(pb.ListResidentRequest(), timeout=TIMEOUT, **kw),
        "Prefetch": lambda **kw: stub.Prefetch(
            pb.PrefetchRequest(adapters=[pb.AdapterRef(task=TASK)]), timeout=TIMEOUT, **kw
        ),
    }


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        assert "Traceback" not in (exc.details() or "")
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_rpc_refuses_plaintext_untrusted_and_unauthenticated_clients(secured: Secured) -> None:
    tokens = {"Coordinator": COORDINATOR_TOKEN, "Worker": WORKER_TOKEN}
    refusals = 0
    for server, right in tokens.items():
        other = tokens["Worker" if server == "Coordinator" else "Coordinator"]
        clients = {  # name -> (client security, metadata sent by hand, the code every RPC must answer)
            "plaintext": (ClientSecurity(), (), UNAVAILABLE),
            "plaintext with the right token": (ClientSecurity(token=right), (), UNAVAILABLE),
            "TLS trusting another CA, right token": (
                ClientSecurity(tls_ca=secured.pki["other-ca.pem"], token=right),
                (),
                UNAVAILABLE,
            ),
            "TLS, no token": (secured.tls(), (), UNAUTHENTICATED),
            "TLS, a wrong token": (secured.tls("wrong"), (), UNAUTHENTICATED),
            "TLS, the other server's token": (secured.tls(other), (), UNAUTHENTICATED),
            "TLS, the token with no scheme": (secured.tls(), (("authorization", right),), UNAUTHENTICATED),
            "TLS, 'bearer' in lower case": (secured.tls(), (("authorization", f"bearer {right}"),), UNAUTHENTICATED),
            "TLS, Basic": (secured.tls(), (("authorization", f"Basic {right}"),), UNAUTHENTICATED),
            "TLS, a token with a trailing space": (
                secured.tls(),
                (("authorization", f"Bearer {right} "),),
                UNAUTHENTICATED,
            ),
            "TLS, an empty bearer token": (secured.tls(), (("authorization", "Bearer "),), UNAUTHENTICATED),
        }
        for name, (security, metadata, expected) in clients.items():
            with open_channel(secured.target(server), security) as channel:
                for rpc, call in rpcs(channel, server).items():
                    code, details = code_of(lambda c=call, m=metadata: c(metadata=m) if m else c())
                    assert code == expected, (server, rpc, name, code, details)
                    refusals += 1
    print(f"\n{refusals} calls refused as they must be")
    # Refused calls did no work: no adapter made, nothing cached, nothing fetched or installed.
    assert secured.recorder.calls == []
    assert secured.coordinator.store.stats() == (0, 0) and secured.worker.servicer.store.resident() == []

    # The same calls with the right token over TLS work, the worker reaching the coordinator over TLS with its own.
    with open_channel(secured.target("Coordinator"), secured.tls(COORDINATOR_TOKEN)) as channel:
        calls = rpcs(channel, "Coordinator")
        made = calls["GenerateFromDescription"]().manifest.adapter_id
        assert calls["InternalizeDocument"]()[-1].result.manifest.provenance["loracast.document_sha256"] == (
            hashlib.sha256(DOCUMENT).hexdigest()
        )
        assert rpcs(channel, "Coordinator", made)["FetchAdapter"]()[0].manifest.adapter_id == made
        assert len(calls["ListAdapters"]().adapters) == 2 and calls["Describe"]().hypernetworks
    with open_channel(secured.target("Worker"), secured.tls(WORKER_TOKEN)) as channel:
        calls = rpcs(channel, "Worker")
        assert calls["Generate"]()[-1].done.tokens > 0
        assert calls["Prefetch"]().adapter_ids == [made]
        assert len(calls["ListAdapters"]().adapters) == 2
    assert secured.recorder.calls == [TASK, OTHER_TASK]


def test_health_needs_no_token_but_reflection_does(secured: Secured) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for server, token in (("Coordinator", COORDINATOR_TOKEN), ("Worker", WORKER_TOKEN)):
        with open_channel(secured.target(server), secured.tls()) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            code, _ = code_of(lambda r=reflection: list(r.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)))
            assert code == UNAUTHENTICATED, (server, code)
        with open_channel(secured.target(server), ClientSecurity()) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            code, _ = code_of(lambda h=health: h.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT))
            assert code == UNAVAILABLE  # health too is only spoken over TLS
        with open_channel(secured.target(server), secured.tls(token)) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            (reply,) = reflection.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)
            assert f"loracast.v1.{server}" in {s.name for s in reply.list_services_response.service}


def test_a_worker_with_wrong_credentials_for_the_coordinator_gets_nothing_from_it(
    secured: Secured,
    tmp_path: Path,
    model_dir: Path,
) -> None:
    """The coordinator refuses the worker itself; its client learns the coordinator is out of reach (UNAVAILABLE,
    naming why), not UNAUTHENTICATED, which would say the client's own token is wrong."""
    target = secured.target("Coordinator")
    for name, security, cause in (
        ("a wrong token", ClientSecurity(tls_ca=secured.pki["ca.pem"], token="wrong"), "UNAUTHENTICATED"),
        ("no TLS", ClientSecurity(token=COORDINATOR_TOKEN), "UNAVAILABLE"),
    ):
        worker = start_worker_server(
            loopback_worker(
                cache_dir=tmp_path / name,
                coordinator=target,
                coordinator_security=security,
                model_dir=model_dir,
            )
        )
        try:
            with open_channel(f"127.0.0.1:{worker.port}") as channel:
                wait_until_serving(channel, timeout=TIMEOUT)
                request = pb.GenerateRequest(prompt="Hi", adapter=pb.AdapterRef(task="A task for nobody."))
                code, details = code_of(
                    lambda c=channel, r=request: list(pb_grpc.WorkerStub(c).Generate(r, timeout=TIMEOUT))
                )
            assert code == UNAVAILABLE and cause in details, (name, code, details)
            assert worker.servicer.store.resident() == []
        finally:
            worker.stop(None)
    assert "A task for nobody." not in secured.recorder.calls


def test_mutual_tls_on_the_worker_refuses_a_client_without_a_certificate_on_every_rpc(
    pki: dict[str, Path],
    tmp_path: Path,
    model_dir: Path,
) -> None:
    security = ServerSecurity(
        tls_cert=pki["server.pem"], tls_key=pki["server.key"], client_ca=pki["ca.pem"], tokens=frozenset({"t"})
    )
    worker = start_worker_server(
        loopback_worker(
            cache_dir=tmp_path / "cache",
            model_dir=model_dir,
            security=security,
        )
    )
    target = f"127.0.0.1:{worker.port}"
    with_cert = ClientSecurity(
        tls_ca=pki["ca.pem"], client_cert=pki["client.pem"], client_key=pki["client.key"], token="t"
    )
    try:
        with open_channel(target, with_cert) as channel:
            wait_until_serving(channel, timeout=TIMEOUT)
            assert pb_grpc.WorkerStub(channel).ListAdapters(pb.ListResidentRequest(), timeout=TIMEOUT).capacity_bytes
        for security in (ClientSecurity(tls_ca=pki["ca.pem"], token="t"), ClientSecurity(token="t")):
            with open_channel(target, security) as channel:
                for rpc, call in rpcs(channel, "Worker").items():
                    code, details = code_of(call)
                    assert code == UNAVAILABLE, (rpc, security, code, details)
    finally:
        worker.stop(None)


# ---------------------------------------------------------------------------------------------------------
# A worker installs nothing it could not verify
# ---------------------------------------------------------------------------------------------------------


def _float32(wire: adapter_wire.WireAdapter) -> adapter_wire.WireAdapter:
    """The same adapter in FLOAT32 (the fixtures are FLOAT16, as the coordinator sends them by default)."""
    adapter, spec, metadata = adapter_wire.decode(wire.manifest, wire.payload)
    return adapter_wire.encode(adapter, spec, metadata, pb.FLOAT32)


def _forged(manifest_of: adapter_wire.WireAdapter, **changes: Any) -> pb.AdapterManifest:
    manifest = pb.AdapterManifest()
    manifest.CopyFrom(manifest_of.manifest)
    for field, value in changes.items():
        setattr(manifest, field, value)
    return manifest


def _forgeries(sent: dict[str, adapter_wire.WireAdapter], base_fingerprint: str) -> dict[str, tuple]:
    """name -> (the id the worker asks for, the manifest and payload the coordinator sends for it)."""
    a, b, other_base = _float32(sent["a"]), _float32(sent["b"]), _float32(sent["other-base"])
    relabeled = _forged(other_base, base_fingerprint=base_fingerprint)  # claims this worker's base; its id says not
    swapped = _forged(a, payload_sha256=b.manifest.payload_sha256)  # b's bytes, with their own SHA-256, as a
    return {
        "the stream's manifest names another adapter": (a.manifest.adapter_id, b.manifest, b.payload),
        "FLOAT32: another adapter's bytes with their SHA-256": (a.manifest.adapter_id, swapped, b.payload),
        "FLOAT32: another base's adapter claiming this base": (
            other_base.manifest.adapter_id,
            relabeled,
            other_base.payload,
        ),
    }


@dataclass
class Scripted:
    """test_worker.py's scripted coordinator, and a worker fetching from it with its cache in `cache`."""

    script: ScriptedCoordinator
    stub: pb_grpc.WorkerStub
    cache: Path
    wires: dict[str, adapter_wire.WireAdapter]
    fingerprint: str  # of the worker's base model


@pytest.fixture
def scripted(coordinator, start_worker, connect, wires, fingerprint, tmp_path) -> Scripted:
    script, target, _ = coordinator
    return Scripted(script, connect(start_worker(coordinator=target)), tmp_path / "cache", wires, fingerprint)


def _ask(scripted: Scripted, rpc: str, adapter_id: str) -> grpc.RpcError:
    ref = pb.AdapterRef(adapter_id=adapter_id)
    if rpc == "Generate":
        return rpc_error(scripted.stub.Generate, pb.GenerateRequest(prompt="Hi", adapter=ref), timeout=TIMEOUT)
    return rpc_error(scripted.stub.Prefetch, pb.PrefetchRequest(adapters=[ref]), timeout=TIMEOUT)


FORGERIES = [
    "the stream's manifest names another adapter",
    "FLOAT32: another adapter's bytes with their SHA-256",
    "FLOAT32: another base's adapter claiming this base",
]


@pytest.mark.parametrize("forgery", FORGERIES)
@pytest.mark.parametrize("rpc", ["Generate", "Prefetch"])
def test_a_forged_adapter_is_refused_and_never_installed(scripted: Scripted, forgery: str, rpc: str) -> None:
    adapter_id, manifest, payload = _forgeries(scripted.wires, scripted.fingerprint)[forgery]
    scripted.script.adapters[adapter_id] = adapter_wire.WireAdapter(manifest, payload)
    error = _ask(scripted, rpc, adapter_id)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (error.code(), error.details())
    assert scripted.script.fetches, "the worker must have asked for it"
    assert scripted.stub.ListAdapters(pb.ListResidentRequest(), timeout=TIMEOUT).adapters == []
    assert installed(scripted.cache) == [] and list((scripted.cache / "partial").iterdir()) == []


@pytest.mark.parametrize("forgery", ["other bytes", "another base"])
def test_a_forged_float16_adapter_is_refused(scripted: Scripted, forgery: str) -> None:
    # The worker cannot recompute the float32 digest from float16 bytes: the id, over both digests, still tells.
    a, b, other_base = scripted.wires["a"], scripted.wires["b"], scripted.wires["other-base"]
    if forgery == "other bytes":
        adapter_id, payload = a.manifest.adapter_id, b.payload
        manifest = _forged(a, payload_sha256=b.manifest.payload_sha256)
    else:
        adapter_id, payload = other_base.manifest.adapter_id, other_base.payload
        manifest = _forged(other_base, base_fingerprint=scripted.fingerprint)
    scripted.script.adapters[adapter_id] = adapter_wire.WireAdapter(manifest, payload)
    assert _ask(scripted, "Generate", adapter_id).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert installed(scripted.cache) == []


# ---------------------------------------------------------------------------------------------------------
# Documents never reach disk or logs
# ---------------------------------------------------------------------------------------------------------


def _forms(marker: str, token_ids: list[int]) -> dict[str, bytes]:
    """The marker as it could appear in a file or log: text encodings, hex, base64 at each alignment, the document's
    token ids as int32/int64 arrays."""
    raw = marker.encode()
    forms = {codec: marker.encode(codec) for codec in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")}
    forms.update(
        {"upper": raw.upper(), "lower": raw.lower(), "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode()}
    )
    for shift in range(3):  # base64 of the marker after `shift` other bytes: the characters only it decides
        for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            forms[f"{name}+{shift}"] = encode(b"\0" * shift + raw)[4 if shift else 0 : -4]
    for dtype in ("<i4", "<i8"):
        forms[f"token ids {dtype}"] = np.array(token_ids, dtype).tobytes()
    return forms


def _unpacked(data: bytes) -> Iterator[bytes]:
    """The bytes, and their gzip or zlib decompression where they are compressed."""
    yield data
    for magic, decompress in ((b"\x1f\x8b", gzip.decompress), (b"\x78", zlib.decompress)):
        if data.startswith(magic):
            with contextlib.suppress(OSError, zlib.error, EOFError):
                yield decompress(data)


def leaks(blobs: dict[str, bytes], forms: dict[str, bytes]) -> set[tuple[str, str]]:
    """(where, which form) for every form of the marker found in the blobs."""
    return {
        (where, form)
        for where, data in blobs.items()
        for body in _unpacked(data)
        for form, needle in forms.items()
        if needle in body
    }


def files_under(*roots: Path) -> dict[str, bytes]:
    """Every file's content, and (as one more blob) every file and directory name: a name can leak too."""
    paths = [path for root in roots for path in root.rglob("*")]
    blobs = {str(path): path.read_bytes() for path in paths if path.is_file()}
    blobs["file names"] = "\n".join(str(path) for path in paths).encode()
    return blobs


def test_documents_never_reach_disk_or_logs(
    tiny_t2l: Path,
    tiny_d2l: Path,
    tiny_base_dir: Path,
    model_dir: Path,
    cache_root: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    scratch = tmp_path / "tmp"  # anything the servers put in "the" temporary directory lands here, and is searched
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    marker = f"LCMARK{uuid.uuid4().hex}"
    documents = [
        f"Brelna Dostik keeps a heron called Mibbin. The vault code is {marker}. She makes lamps.".encode(),
        f"The office opens at 8:00. The alarm code is {marker}.".encode(),
        f"Zarvik's magic number is 48213; its password is {marker}.".encode(),
    ]
    tokens = ChatTokenizer(model_dir).encode(documents[0].decode())
    inner = ChatTokenizer(model_dir).encode(f" {marker}")[1:-1]  # the boundary tokens may merge with neighbours
    assert len(inner) >= 6 and any(tokens[i : i + len(inner)] == inner for i in range(len(tokens)))
    forms = _forms(marker, inner)

    # The search works: it finds each form planted in a control file, plain and compressed, and in a log line.
    control = tmp_path.parent / f"{tmp_path.name}-control"
    control.mkdir()
    for form, needle in forms.items():
        (control / form).write_bytes(b"before " + needle + b" after")
        (control / f"{form}.gz").write_bytes(gzip.compress(b"x" * 7 + needle))
    (control / "named").mkdir()
    (control / "named" / f"{marker}.adapter").touch()
    planted = files_under(control)
    found = leaks({**planted, "log": f"INFO something {marker} happened".encode()}, forms)
    assert {form for _, form in found} == set(forms)
    assert {where for where, _ in found} == {*planted, "log"} - {str(control / "named" / f"{marker}.adapter")}

    coordinator_cache, worker_cache = tmp_path / "coordinator-cache", tmp_path / "worker-cache"
    config = CoordinatorConfig(
        cache_dir=coordinator_cache,
        listen="127.0.0.1:0",
        metrics_port=0,
        t2l_checkpoint=tiny_t2l,
        d2l_checkpoint=tiny_d2l,
        base=str(tiny_base_dir),
        max_document_bytes=4096,
        budget_seconds=1.0,  # distilled: the probes and the teacher's answers are made from the documents too
    )
    audit, messages, pages = FileAudit(), [], {}
    with audit.recording() as touched:
        running_coordinator = start_coordinator(config)
        running_worker = None
        try:
            running_worker = start_worker_server(
                loopback_worker(
                    cache_dir=worker_cache,
                    coordinator=f"127.0.0.1:{running_coordinator.port}",
                    model_dir=model_dir,
                    metrics_port=0,
                    max_new_tokens=4,
                )
            )
            with (
                open_channel(f"127.0.0.1:{running_coordinator.port}") as to_coordinator,
                open_channel(f"127.0.0.1:{running_worker.port}") as to_worker,
            ):
                wait_until_serving(to_worker, timeout=TIMEOUT)
                coordinator_stub, worker_stub = pb_grpc.CoordinatorStub(to_coordinator), pb_grpc.WorkerStub(to_worker)
                request = pb.GenerateRequest(
                    prompt="What is the vault code?", adapter=pb.AdapterRef(document=documents[0])
                )
                events = list(worker_stub.Generate(request, timeout=TIMEOUT))
                assert events[0].progress.phase == "start"
                ids = [next(e.started.adapter_id for e in events if e.HasField("started"))]
                ids += worker_stub.Prefetch(
                    pb.PrefetchRequest(adapters=[pb.AdapterRef(document=documents[1])]), timeout=TIMEOUT
                ).adapter_ids
                cut = documents[2].index(marker.encode()) + 5  # the marker split across two chunks
                chunks = [pb.DocumentChunk(data=documents[2][:cut]), pb.DocumentChunk(data=documents[2][cut:])]
                *progress, last = coordinator_stub.InternalizeDocument(iter(chunks), timeout=TIMEOUT)
                reply = last.result
                assert not reply.cached and progress[-1].progress.phase == "done"
                # Each document went through the hypernetwork: the adapters carry the documents' SHA-256.
                made = [read_installed(worker_cache, i, running_worker.servicer.decoder.fingerprint) for i in ids]
                assert [m.manifest.provenance["loracast.document_sha256"] for m in made] == [
                    hashlib.sha256(d).hexdigest() for d in documents[:2]
                ]
                assert reply.manifest.provenance["loracast.document_sha256"] == hashlib.sha256(documents[2]).hexdigest()
                # Refused documents: not UTF-8, over the limit, through either server.
                broken = documents[0] + b"\xff"
                too_long = documents[0] * 100
                for call in (
                    lambda: list(
                        coordinator_stub.InternalizeDocument(iter([pb.DocumentChunk(data=broken)]), timeout=TIMEOUT)
                    ),
                    lambda: list(
                        coordinator_stub.InternalizeDocument(iter([pb.DocumentChunk(data=too_long)]), timeout=TIMEOUT)
                    ),
                    lambda: list(
                        worker_stub.Generate(
                            pb.GenerateRequest(prompt="Hi", adapter=pb.AdapterRef(document=broken)), timeout=TIMEOUT
                        )
                    ),
                    lambda: worker_stub.Prefetch(
                        pb.PrefetchRequest(adapters=[pb.AdapterRef(document=too_long)]), timeout=TIMEOUT
                    ),
                ):
                    code, details = code_of(call)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
                    messages.append(details)
            for name, port in (
                ("coordinator", running_coordinator.metrics_port),
                ("worker", running_worker.metrics_port),
            ):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as page:
                    pages[f"{name} /metrics"] = page.read()
        finally:
            if running_worker is not None:
                running_worker.stop(None)
            running_coordinator.stop(None)
    out, err = capfd.readouterr()
    # The servers' own logs are among what is searched: the worker logged the adapters it installed.
    assert any(record.name == "worker.adapter_store" for record in caplog.records)
    logs = {"stdout": out.encode(), "stderr": err.encode(), "python logs": caplog.text.encode()}
    logs.update(pages)
    logs["error messages"] = "\n".join(messages).encode()
    searched = files_under(tmp_path, cache_root)
    for cache in (coordinator_cache, worker_cache):  # what the servers wrote is among what is searched
        assert any(path.startswith(f"{cache}{os.sep}adapters{os.sep}") for path in searched), cache
    assert leaks({**searched, **logs}, forms) == set()
    # Every file Python wrote to while the servers ran lies in a searched directory.
    roots = (str(tmp_path) + os.sep, str(cache_root) + os.sep)
    assert [touch for touch in touched if touch.writes and not touch.path.startswith(roots)] == []
    assert any(touch.writes and touch.path.startswith(str(worker_cache)) for touch in touched)  # the audit works
