"""The base model as the worker runs it: exported to ONNX once, then found again without torch.

    <cache root>/onnx/<base fingerprint>/model.onnx   the exported graph (`worker.onnx_export`, needs torch)
    <cache root>/onnx/<base fingerprint>/tokenizer*   the tokenizer and chat template (`worker.chat`)
    <cache root>/onnx/index.json                      base name or directory -> fingerprint, and a stamp of
                                                      the source's weight files (a changed model re-exports)

An exported directory is self-contained: copy it to a device and serve it with `--model DIR`, no torch there.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from loracast.errors import UserError
from loracast.paths import DEFAULT_BASE, cache_root
from worker import onnx_io

MODEL_FILE = "model.onnx"
INDEX_FILE = "index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}


class ModelError(UserError, RuntimeError):
    """No usable exported model; the message says what to run or fix."""


def onnx_root() -> Path:
    return cache_root() / "onnx"


def _key(base: str) -> str:
    return base if base == DEFAULT_BASE else str(Path(base).resolve())


def _stamp(model_dir: Path) -> list:
    """Names, sizes and mtimes of the files that define the model: a different model gets a different stamp."""
    files = [p for p in sorted(model_dir.iterdir()) if p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _read_index(root: Path) -> dict:
    try:
        index = json.loads((root / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _varint(stream: BinaryIO) -> int:
    value = shift = 0
    while byte := stream.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    raise ValueError("truncated protobuf message")


def _length_delimited(stream: BinaryIO, end: int, numbers: set[int]) -> Iterator[tuple[int, bytes]]:
    """(number, payload) of each length-delimited field in `numbers` of the protobuf message that ends at `end`;
    every other field is skipped with a seek, unread."""
    while stream.tell() < end:
        key = _varint(stream)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _varint(stream)
        elif wire_type == 2:
            size = _varint(stream)
            if number in numbers:
                yield number, stream.read(size)
            else:
                stream.seek(size, os.SEEK_CUR)
        elif wire_type in (1, 5):
            stream.seek(8 if wire_type == 1 else 4, os.SEEK_CUR)
        else:
            raise ValueError(f"not an ONNX model (protobuf wire type {wire_type})")


def graph_metadata(graph: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file without parsing its graph: `onnx.load` of a 500 MB model takes a second
    and twice its size in memory, on every worker start. Raises OSError or ValueError."""
    metadata = {}
    with open(graph, "rb") as stream:
        end = stream.seek(0, os.SEEK_END)
        stream.seek(0)
        for _, entry in _length_delimited(stream, end, {_METADATA_PROPS}):
            fields = dict(_length_delimited(io.BytesIO(entry), len(entry), {1, 2}))
            metadata[fields.get(1, b"").decode()] = fields.get(2, b"").decode()
    return metadata


def check_exported(directory: Path) -> Path:
    """`directory` if it holds an export this worker runs (the graph at this io version, and the tokenizer files),
    else ModelError."""
    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file() or not (directory / TOKENIZER_FILES[0]).is_file():
        raise ModelError(
            f"{directory} is not an exported model directory (needs {MODEL_FILE} and {TOKENIZER_FILES[0]})"
        )
    try:
        version = graph_metadata(directory / MODEL_FILE).get(onnx_io.META_VERSION)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{directory / MODEL_FILE} cannot be read as an ONNX model: {exc}") from exc
    if version != onnx_io.IO_VERSION:
        raise ModelError(
            f"{directory} holds an export with graph io version {version}, this worker runs version "
            f"{onnx_io.IO_VERSION}: export it again (`loracast worker serve --base ...` where torch is installed)"
        )
    return directory


def find(base: str, root: Path | None = None) -> Path | None:
    """The directory of the cached export of `base` ('smollm2' or a Hugging Face directory), or None: also when the
    source model changed since, or the export was made for another graph io version (`prepare` exports it again).

    Never imports torch.
    """
    root = root or onnx_root()
    entry = _read_index(root).get(_key(base))
    if not isinstance(entry, dict):
        return None
    try:
        if _stamp(Path(entry["model_dir"])) != entry["stamp"]:
            return None
        return check_exported(root / entry["fingerprint"])
    except (OSError, KeyError, TypeError, ModelError):
        return None


def export(base: str, root: Path | None = None) -> Path:
    """Export `base` to ONNX under `root` and record it in the index (imports torch: the one-time step)."""
    if base != DEFAULT_BASE and not (Path(base) / "config.json").is_file():  # say so before a slow torch import
        raise ModelError(f"base model {base!r}: no config.json there; give 'smollm2' or a Hugging Face model directory")
    try:
        from loracast import base_model
        from worker import onnx_export
    except ImportError as exc:
        raise ModelError(
            f"no exported model for base {base!r} and no torch here to export it ({exc}): export it where torch is "
            "installed (`loracast worker serve --base ...` once) and pass the directory with --model"
        ) from exc
    root = root or onnx_root()
    try:
        model_dir = base_model.resolve(base)
    except base_model.BaseModelError as exc:
        raise ModelError(str(exc)) from exc
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".export.") as tmp:
        work = Path(tmp) / "model"
        onnx_export.export(model_dir, work / MODEL_FILE)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, work / name)
        fingerprint = graph_metadata(work / MODEL_FILE)[onnx_io.META_FINGERPRINT]
        target = root / fingerprint
        try:  # another process may have exported the same model meanwhile
            check_exported(target)
        except ModelError:  # none there, or one for another io version
            shutil.rmtree(target, ignore_errors=True)
            os.replace(work, target)
    index = _read_index(root)
    index[_key(base)] = {"fingerprint": fingerprint, "model_dir": str(model_dir), "stamp": _stamp(model_dir)}
    tmp_index = root / f".{INDEX_FILE}.tmp{os.getpid()}"
    tmp_index.write_text(json.dumps(index, indent=2, sort_keys=True))
    os.replace(tmp_index, root / INDEX_FILE)
    return target


def prepare(base: str, root: Path | None = None) -> Path:
    """The exported model directory for `base`: the cached one, or a fresh export in a child process, so the
    serving process never holds torch in memory, not even on its first start."""
    root = root or onnx_root()
    found = find(base, root)
    if found is not None:
        return found
    done = subprocess.run([sys.executable, "-m", __name__, base, str(root)], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    if done.returncode == 2:
        raise ModelError(lines[-1])
    if done.returncode != 0:
        raise ModelError(f"the ONNX export of {base!r} failed (exit {done.returncode}): {lines[-1] if lines else ''}")
    return Path(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # `prepare`'s child: export, print the directory; a ModelError is one line, exit 2
    try:
        print(export(sys.argv[1], Path(sys.argv[2])))
    except ModelError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
