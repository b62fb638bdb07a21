"""One logging setup for every `loracast` process: a UTC timestamp, the level and the logger's name on each line, to
stderr.

Modules log through `logging.getLogger(__name__)`; a process calls `configure_logging` once, at its start (the
`loracast` command does, with its `--log-level`). Nothing logged may hold a document's text or a prompt: ids,
sizes, counts, timings and the reasons for errors only.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "info"
FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
# The top-level packages of this repository ("__main__": one of its modules run as a script), which `--log-level`
# is for. Other libraries (gRPC, Hugging Face, urllib3) show WARNING and above only, so that `--log-level debug`
# shows LoraCast's own detail rather than every HTTP request a library makes.
PACKAGES = frozenset(
    {"loracast", "loracast_cli", "coordinator", "worker", "edge_client", "hypernet", "bench", "__main__"}
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (a test's capture, a redirected stream), never to a
    stream that was replaced and closed since the setup."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _shown(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.partition(".")[0] in PACKAGES


def configure_logging(level: str = DEFAULT_LEVEL) -> None:
    """Log to stderr in the one format: this repository's records at `level` (one of LEVELS) and above, other
    libraries' at WARNING and above. Calling it again replaces the earlier setup; other handlers (a test's
    capture) are left as they are."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: choose one of {', '.join(LEVELS)}")
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    formatter.converter = time.gmtime  # lines from machines in different time zones sort together
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    handler.addFilter(_shown)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
