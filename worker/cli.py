"""`loracast worker serve | export`: the edge worker's commands.

Imports stay inside the commands, so `loracast --help` stays instant and `loracast worker serve` never loads torch:
an edge device serving an exported model needs only ONNX Runtime. Bad options raise a UserError, which `loracast`
prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loracast.server_flags import add_security_flags, optional_path


def _cache_dir(args: argparse.Namespace) -> Path:
    from loracast.paths import cache_root

    return Path(args.cache_dir) if args.cache_dir else cache_root() / "worker"


def cmd_serve(args: argparse.Namespace) -> None:
    from loracast.errors import ConfigError
    from loracast.grpc_security import ClientSecurity, read_token_file
    from loracast.grpc_server import wait_for_signal
    from loracast.server_flags import server_security
    from worker.server import WorkerConfig, start

    coordinator_token = args.coordinator_token
    if args.coordinator_token_file:
        coordinator_token, *more = read_token_file(Path(args.coordinator_token_file))
        if more:
            raise ConfigError(f"{args.coordinator_token_file} holds {1 + len(more)} tokens: a client sends one")
    security = server_security(args)
    coordinator_security = ClientSecurity(
        tls_ca=optional_path(args.coordinator_ca),
        client_cert=optional_path(args.coordinator_cert),
        client_key=optional_path(args.coordinator_key),
        token=coordinator_token,
    )
    config = WorkerConfig(
        cache_dir=_cache_dir(args),
        coordinator=args.coordinator,
        coordinator_security=coordinator_security,
        listen=args.listen,
        metrics_port=args.metrics_port,
        capacity_bytes=int(args.capacity_mb * 2**20),
        base=args.base,
        model_dir=optional_path(args.model),
        max_new_tokens=args.max_new_tokens,
        max_concurrent_answers=args.max_concurrent_answers,
        intra_op_threads=args.threads,
        int8_activations=args.int8_activations,
        security=security,
    )
    try:
        running = start(config)
    except OSError as exc:  # a file or directory the options name, unusable in a way no check foresaw
        where = f"{exc.filename}: " if exc.filename else ""
        raise ConfigError(
            f"{where}{exc.strerror or exc}: check --cache-dir, --model and $LORACAST_CACHE (the ONNX export's home)"
        ) from exc
    wait_for_signal(running.ready_line(), running.stop)


def cmd_export(args: argparse.Namespace) -> None:
    from google.protobuf.message import DecodeError

    from loracast import adapter_ids
    from loracast.adapter_wire import WireError
    from loracast.errors import UserError
    from worker import model_cache
    from worker.adapter_store import installed_ids, read_installed
    from worker.onnx_session import OnnxDecoder

    model_dir = model_cache.check_exported(args.model) if args.model else model_cache.find(args.base)
    if model_dir is None:
        raise model_cache.ModelError(
            f"no exported model for base {args.base!r}: run `loracast worker serve --base {args.base}` once"
        )
    decoder = OnnxDecoder(model_dir / model_cache.MODEL_FILE)
    cache_dir = _cache_dir(args)
    fetch_first = "fetch it first (Prefetch, or one Generate)"
    adapter_id = adapter_ids.resolve(args.adapter, lambda: installed_ids(cache_dir), f"in {cache_dir}", fetch_first)
    try:
        resident = read_installed(cache_dir, adapter_id, decoder.fingerprint or "")
    except FileNotFoundError:
        raise UserError(f"adapter {adapter_id} is not resident in {cache_dir}: {fetch_first}") from None
    except (WireError, DecodeError, OSError) as exc:
        raise UserError(f"adapter {adapter_id} cannot be used: {exc}") from exc
    try:
        out = decoder.export_merged(resident.adapter, resident.spec, Path(args.out), adapter_id=adapter_id)
    except OSError as exc:
        raise UserError(f"cannot write --out {args.out}: {exc.strerror or exc}: give a writable file path") from exc
    print(f"wrote {out} (adapter {adapter_id[:12]}… merged into base {decoder.fingerprint[:12]}…)")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="adapter cache directory (default: $LORACAST_CACHE/worker)")
    p.add_argument(
        "--base", default="smollm2", help="'smollm2' or a Hugging Face model directory (its cached ONNX export)"
    )
    p.add_argument("--model", help="an exported model directory (model.onnx + tokenizer) instead of --base")


def add_parser(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="the edge worker: generation with adapters in ONNX Runtime")
    commands = worker.add_subparsers(dest="worker_command", required=True)

    s = commands.add_parser("serve", help="serve Generate / ListAdapters / Prefetch over gRPC until SIGTERM")
    s.add_argument("--listen", default="127.0.0.1:50052", help="HOST:PORT (port 0 picks a free one)")
    s.add_argument(
        "--coordinator",
        help="HOST:PORT of the coordinator, several comma-separated, or dns:///NAME:PORT: round-robin over the healthy"
        " ones (without: resident adapters and base only)",
    )
    s.add_argument("--metrics-port", type=int, default=9465, help="Prometheus /metrics port (0 picks a free one)")
    s.add_argument("--capacity-mb", type=float, default=256.0, help="adapter cache size on disk")
    _model_options(s)
    s.add_argument("--max-new-tokens", type=int, default=512, help="the most tokens a request may ask for")
    s.add_argument(
        "--max-concurrent-answers",
        type=int,
        default=2,
        help="Generate calls decoding at once; more get RESOURCE_EXHAUSTED",
    )
    s.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per run (0: one per core)")
    s.add_argument(
        "--int8-activations",
        action="store_true",
        help="LOSSY, faster decoding: the 4-bit linears quantize their activations to int8 (MatMulNBits "
        "accuracy_level 4). Measured on smollm2: perplexity +0.66%%, 96%% of next-token argmaxes and 15%% of "
        "128-token greedy tokens same as exact (first divergence ~10-30 tokens). Default: exact float32 activations",
    )
    add_security_flags(s)
    s.add_argument("--coordinator-ca", help="connect to the coordinator with TLS, trusting this CA")
    s.add_argument("--coordinator-cert", help="client certificate for the coordinator (mutual TLS)")
    s.add_argument("--coordinator-key", help="the client certificate's private key")
    s.add_argument("--coordinator-token", help="bearer token sent to the coordinator")
    s.add_argument("--coordinator-token-file", help="file holding the coordinator's bearer token")
    s.set_defaults(func=cmd_serve)

    e = commands.add_parser("export", help="write a standalone .onnx with a resident adapter merged in")
    e.add_argument(
        "--adapter",
        required=True,
        help="id of a resident adapter (see ListAdapters), or its first 4 or more hex digits",
    )
    e.add_argument("--out", required=True, help="the .onnx file to write")
    _model_options(e)
    e.set_defaults(func=cmd_export)
