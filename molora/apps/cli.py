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
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "token-cls": "AutoModelForTokenClassification",
}
#: The model class a PEFT adapter's ``task_type`` was trained with (``compose`` without --model-class).
TASK_TYPE_CLASSES = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls", "SEQ_2_SEQ_LM": "seq2seq-lm",
                     "TOKEN_CLS": "token-cls", "FEATURE_EXTRACTION": "auto", "QUESTION_ANS": "auto"}


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


class _UsageError(CLIError):
    """A bad command line (unknown flag, missing or malformed argument), raised by the parser."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (``molora <cmd>: error: ...``)
    and exit status 2 from :func:`main`, instead of the usage block and ``SystemExit``."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(self.prog, f"{message} (see {self.prog} --help)")


def load_base(path: str, model_class: str | None):
    """The base model from a Hugging Face name or folder (offline unless HF_HUB_OFFLINE=0)."""
    import transformers

    model_class = model_class or "auto"
    if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CLIError(f"base model {path!r} is not a folder (and the hub is offline: HF_HUB_OFFLINE=1)")
    from transformers.utils import logging as hf_logging

    # Progress bars only on a terminal: a log or a pipe keeps one line per error.
    quiet = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return getattr(transformers, MODEL_CLASSES[model_class]).from_pretrained(path)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _finite(value: float, what: str) -> float:
    from molora.checks import finite_number

    try:
        return finite_number(value, what, "value")
    except ValueError:
        raise CLIError(f"{what}: must be a finite number; got {value!r}") from None


def parse_pairs(items: list[str], what: str, convert: Callable[[str], object] = str) -> dict[str, object]:
    """``["a=1", "b=2"]`` -> ``{"a": convert("1"), ...}``; a bare path names itself after its folder.

    Every name must be non-empty and given once (a repeated name, also two adapter folders with
    the same last component, is an error: nothing is silently dropped); a value ``convert``
    refuses, or a NaN/inf float, is an error naming the item.
    """
    pairs: dict[str, object] = {}
    sources: dict[str, str] = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
        elif what == "adapter":
            key, value = os.path.basename(os.path.normpath(item)), item
        else:
            raise CLIError(f"{what} {item!r} must look like NAME=VALUE")
        key = key.strip()
        if not key or key in (".", ".."):
            raise CLIError(f"{what} {item!r}: the name is empty (write NAME=VALUE)")
        if not value:
            raise CLIError(f"{what} {item!r}: the value is empty (write NAME=VALUE)")
        if key in pairs:
            raise CLIError(f"{what} name {key!r} is given twice ({sources[key]!r} and {item!r}); names must be distinct"
                           + (" (name the folders: --adapter NAME=FOLDER)" if what == "adapter" else ""))
        try:
            converted = convert(value)
        except ValueError:
            raise CLIError(f"{what} {item!r}: {value!r} is not a valid value") from None
        if isinstance(converted, float):
            converted = _finite(converted, f"{what} {item!r}")
        pairs[key], sources[key] = converted, item
    return pairs


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _float_in(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
        if value < low or (low_open and value == low) or (high is not None and (value > high or (high_open and value == high))):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {'inf' if high is None else f'{high:g}'}{hi}; got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_INT, NONNEGATIVE_INT = _int_at_least(1), _int_at_least(0)
POSITIVE_FLOAT = _float_in(0.0, low_open=True)
NONNEGATIVE_FLOAT = _float_in(0.0)


def _demo(args: argparse.Namespace) -> int:
    from molora.apps.demo import run_demo

    run_demo(args.out, seed=args.seed, num_experts=args.experts, epochs=args.epochs, shots=args.shots,
             progress=not args.no_progress)
    return 0


def adapters_model_class(adapters: dict) -> str:
    """The ``--model-class`` the adapters' PEFT ``task_type`` implies (``auto`` when none is set);
    a CLIError when they disagree."""
    kinds = {name: TASK_TYPE_CLASSES.get(str(a.config.get("task_type") or "FEATURE_EXTRACTION"), "auto")
             for name, a in adapters.items()}
    found = set(kinds.values())
    if len(found) > 1:
        raise CLIError(f"the adapters were trained for different model classes {kinds} (PEFT task_type); "
                       "pass --model-class to choose one")
    return found.pop() if found else "auto"


def _compose(args: argparse.Namespace) -> int:
    import molora

    adapters = parse_pairs(args.adapter, "adapter")
    for name, path in adapters.items():
        if not os.path.isdir(path):
            raise CLIError(f"adapter {name!r}: folder {path} does not exist")
    router_kwargs = parse_pairs(args.router_arg or [], "router argument", _number_or_str)
    bad = [k for k in router_kwargs if not k.isidentifier()]
    if bad:
        raise CLIError(f"router argument names must be identifiers (KEY=VALUE); got {bad}")
    # Everything that can be checked without the base model is, before the (slow) load.
    from molora.routers import router_class

    router_class(args.router)
    loaded = {name: molora.load_peft_adapter(path, name) for name, path in adapters.items()}
    model_class = args.model_class or adapters_model_class(loaded)
    model = molora.compose(load_base(args.base, model_class), adapters, router=args.router, top_k=args.top_k, **router_kwargs)
    model.save_pretrained(args.out)
    print(f"composed {len(adapters)} adapters into {len(model.routed_layers())} routed layers -> {args.out}")
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    import molora

    from molora.merging import merge_options

    weights = parse_pairs(args.weight, "weight", float)  # checked before the (slow) model load
    options = dict(density=args.density, majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank,
                   svd_clamp=args.svd_clamp, seed=args.seed)
    merge_options(args.combination, **options, where="export_peft")
    model = molora.MoLoRAModel.from_pretrained(load_base(args.base, args.model_class), args.checkpoint)
    model.export_peft(args.out, weights, args.combination, **options)
    print(f"exported the mixture {weights} ({args.combination}) as a PEFT LoRA adapter -> {args.out}")
    return 0


def _continual(args: argparse.Namespace) -> int:
    import json

    from molora.apps.continual_bench import (ORDERS, STRATEGIES, RunConfig, build_cache, format_table,
                                             load_order, run_strategy, untrained_accuracies)

    order = ORDERS.get(args.order) or [t.strip() for t in args.order.split(",") if t.strip()]
    strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise CLIError(f"unknown strategy {bad or args.strategy!r}; choose from {', '.join(STRATEGIES)}")
    for name in ("epochs", "lr"):
        if not getattr(args, name) > 0:  # also NaN
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
            number = cast(value)
        except ValueError:
            continue
        if value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise CLIError(f"router argument value {value!r} is not a finite number")
        return number
    return {"true": True, "false": False}.get(value.lower(), value)


def _add_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model: Hugging Face name or folder")
    p.add_argument("--model-class", choices=sorted(MODEL_CLASSES), default=None,
                   help="transformers auto class of the base (default: from the adapters' PEFT task_type for compose, else auto)")


# ---------------------------------------------------------------------- bench, stats, train-router
def default_benchmarks_dir() -> str:
    """``benchmarks/`` of the source tree molora runs from (they ship with the repository, not the wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))  # <repo>/molora/apps
    return os.path.join(os.path.dirname(os.path.dirname(here)), "benchmarks")


