"""`loracast bench`: every benchmark in one process tree, on the real base model, and the ratios they add up to.

    .venv/bin/loracast bench [--json bench/results/bench.json] [--only decode,answering] [--skip load]

Runs the sections below one after another (never two at once: they share the CPU they measure), each as a child
process that writes its own JSON (and plots) into bench/results/, then writes FILE with the headline `ratios`
(a factor where above 1 means LoraCast is better), each against its bar, a markdown report bench/results/bench.md
and bench/results/ratios.png. A section that fails is reported and the others still run; the command then exits
non-zero. Ratios compare runs made side by side in the same section; absolute times are only context.

| section | script | ratios |
|---|---|---|
| t2l_generate | bench_t2l_generate.py | (description -> adapter in memory: encoder and hypernetwork ms) |
| t2l_vs_lora | bench_t2l_vs_lora.py | t2l_vs_lora_training |
| d2l_vs_cd | bench_d2l_vs_cd.py | d2l_vs_context_distillation, the quality-time curve |
| answering | bench_d2l_answering.py | adapter_vs_in_context_latency_10q, adapter_vs_in_context_memory_2k |
| decode | bench_worker_decode.py | onnx_vs_torch_decode, onnx_vs_llamacpp_decode |
| delivery | bench_delivery.py | (description -> first token new / cached / after restart, hot-swap, streaming) |
| scaling | bench_scaling.py | (plots against rank, target modules and document length) |
| load | tests/test_load.py | (32 clients: answered / refused, p50 / p99) |
| sim_fleet | sim_fleet.py | (10,000 workers modelled on the results above; 200 replayed on 2 coordinators + Redis) |
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracast.errors import UserError
from loracast.paths import write_json
from loracast.plots import figure

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"


@dataclass(frozen=True)
class Section:
    name: str
    command: tuple[str, ...]  # after the Python interpreter
    result: str  # the JSON it writes, relative to bench/results (load: found under its pytest basetemp)


SECTIONS = (
    Section("t2l_generate", ("bench/bench_t2l_generate.py",), "t2l_generate.json"),
    Section("t2l_vs_lora", ("bench/bench_t2l_vs_lora.py",), "t2l_vs_lora.json"),
    Section("d2l_vs_cd", ("bench/bench_d2l_vs_cd.py",), "d2l_vs_cd.json"),
    Section("answering", ("bench/bench_d2l_answering.py", "--questions", "100"), "d2l_answering.json"),
    Section("decode", ("bench/bench_worker_decode.py",), "worker_decode.json"),
    Section("delivery", ("bench/bench_delivery.py",), "delivery.json"),
    Section("scaling", ("bench/bench_scaling.py",), "scaling.json"),
    Section("load", ("-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_load.py"), "load.json"),
    # Last: its model reads delivery.json, scaling.json and d2l_vs_cd.json.
    Section("sim_fleet", ("bench/sim_fleet.py",), "sim_fleet.json"),
)
SECTION_FILES = {s.name: s.result for s in SECTIONS}


@dataclass(frozen=True)
class Ratio:
    name: str
    section: str
    bar: float | None  # the acceptance bar, None where it sets a goal only
    read: Callable[[dict[str, Any]], float | None]
    meaning: str
    # Whether the value is a lower bound (the baseline never got there within its budget).
    lower_bound: Callable[[dict[str, Any]], bool] = lambda r: False


def _answering_memory(r: dict[str, Any]) -> float:
    mem = r["comparison"]["answering_peak_mb"]
    return round(mem["in_context"] / mem["adapter"], 2)


RATIOS = (
    # Train tasks only (no gradient ever touches sni/dev), which T2L was trained on: t2l_vs_lora.json also
    # holds the figure against T2L's mean score on unseen tasks.
    Ratio(
        "t2l_vs_lora_training",
        "t2l_vs_lora",
        100,
        lambda r: r["t2l_vs_lora_training"],
        "LoRA training on a task's examples until it scores what T2L scores there / T2L generation, median of tasks",
        lambda r: r["t2l_vs_lora_training_is_lower_bound"],
    ),
    Ratio(
        "d2l_vs_context_distillation",
        "d2l_vs_cd",
        5,
        lambda r: r["d2l_vs_context_distillation"],
        "seconds distillation from zero init (same probes) needs for LoraCast's score / LoraCast's default budget",
        lambda r: r["ratio_is_lower_bound"],
    ),
    Ratio(
        "onnx_vs_torch_decode",
        "decode",
        4,
        lambda r: r["onnx_vs_torch_decode"],
        "decode tokens/s, the worker's ONNX Runtime decoder / PyTorch eager",
    ),
    Ratio(
        "onnx_vs_llamacpp_decode",
        "decode",
        1,
        lambda r: r.get("onnx_vs_llamacpp_decode"),
        "decode tokens/s, the worker's ONNX Runtime decoder / llama.cpp on the same GGUF (a goal)",
    ),
    Ratio(
        "adapter_vs_in_context_latency_10q",
        "answering",
        1,
        lambda r: r["comparison"]["cumulative"]["10"]["ratio"],
        "10 questions on a 2k-token document: total seconds in context / with the adapter (incl. internalizing)",
    ),
    Ratio(
        "adapter_vs_in_context_memory_2k",
        "answering",
        1,
        _answering_memory,
        "worker peak memory answering about a 2k-token document: in context / adapter",
    ),
)


def run_section(section: Section, workdir: Path) -> dict[str, Any]:
    """Run one section as a child process (its output streams to ours) and read the JSON it wrote."""
    command = [sys.executable, *section.command]
    if section.name == "load":
        command += ["--basetemp", str(workdir / "load")]
    print(f"\n=== {section.name}: {' '.join(section.command)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT).returncode
    wall = round(time.perf_counter() - start, 1)
    found = sorted((workdir / "load").rglob(section.result)) if section.name == "load" else [RESULTS / section.result]
    ok = code == 0 and bool(found) and found[0].is_file()
    result = json.loads(found[0].read_text()) if ok else None
    if section.name == "load" and result is not None:
        write_json(result, RESULTS / section.result)  # the run's copy, beside the others
    return {"ok": ok, "exit_code": code, "wall_s": wall, "command": " ".join(section.command), "result": result}


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ratios the sections add up to, each with its bar; a ratio whose section did not run is null."""
    ratios, bars, met, lower = {}, {}, {}, {}
    for ratio in RATIOS:
        run = runs.get(ratio.section)
        value = ratio.read(run["result"]) if run and run["result"] is not None else None
        ratios[ratio.name] = value
        lower[ratio.name] = value is not None and ratio.lower_bound(run["result"])
        bars[ratio.name] = ratio.bar
        met[ratio.name] = None if value is None or ratio.bar is None else value >= ratio.bar
    return {
        "ratios": ratios,
        "bars": bars,
        "met": met,
        "lower_bound": lower,
        "meaning": {r.name: r.meaning for r in RATIOS},
        "sections": {name: {k: v for k, v in run.items() if k != "result"} for name, run in runs.items()},
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}x"


