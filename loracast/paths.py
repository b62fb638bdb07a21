"""The default base model's name and where LoraCast keeps files: torch-free, so every component can read them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

DEFAULT_BASE = "smollm2"


def cache_root() -> Path:
    """~/.cache/loracast, or $LORACAST_CACHE: the base model, ONNX exports and adapter caches live under it."""
    return Path(os.environ.get("LORACAST_CACHE", Path.home() / ".cache" / "loracast"))


def write_json(data: object, path: Path) -> None:
    """`data` as indented JSON at `path`, atomically (a temporary file beside it, then a rename): an interrupted
    run leaves the previous result, never half of one. Evaluations and benchmarks write their results here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(f.name, path)
