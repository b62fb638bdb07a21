"""The edge client SDK and `loracast ask` against a real gRPC server on loopback that streams scripted events.

The scripted Worker servicer runs behind the same server setup as the real worker (`create_server`, auth and
metrics interceptors, health), so what is tested here is the client: request building, streaming, the event
types, error mapping and the command line's output. tests/test_system.py drives the real worker.
"""

from __future__ import annotations

import io
import json
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edge_client.client import Answer, Done, EdgeClient, EdgeError, Progress, Started, Timings
from loracast.adapter_ids import AdapterIdError, resolve
from loracast.grpc_errors import retry_later
from loracast.grpc_security import ClientSecurity, ServerSecurity, open_channel
from loracast.grpc_server import create_server, start_serving, wait_until_serving
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc
from loracast_cli.cli import main

ADAPTER_ID = "ab" * 32
TWIN_ID = "abab" + "cd" * 30  # resident too: its first four digits are ADAPTER_ID's
TIMINGS = pb.Timings(adapter_fetch_seconds=0.5, apply_seconds=0.25, first_token_seconds=1.0, total_seconds=2.0)
WAIT = 30.0  # bound on every wait, so a broken client fails the test instead of hanging it
# What a worker streams while the coordinator internalizes a document, before `started`.
PROGRESS = (
    pb.InternalizeProgress(phase="start", estimate_seconds=2.5),
    pb.InternalizeProgress(phase="distill", step=3, probe_loss=0.5, elapsed_seconds=1.0, estimate_seconds=2.5),
    pb.InternalizeProgress(phase="done", step=4, probe_loss=0.25, elapsed_seconds=2.0, estimate_seconds=2.0),
)


class ScriptedWorker(pb_grpc.WorkerServicer):
    """Answers by prompt: "hello" streams a normal answer; the others exercise streaming and failures. A document
    is internalized first (PROGRESS)."""

    def __init__(self) -> None:
        self.requests: queue.Queue[pb.GenerateRequest] = queue.Queue()
        self.first_piece_shown = threading.Event()  # set by the test once the client has shown "first"
        self.cancelled = threading.Event()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateEvent]:
        self.requests.put(request)
        context.add_callback(self.cancelled.set)
        if request.prompt == "busy":
            retry_later(context, 250, "too many generations in flight")
        if request.prompt == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no adapter with this id")
        if request.adapter.WhichOneof("source") == "document":
            yield from (pb.GenerateEvent(progress=p) for p in PROGRESS)
        yield pb.GenerateEvent(started=pb.GenerateEvent.Started(adapter_id=ADAPTER_ID, resident=True))
        if request.prompt == "hello":
            yield from (pb.GenerateEvent(token=pb.GenerateEvent.Token(text=t)) for t in ("Hel", "lo ", "wörld"))
        else:
            yield pb.GenerateEvent(token=pb.GenerateEvent.Token(text="first"))
            if request.prompt == "broken":
                context.abort(grpc.StatusCode.INTERNAL, "decoder failed")
            # The rest only once the client has shown the first piece: proof that it streams, not buffers.
            if not self.first_piece_shown.wait(WAIT):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the client never showed the first piece")
            yield pb.GenerateEvent(token=pb.GenerateEvent.Token(text=" second"))
        yield pb.GenerateEvent(done=pb.GenerateEvent.Done(tokens=3, timings=TIMINGS))

    def ListAdapters(self, request: pb.ListResidentRequest, context: grpc.ServicerContext) -> pb.ListResidentResponse:
        return pb.ListResidentResponse(adapters=[pb.ResidentAdapter(adapter_id=i) for i in (ADAPTER_ID, TWIN_ID)])

    def next_request(self) -> pb.GenerateRequest:
        return self.requests.get(timeout=WAIT)


def _serve(tokens: frozenset[str] = frozenset()) -> tuple[grpc.Server, ScriptedWorker, str]:
    security = ServerSecurity(tokens=tokens)
    server = create_server("worker", security, max_workers=4)
    worker = ScriptedWorker()
    pb_grpc.add_WorkerServicer_to_server(worker, server)
    port, _ = start_serving(server, "127.0.0.1:0", security, [pb.DESCRIPTOR.services_by_name["Worker"].full_name])
    target = f"127.0.0.1:{port}"
    with open_channel(target) as channel:
        wait_until_serving(channel, timeout=WAIT)
    return server, worker, target


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedWorker, str]]:
    server, worker, target = _serve()
    yield worker, target
    server.stop(None)


# ---------------------------------------------------------------------------------------------------------
# SDK
# ---------------------------------------------------------------------------------------------------------