def list_benchmarks(directory: str) -> list[str]:
    """The runnable scripts of ``directory``: ``*.py`` with a ``__main__`` guard (helpers that
    benchmarks import, such as ``timing.py``, have none)."""
    if not os.path.isdir(directory):
        raise CLIError(f"no benchmarks folder at {directory} (benchmarks ship with the source repository; pass --dir)")
    names = []
    for f in sorted(os.listdir(directory)):
        if f.endswith(".py") and not f.startswith("_"):
            with open(os.path.join(directory, f), encoding="utf-8") as fh:
                if "__main__" in fh.read():
                    names.append(f[:-3])
    return names


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    names = list_benchmarks(args.dir)
    if args.list or args.name is None:
        print("\n".join(names))
        return 0
    if args.name not in names:
        raise CLIError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not any(a == "--out" or a.startswith("--out=") for a in extra):
        # never the tracked benchmarks/results/ by default: a user's run is not the README's figure
        os.makedirs(args.results, exist_ok=True)
        extra = [*extra, "--out", os.path.join(args.results, args.name + ".json")]
    # A fresh interpreter: benchmarks are scripts (argparse, __main__) and time themselves.
    return subprocess.run([sys.executable, os.path.join(args.dir, args.name + ".py"), *extra]).returncode


def read_text_rows(path: str, *, need_label: bool = False) -> list[dict]:
    """Rows of a JSON-lines file, each an object with a string ``"text"`` (optional ``"task"``,
    and an integer ``"label"`` where ``need_label``); CLIError naming the line otherwise."""
    import json

    if not os.path.isfile(path):
        raise CLIError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CLIError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CLIError(f'{path}, line {n}: each line must be an object with a string "text"')
            if need_label and not isinstance(row.get("label"), int):
                raise CLIError(f'{path}, line {n}: needs an integer "label"')
            rows.append(row)
    if not rows:
        raise CLIError(f"data file {path} holds no rows")
    return rows


