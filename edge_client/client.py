"""The edge client SDK: ask a worker a question with an adapter chosen by task, document or id, and stream the answer.

    with EdgeClient("worker:50052") as client:
        for event in client.stream("Is this review positive?", task="Classify the sentiment of a review."):
            if isinstance(event, str):
                print(event, end="", flush=True)
        answer = client.ask("What is the warranty period?", document=Path("manual.txt").read_bytes(), budget_seconds=30)

A document the coordinator has not internalized yet first streams `Progress` events (phase, step, probe loss,
seconds elapsed of the estimate) before `Started`.

gRPC failures surface as `EdgeError`, carrying the status code name, the worker's message and, when the worker
is busy, how long it asked us to wait (`retry_after_ms`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from loracast import adapter_ids
from loracast.errors import UserError
from loracast.grpc_errors import RETRY_AFTER_MS
from loracast.grpc_security import ClientSecurity, open_channel
from loracast.v1 import loracast_pb2 as pb
from loracast.v1 import loracast_pb2_grpc as pb_grpc

MODES = {"hot-swap": pb.HOT_SWAP, "merged": pb.MERGED}
DEFAULT_TIMEOUT = 300.0  # an adapter made on a CPU coordinator, transferred and applied, then decoded
LIST_TIMEOUT = 30.0  # ListAdapters reads the worker's index: no adapter made, no transfer


class EdgeError(UserError):
    """A failed call: `code` is the gRPC status code's name (e.g. "NOT_FOUND"), `message` the worker's reason."""

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        retry = f" (retry after {retry_after_ms} ms)" if retry_after_ms is not None else ""
        super().__init__(f"{code}: {message}{retry}")


@dataclass(frozen=True)
class Timings:
    adapter_fetch_seconds: float  # making it on the coordinator + transfer; 0 when the adapter was resident
    apply_seconds: float
    first_token_seconds: float  # from the request's arrival at the worker to the first token
    total_seconds: float


@dataclass(frozen=True)
class Started:
    adapter_id: str  # empty for the base model
    resident: bool  # the adapter was already on the worker


@dataclass(frozen=True)
class Done:
    tokens: int
    timings: Timings


@dataclass(frozen=True)
class Progress:
    """Where the internalization of the request's document stands (protos/loracast/v1/loracast.proto)."""

    phase: str  # "start", "probes", "teacher", "distill", "done", in this order
    step: int
    probe_loss: float  # NaN before the first step
    elapsed_seconds: float
    estimate_seconds: float  # of the whole internalization


Event = Progress | Started | str | Done  # `str` is a piece of the answer's text


@dataclass(frozen=True)
class Answer:
    text: str
    adapter_id: str
    resident: bool
    tokens: int
    timings: Timings


def _adapter_ref(
    task: str | None, document: bytes | None, adapter_id: str | None, budget_seconds: float | None
) -> pb.AdapterRef | None:
    sources = (("task", task), ("document", document), ("adapter_id", adapter_id))
    chosen = [name for name, value in sources if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"choose one adapter source, not {' and '.join(chosen)}")
    if budget_seconds is not None and document is None:
        raise ValueError("budget_seconds is for a document: a task or an adapter id has no internalization")
    if task is not None:
        return pb.AdapterRef(task=task)
    if document is not None:
        return pb.AdapterRef(document=document, budget_seconds=budget_seconds)
    if adapter_id is not None:
        return pb.AdapterRef(adapter_id=adapter_id)
    return None


def _error(call: grpc.RpcError) -> EdgeError:
    trailers = dict(call.trailing_metadata() or ())
    retry = trailers.get(RETRY_AFTER_MS)
    return EdgeError(call.code().name, call.details() or "", int(retry) if retry and retry.isdigit() else None)


