"""Adapter ids as people type them: the full id, or a prefix of it that names one adapter, as git takes commit ids.

Output shortens ids to a prefix (they are 64 hex digits); the commands that take an id take that prefix back.
Torch- and numpy-free: `loracast ask` resolves prefixes on edge devices that have only grpcio.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from loracast.errors import UserError

FULL_LENGTH = 64
# Shorter prefixes would match by accident as soon as a few adapters are resident.
MIN_PREFIX = 4
_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},{FULL_LENGTH}}}")


class AdapterIdError(UserError):
    """An id that is no id, or a prefix that names no adapter or several."""


def resolve(given: str, known: Callable[[], Iterable[str]], where: str, if_unknown: str) -> str:
    """The full id `given` stands for. A full id is returned as it is, without calling `known`: it may name an
    adapter known elsewhere (the coordinator). A prefix must start exactly one of the ids `known` returns.

    `where` says where those ids are ("resident on the worker at HOST:PORT"); `if_unknown` what to do when the
    prefix starts none of them.
    """
    prefix = given.strip().lower()
    if not _PREFIX.fullmatch(prefix):
        raise AdapterIdError(
            f"adapter id {given[:80]!r} is not an id: give its {FULL_LENGTH} hex digits, or at least {MIN_PREFIX}"
            " of them that start only it"
        )
    if len(prefix) == FULL_LENGTH:
        return prefix
    matches = sorted({adapter_id for adapter_id in known() if adapter_id.startswith(prefix)})
    if not matches:
        raise AdapterIdError(f"no adapter {where} starts with {prefix}: {if_unknown}")
    if len(matches) > 1:
        shown = ", ".join(f"{m[: len(prefix) + 4]}…" for m in matches[:5])
        more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
        raise AdapterIdError(f"{len(matches)} adapters {where} start with {prefix} ({shown}{more}): give more digits")
    return matches[0]
