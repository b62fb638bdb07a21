"""How a LoraCast server refuses a call: the status and one-line message a client sees, and when to retry.

A servicer raises `RequestError` (or an exception `abort` maps to a status); `abort` ends the call with it. Anything
else is a bug, answered INTERNAL with the traceback in the server's log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import NoReturn

import grpc

RETRY_AFTER_MS = "retry-after-ms"
log = logging.getLogger(__name__)


class MalformedRequest(ValueError):
    """A request message that does not parse as its type; raised from a client stream's request iterator (a
    servicer answers INVALID_ARGUMENT). A unary request that does not parse is refused before the servicer runs."""


class RequestError(Exception):
    """A request a server refuses: `code` and the one-line `message` go to the client (`abort`), with a
    `retry-after-ms` trailer when `retry_after_ms` is set."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


def abort(
    context: grpc.ServicerContext,
    exc: Exception,
    component: str,
    statuses: Mapping[type[Exception], grpc.StatusCode] = MappingProxyType({}),
) -> NoReturn:
    """End the call with the status an error stands for: a RequestError's own; for an exception of a type in
    `statuses`, that status and its message. Anything else is a bug: INTERNAL, the traceback logged."""
    if isinstance(exc, grpc.RpcError) and not context.is_active():  # the client left mid-stream: not a bug
        context.abort(grpc.StatusCode.CANCELLED, "the client went away")
    if isinstance(exc, RequestError):
        code, message = exc.code, exc.message
    else:
        code, message = next((code for kind, code in statuses.items() if isinstance(exc, kind)), None), str(exc)
    if code is None:
        log.error("%s: a bug answered INTERNAL", component, exc_info=exc)
        context.abort(
            grpc.StatusCode.INTERNAL, f"internal error in the {component} ({type(exc).__name__}); see its log"
        )
    log.debug("%s refused a call: %s %s", component, code.name, message)
    if isinstance(exc, RequestError) and exc.retry_after_ms:
        retry_later(context, exc.retry_after_ms, message)
    context.abort(code, message)


def retry_later(context: grpc.ServicerContext, retry_after_ms: int, message: str) -> None:
    """Refuse with RESOURCE_EXHAUSTED and a `retry-after-ms` trailer saying when to try again."""
    context.set_trailing_metadata(((RETRY_AFTER_MS, str(retry_after_ms)),))
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