def load_checkpoint_model(args: argparse.Namespace):
    """Base model + molora checkpoint (CLIError if the checkpoint folder is missing)."""
    import molora

    if not os.path.isdir(args.checkpoint):
        raise CLIError(f"checkpoint folder {args.checkpoint} does not exist")
    return molora.MoLoRAModel.from_pretrained(load_base(args.base, args.model_class), args.checkpoint)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CLIError(f"no tokenizer at {path} ({exc.__class__.__name__}); pass --tokenizer") from None
    if tok.pad_token is None:  # GPT-2 style tokenizers: pad with EOS, padding is masked anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def batch_inputs(model, tok, rows: list[dict], max_length: int):
    """Tokenised rows plus their routing signals (``task`` per row -> ``task_ids``)."""
    enc = tok([r["text"] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    if "token_type_ids" not in _forward_args(model):
        enc.pop("token_type_ids", None)
    signals = {}
    if any("task" in r for r in rows):
        if not all("task" in r for r in rows):
            raise CLIError('either every row or no row has a "task"')
        signals["task_ids"] = [r["task"] for r in rows]
    return dict(enc), signals


def _forward_args(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.base_model.forward).parameters)


def _stats(args: argparse.Namespace) -> int:
    import json

    import torch
    from tqdm.auto import tqdm

    from molora.stats import RoutingTally, plot_routing_heatmap

    rows = read_text_rows(args.data)
    model = load_checkpoint_model(args).eval()
    tok = load_tokenizer(args.tokenizer or args.base)
    tally = RoutingTally()
    batches = range(0, len(rows), args.batch_size)
    with torch.no_grad():
        for i in tqdm(batches, desc="routing", unit="batch", disable=args.no_progress):
            inputs, signals = batch_inputs(model, tok, rows[i:i + args.batch_size], args.max_length)
            with model.routing(**signals):
                model(**inputs)
            tally.update(model)
    stats = tally.result()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "routing_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    png = plot_routing_heatmap(stats, os.path.join(args.out, "routing_heatmap.png"), value=args.value,
                               title=f"{args.value} on {os.path.basename(args.data)}")
    for name, s in stats["layers"].items():
        print(f"{name:60s} load_cv {s['load_cv']:.3f}  {args.value} " + " ".join(f"{v:.2f}" for v in s[args.value]))
    print(f"{len(rows)} rows; mean load CV {stats['mean_load_cv']:.3f} -> {args.out}/routing_stats.json, {png}")
    return 0


def router_loss(model, tok, model_class: str, max_length: int):
    """``loss_fn(model, rows)`` for router training: the base model's own loss on the rows
    (next-token cross-entropy for ``causal-lm``, label cross-entropy for ``seq-cls``)."""
    import torch

    if model_class not in ("causal-lm", "seq-cls"):
        raise CLIError("train-router needs a loss: use --model-class causal-lm (language modelling on the texts) "
                       'or seq-cls (rows with an integer "label")')

    def loss_fn(m, rows: list[dict]):
        inputs, signals = batch_inputs(m, tok, rows, max_length)
        if model_class == "causal-lm":
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        else:
            labels = torch.tensor([r["label"] for r in rows])
        with m.routing(**signals):
            return m(**inputs, labels=labels).loss  # the model's forward adds m.aux_loss() to it

    return loss_fn


