"""The machine's memory bandwidth, STREAM-like: what a memory-bound decoder can read per second at most.

    .venv/bin/python bench/bench_memory_bandwidth.py [--sizes-mb 64,128,256,512] [--threads 1,2] [--repeats 10]
                                                     [--json PATH]

Kernels of McCalpin's STREAM on float32 numpy arrays, each run on `threads` contiguous slices of the arrays at
once (a thread pool; numpy lets go of the GIL inside these loops), best of `repeats`, bytes counted as STREAM
counts them (what the kernel reads plus what it writes, no write-allocate traffic):

- read:  s = OR of a's words     4 B per element (what a decoder does with its weights: read them once; an OR
                                 of 64-bit words, not a float sum: numpy's pairwise float sum is compute bound
                                 at ~15 GB/s a core here, the OR reads 20)
- copy:  b = a                   8 B
- scale: b = q a                 8 B
- add:   c = a + b              12 B
- triad: a = b + q c            12 B (numpy needs two passes: the temporary is in cache, the arrays are not)

Sizes are MB per array; the machine's last-level cache is read from sysfs and recorded. `limit_gb_s` is the best read
rate at the largest thread count over the arrays at least 4x that cache (smaller ones partly stay in it): DRAM's, the
bandwidth limit of a decoder whose weights do not fit in cache, which `bench/bench_edge_decode.py` divides each
engine's bytes per token by. Writes bench/results/memory_bandwidth.json (or --json PATH) and prints a table.
In-process: `measure(sizes_mb, threads, repeats)` returns the JSON's dict.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from loracast.paths import write_json

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_JSON = RESULTS / "memory_bandwidth.json"
Q = np.float32(3.0)

# kernel -> (bytes moved per element, function of the slices (a, b, c) and a per-thread scratch row)
KERNELS: dict[str, tuple[int, Callable[[np.ndarray, np.ndarray, np.ndarray], object]]] = {
    "read": (4, lambda a, b, c: np.bitwise_or.reduce(a.view(np.uint64))),
    "copy": (8, lambda a, b, c: np.copyto(b, a)),
    "scale": (8, lambda a, b, c: np.multiply(a, Q, out=b)),
    "add": (12, lambda a, b, c: np.add(a, b, out=c)),
    "triad": (12, lambda a, b, c: np.add(b, np.multiply(c, Q, out=a), out=a)),
}


def l3_bytes() -> int | None:
    """The largest cache of CPU 0 in bytes, from sysfs (Linux), else None."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes) if sizes else None


def _best_rate(
    kernel: str, arrays: tuple[np.ndarray, ...], threads: int, pool: ThreadPoolExecutor, repeats: int
) -> float:
    """Best GB/s (1e9 bytes) of one kernel over `repeats` runs, each thread on its contiguous slice of the arrays."""
    per_element, fn = KERNELS[kernel]
    n = arrays[0].size
    bounds = 2 * np.linspace(0, n // 2, threads + 1).astype(int)  # even: the read kernel views pairs as uint64
    slices = [tuple(x[lo:hi] for x in arrays) for lo, hi in itertools.pairwise(bounds)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for future in [pool.submit(fn, *part) for part in slices]:
            future.result()
        best = min(best, time.perf_counter() - start)
    return per_element * n / best / 1e9


def measure(sizes_mb: list[int], threads: list[int], repeats: int) -> dict:
    """GB/s of every kernel at every (array size, thread count), and the limit (best read at the most threads)."""
    rates: dict[str, dict[str, dict[str, float]]] = {}
    with ThreadPoolExecutor(max(threads)) as pool:
        for size in sizes_mb:
            n = size * 2**20 // 4
            arrays = tuple(np.full(n, v, np.float32) for v in (1.0, 2.0, 0.5))  # touched: pages are resident
            for t in threads:
                rates.setdefault(str(t), {})[str(size)] = {
                    kernel: round(_best_rate(kernel, arrays, t, pool, repeats), 2) for kernel in KERNELS
                }
            del arrays
    most = str(max(threads))
    llc = l3_bytes()
    # Arrays at least 4x the last-level cache: a sweep over them finds (nearly) nothing left in cache.
    dram = [str(size) for size in sizes_mb if llc is None or size * 2**20 >= 4 * llc] or [str(max(sizes_mb))]
    limit = max(rates[most][size]["read"] for size in dram)
    return {
        "limit_gb_s": limit,
        "limit_is": f"best read rate over arrays of {', '.join(dram)} MB (>= 4x the last-level cache), {most} threads",
        "gb_s": rates,
        "sizes_mb": sizes_mb,
        "threads": threads,
        "repeats": repeats,
        "bytes_per_element": {kernel: per for kernel, (per, _) in KERNELS.items()},
        "last_level_cache_bytes": llc,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "load_average": round(os.getloadavg()[0], 2),
        "numpy": np.__version__,
    }


def print_report(result: dict) -> None:
    print(f"\nmemory bandwidth limit: {result['limit_gb_s']} GB/s ({result['limit_is']}); "
          f"L3 {result['last_level_cache_bytes']} B; load average {result['load_average']}\n")  # fmt: skip
    kernels = list(result["bytes_per_element"])
    print("| threads | MB per array | " + " | ".join(f"{k} GB/s" for k in kernels) + " |")
    print("|---|---|" + "---|" * len(kernels))
    for t, by_size in result["gb_s"].items():
        for size, by_kernel in by_size.items():
            print(f"| {t} | {size} | " + " | ".join(str(by_kernel[k]) for k in kernels) + " |")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=_ints, default=[64, 128, 256, 512, 1024], help="MB per array, comma separated")
    p.add_argument("--threads", type=_ints, default=sorted({1, os.cpu_count() or 1}), help="comma separated")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args()
    result = measure(args.sizes_mb, args.threads, args.repeats)
    write_json(result, args.json)
    print_report(result)


if __name__ == "__main__":
    main()
