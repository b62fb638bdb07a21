"""The base model as the worker runs it: exported to ONNX once, then found again without torch.

    <cache root>/onnx/<base fingerprint>/model.onnx   the exported graph (`worker.onnx_export`, needs torch)
    <cache root>/onnx/<base fingerprint>/tokenizer*   the tokenizer and chat template (`worker.chat`)
    <cache root>/onnx/index.json                      base name or directory -> fingerprint, and a stamp of
                                                      the source's weight files (a changed model re-exports)

An exported directory is self-contained: copy it to a device and serve it with `--model DIR`, no torch there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loracast.paths import DEFAULT_BASE, cache_root
from worker import onnx_io

MODEL_FILE = "model.onnx"
INDEX_FILE = "index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


class ModelError(RuntimeError):
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


def check_exported(directory: Path) -> Path:
    """`directory` if it holds an exported model (the graph and the tokenizer files), else ModelError."""
    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file() or not (directory / TOKENIZER_FILES[0]).is_file():
        raise ModelError(
            f"{directory} is not an exported model directory (needs {MODEL_FILE} and {TOKENIZER_FILES[0]})"
        )
    return directory


def find(base: str, root: Path | None = None) -> Path | None:
    """The directory of the cached export of `base` ('smollm2' or a Hugging Face directory), or None.

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
    import onnx

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
        graph = onnx.load(str(work / MODEL_FILE), load_external_data=False)
        fingerprint = {p.key: p.value for p in graph.metadata_props}[onnx_io.META_FINGERPRINT]
        target = root / fingerprint
        if not (target / MODEL_FILE).is_file():  # another process may have exported the same model meanwhile
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