def _event(message: pb.GenerateEvent) -> Event | None:
    kind = message.WhichOneof("event")
    if kind == "progress":
        p = message.progress
        return Progress(p.phase, p.step, p.probe_loss, p.elapsed_seconds, p.estimate_seconds)
    if kind == "started":
        return Started(message.started.adapter_id, message.started.resident)
    if kind == "token":
        return message.token.text
    if kind == "done":
        t = message.done.timings
        timings = Timings(t.adapter_fetch_seconds, t.apply_seconds, t.first_token_seconds, t.total_seconds)
        return Done(message.done.tokens, timings)
    # An event added to the contract after this client was built: skipping it keeps old clients working.
    return None


class EdgeClient:
    """A connection to one worker (HOST:PORT). Close it, or use it as a context manager."""

    def __init__(self, target: str, security: ClientSecurity | None = None) -> None:
        self._target = target
        self._channel = open_channel(target, security)
        self._stub = pb_grpc.WorkerStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def resident_adapter_ids(self, timeout: float | None = LIST_TIMEOUT) -> list[str]:
        """The ids of the adapters resident on the worker, most recently used first."""
        try:
            response = self._stub.ListAdapters(pb.ListResidentRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return [adapter.adapter_id for adapter in response.adapters]

    def resolve_adapter_id(self, given: str) -> str:
        """The full id of `given`: a full id as it is, a prefix (at least 4 hex digits, such as the demo prints) the
        one adapter resident on the worker whose id it starts. Raises `AdapterIdError` (a UserError) for a prefix
        that starts none or several, `EdgeError` when the worker cannot list its adapters."""
        return adapter_ids.resolve(
            given,
            self.resident_adapter_ids,
            f"resident on the worker at {self._target}",
            "an adapter the worker does not hold yet is asked for by its full id (`loracast ask --json` prints it)",
        )

    def stream(
        self,
        question: str,
        *,
        task: str | None = None,
        document: bytes | None = None,
        adapter_id: str | None = None,
        budget_seconds: float | None = None,
        mode: str = "hot-swap",
        max_new_tokens: int = 0,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Iterator[Event]:
        """`Progress` while a document is internalized, `Started`, the answer's text pieces as they are decoded,
        then `Done`.

        Choose at most one of `task`, `document` (UTF-8 bytes, sent as they are) and `adapter_id`; none asks the
        base model. `budget_seconds` is a document's internalization budget (None: the coordinator's default; 0: one
        hypernetwork pass) and adds to `timeout`. `max_new_tokens=0` takes the worker's default. Raises `EdgeError`
        for a failed call; stopping early (or Ctrl-C) cancels the call, and with it an internalization nobody else
        waits for.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        request = pb.GenerateRequest(
            adapter=_adapter_ref(task, document, adapter_id, budget_seconds),
            prompt=question,
            max_new_tokens=max_new_tokens,
            mode=MODES[mode],
        )
        if timeout is not None and budget_seconds is not None:
            timeout += budget_seconds
        call = self._stub.Generate(request, timeout=timeout)
        try:
            for message in call:
                event = _event(message)
                if event is not None:
                    yield event
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            # A caller that stops reading early must not leave the worker decoding for nobody.
            call.cancel()

    def ask(
        self,
        question: str,
        *,
        task: str | None = None,
        document: bytes | None = None,
        adapter_id: str | None = None,
        budget_seconds: float | None = None,
        mode: str = "hot-swap",
        max_new_tokens: int = 0,
        timeout: float | None = DEFAULT_TIMEOUT,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Answer:
        """The whole answer at once (see `stream`); a document's `Progress` goes to `on_progress` as it comes."""
        started: Started | None = None
        done: Done | None = None
        pieces: list[str] = []
        events = self.stream(
            question,
            task=task,
            document=document,
            adapter_id=adapter_id,
            budget_seconds=budget_seconds,
            mode=mode,
            max_new_tokens=max_new_tokens,
            timeout=timeout,
        )
        for event in events:
            if isinstance(event, Progress):
                if on_progress is not None:
                    on_progress(event)
            elif isinstance(event, Started):
                started = event
            elif isinstance(event, Done):
                done = event
            else:
                pieces.append(event)
        if started is None or done is None:
            raise EdgeError("DATA_LOSS", "the worker ended the answer without its started and done messages")
        return Answer("".join(pieces), started.adapter_id, started.resident, done.tokens, done.timings)
