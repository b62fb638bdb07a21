"""`loracast ask`: ask a worker a question with an adapter chosen by task, document or id; stream the answer.

Only argparse at module level: every `loracast` command builds this parser, and gRPC loads only for `ask`, so an
edge device asking a worker needs only grpcio, never PyTorch. Failures raise a UserError, which `loracast` prints as
one line with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from loracast.progress import add_budget_flag

if TYPE_CHECKING:
    from loracast.grpc_security import ClientSecurity

log = logging.getLogger(__name__)


def _read(path: str, flag: str) -> bytes:
    from pathlib import Path

    from loracast.errors import UserError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {flag} {path}: {exc.strerror}") from exc


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return int(value)


def _security(args: argparse.Namespace) -> ClientSecurity:
    from pathlib import Path

    from loracast.errors import ConfigError
    from loracast.grpc_security import ClientSecurity, read_token_file

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
    token = args.token
    if args.token_file:
        tokens = read_token_file(Path(args.token_file))
        if len(tokens) > 1:
            raise ConfigError(f"the token file {args.token_file} holds {len(tokens)} tokens: a client sends one")
        [token] = tokens
    return ClientSecurity(
        tls_ca=Path(args.tls_ca) if args.tls_ca else None,
        client_cert=Path(args.tls_cert) if args.tls_cert else None,
        client_key=Path(args.tls_key) if args.tls_key else None,
        token=token,
    )


def cmd_ask(args: argparse.Namespace) -> None:
    import dataclasses
    import json
    import sys

    from edge_client.client import Done, EdgeClient, Progress
    from loracast.errors import UserError
    from loracast.progress import InternalizationBar

    if args.budget_seconds is not None and args.doc is None:
        raise UserError("--budget-seconds is for --doc: a task's or an id's adapter needs no internalization")
    options = {
        "task": args.task,
        "document": _read(args.doc, "--doc") if args.doc is not None else None,
        "budget_seconds": args.budget_seconds,
        "mode": args.mode,
        "max_new_tokens": args.max_new_tokens,
    }
    printed = False
    bar = InternalizationBar()
    source = "task" if args.task is not None else "document" if args.doc is not None else "id"
    log.debug("asking the worker at %s, the adapter by %s", args.worker, source)

    def show(p: Progress) -> None:
        bar.update(p.phase, p.step, p.probe_loss, p.elapsed_seconds, p.estimate_seconds)

    try:
        with EdgeClient(args.worker, _security(args)) as client, bar:
            options["adapter_id"] = client.resolve_adapter_id(args.adapter) if args.adapter is not None else None
            if args.json:
                answer = client.ask(args.question, **options, on_progress=show)
                result = {
                    "answer": answer.text,
                    "adapter_id": answer.adapter_id,
                    "resident": answer.resident,
                    "tokens": answer.tokens,
                    "timings": dataclasses.asdict(answer.timings),
                }
                print(json.dumps(result, ensure_ascii=False))
                return
            for event in client.stream(args.question, **options):
                if isinstance(event, Progress):
                    show(event)
                    continue
                bar.close()  # the answer starts below the finished bar
                if isinstance(event, str):
                    sys.stdout.write(event)
                    sys.stdout.flush()
                    printed = True
                elif isinstance(event, Done):
                    print()
                    t = event.timings
                    log.debug(
                        "%d tokens; at the worker %.2f s, first token %.2f s",
                        event.tokens,
                        t.total_seconds,
                        t.first_token_seconds,
                    )
                    printed = False
    except UserError:
        if printed:  # end the partial answer's line so the error stands on its own
            print()
        raise
    except KeyboardInterrupt:  # Ctrl-C stops a streaming answer: the shell's status for it, not a traceback
        raise SystemExit(130) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a worker; the answer streams to stdout as it is decoded")
    p.add_argument("--worker", required=True, metavar="HOST:PORT", help="the worker's gRPC address")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", metavar="TEXT", help="a task description: its adapter is made or cached")
    source.add_argument("--doc", metavar="FILE", help="a UTF-8 document: its facts become an adapter (not stored)")
    source.add_argument(
        "--adapter",
        metavar="ID",
        help="an adapter already known by id: all 64 hex digits, or a prefix (4 or more) of one resident on the worker",
    )
    p.add_argument(
        "--mode",
        choices=["hot-swap", "merged"],
        default="hot-swap",
        help="hot-swap: LoRA as graph inputs (instant switch); merged: folded into the weights (faster per token)",
    )
    add_budget_flag(p, "the coordinator's")
    p.add_argument("--max-new-tokens", type=_count, default=0, metavar="N", help="0: the worker's default")
    p.add_argument("--json", action="store_true", help="print one JSON object: answer, adapter, tokens, timings")
    p.add_argument("--tls-ca", metavar="FILE", help="connect with TLS, trusting this CA")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="FILE", help="client key (mutual TLS)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (visible in the process list: prefer --token-file)")
    token.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("question", help="the user turn")
    p.set_defaults(func=cmd_ask)