def test_ask_by_task_returns_the_answer_and_its_timings(scripted):
    worker, target = scripted
    with EdgeClient(target) as client:
        answer = client.ask("hello", task="Greet the world.", mode="merged", max_new_tokens=7)
    assert answer == Answer(
        text="Hello wörld",
        adapter_id=ADAPTER_ID,
        resident=True,
        tokens=3,
        timings=Timings(adapter_fetch_seconds=0.5, apply_seconds=0.25, first_token_seconds=1.0, total_seconds=2.0),
    )
    request = worker.next_request()
    assert request.adapter.task == "Greet the world."
    assert (request.prompt, request.mode, request.max_new_tokens) == ("hello", pb.MERGED, 7)


def test_documents_go_as_bytes_unchanged_and_no_source_means_the_base_model(scripted):
    worker, target = scripted
    document = "Le café ouvre à 8 h.\n".encode() + b"\xff\x00"  # not even UTF-8: the worker judges, not us
    with EdgeClient(target) as client:
        client.ask("hello", document=document)
        assert worker.next_request().adapter.document == document
        client.ask("hello", adapter_id=ADAPTER_ID)
        assert worker.next_request().adapter.adapter_id == ADAPTER_ID
        client.ask("hello")
        request = worker.next_request()
    assert not request.HasField("adapter")
    assert request.mode == pb.HOT_SWAP


def test_a_documents_budget_is_sent_and_its_progress_comes_before_the_answer(scripted):
    worker, target = scripted
    with EdgeClient(target) as client:
        events = list(client.stream("hello", document=b"The warranty lasts two years.", budget_seconds=2.5))
        assert worker.next_request().adapter.budget_seconds == 2.5
        progress = [Progress(p.phase, p.step, p.probe_loss, p.elapsed_seconds, p.estimate_seconds) for p in PROGRESS]
        assert events[:4] == [*progress, Started(ADAPTER_ID, True)] and isinstance(events[-1], Done)
        shown: list[Progress] = []
        assert client.ask("hello", document=b"Doc.", on_progress=shown.append).text == "Hello wörld"
        assert shown == progress
        assert not worker.next_request().adapter.HasField("budget_seconds")  # the coordinator's default
        with pytest.raises(ValueError, match="budget_seconds is for a document"):
            client.ask("hello", task="t", budget_seconds=1.0)
    assert worker.requests.empty()


def test_two_adapter_sources_or_an_unknown_mode_are_refused_before_any_call(scripted):
    worker, target = scripted
    with EdgeClient(target) as client:
        with pytest.raises(ValueError, match="not task and adapter_id"):
            client.ask("hello", task="t", adapter_id=ADAPTER_ID)
        with pytest.raises(ValueError, match="not task and document"):
            client.ask("hello", task="", document=b"")  # empty is still a choice: the worker refuses it
        with pytest.raises(ValueError, match="hot-swap, merged"):
            client.ask("hello", mode="fast")
    assert worker.requests.empty()


def test_stream_yields_started_then_pieces_then_done(scripted):
    worker, target = scripted
    worker.first_piece_shown.set()
    with EdgeClient(target) as client:
        events = list(client.stream("stream", task="t"))
    assert events == [
        Started(ADAPTER_ID, True),
        "first",
        " second",
        Done(3, Timings(0.5, 0.25, 1.0, 2.0)),
    ]


def test_a_reader_that_stops_early_cancels_the_call(scripted):
    worker, target = scripted
    with EdgeClient(target) as client:
        events = client.stream("stream", task="t")
        assert next(events) == Started(ADAPTER_ID, True)
        assert next(events) == "first"
        events.close()
        assert worker.cancelled.wait(WAIT), "the worker was left generating for nobody"


def test_grpc_failures_carry_the_code_the_message_and_retry_after(scripted):
    _, target = scripted
    with EdgeClient(target) as client:
        with pytest.raises(EdgeError) as busy:
            client.ask("busy", task="t")
        with pytest.raises(EdgeError) as missing:
            client.ask("missing", adapter_id=ADAPTER_ID)
    assert (busy.value.code, busy.value.message, busy.value.retry_after_ms) == (
        "RESOURCE_EXHAUSTED",
        "too many generations in flight",
        250,
    )
    assert str(busy.value) == "RESOURCE_EXHAUSTED: too many generations in flight (retry after 250 ms)"
    assert (missing.value.code, missing.value.retry_after_ms) == ("NOT_FOUND", None)
    assert str(missing.value) == "NOT_FOUND: no adapter with this id"


