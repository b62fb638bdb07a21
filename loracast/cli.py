"""The `loracast` command line: one entry point, a subcommand per job.

Heavy imports happen inside the subcommand that needs them, so `loracast --help` is instant and
an error in one component cannot break another's commands.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from loracast.base_model import DEFAULT_BASE

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
    from hypernet.generate import TextToLoRAGenerator, check_description

    check_description(args.description)  # fail fast, before loading anything
    t0 = time.perf_counter()
    generator = TextToLoRAGenerator(Path(args.checkpoint))
    out = generator.save(args.description, Path(args.out), args.base)
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s, base {generator.fingerprint[:12]}…)")


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
    from hypernet.train_t2l import TrainArgs, train

    default_out = checkpoint.DEFAULT_T2L if args.kind == "t2l" else checkpoint.DEFAULT_MTL
    targs = TrainArgs(
        kind=args.kind,
        data_dir=_data_dir(args.data),
        out=Path(args.out) if args.out else default_out,
        work_dir=Path(args.work_dir),
        base=args.base,
        encoder=args.encoder,
        target_modules=tuple(args.target_modules.split(",")),
        r=args.rank,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )
    meta = train(targs)
    print(f"wrote {targs.out}: final loss {meta['final_loss_50']:.3f}, {meta['wall_s_this_run']} s this run")


def cmd_eval(args: argparse.Namespace) -> None:
    from hypernet import checkpoint
    from hypernet.eval_t2l import evaluate, table, write_json

    result = evaluate(
        _data_dir(args.data),
        split=args.split,
        limit=args.limit,
        t2l_path=Path(args.checkpoint or checkpoint.DEFAULT_T2L),
        mtl_path=Path(args.mtl or checkpoint.DEFAULT_MTL),
        base_name=args.base,
    )
    print(table(result))
    if args.json:
        write_json(result, Path(args.json))
        print(f"wrote {args.json}")


def cmd_data(args: argparse.Namespace) -> None:
    from hypernet.sni_build import build, task_lists_from

    train_tasks, dev_tasks = task_lists_from(_data_dir(args.like))
    summary = build(Path(args.source), Path(args.out), train_tasks, dev_tasks, commit=args.commit)
    print(json.dumps(summary, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from hypernet.answering import answer
    from hypernet.generate import TextToLoRAGenerator
    from loracast import base_model
    from loracast.lora import inject

    base = base_model.load(args.base)
    generator = TextToLoRAGenerator(base=base)
    wrappers = inject(base.model, generator.spec)
    for description, inputs in DEMO_TASKS:
        t0 = time.perf_counter()
        adapter = generator.generate(description)
        ms = 1000 * (time.perf_counter() - t0)
        print(f"\n## task: {description}\n   adapter generated in {ms:.0f} ms (one hypernetwork pass)")
        plain = answer(base, wrappers, None, inputs)
        adapted = answer(base, wrappers, adapter, inputs)
        for text, p, a in zip(inputs, plain, adapted, strict=True):
            print(json.dumps({"input": text, "base model": p, "with T2L adapter": a}, indent=2, ensure_ascii=False))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loracast", description="Text in, LoRA adapters out.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="description -> PEFT adapter directory")
    g.add_argument("--description", required=True, help="what the adapter should make the model do")
    g.add_argument("--out", required=True, help="adapter directory to write (must not be another kind of directory)")
    g.add_argument(
        "--checkpoint",
        default=str(Path(__file__).resolve().parent.parent / "hypernet" / "checkpoints" / "t2l.safetensors"),
        help="T2L checkpoint (default: shipped)",
    )
    g.add_argument("--base", default=DEFAULT_BASE, help="base model recorded in adapter_config.json")
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("answer", help="answer prompts with an adapter (greedy, chat template)")
    a.add_argument("--adapter", required=True, help="PEFT adapter directory")
    a.add_argument("--base", default=DEFAULT_BASE, help="'smollm2' or a Hugging Face model directory")
    a.add_argument("prompt", nargs="+", help="user turns, one answer each")
    a.set_defaults(func=cmd_answer)

    t = sub.add_parser("train", help="train a hypernetwork (resumable; reproduces the shipped checkpoint)")
    t.add_argument("kind", choices=["t2l", "mtl"], help="t2l: Text-to-LoRA; mtl: the multi-task LoRA baseline")
    t.add_argument("--data", help="data directory holding sni/train (default: ../shared/data)")
    t.add_argument("--out", help="checkpoint to write (default: the shipped one)")
    t.add_argument("--work-dir", default="runs", help="where resumable state and the loss log go")
    t.add_argument("--base", default=DEFAULT_BASE)
    t.add_argument("--encoder", default="minilm", choices=["minilm", "base"])
    t.add_argument("--target-modules", default="q_proj,v_proj")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate on unseen tasks; prints a table, writes JSON")
    e.add_argument("what", choices=["t2l"])
    e.add_argument("--data", help="data directory (default: ../shared/data)")
    e.add_argument("--split", default="dev")
    e.add_argument("--limit", type=int, default=25, help="instances per task")
    e.add_argument("--json", help="write the full result here")
    e.add_argument("--checkpoint", help="T2L checkpoint (default: shipped)")
    e.add_argument("--mtl", help="multi-task LoRA checkpoint (default: shipped)")
    e.add_argument("--base", default=DEFAULT_BASE)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("data", help="rebuild sni/train and sni/dev from a clone of allenai/natural-instructions")
    b.add_argument("action", choices=["build-sni"])
    b.add_argument("--source", required=True, help="local clone of github.com/allenai/natural-instructions")
    b.add_argument("--out", required=True, help="directory to write sni/train and sni/dev into (best empty)")
    b.add_argument("--like", help="data directory whose task selection to rebuild (default: ../shared/data)")
    b.add_argument("--commit", default="unknown", help="the clone's commit, recorded in every file")
    b.set_defaults(func=cmd_data)

    d = sub.add_parser("demo", help="the main job: generate adapters from descriptions and answer with them")
    d.add_argument("--base", default=DEFAULT_BASE)
    d.set_defaults(func=cmd_demo)

    # The serving components own their subcommands (coordinator serve, worker serve/export, ask).
    for module in ("coordinator.cli", "worker.cli", "edge_client.cli"):
        importlib.import_module(module).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from hypernet.checkpoint import CheckpointError
    from hypernet.generate import InputError
    from hypernet.sni_build import SNIBuildError
    from hypernet.sni_data import DataError
    from loracast.adapter_format import AdapterError
    from loracast.base_model import BaseModelError

    args = parser().parse_args(argv)
    # Library progress bars and notices would bury our one-line results and errors.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except (InputError, AdapterError, CheckpointError, BaseModelError, DataError, SNIBuildError) as exc:
        print(f"loracast: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