def _train_router(args: argparse.Namespace) -> int:
    args.model_class = args.model_class or "auto"
    rows = read_text_rows(args.data, need_label=args.model_class == "seq-cls")
    model = load_checkpoint_model(args)
    tok = load_tokenizer(args.tokenizer or args.base)
    loss_fn = router_loss(model, tok, args.model_class, args.max_length)
    from molora.train_router import router_parameters, train_router

    if args.method == "existing" and not router_parameters(model):
        raise CLIError(f"the checkpoint's router {model.molora_config.router!r} has no trainable parameters "
                       "(compose with a learned router, e.g. --router soft, or use --method auto)")
    common = dict(loss_fn=loss_fn, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                  val_fraction=args.val_fraction, seed=args.seed)
    if args.method == "auto":
        result = train_router(model, rows, method="auto", folds=args.folds, **common)
        model.save_pretrained(args.out)
        for name, score in sorted(result.scores.items(), key=lambda kv: kv[1]):
            mark = "  <- chosen" if name == result.method else ""
            print(f"  {name:10s} CV loss {score:.4f} +- {result.std_errors[name]:.4f}{mark}")
        print(f"chose {result.method!r} by {result.folds}-fold cross-validation on {len(rows)} rows "
              f"(uniform {result.scores['uniform']:.4f}) in {result.seconds:.1f}s; checkpoint -> {args.out}")
        return 0
    result = train_router(model, rows, router=args.method, progress=not args.no_progress, folds=args.folds, **common)
    losses = result.train_losses
    model.save_pretrained(args.out)
    span = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "the uniform start kept"
    print(f"trained the router ({args.method}) on {len(rows)} rows for {len(losses)} steps: {span}; checkpoint -> {args.out}")
    return 0


def add_integration_commands(sub) -> None:
    """``bench``, ``stats`` and ``train-router``."""
    bench = sub.add_parser("bench", help="run a benchmark script of benchmarks/ by name",
                           description="Run benchmarks/NAME.py (arguments after NAME go to the script); "
                           "each prints a table and writes its JSON to --results/NAME.json (the repository's "
                           "tracked benchmarks/results/ only when the script's own --out names it).")
    bench.add_argument("name", nargs="?", help="benchmark name (see --list)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.add_argument("--list", action="store_true", help="list the benchmarks")
    bench.add_argument("--dir", default=default_benchmarks_dir(), help="benchmarks folder (default: the repository's)")
    bench.add_argument("--results", default="molora-bench-results",
                       help="folder for the result JSON (default: ./molora-bench-results); ignored when the "
                       "arguments after NAME pass the script's own --out")
    bench.set_defaults(func=_bench)

    stats = sub.add_parser("stats", help="routing statistics and heatmap of a checkpoint on a data file",
                           description='Route every row of a JSON-lines file ({"text": ...}, optional "task") '
                           "through the checkpoint and write per-layer token fractions, gate shares, load CV "
                           "(routing_stats.json) and a layers x experts heatmap (routing_heatmap.png).")
    _add_base(stats)
    stats.add_argument("--checkpoint", required=True, help="molora checkpoint folder")
    stats.add_argument("--data", required=True, help='JSON-lines file, one {"text": ...} per line')
    stats.add_argument("--out", required=True, help="folder for routing_stats.json and routing_heatmap.png")
    stats.add_argument("--tokenizer", help="tokenizer name or folder (default: --base)")
    stats.add_argument("--value", choices=["token_fraction", "gate_share"], default="gate_share", help="heatmap value")
    stats.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    stats.add_argument("--max-length", type=POSITIVE_INT, default=128)
    stats.add_argument("--no-progress", action="store_true", help="hide progress bars")
    stats.set_defaults(func=_stats)

    tr = sub.add_parser("train-router", help="few-shot training of a checkpoint's router (experts frozen)",
                        description="Choose (--method auto) or train the router(s) of a molora checkpoint on a few rows of a JSON-lines "
                        'file with the base model\'s own loss: causal-lm (next tokens of "text") or seq-cls '
                        '(integer "label"). Writes a new checkpoint.')
    _add_base(tr)
    tr.add_argument("--checkpoint", required=True, help="molora checkpoint folder (its router is trained)")
    tr.add_argument("--data", required=True, help='JSON-lines file of shots: {"text": ...} (+ "label" for seq-cls)')
    tr.add_argument("--out", required=True, help="checkpoint folder to write")
    tr.add_argument("--tokenizer", help="tokenizer name or folder (default: --base)")
    tr.add_argument("--steps", type=POSITIVE_INT, default=50)
    tr.add_argument("--method", choices=["auto", "existing", "per_layer", "weights", "shared"], default="per_layer",
                    help="per_layer (default: the best measured on the 11-target clbench grid): a fresh sequence-level soft "
                    "router per layer; weights, shared: a fresh router of that kind; existing: train the checkpoint's own "
                    "router; auto: choose uniform / global weights / LoRAHub / per-layer routers by k-fold "
                    "cross-validation on the rows and apply the winner")
    tr.add_argument("--folds", type=POSITIVE_INT, default=None,
                    help="cross-validation folds (default: 5 below 32 rows for auto/step selection)")
    tr.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="learning rate (default per router kind)")
    tr.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    tr.add_argument("--max-length", type=POSITIVE_INT, default=128)
    tr.add_argument("--val-fraction", type=_float_in(0.0, 1.0, high_open=True), default=0.25,
                    help="share of the rows held out for early stopping (molora.train_router); 0 trains on all rows")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-progress", action="store_true", help="hide progress bars")
    tr.set_defaults(func=_train_router)


