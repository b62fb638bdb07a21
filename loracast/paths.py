"""The default base model's name and where LoraCast keeps files: torch-free, so every component can read them."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_BASE = "smollm2"
TEMP_SUFFIX = ".tmp"  # `.{name}.<random>.tmp`: what a crash mid-write leaves, for a store to sweep at start


def cache_root() -> Path:
    """~/.cache/loracast, or $LORACAST_CACHE: the base model, ONNX exports and adapter caches live under it."""
    return Path(os.environ.get("LORACAST_CACHE", Path.home() / ".cache" / "loracast"))


@contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write; it replaces `path` when the block ends, and is
    removed if the block raises: a crash or an interrupted run leaves the previous file, never half of a new one.

    `durable` also fsyncs the data and the directory, so the new file survives a power loss (the adapter stores).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh random name rather than mkstemp's file: the writer creates it, so it gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:  # the rename itself survives a power loss only once the directory is synced
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes | str, durable: bool = False) -> None:
    """`data` (str: as UTF-8) at `path`, atomically; `durable` as in `replacing`."""
    with replacing(path, durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(data: object, path: Path) -> None:
    """`data` as indented JSON at `path`, atomically. Evaluations and benchmarks write their results here."""
    write_file(path, json.dumps(data, indent=2) + "\n")
