"""The ``molora`` command line: ``molora <command> --help`` describes each command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

MODEL_CLASSES = {
    "auto": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
}


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def load_base(path: str, model_class: str):
    """The base model from a Hugging Face name or folder (offline unless HF_HUB_OFFLINE=0)."""
    import transformers

    if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CLIError(f"base model {path!r} is not a folder (and the hub is offline: HF_HUB_OFFLINE=1)")
    return getattr(transformers, MODEL_CLASSES[model_class]).from_pretrained(path)


def parse_pairs(items: list[str], what: str, convert: Callable[[str], object] = str) -> dict[str, object]:
    """``["a=1", "b=2"]`` -> ``{"a": convert("1"), ...}``; a bare path names itself after its folder."""
    pairs: dict[str, object] = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
        elif what == "adapter":
            key, value = os.path.basename(os.path.normpath(item)), item
        else:
            raise CLIError(f"{what} {item!r} must look like NAME=VALUE")
        try:
            pairs[key] = convert(value)
        except ValueError:
            raise CLIError(f"{what} {item!r}: {value!r} is not a valid value") from None
    return pairs


def _demo(args: argparse.Namespace) -> int:
    from molora.demo import run_demo

    run_demo(args.out, seed=args.seed, num_experts=args.experts, epochs=args.epochs, shots=args.shots,
             progress=not args.no_progress)
    return 0


def _compose(args: argparse.Namespace) -> int:
    import molora

    adapters = parse_pairs(args.adapter, "adapter")
    for name, path in adapters.items():
        if not os.path.isdir(path):
            raise CLIError(f"adapter {name!r}: folder {path} does not exist")
    router_kwargs = parse_pairs(args.router_arg or [], "router argument", _number_or_str)
    model = molora.compose(load_base(args.base, args.model_class), adapters, router=args.router, top_k=args.top_k, **router_kwargs)
    model.save_pretrained(args.out)
    print(f"composed {len(adapters)} adapters into {len(model.routed_layers())} routed layers -> {args.out}")
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    import molora

    model = molora.MoLoRAModel.from_pretrained(load_base(args.base, args.model_class), args.checkpoint)
    weights = parse_pairs(args.weight, "weight", float)
    model.export_peft(args.out, weights)
    print(f"exported the mixture {weights} as a PEFT LoRA adapter -> {args.out}")
    return 0


def _continual(args: argparse.Namespace) -> int:
    import json

    from molora.continual.runner import (ORDERS, STRATEGIES, RunConfig, build_cache, format_table, load_order,
                                         run_strategy, untrained_accuracies)

    order = ORDERS.get(args.order) or [t.strip() for t in args.order.split(",") if t.strip()]
    strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise CLIError(f"unknown strategy {bad or args.strategy!r}; choose from {', '.join(STRATEGIES)}")
    for name in ("epochs", "lr"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name} must be > 0; got {getattr(args, name)}")
    cfg = RunConfig(frozen_layers=args.frozen_layers, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    max_length=args.max_length, train_limit=args.train_limit, test_limit=args.test_limit,
                    rank=args.rank, l1=args.l1, seed=args.seed)
    tasks = load_order(args.data, order, cfg)
    cache, protos = build_cache(tasks, cfg, progress=not args.no_progress)
    b = untrained_accuracies(tasks, cache, protos, cfg)
    results = {s: run_strategy(s, tasks, cache, protos, cfg, untrained=b, progress=not args.no_progress) for s in strategies}
    label = args.order if args.order in ORDERS else "custom"
    print(format_table({label: results}))
    if args.out:
        record = {"units": "fractions in [0, 1]", "order": order, "config": cfg.to_dict(), "untrained": b,
                  "results": results}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def _number_or_str(value: str) -> object:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def _add_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model: Hugging Face name or folder")
    p.add_argument("--model-class", choices=sorted(MODEL_CLASSES), default="auto", help="transformers auto class of the base")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molora", description="Mixtures of LoRA experts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

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

    comp = sub.add_parser("compose", help="PEFT LoRA adapter folders -> a routed molora checkpoint",
                          description="Load PEFT LoRA adapters as the experts of a routed model and save it.")
    _add_base(comp)
    comp.add_argument("--adapter", action="append", required=True, metavar="NAME=FOLDER", help="a PEFT adapter (repeat)")
    comp.add_argument("--router", default="task", help="router name (default: task)")
    comp.add_argument("--top-k", type=int, default=None, help="experts per token (router topk)")
    comp.add_argument("--router-arg", action="append", metavar="KEY=VALUE", help="extra router argument (repeat)")
    comp.add_argument("--out", required=True, help="checkpoint folder to write")
    comp.set_defaults(func=_compose)

    exp = sub.add_parser("export-peft", help="a static mixture of a checkpoint's experts -> one PEFT LoRA adapter",
                         description="Write sum_e w_e s_e B_e A_e exactly as one PEFT LoRA adapter (ranks add up).")
    _add_base(exp)
    exp.add_argument("--checkpoint", required=True, help="molora checkpoint folder")
    exp.add_argument("--weight", action="append", required=True, metavar="EXPERT=W", help="an expert's weight (repeat)")
    exp.add_argument("--out", required=True, help="PEFT adapter folder to write")
    exp.set_defaults(func=_export_peft)

    from molora.continual.runner import RunConfig as RC  # the benchmark's budget is the default

    cl = sub.add_parser("continual", help="train tasks one after another (O-LoRA, retrieval experts, baselines) and "
                        "report ACC/BWT", description="Continual learning on a folder of text-classification tasks "
                        "(clbench format: tasks.json and <task>/{train,test}.jsonl) with the shipped "
                        "all-MiniLM-L6-v2 and the label-prototype classifier; prints ACC, BWT, FWT per strategy.")
    cl.add_argument("--data", required=True, help="task folder (tasks.json, <task>/train.jsonl, <task>/test.jsonl)")
    cl.add_argument("--order", required=True, help="comma-separated task names in training order, or a named order "
                    "(standard4-1, standard4-2, standard4-3, long)")
    cl.add_argument("--strategy", default="olora", help="seqlora, inclora, olora, retrieval, multitask (comma-separated)")
    cl.add_argument("--epochs", type=float, default=RC.epochs, help="epochs per task")
    cl.add_argument("--lr", type=float, default=RC.lr)
    cl.add_argument("--batch-size", type=int, default=RC.batch_size)
    cl.add_argument("--max-length", type=int, default=RC.max_length, help="tokens per input (instruction + text)")
    cl.add_argument("--train-limit", type=int, default=RC.train_limit, help="training examples per task")
    cl.add_argument("--test-limit", type=int, default=RC.test_limit, help="test examples per task")
    cl.add_argument("--frozen-layers", type=int, default=RC.frozen_layers, help="bottom encoder layers without LoRA (cached)")
    cl.add_argument("--rank", type=int, default=RC.rank)
    cl.add_argument("--l1", type=float, default=RC.l1, help="O-LoRA orthogonality weight")
    cl.add_argument("--seed", type=int, default=RC.seed)
    cl.add_argument("--out", default=None, help="write the results as JSON here")
    cl.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cl.set_defaults(func=_continual)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, ImportError) as exc:
        # molora's own errors are ValueErrors that name the module, shape or value.
        print(f"molora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
