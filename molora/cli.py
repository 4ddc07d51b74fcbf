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

    demo = sub.add_parser("demo", help="train experts on generated tasks, compose and route them, few-shot and continual (offline, CPU)",
                          description="Train LoRA experts on the shipped all-MiniLM-L6-v2 with tasks molora "
                          "generates itself, compose them into one routed model and compare routing strategies, weigh them "
                          "for a new task from a few shots, then add a task continually.")
    demo.add_argument("--out", default="molora-demo-out", help="output folder (adapters, results.json)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--experts", type=int, default=3, help="number of tasks/experts (2-4; two more tasks follow)")
    demo.add_argument("--epochs", type=float, default=4, help="training epochs per expert")
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
