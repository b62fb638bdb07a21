"""gRPC security, opt-in per flag, and the client channel that applies it.

A server certificate turns on TLS, a client CA on top of it requires mutual TLS, and bearer tokens require
`authorization: Bearer <token>` metadata on every call except health checks (so orchestrators can probe without a
secret; the server side of the check is `loracast.grpc_server`'s interceptor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from loracast.errors import ConfigError

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a data chunk is at most 1 MiB; documents arrive as a stream
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class ServerSecurity:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # set: clients must present a certificate signed by this CA (mutual TLS)
    tokens: frozenset[str] = field(default_factory=frozenset)

    def credentials(self) -> grpc.ServerCredentials | None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_cert is None:
            if self.client_ca is not None:
                raise ConfigError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
            return None
        pair = (_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))
        ca = _read(self.client_ca, "client CA")
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientSecurity:
    tls_ca: Path | None = None  # set: connect with TLS, trusting this CA
    client_cert: Path | None = None
    client_key: Path | None = None
    token: str | None = None


def open_channel(
    target: str, security: ClientSecurity | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to `target` (HOST:PORT, or any gRPC target) with TLS, a client certificate and a bearer token as
    configured; `options` add channel arguments (a service config, say)."""
    security = security or ClientSecurity()
    options = [*CHANNEL_OPTIONS, *options]
    if security.tls_ca is None:
        if security.client_cert is not None:
            raise ConfigError("a client certificate needs TLS: add the server's CA")
        channel = grpc.insecure_channel(target, options=options)
    else:
        creds = grpc.ssl_channel_credentials(
            _read(security.tls_ca, "CA certificate"),
            _read(security.client_key, "client key"),
            _read(security.client_cert, "client certificate"),
        )
        channel = grpc.secure_channel(target, creds, options=options)
    if security.token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(security.token))
    return channel


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def read_token_file(path: Path) -> frozenset[str]:
    """The bearer tokens in a file, one a line (blank lines ignored), so tokens stay off command lines."""
    try:  # metadata values are ASCII
        tokens = frozenset(line.strip() for line in _read(path, "token file").decode("ascii").splitlines()) - {""}
    except UnicodeDecodeError:
        raise ConfigError(f"the token file {path} is not ASCII text") from None
    if not tokens:
        raise ConfigError(f"the token file {path} holds no token: auth would be off")
    return tokens
