"""Starting LoraCast servers as processes: the command lines, and waiting for their ready line.

One definition serves the local demo, the system test and docker-compose.yml (a test checks that the compose
file runs exactly these command lines).
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from loracast.errors import UserError

LORACAST = Path(sys.executable).with_name("loracast")


class LaunchError(UserError):
    """A server exited or stayed silent before it was ready; the message holds the end of its log."""


def coordinator_argv(
    *, listen: str, metrics_port: int, cache_dir: str, base: str, checkpoint: str, store: str | None = None
) -> list[str]:
    """`loracast` arguments for the coordinator (`store`: a Redis URL shared by a cluster; None: `cache_dir`)."""
    store_flag = [] if store is None else ["--store", store]
    return [
        "coordinator",
        "serve",
        "--listen",
        listen,
        "--metrics-port",
        str(metrics_port),
        "--cache-dir",
        cache_dir,
        "--base",
        base,
        "--checkpoint",
        checkpoint,
        *store_flag,
    ]


def worker_argv(
    *, listen: str, coordinator: str, metrics_port: int, cache_dir: str, capacity_mb: int, base: str
) -> list[str]:
    """`loracast` arguments for a worker."""
    return [
        "worker",
        "serve",
        "--listen",
        listen,
        "--coordinator",
        coordinator,
        "--metrics-port",
        str(metrics_port),
        "--cache-dir",
        cache_dir,
        "--capacity-mb",
        str(capacity_mb),
        "--base",
        base,
    ]


def ready_pattern(component: str) -> str:
    """The one line a server prints when it serves; groups `grpc` (HOST:PORT) and `metrics` (port)."""
    return rf"loracast {component} ready: grpc=(?P<grpc>\S+:\d+) metrics=http://\S+:(?P<metrics>\d+)/metrics"


class ServerProcess:
    """A server started as a process; its stdout is read on a thread so that waiting for a line can time out."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.stderr_path = Path(log_dir) / f"{name}.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    @classmethod
    def loracast(cls, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> ServerProcess:
        return cls(name, [str(LORACAST), *args], log_dir, env)

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise LaunchError(
                    f"{self.name} printed no line like {pattern!r} in {timeout:.0f} s: {seen}\n{self.stderr()}"
                ) from None
            if line is None:
                code = self.proc.wait()
                raise LaunchError(f"{self.name} exited ({code}) before its ready line: {seen}\n{self.stderr()}")
            if match := re.fullmatch(pattern, line):
                return match
            seen.append(line)

    def wait_ready(self, component: str, timeout: float) -> re.Match:
        return self.wait_for_line(ready_pattern(component), timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code; a server that does not stop in time is killed and LaunchError raised."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LaunchError(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM\n{self.stderr()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
