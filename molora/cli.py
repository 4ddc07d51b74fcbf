"""The ``molora`` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from molora.demo import run_demo

    run_demo(args.out, seed=args.seed, num_experts=args.experts, epochs=args.epochs, shots=args.shots,
             progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molora", description="Mixtures of LoRA experts.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train experts on generated tasks, compose and route them (offline, CPU)",
                          description="Train LoRA experts on the shipped all-MiniLM-L6-v2 with tasks molora "
                          "generates itself, compose them into one routed model and compare routing strategies.")
    demo.add_argument("--out", default="molora-demo-out", help="output folder (adapters, results.json)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--experts", type=int, default=3, help="number of tasks/experts (2-6)")
    demo.add_argument("--epochs", type=float, default=5, help="training epochs per expert")
    demo.add_argument("--shots", type=int, default=16, help="examples per task for the router")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"molora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
