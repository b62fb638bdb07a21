"""A document's internalization on the command line: the `--budget-seconds` flag and the progress bar on stderr.

Shared by `loracast ask` (progress from the worker's stream), `loracast generate` (from the adapter maker itself) and
`loracast coordinator serve` (the flag only). Imports nothing heavy at module level: every `loracast` command builds
its parsers, and an edge device runs `ask` without PyTorch.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"the budget must be 0 seconds or more, not {value}")
    return seconds


def add_budget_flag(parser: argparse.ArgumentParser, default_help: str) -> None:
    """`--budget-seconds S` (None when not given): the upper bound is the adapter maker's, checked where it is known."""
    parser.add_argument(
        "--budget-seconds",
        type=_seconds,
        metavar="S",
        help=f"seconds to internalize a document, its one hypernetwork pass included; 0: that pass alone; "
        f"default: {default_help}",
    )


class InternalizationBar:
    """Seconds elapsed out of the job's current estimate, with its phase, step and probe loss. Use it as a context
    manager, so that a failed job still ends the bar's line before its error is printed."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def update(self, phase: str, step: int, probe_loss: float, elapsed_s: float, estimate_s: float) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=1.0, file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}", leave=True
            )
        # The estimate shrinks when training stops early, so the total moves with it.
        self._bar.total = max(estimate_s, elapsed_s, 1e-9)
        self._bar.n = elapsed_s
        self._bar.set_description_str(f"internalizing ({phase})", refresh=False)
        loss = "" if math.isnan(probe_loss) else f", probe loss {probe_loss:.3f}"
        self._bar.set_postfix_str(f"{elapsed_s:.1f}/{estimate_s:.1f} s, step {step}{loss}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> InternalizationBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
