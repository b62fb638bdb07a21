"""The `loracast` command line: one entry point, a subcommand per job.

Heavy imports happen inside the subcommand that needs them, so `loracast --help` is instant and
an error in one component cannot break another's commands.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

from loracast.errors import UserError
from loracast.logs import DEFAULT_LEVEL, LEVELS, configure_logging
from loracast.paths import DEFAULT_BASE, write_json
from loracast.progress import add_budget_flag

DEMO_TASKS = [
    (
        "Classify the sentiment of a product review as positive or negative. Answer with one word.",
        [
            "This blender broke after two days and the support never answered.",
            "Best headphones I have ever owned, the sound is crisp and the battery lasts forever.",
        ],
    ),
    (
        "In this task, you are given a list of integers. You need to return the same list in reverse order.",
        ["[4, 8, 15, 16, 23, 42]"],
    ),
]


def _data_dir(value: str | None) -> Path:
    from hypernet.sni_data import DataError, default_data_dir

    path = Path(value) if value else default_data_dir()
    if path is None:
        raise DataError("no training data found: pass --data DIR (see the README's 'Data' section)")
    return path


def cmd_generate(args: argparse.Namespace) -> None:
    from hypernet.checkpoint import DEFAULT_D2L, DEFAULT_T2L
    from hypernet.makers import DocToLoRAMaker, TextToLoRAMaker, check_description, read_document
    from loracast import adapter_format
    from loracast.progress import InternalizationBar

    t0 = time.perf_counter()
    # Input is checked first, so bad input fails fast, before anything is loaded or written.
    if args.document is not None:
        from loracast import base_model

        text = read_document(Path(args.document), args.max_document_bytes)
        maker = DocToLoRAMaker(Path(args.checkpoint or DEFAULT_D2L), base_model.load(args.base))
        with InternalizationBar() as bar:
            adapter = maker.internalize(
                text,
                args.budget_seconds,
                on_progress=lambda p: bar.update(p.phase, p.step, p.probe_loss, p.elapsed_s, p.estimate_s),
            )
        spec = maker.spec_for(adapter)
        out = adapter_format.save(Path(args.out), adapter, spec, args.base, maker.metadata(text))
    else:
        if args.budget_seconds is not None:
            raise UserError("--budget-seconds is for --document: a description's adapter is one pass")
        text = check_description(args.description)
        maker = TextToLoRAMaker(Path(args.checkpoint or DEFAULT_T2L))
        out = maker.save(text, Path(args.out), args.base)
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s, base {maker.fingerprint[:12]}…)")


def cmd_answer(args: argparse.Namespace) -> None:
    from hypernet.answering import answer
    from loracast import adapter_format, base_model
    from loracast.lora import inject, to_torch

    base = base_model.load(args.base)
    stored, spec, _ = adapter_format.load(Path(args.adapter), expected_fingerprint=base.fingerprint)
    adapter = to_torch(stored)
    wrappers = inject(base.model, spec)
    for question, reply in zip(args.prompt, answer(base, wrappers, adapter, args.prompt), strict=True):
        print(f"> {question}\n{reply}\n")


def cmd_train(args: argparse.Namespace) -> None:
    from hypernet import checkpoint

    default_out = {"t2l": checkpoint.DEFAULT_T2L, "mtl": checkpoint.DEFAULT_MTL, "d2l": checkpoint.DEFAULT_D2L}
    # Options left unset take the defaults of the kind's TrainArgs (the shipped runs).
    given = {
        "target_modules": tuple(args.target_modules.split(",")) if args.target_modules else None,
        "r": args.rank,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
    }
    if args.describe:  # condition (f) is a multi-task LoRA of its own, beside (c)
        default_out["mtl"] = checkpoint.DEFAULT_MTL_DESCRIBED
    common = dict(
        data_dir=_data_dir(args.data),
        out=Path(args.out) if args.out else default_out[args.kind],
        work_dir=Path(args.work_dir),
        base=args.base,
        seed=args.seed,
    )
    if args.kind == "d2l":
        from hypernet.train_d2l import TrainArgs, train

        given.update(chunk_tokens=args.chunk_tokens, chunk_scaler=args.chunk_scaler)
        targs = TrainArgs(**common, **{k: v for k, v in given.items() if v is not None})
    else:
        from hypernet.train_t2l import TrainArgs, train

        given.update(encoder=args.encoder, describe=args.describe)
        targs = TrainArgs(kind=args.kind, **common, **{k: v for k, v in given.items() if v is not None})
        if args.paraphrases is not None:  # unset keeps TrainArgs' default, the shipped file
            targs.paraphrases = None if args.paraphrases.lower() == "none" else Path(args.paraphrases)
    meta = train(targs)
    print(f"wrote {targs.out}: final loss {meta['final_loss_50']:.3f}, {meta['wall_s_this_run']} s this run")


def cmd_eval(args: argparse.Namespace) -> None:
    from hypernet import checkpoint

    if args.what == "d2l":
        from hypernet.eval_d2l import EvalArgs, evaluate, table
        from hypernet.self_distill import DistillConfig

        eargs = EvalArgs(
            data_dir=_data_dir(args.data),
            d2l_path=Path(args.checkpoint or checkpoint.DEFAULT_D2L),
            base=args.base,
            distill=DistillConfig(**({} if args.budget_seconds is None else {"budget_s": args.budget_seconds})),
            fictional=args.documents,
            composites=args.composites,
            passages=args.passages,
            needles=args.needles,
            needle_lengths=tuple(int(n) for n in args.needle_tokens.split(",")),
            curve_documents=args.curve_documents,
            budgets=tuple(float(b) for b in args.budgets.split(",")),
            threads=args.threads,
            sets=tuple(args.sets.split(",")),
        )
        result = evaluate(eargs)
    else:
        from hypernet.eval_t2l import evaluate, table

        result = evaluate(
            _data_dir(args.data),
            split=args.split,
            limit=args.limit,
            t2l_path=Path(args.checkpoint or checkpoint.DEFAULT_T2L),
            mtl_path=Path(args.mtl or checkpoint.DEFAULT_MTL),
            described_path=Path(args.mtl_described or checkpoint.DEFAULT_MTL_DESCRIBED),
            conditions=args.conditions,
            base_name=args.base,
        )
    print(table(result))
    if args.json:
        write_json(result, Path(args.json))
        print(f"wrote {args.json}")


def bench_suite() -> types.ModuleType:
    """bench/suite.py, which belongs to a source checkout rather than the installed package: found beside it."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "suite.py"
    if not path.is_file():
        raise UserError(f"no {path}: `loracast bench` runs from a clone of the repository (pip install -e .)")
    spec = importlib.util.spec_from_file_location("bench_suite", path)
    suite = sys.modules["bench_suite"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(suite)
    return suite


def cmd_bench(args: argparse.Namespace) -> None:
    suite = bench_suite()
    skip = args.skip.split(",") if args.skip else []
    code = suite.run(Path(args.json), args.only.split(",") if args.only else None, skip)
    if code:
        raise SystemExit(code)


def cmd_data(args: argparse.Namespace) -> None:
    from hypernet.sni_build import build, task_lists_from

    train_tasks, dev_tasks = task_lists_from(_data_dir(args.like))
    summary = build(Path(args.source), Path(args.out), train_tasks, dev_tasks, commit=args.commit)
    print(json.dumps(summary, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job: a coordinator and a worker on loopback, asked by description through the edge client."""
    import tempfile

    from edge_client.client import EdgeClient
    from hypernet.checkpoint import DEFAULT_T2L
    from loracast.paths import cache_root
    from loracast_cli.launch import ServerProcess, coordinator_argv, worker_argv

    demo_dir = cache_root() / "demo"  # adapter caches survive between runs: the second run shows cache hits
    with tempfile.TemporaryDirectory(prefix="loracast-demo-") as logs:
        print("starting the coordinator (loads the base model and the T2L hypernetwork) ...", flush=True)
        started: list[ServerProcess] = []
        try:
            coordinator = ServerProcess.loracast(
                "coordinator",
                coordinator_argv(
                    listen="127.0.0.1:0",
                    metrics_port=0,
                    cache_dir=str(demo_dir / "coordinator"),
                    base=args.base,
                    checkpoint=str(args.checkpoint or DEFAULT_T2L),
                ),
                Path(logs),
            )
            started.append(coordinator)
            c = coordinator.wait_ready("coordinator", args.startup_timeout)
            print(f"coordinator on {c['grpc']}; starting a worker (the first start exports the base model to ONNX)")
            worker = ServerProcess.loracast(
                "worker",
                worker_argv(
                    listen="127.0.0.1:0",
                    coordinator=c["grpc"],
                    metrics_port=0,
                    cache_dir=str(demo_dir / "worker"),
                    capacity_mb=256,
                    base=args.base,
                ),
                Path(logs),
            )
            started.append(worker)
            w = worker.wait_ready("worker", args.startup_timeout)
            print(f"worker on {w['grpc']}\n", flush=True)
            with EdgeClient(w["grpc"]) as client:
                for description, inputs in DEMO_TASKS:
                    print(f"## task: {description}")
                    for text in inputs:
                        plain = client.ask(text, max_new_tokens=args.max_new_tokens)
                        adapted = client.ask(text, task=description, max_new_tokens=args.max_new_tokens)
                        t = adapted.timings
                        print(
                            json.dumps(
                                {
                                    "input": text,
                                    "base model": plain.text,
                                    "with T2L adapter": adapted.text,
                                    "adapter": adapted.adapter_id[:16],
                                    "adapter was resident": adapted.resident,
                                    "timings_ms": {
                                        "adapter fetch (make + stream)": round(1000 * t.adapter_fetch_seconds, 1),
                                        "apply": round(1000 * t.apply_seconds, 1),
                                        "first token": round(1000 * t.first_token_seconds, 1),
                                        "total": round(1000 * t.total_seconds, 1),
                                    },
                                },
                                indent=2,
                                ensure_ascii=False,
                            )
                        )
            print(
                f"\nmetrics: coordinator http://127.0.0.1:{c['metrics']}/metrics, "
                f"worker http://127.0.0.1:{w['metrics']}/metrics (Prometheus + Grafana: docker compose up)"
            )
            if args.keep_running:
                print("servers keep running; Ctrl-C stops them", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    worker.proc.wait()
        finally:
            for process in reversed(started):
                process.terminate()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loracast", description="Text in, LoRA adapters out.")
    p.add_argument(
        "--log-level",
        choices=LEVELS,
        default=DEFAULT_LEVEL,
        help="the least severe log lines shown on stderr (servers log each adapter fetched, evicted or refused)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="description or document -> PEFT adapter directory")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--description", help="what the adapter should make the model do (Text-to-LoRA)")
    source.add_argument("--document", help="UTF-8 text file whose facts the adapter should hold (Doc-to-LoRA)")
    g.add_argument("--out", required=True, help="adapter directory to write (must not be another kind of directory)")
    g.add_argument("--checkpoint", help="T2L or D2L checkpoint (default: the shipped one)")
    g.add_argument(
        "--base",
        default=DEFAULT_BASE,
        help="base model recorded in adapter_config.json (with --document also loaded: it encodes the document)",
    )
    g.add_argument("--max-document-bytes", type=int, default=2**20, help="larger documents are refused")
    add_budget_flag(g, "the Doc-to-LoRA maker's own")
    g.set_defaults(func=cmd_generate, uses_transformers=True)

    a = sub.add_parser("answer", help="answer prompts with an adapter (greedy, chat template)")
    a.add_argument("--adapter", required=True, help="PEFT adapter directory")
    a.add_argument("--base", default=DEFAULT_BASE, help="'smollm2' or a Hugging Face model directory")
    a.add_argument("prompt", nargs="+", help="user turns, one answer each")
    a.set_defaults(func=cmd_answer, uses_transformers=True)

    t = sub.add_parser("train", help="train a hypernetwork (resumable; reproduces the shipped checkpoint)")
    t.add_argument(
        "kind",
        choices=["t2l", "mtl", "d2l"],
        help="t2l: Text-to-LoRA; mtl: the multi-task LoRA baseline; d2l: Doc-to-LoRA",
    )
    t.add_argument("--data", help="data directory holding sni/train and rc/train (default: ../shared/data)")
    t.add_argument("--out", help="checkpoint to write (default: the shipped one)")
    t.add_argument("--work-dir", default="runs", help="where resumable state and the loss log go")
    t.add_argument("--base", default=DEFAULT_BASE)
    t.add_argument("--encoder", choices=["minilm", "base"], help="t2l/mtl description encoder (default: minilm)")
    t.add_argument("--target-modules", help="comma-separated (default: q_proj,v_proj; d2l: down_proj)")
    t.add_argument("--rank", type=int, help="LoRA rank (default: 8; d2l: per chunk)")
    t.add_argument("--steps", type=int, help="default: 1600 (d2l: 1000)")
    t.add_argument("--batch-size", type=int, help="default: 8 (d2l: 4)")
    t.add_argument("--lr", type=float, help="default: 3e-4")
    t.add_argument(
        "--describe",
        action="store_true",
        help="mtl: put a drawn task description before each input, condition (f) of `eval t2l` "
        "(default --out: hypernet/checkpoints/multitask-lora-described.safetensors)",
    )
    t.add_argument(
        "--paraphrases",
        help="t2l, mtl --describe: JSON file of extra descriptions per training task, {'tasks': {name: [text, ...]}} "
        "(default: the shipped hypernet/data/sni_train_paraphrases.json; 'none': without them)",
    )
    t.add_argument("--chunk-tokens", type=int, help="d2l: document tokens per chunk (default: 256)")
    t.add_argument("--chunk-scaler", choices=["none", "sqrt", "linear"], help="d2l: chunk B scale (default: sqrt)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.set_defaults(func=cmd_train, uses_transformers=True)

    e = sub.add_parser("eval", help="evaluate on held-out data; prints a table, writes JSON")
    e.add_argument("what", choices=["t2l", "d2l"], help="t2l: unseen SNI tasks; d2l: held-out documents")
    e.add_argument("--data", help="data directory (default: ../shared/data)")
    e.add_argument("--json", help="write the full result here")
    e.add_argument("--checkpoint", help="T2L or D2L checkpoint (default: shipped)")
    e.add_argument("--base", default=DEFAULT_BASE)
    e.add_argument("--split", default="dev", help="t2l: dev, or heldout (30 sni/train tasks no run trains on)")
    e.add_argument("--limit", type=int, help="t2l: instances per task (default: all of them)")
    e.add_argument("--mtl", help="t2l: multi-task LoRA checkpoint (default: shipped)")
    e.add_argument("--mtl-described", help="t2l: condition (f)'s checkpoint, from `train mtl --describe`")
    e.add_argument("--conditions", default="abcdef", help="t2l: which conditions to run (default: all, abcdef)")
    e.add_argument("--documents", type=int, default=12, help="d2l: held-out fictional profiles")
    e.add_argument("--composites", type=int, default=4, help="d2l: held-out ~512-token composites of profiles")
    e.add_argument("--passages", type=int, default=12, help="d2l: held-out reading-comprehension passages")
    e.add_argument("--needles", type=int, default=4, help="d2l: needle documents per length")
    e.add_argument("--needle-tokens", default="256,1024", help="d2l: needle document lengths, in tokens")
    e.add_argument("--curve-documents", type=int, default=6, help="d2l: profiles on the quality-time curve")
    e.add_argument("--budgets", default="0,2,5,10,15,20,40,60,80", help="d2l: seconds on the curve")
    add_budget_flag(e, "d2l: the shipped one, per 512 document tokens")
    e.add_argument("--sets", default="fictional,composites,passages,needle,curve", help="d2l: which parts to run")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    e.set_defaults(func=cmd_eval, uses_transformers=True)

    r = sub.add_parser("bench", help="every benchmark on the real base model: ratios, markdown and plots (~1 h)")
    r.add_argument("--json", default="bench/results/bench.json", help="the summary with the headline ratios")
    r.add_argument("--only", help="comma-separated sections (t2l_vs_lora,d2l_vs_cd,answering,decode,...)")
    r.add_argument("--skip", help="comma-separated sections to leave out")
    r.set_defaults(func=cmd_bench)

    b = sub.add_parser("data", help="rebuild sni/train and sni/dev from a clone of allenai/natural-instructions")
    b.add_argument("action", choices=["build-sni"])
    b.add_argument("--source", required=True, help="local clone of github.com/allenai/natural-instructions")
    b.add_argument("--out", required=True, help="directory to write sni/train and sni/dev into (best empty)")
    b.add_argument("--like", help="data directory whose task selection to rebuild (default: ../shared/data)")
    b.add_argument("--commit", default="unknown", help="the clone's commit, recorded in every file")
    b.set_defaults(func=cmd_data)

    d = sub.add_parser("demo", help="the main job: coordinator + worker on loopback, asked by description")
    d.add_argument("--base", default=DEFAULT_BASE)
    d.add_argument("--checkpoint", help="T2L checkpoint (default: shipped)")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to get ready")
    d.add_argument("--keep-running", action="store_true", help="keep the servers up afterwards (Ctrl-C stops)")
    d.set_defaults(func=cmd_demo)

    # The serving components own their subcommands (coordinator serve, worker serve/export, ask).
    for module in ("coordinator.cli", "worker.cli", "edge_client.cli"):
        importlib.import_module(module).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # Library progress bars and notices would bury our one-line results and errors; set before any import.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    if getattr(args, "uses_transformers", False):  # the environment is read at import; it may be imported already
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except UserError as exc:
        print(f"loracast: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