def build_parser() -> argparse.ArgumentParser:
    from molora.merging import COMBINATIONS

    parser = _Parser(prog="molora", description="Mixtures of LoRA experts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    demo = sub.add_parser("demo", help="train experts on generated tasks, compose and route them, few-shot and continual (offline, CPU)",
                          description="Train LoRA experts on the shipped all-MiniLM-L6-v2 with tasks molora "
                          "generates itself, compose them into one routed model and compare routing strategies, weigh them "
                          "for a new task from a few shots, then add a task continually.")
    demo.add_argument("--out", default="molora-demo-out", help="output folder (adapters, results.json)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--experts", type=POSITIVE_INT, default=3, help="number of tasks/experts (2-4; two more tasks follow)")
    demo.add_argument("--epochs", type=POSITIVE_FLOAT, default=4, help="training epochs per expert")
    demo.add_argument("--shots", type=POSITIVE_INT, default=16, help="examples per task for the router")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)

    comp = sub.add_parser("compose", help="PEFT LoRA adapter folders -> a routed molora checkpoint",
                          description="Load PEFT LoRA adapters as the experts of a routed model and save it.")
    _add_base(comp)
    comp.add_argument("--adapter", action="append", required=True, metavar="NAME=FOLDER", help="a PEFT adapter (repeat)")
    comp.add_argument("--router", default="task", help="router name (default: task)")
    comp.add_argument("--top-k", type=POSITIVE_INT, default=None, help="experts per token (router topk)")
    comp.add_argument("--router-arg", action="append", metavar="KEY=VALUE", help="extra router argument (repeat)")
    comp.add_argument("--out", required=True, help="checkpoint folder to write")
    comp.set_defaults(func=_compose)

    exp = sub.add_parser("export-peft", help="a static mixture of a checkpoint's experts -> one PEFT LoRA adapter",
                         description="Write sum_e w_e s_e B_e A_e as one PEFT LoRA adapter: exactly with --combination cat (ranks "
                                     "add up), or merged by svd, ties, dare_ties, ... (PEFT's add_weighted_adapter types).")
    _add_base(exp)
    exp.add_argument("--checkpoint", required=True, help="molora checkpoint folder")
    exp.add_argument("--weight", action="append", required=True, metavar="EXPERT=W", help="an expert's weight (repeat)")
    exp.add_argument("--combination", choices=COMBINATIONS, default="cat",
                     help="how the experts merge (default: cat, exact; see README 'Exporting to PEFT')")
    exp.add_argument("--svd-rank", type=POSITIVE_INT, default=None,
                     help="rank of the SVD combinations (default: the module's largest expert rank)")
    exp.add_argument("--svd-clamp", type=_float_in(0.5, 1.0, low_open=True), default=None,
                     help="quantile clamp of the SVD factors, in (0.5, 1]")
    exp.add_argument("--density", type=_float_in(0.0, 1.0, low_open=True), default=None,
                     help="fraction of entries kept by ties / dare_* / magnitude_prune, in (0, 1]")
    exp.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total",
                     help="TIES sign election (default: total)")
    exp.add_argument("--seed", type=NONNEGATIVE_INT, default=0, help="seed of DARE's random drops (default: 0)")
    exp.add_argument("--out", required=True, help="PEFT adapter folder to write")
    exp.set_defaults(func=_export_peft)

    add_integration_commands(sub)

    from molora.apps.continual_bench import RunConfig as RC  # the benchmark's budget is the default

    cl = sub.add_parser("continual", help="train tasks one after another (O-LoRA, retrieval experts, baselines) and "
                        "report ACC/BWT", description="Continual learning on a folder of text-classification tasks "
                        "(clbench format: tasks.json and <task>/{train,test}.jsonl) with the shipped "
                        "all-MiniLM-L6-v2 and the label-prototype classifier; prints ACC, BWT, FWT per strategy.")
    cl.add_argument("--data", required=True, help="task folder (tasks.json, <task>/train.jsonl, <task>/test.jsonl)")
    cl.add_argument("--order", required=True, help="comma-separated task names in training order, or a named order "
                    "(standard4-1, standard4-2, standard4-3, long)")
    cl.add_argument("--strategy", default="olora", help="seqlora, inclora, olora, retrieval, multitask (comma-separated)")
    cl.add_argument("--epochs", type=POSITIVE_FLOAT, default=RC.epochs, help="epochs per task")
    cl.add_argument("--lr", type=POSITIVE_FLOAT, default=RC.lr)
    cl.add_argument("--batch-size", type=POSITIVE_INT, default=RC.batch_size)
    cl.add_argument("--max-length", type=POSITIVE_INT, default=RC.max_length, help="tokens per input (instruction + text)")
    cl.add_argument("--train-limit", type=POSITIVE_INT, default=RC.train_limit, help="training examples per task")
    cl.add_argument("--test-limit", type=POSITIVE_INT, default=RC.test_limit, help="test examples per task")
    cl.add_argument("--frozen-layers", type=NONNEGATIVE_INT, default=RC.frozen_layers, help="bottom encoder layers without LoRA (cached)")
    cl.add_argument("--rank", type=POSITIVE_INT, default=RC.rank)
    cl.add_argument("--l1", type=NONNEGATIVE_FLOAT, default=RC.l1, help="O-LoRA orthogonality weight")
    cl.add_argument("--seed", type=int, default=RC.seed)
    cl.add_argument("--out", default=None, help="write the results as JSON here")
    cl.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cl.set_defaults(func=_continual)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad input is one line on stderr, ``molora <cmd>: error: ...``, and
    exit status 2 (never a traceback): a bad command line, a missing file or folder, a malformed
    adapter or checkpoint, a NaN weight, an unknown expert name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args, extra = build_parser().parse_known_args(argv)
    except _UsageError as exc:
        return _fail(exc.prog, exc)
    if extra:
        prog = f"molora {args.command}"
        return _fail(prog, f"unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
    try:
        return args.func(args)
    except (CLIError, ValueError, OSError, ImportError) as exc:
        # molora's own errors are ValueErrors that name the module, shape, value or file.
        return _fail(f"molora {args.command}", exc)


def _fail(prog: str, exc: BaseException | str) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the exception held
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
