"""Figures for benchmarks: matplotlib (the dev extra) drawn headless, and written whole or not at all."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loracast.paths import replacing


@contextmanager
def figure(path: Path, *grid: int, dpi: int = 110, **subplots: Any) -> Iterator[Any]:
    """The axes of `plt.subplots(*grid, **subplots)` for the block to draw on; then the figure is saved to
    `path` (format from its suffix), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield axes
        fig.tight_layout()
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
