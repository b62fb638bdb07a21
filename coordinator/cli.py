"""`loracast coordinator serve`: the coordinator's command.

Imports stay inside the command, so `loracast --help` stays instant.
"""

from __future__ import annotations

import argparse

from loracast.paths import DEFAULT_BASE  # torch-free, like everything imported at this level
from loracast.progress import add_budget_flag
from loracast.server_flags import add_security_flags, optional_path


def cmd_serve(args: argparse.Namespace) -> None:
    """Configuration errors raise a UserError (ConfigError, CheckpointError, ...): `loracast` prints it as one line
    and exits with status 2."""
    from coordinator.server import CoordinatorConfig, default_cache_dir, start
    from hypernet.checkpoint import DEFAULT_D2L, DEFAULT_T2L
    from loracast.errors import ConfigError
    from loracast.grpc_server import wait_for_signal
    from loracast.server_flags import server_security

    config = CoordinatorConfig(
        cache_dir=optional_path(args.cache_dir) or default_cache_dir(),
        store=args.store,
        listen=args.listen,
        metrics_port=args.metrics_port,
        t2l_checkpoint=optional_path(args.checkpoint) or DEFAULT_T2L,
        d2l_checkpoint=optional_path(args.d2l_checkpoint) or DEFAULT_D2L,
        base=args.base,
        max_concurrent_passes=args.max_concurrent_passes,
        max_document_bytes=round(args.max_document_mb * 2**20),
        budget_seconds=args.budget_seconds,
        cache_capacity_bytes=round(args.capacity_mb * 2**20),
        security=server_security(args),
    )
    try:
        running = start(config)
    except OSError as exc:  # a file or directory the configuration names, unreadable in a way no check foresaw
        raise ConfigError(str(exc)) from exc
    wait_for_signal(running.ready_line(), running.stop)


def add_parser(sub: argparse._SubParsersAction) -> None:
    coordinator = sub.add_parser("coordinator", help="the coordinator: hypernetworks, adapter cache, adapter streams")
    commands = coordinator.add_subparsers(dest="coordinator_command", required=True)

    s = commands.add_parser("serve", help="serve the Coordinator gRPC service until SIGTERM")
    s.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0 picks a free one)")
    s.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0 picks a free one)")
    s.add_argument(
        "--store",
        help="redis://HOST:PORT/DB: the adapter store every coordinator of a cluster shares (default: --cache-dir)",
    )
    s.add_argument("--cache-dir", help="the local adapter store's directory (default: $LORACAST_CACHE/coordinator)")
    s.add_argument(
        "--capacity-mb", type=float, default=4096.0, help="adapter store size (with --store: the cluster's, shared)"
    )
    s.add_argument("--checkpoint", help="Text-to-LoRA checkpoint (default: the shipped one)")
    s.add_argument(
        "--d2l-checkpoint", help="Doc-to-LoRA checkpoint (default: the shipped one if any; without, no documents)"
    )
    s.add_argument("--base", default=DEFAULT_BASE, help="'smollm2' or a Hugging Face model directory")
    s.add_argument(
        "--max-concurrent-passes",
        "--max-concurrent",  # its first name, kept for existing command lines
        type=int,
        default=2,
        help="hypernetwork passes in flight (a wait for another coordinator's is one); more get RESOURCE_EXHAUSTED",
    )
    s.add_argument("--max-document-mb", type=float, default=1.0, help="the largest document InternalizeDocument takes")
    add_budget_flag(s, "the Doc-to-LoRA maker's own; for a document whose request names none, more for a long one")
    add_security_flags(s)
    s.set_defaults(func=cmd_serve)