def test_an_adapter_id_prefix_names_the_one_resident_adapter_it_starts(scripted):
    _, target = scripted
    with EdgeClient(target) as client:
        assert client.resident_adapter_ids() == [ADAPTER_ID, TWIN_ID]
        assert client.resolve_adapter_id(ADAPTER_ID[:16]) == ADAPTER_ID
        assert client.resolve_adapter_id(" ABABC") == TWIN_ID  # as git takes it: any case, spaces around
        with pytest.raises(AdapterIdError, match=r"^2 adapters resident on the worker at .* start with abab "):
            client.resolve_adapter_id("abab")
        with pytest.raises(AdapterIdError, match=r"^no adapter resident on the worker at .* starts with ffff: "):
            client.resolve_adapter_id("ffff")


def test_a_full_adapter_id_is_taken_as_it_is_and_a_non_id_is_refused_without_listing():
    def nothing_listed() -> list[str]:
        raise AssertionError("listed the adapters")

    unknown = "f" * 64  # perhaps only the coordinator holds it: the worker judges
    assert resolve(unknown, nothing_listed, "here", "") == unknown
    for given in ("abc", "a" * 65, "../etc", "abcg"):
        with pytest.raises(AdapterIdError, match="is not an id: give its 64 hex digits, or at least 4 of them"):
            resolve(given, nothing_listed, "here", "")


def test_bearer_token_is_sent_and_a_wrong_one_is_refused():
    server, _, target = _serve(tokens=frozenset({"s3cret"}))
    try:
        with EdgeClient(target, ClientSecurity(token="s3cret")) as client:
            assert client.ask("hello", task="t").text == "Hello wörld"
        with EdgeClient(target, ClientSecurity(token="guess")) as client, pytest.raises(EdgeError) as refused:
            client.ask("hello", task="t")
        assert refused.value.code == "UNAUTHENTICATED"
    finally:
        server.stop(None)


# ---------------------------------------------------------------------------------------------------------
# `loracast ask`
# ---------------------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    """stdout that tells the scripted worker when the first piece of the answer has been shown."""

    def __init__(self, shown: threading.Event) -> None:
        super().__init__()
        self.shown = shown

    def flush(self) -> None:
        if "first" in self.getvalue():
            self.shown.set()


def _ask(*args: str) -> int:
    try:
        return main(["ask", *args])
    except SystemExit as exc:
        return int(exc.code)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_streams_the_answer_as_it_arrives(scripted, monkeypatch):
    worker, target = scripted
    terminal = _Terminal(worker.first_piece_shown)
    monkeypatch.setattr(sys, "stdout", terminal)
    assert _ask("--worker", target, "--task", "Count.", "stream") == 0
    assert terminal.getvalue() == "first second\n"


def test_cli_shows_a_documents_progress_on_stderr_and_sends_its_budget(scripted, tmp_path, capsys):
    worker, target = scripted
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"The warranty lasts two years.\n")
    assert _ask("--worker", target, "--doc", str(doc), "--budget-seconds", "2.5", "hello") == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello wörld\n"  # the answer alone: the bar is on stderr
    assert "internalizing (done): 100%" in captured.err and "2.0/2.0 s, step 4, probe loss 0.250" in captured.err
    assert worker.next_request().adapter.budget_seconds == 2.5

    assert _ask("--worker", target, "--doc", str(doc), "--budget-seconds", "-1", "hello") == 2
    assert "the budget must be 0 seconds or more, not -1" in capsys.readouterr().err
    assert _ask("--worker", target, "--task", "t", "--budget-seconds", "1", "hello") == 2
    expected = "--budget-seconds is for --doc: a task's or an id's adapter needs no internalization"
    assert _error_line(capsys) == f"loracast: error: {expected}"
    assert worker.requests.empty()


def test_cli_json_prints_one_object_with_the_answer_and_timings(scripted, tmp_path, capsys):
    worker, target = scripted
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"The warranty lasts two years.\n")
    assert (
        _ask("--worker", target, "--doc", str(doc), "--mode", "merged", "--max-new-tokens", "5", "--json", "hello") == 0
    )
    assert json.loads(capsys.readouterr().out) == {
        "answer": "Hello wörld",
        "adapter_id": ADAPTER_ID,
        "resident": True,
        "tokens": 3,
        "timings": {
            "adapter_fetch_seconds": 0.5,
            "apply_seconds": 0.25,
            "first_token_seconds": 1.0,
            "total_seconds": 2.0,
        },
    }
    request = worker.next_request()
    assert (request.adapter.document, request.mode, request.max_new_tokens) == (doc.read_bytes(), pb.MERGED, 5)


def test_cli_errors_are_one_line_with_the_grpc_code(scripted, capsys):
    _, target = scripted
    assert _ask("--worker", target, "--adapter", ADAPTER_ID, "missing") == 2
    assert _error_line(capsys) == "loracast: error: NOT_FOUND: no adapter with this id"
    assert _ask("--worker", target, "--task", "t", "busy") == 2
    assert _error_line(capsys) == (
        "loracast: error: RESOURCE_EXHAUSTED: too many generations in flight (retry after 250 ms)"
    )


