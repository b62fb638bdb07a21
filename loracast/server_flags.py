"""The flags both servers take (`coordinator serve`, `worker serve`), defined once with their meaning.

Imports nothing heavy at module level: the CLI builds its parsers on every start.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loracast.grpc_security import ServerSecurity


def optional_path(value: str | None) -> Path | None:
    """A flag's path, or None when the flag was not given."""
    return Path(value) if value else None


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--client-ca", help="require client certificates signed by this CA (mutual TLS)")
    parser.add_argument(
        "--token", action="append", default=[], help="accepted bearer token (repeatable; see --token-file)"
    )
    parser.add_argument(
        "--token-file", help="file of accepted bearer tokens, one a line (keeps them off the command line)"
    )


def server_security(args: argparse.Namespace) -> ServerSecurity:
    """The `ServerSecurity` the flags of `add_security_flags` ask for; a bad token file raises ConfigError."""
    from loracast.grpc_security import ServerSecurity, read_token_file

    tokens = frozenset(args.token) | (read_token_file(Path(args.token_file)) if args.token_file else frozenset())
    return ServerSecurity(
        tls_cert=optional_path(args.tls_cert),
        tls_key=optional_path(args.tls_key),
        client_ca=optional_path(args.client_ca),
        tokens=tokens,
    )
