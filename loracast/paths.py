"""The default base model's name and where LoraCast keeps files: torch-free, so every component can read them."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BASE = "smollm2"


def cache_root() -> Path:
    """~/.cache/loracast, or $LORACAST_CACHE: the base model, ONNX exports and adapter caches live under it."""
    return Path(os.environ.get("LORACAST_CACHE", Path.home() / ".cache" / "loracast"))