def test_cli_takes_the_prefix_of_a_resident_adapters_id_as_the_demo_prints_it(scripted, capsys):
    worker, target = scripted
    assert _ask("--worker", target, "--adapter", ADAPTER_ID[:16], "--json", "hello") == 0
    assert json.loads(capsys.readouterr().out)["adapter_id"] == ADAPTER_ID
    assert worker.next_request().adapter.adapter_id == ADAPTER_ID
    assert _ask("--worker", target, "--adapter", "abab", "hello") == 2
    assert _error_line(capsys) == (
        f"loracast: error: 2 adapters resident on the worker at {target} start with abab (abababab…, ababcdcd…): "
        "give more digits"
    )
    assert _ask("--worker", target, "--adapter", "ffff", "hello") == 2
    assert _error_line(capsys) == (
        f"loracast: error: no adapter resident on the worker at {target} starts with ffff: an adapter the worker "
        "does not hold yet is asked for by its full id (`loracast ask --json` prints it)"
    )
    assert worker.requests.empty()


def test_cli_failure_mid_answer_ends_the_partial_line_first(scripted, capsys):
    _, target = scripted
    assert _ask("--worker", target, "--task", "t", "broken") == 2
    captured = capsys.readouterr()
    assert captured.out == "first\n"
    assert captured.err == "loracast: error: INTERNAL: decoder failed\n"


def test_cli_takes_exactly_one_adapter_source(scripted, capsys):
    worker, target = scripted
    assert _ask("--worker", target, "--task", "t", "--adapter", ADAPTER_ID, "hello") == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert _ask("--worker", target, "hello") == 2
    assert "one of the arguments --task --doc --adapter is required" in capsys.readouterr().err
    assert worker.requests.empty()


def test_cli_unreadable_doc_or_token_file_is_one_line(scripted, tmp_path, capsys):
    worker, target = scripted
    missing = tmp_path / "nope.txt"
    assert _ask("--worker", target, "--doc", str(missing), "hello") == 2
    assert _error_line(capsys) == f"loracast: error: cannot read --doc {missing}: No such file or directory"
    assert _ask("--worker", target, "--task", "t", "--token-file", str(tmp_path), "hello") == 2
    assert _error_line(capsys) == f"loracast: error: cannot read the token file {tmp_path}: Is a directory"
    assert _ask("--worker", target, "--task", "t", "--tls-cert", str(missing), "hello") == 2
    assert _error_line(capsys) == "loracast: error: a client certificate needs both --tls-cert and --tls-key"
    assert worker.requests.empty()


def test_cli_sends_the_token_from_its_file(tmp_path, capsys):
    server, _, target = _serve(tokens=frozenset({"s3cret"}))
    try:
        token_file = tmp_path / "token"
        token_file.write_text("\n")
        assert _ask("--worker", target, "--task", "t", "--token-file", str(token_file), "hello") == 2
        assert _error_line(capsys) == f"loracast: error: the token file {token_file} holds no token: auth would be off"
        token_file.write_text("s3cret\nother\n")
        assert _ask("--worker", target, "--task", "t", "--token-file", str(token_file), "hello") == 2
        assert _error_line(capsys) == f"loracast: error: the token file {token_file} holds 2 tokens: a client sends one"
        token_file.write_text("s3cret\n")
        assert _ask("--worker", target, "--task", "t", "--token-file", str(token_file), "--json", "hello") == 0
        assert json.loads(capsys.readouterr().out)["answer"] == "Hello wörld"
        assert _ask("--worker", target, "--task", "t", "--token", "guess", "hello") == 2
        assert _error_line(capsys) == "loracast: error: UNAUTHENTICATED: the bearer token is not valid"
    finally:
        server.stop(None)


def test_cli_unreachable_worker_exits_2_without_a_traceback():
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        done = subprocess.run(
            [
                str(Path(sys.executable).with_name("loracast")),
                "ask",
                "--worker",
                f"127.0.0.1:{port}",
                "--task",
                "t",
                "q",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loracast: error: UNAVAILABLE: "), done.stderr


def test_cli_asks_without_loading_torch(scripted):
    """`loracast ask`, its whole command line parser included, never imports PyTorch: devices need only grpcio."""
    _, target = scripted
    program = (
        "import sys\nfrom loracast_cli.cli import main\nassert main(sys.argv[1:]) == 0\nprint('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, "ask", "--worker", target, "--task", "t", "--json", "hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer, torch_loaded = done.stdout.splitlines()
    assert json.loads(answer)["answer"] == "Hello wörld"
    assert torch_loaded == "False"