def markdown(summary: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# LoraCast benchmark",
        "",
        f"`{summary['command']}` on {summary['machine']}, {summary['date']}; {summary['wall_s'] / 60:.0f} min.",
        "Ratios: above 1 means LoraCast is better; each compares runs made side by side in one section.",
        "",
        "| ratio | value | bar | met | what |",
        "|---|---|---|---|---|",
    ]
    for name, value in summary["ratios"].items():
        met = {True: "yes", False: "**no**", None: "-"}[summary["met"][name]]
        bar, meaning = _fmt(summary["bars"][name]), summary["meaning"][name]
        value_text = (">" if summary["lower_bound"][name] else "") + _fmt(value)
        lines.append(f"| `{name}` | {value_text} | {bar} | {met} | {meaning} |")
    lines += [
        "",
        "![ratios](ratios.png)",
        "",
        "| section | ok | minutes | command | details |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary["sections"].items():
        lines.append(
            f"| {name} | {'yes' if s['ok'] else '**failed**'} | {s['wall_s'] / 60:.1f} | `python {s['command']}` | "
            f"[{SECTION_FILES[name]}]({SECTION_FILES[name]}) |"
        )
    load = runs.get("load", {}).get("result")
    if load:
        lines += [
            "",
            f"Load ({load['clients']} clients, {load['requests']} requests): {load['answered']} answered, "
            f"{load['refused']} refused with a retry hint, {load['failed']} failed "
            f"({load['calls'].get('RESOURCE_EXHAUSTED', 0)} calls refused and retried); request seconds p50 "
            f"{load['request_seconds']['p50']} p99 {load['request_seconds']['p99']}, first token p50 "
            f"{load['first_token_seconds']['p50']} p99 {load['first_token_seconds']['p99']} (tiny model).",
        ]
    plots = sorted(p.name for p in RESULTS.glob("*.png") if p.name != "ratios.png")
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    names = [n for n, v in summary["ratios"].items() if v is not None]
    values = [summary["ratios"][n] for n in names]
    with figure(path, figsize=(8, 0.6 * len(names) + 1.5), dpi=120) as ax:
        colors = ["tab:green" if summary["met"][n] is not False else "tab:red" for n in names]
        ax.barh(names, values, color=colors)
        for i, n in enumerate(names):
            if summary["bars"][n] is not None:
                ax.plot([summary["bars"][n]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
            ax.text(values[i], i, f" {values[i]:,.2f}x", va="center")
        ax.set_xscale("log")
        ax.axvline(1, color="grey", ls=":")
        ax.set_xlabel("factor, above 1 favours LoraCast (black: the bar)")
        ax.invert_yaxis()


def selected(only: list[str] | None, skip: list[str]) -> list[Section]:
    """The sections to run, checked before an hour is spent: names exist, the decode baseline is installed."""
    names = {s.name for s in SECTIONS}
    unknown = sorted((set(only or []) | set(skip)) - names)
    if unknown:
        raise UserError(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(sorted(names))}")
    sections = [s for s in SECTIONS if (only is None or s.name in only) and s.name not in skip]
    if any(s.name == "decode" for s in sections) and importlib.util.find_spec("llama_cpp") is None:
        raise UserError(
            "the decode section compares with llama.cpp: install it with `.venv/bin/pip install -e '.[bench]'` "
            "(builds for a few minutes), or pass --skip decode"
        )
    return sections


def run(json_path: Path, only: list[str] | None = None, skip: list[str] = ()) -> int:
    sections = selected(only, list(skip))
    RESULTS.mkdir(exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {s.name: run_section(s, Path(tmp)) for s in sections}
    summary = summarize(runs)
    summary |= {
        "command": "loracast bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "loracast bench",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "wall_s": round(time.time() - start, 1),
    }
    write_json(summary, json_path)
    (RESULTS / "bench.md").write_text(markdown(summary, runs))
    plot(summary, RESULTS / "ratios.png")
    print(f"\nwrote {json_path}, {RESULTS / 'bench.md'} and {RESULTS / 'ratios.png'}")
    for name, value in summary["ratios"].items():
        bar = summary["bars"][name]
        print(f"  {name:36} {_fmt(value):>12}  (bar {_fmt(bar)})")
    failed = [name for name, r in runs.items() if not r["ok"]]
    if failed:
        print(f"failed section(s): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=RESULTS / "bench.json")
    p.add_argument("--only", type=lambda s: s.split(","), help="comma-separated sections")
    p.add_argument("--skip", type=lambda s: s.split(","), default=[], help="comma-separated sections")
    args = p.parse_args()
    try:
        sys.exit(run(args.json, args.only, args.skip))
    except UserError as exc:
        sys.exit(f"bench: error: {exc}")


if __name__ == "__main__":
    main()
