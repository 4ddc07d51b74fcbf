"""Expert kinds against plain LoRA: trainable parameters and train-step time, same run.

A stack of ``layers`` frozen ``nn.Linear(d, d)`` (tanh between), each wrapped by
``get_molora_model`` with E experts of rank r behind a top-k router; one train step = forward on
``[T, d]`` tokens, backward of a squared loss, AdamW step. Every kind runs once per round,
round-robin (:func:`timing.interleaved_medians`), so the ratios to ``lora`` are taken under the
same load. Trainable parameters are counted over the experts only (the routers are the same for
every kind); QR-LoRA's ``dR`` is stored as ``r x d_in`` of which ``r d_in - r (r - 1) / 2`` are
free (the triangle below the diagonal never trains): both counts are printed. ARD-LoRA's step
includes what the method adds to it: its penalty (l1 and depth TV, 1e-3 each) in the loss and
the projection of the gates after the optimizer step; its gates start at 1 (all channels live).
``lora+loft`` is plain LoRA stepped by :class:`molora.optim.LoFT` (Tastan et al. 2025) instead of
AdamW (the routers keep AdamW): the cost of its projected moments, same parameters.
Ortho-LoRA (T-LoRA's parametrisation) runs its rank-2r kernel form (trained and frozen terms) with
no orthogonality penalty, as the official trainer; only its trained factors are randomised.
RiemannLoRA is stepped by its own optimizer (``RiemannianSGD``, heavy-ball 0.9: tangent projection,
transport and a QR + 2r x 2r SVD retraction per expert) instead of AdamW; its trainable tensors
are the gradient probes (``(d_out + d_in) r`` per expert, LoRA's count), the manifold's free
dimension is ``(d_out + d_in - r) r``.
``mixed`` is one bank per layer whose experts are of the kinds ``lora, dora, qr_lora, moslora`` in
turn (:mod:`molora.kinds.mixed`), behind the same router, stepped by AdamW.

    python benchmarks/expert_kinds.py --rounds 10
    python benchmarks/expert_kinds.py --device cuda --d 2048 --tokens 4096

``--accuracy``: accuracy on four clbench tasks of distinct label spaces (default agnews, yelp,
dbpedia, sst2) with the shipped all-MiniLM-L6-v2 and the label-prototype classifier of
:mod:`molora.apps.textcls`; experts on query/value of the top layers, the frozen bottom cached once
(:func:`molora.apps.continual_bench.build_cache`). Per kind, one bank of four experts (one per
task), each trained on its task alone under task-id routing with the other experts frozen, by the
kind's optimizer (AdamW; LoFT for ``lora+loft``; RiemannianSGD for ``riemann_lora``; ARD-LoRA with
its penalty and projection). Mean test accuracy over the tasks: ``single`` (each expert right
after its training), ``task_routed`` (the finished bank routed by task id: equal to ``single``
when training an expert leaves the others untouched), ``soft_routed`` (per-layer sequence-level
soft routers, trained on the four train splits mixed with every expert frozen; no task id).
In the ``mixed`` row the four tasks' experts are of four kinds (agnews: LoRA, yelp: DoRA, dbpedia:
QR-LoRA, sst2: MoSLoRA) in one bank.

``--unet``: the tiny diffusers UNet of ``examples/diffusers_timestep.py`` on fixed synthetic
latents and text, ``--unet-steps`` AdamW steps of the epsilon-prediction loss under
DDPMScheduler (T = 1000), the same noise and timesteps for every variant: plain LoRA, T-LoRA
(Ortho-LoRA rank-1 experts behind the ``tlora`` rank mask), Block-wise LoRA (``block_ranks``) and
TimeStep Master (``timestep`` router, granularities 1, 2, 4). Both write
``benchmarks/results/expert-kinds-accuracy.json``:

    OMP_NUM_THREADS=1 python benchmarks/expert_kinds.py --accuracy --unet
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "examples"))  # diffusers_timestep: the tiny UNet and its step
from timing import interleaved_medians  # noqa: E402

from molora import MoLoRAConfig, get_molora_model  # noqa: E402
from molora.kinds import (EXPERT_KINDS, ARDLoRABank, MixedBank, QRLoRABank, RiemannLoRABank, ard_penalty,  # noqa: E402
                          project_ard)
from molora.kinds.riemann_lora import random_orthonormal  # noqa: E402
from molora.optim import LoFT, RiemannianSGD  # noqa: E402

#: the kinds of the ``mixed`` row's experts, in turn: one bank, one router (molora.kinds.mixed)
MIXED = ("lora", "dora", "qr_lora", "moslora")
# row name -> (expert kind, optimizer of the experts)
VARIANTS = {**{kind: (kind, "adamw") for kind in EXPERT_KINDS}, "lora+loft": ("lora", "loft"), "mixed": (MIXED, "adamw")}


def expert_kind(kind, experts: int):
    """The config's ``expert_kind``: one kind, or MIXED's kinds in turn over the experts."""
    return kind if isinstance(kind, str) else [kind[e % len(kind)] for e in range(experts)]


def kind_banks(banks):
    """The banks of one kind each: a mixed bank's parts in its place."""
    return [p for b in banks for p in (b.parts.values() if isinstance(b, MixedBank) else [b])]

RESULTS = Path(__file__).resolve().parent / "results"


class Stack(torch.nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return x


@torch.no_grad()
def randomize_experts_(banks, device: str = "cpu") -> None:
    """Non-zero factors in every expert, so no kind takes a shortcut through zeros: N(0, 0.02)
    entries; RiemannLoRA a random point (its probes stay 0); ARD-LoRA's gates around 1 (all live)."""
    for bank in banks:
        if isinstance(bank, RiemannLoRABank):
            for e, r in enumerate(bank.ranks):
                bank.set_point_(e, random_orthonormal(bank.d_out, r, device=device),
                                torch.randn(r, r, device=device) * 0.02, random_orthonormal(bank.d_in, r, device=device))
            continue
        for p in bank.parameters():
            p.normal_(0, 0.02)
        if isinstance(bank, ARDLoRABank):
            for a in bank.rank_alpha:
                a.add_(1.0)


def build(variant: str, args: argparse.Namespace):
    kind, optimizer = VARIANTS[variant]
    torch.manual_seed(0)
    model = get_molora_model(Stack(args.d, args.layers).to(args.device),
                             MoLoRAConfig(target_modules=r"layers\.\d+", num_experts=args.experts, rank=args.rank,
                                          alpha=2.0 * args.rank, router="topk", top_k=args.top_k,
                                          expert_kind=expert_kind(kind, args.experts)))
    banks = kind_banks([layer.bank for layer in model.routed_layers().values()])
    randomize_experts_(banks, args.device)
    stored = sum(p.numel() for b in banks for p in b.parameters() if p.requires_grad)
    free = stored - sum(b.num_experts * b.fixed_rank * (b.fixed_rank - 1) // 2 for b in banks if isinstance(b, QRLoRABank))
    free -= sum(r * r for b in banks if isinstance(b, RiemannLoRABank) for r in b.ranks)
    if optimizer == "loft":
        loft = LoFT(model, lr=1e-4)
        factors = {id(p) for g in loft.param_groups for p in g["params"]}
        opts = [loft, torch.optim.AdamW([p for p in model.trainable_parameters() if id(p) not in factors], lr=1e-4)]
    elif kind == "riemann_lora":
        opts = [RiemannianSGD(model, lr=1e-4, momentum=0.9)]
    else:
        opts = [torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)]
    x = torch.randn(args.tokens, args.d, device=args.device)

    ard = kind == "ard_lora"

    def step() -> None:
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        (loss + ard_penalty(model, l1=1e-3, tv=1e-3) if ard else loss).backward()
        for opt in opts:
            opt.step()
        if ard:
            project_ard(model)

    return step, stored, free


# ---------------------------------------------------------------------------------------------- accuracy on clbench
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clbench"
ACC_TASKS = "agnews,yelp,dbpedia,sst2"  # four label spaces: topics, star levels, ontology classes, sentiment
SETTINGS = ("single", "task_routed", "soft_routed")


def kind_optimizers(model, variant: str, lr: float, riemann_lr: float) -> list[torch.optim.Optimizer]:
    """The experts' optimizer of ``variant`` over the model's trainable tensors (as in :func:`build`):
    AdamW; LoFT on the LoRA factor pairs plus AdamW on the rest; RiemannianSGD (heavy-ball 0.9)."""
    kind, optimizer = VARIANTS[variant]
    params = model.trainable_parameters()
    if optimizer == "loft":
        loft = LoFT(model, lr=lr)
        factors = {id(p) for g in loft.param_groups for p in g["params"]}
        rest = [p for p in params if id(p) not in factors]
        return [loft] + ([torch.optim.AdamW(rest, lr=lr, weight_decay=0.0)] if rest else [])
    if kind == "riemann_lora":
        return [RiemannianSGD(model, lr=riemann_lr, momentum=0.9)]
    return [torch.optim.AdamW(params, lr=lr, weight_decay=0.0)]


def accuracy_variant(variant: str, tasks, cache, protos, cfg, args) -> dict:
    """Four single-task experts of ``variant`` in one bank (one per task, trained under task-id
    routing with the other experts frozen, each by the kind's optimizer), then accuracy on every
    task's test rows: ``single`` (each expert right after its training: its task's rows reach it
    alone), ``task_routed`` (the finished bank, task ids route), ``soft_routed`` (a sequence-level
    soft router per layer, zero-initialised, trained on the four train splits mixed with the experts
    frozen; no task id at inference)."""
    from molora.apps.textcls import evaluate, train
    from molora.train_router import install_router

    kind, _ = VARIANTS[variant]
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    names = [t.name for t in tasks]
    model = get_molora_model(cache.top_model(), MoLoRAConfig(
        target_modules=list(cfg.target_modules), num_experts=len(tasks), rank=cfg.rank, alpha=cfg.alpha, router="task",
        expert_names=names, expert_kind=expert_kind(kind, len(tasks))))
    tok = cache.tokenizer
    kw = dict(max_length=cfg.max_length, prototypes=protos)
    routed = lambda texts, ids: model.routing(task_ids=torch.tensor(ids))  # noqa: E731
    ard = kind == "ard_lora"
    out: dict = {s: {} for s in SETTINGS}
    for i, task in enumerate(tasks):
        model.set_experts_trainable(False)
        model.set_experts_trainable(True, [task.name])
        train(model, tok, task, params=model.trainable_parameters(), epochs=cfg.epochs, batch_size=cfg.batch_size,
              seed=cfg.seed + i, task_ids=[i], batch_context=routed, progress=False,
              optimizers=kind_optimizers(model, variant, cfg.lr, args.riemann_lr),
              extra_loss=(lambda: ard_penalty(model, l1=1e-3, tv=1e-3)) if ard else None,
              after_step=(lambda: project_ard(model)) if ard else None, **kw)
        out["single"][task.name] = evaluate(model, tok, task, task_index=i, batch_context=routed, **kw)
    for i, task in enumerate(tasks):
        out["task_routed"][task.name] = evaluate(model, tok, task, task_index=i, batch_context=routed, **kw)
    model.set_experts_trainable(False)
    install_router(model, "per_layer", granularity="sequence")  # per-layer soft routers, uniform at the start
    router_params = model.trainable_parameters()
    train(model, tok, list(tasks), params=router_params, epochs=args.router_epochs, batch_size=cfg.batch_size,
          lr=args.router_lr, seed=cfg.seed, progress=False, **kw)
    for task in tasks:
        out["soft_routed"][task.name] = evaluate(model, tok, task, **kw)
    row = {"kind": variant, **{s: sum(out[s].values()) / len(tasks) for s in SETTINGS}, "per_task": out,
           "seconds": round(time.perf_counter() - t0, 1)}
    return row


def accuracy_run(args: argparse.Namespace) -> dict:
    """Every variant's ``single`` / ``task_routed`` / ``soft_routed`` mean accuracy over ``--tasks``."""
    from molora.apps.continual_bench import RunConfig, build_cache, load_order, untrained_accuracies

    cfg = RunConfig(frozen_layers=args.frozen_layers, rank=args.acc_rank, alpha=2.0 * args.acc_rank,
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                    train_limit=args.train_limit, test_limit=args.test_limit)
    tasks = load_order(args.data, args.tasks.split(","), cfg)
    t0 = time.perf_counter()
    cache, protos = build_cache(tasks, cfg, progress=False)
    cache_s = round(time.perf_counter() - t0, 1)
    base = dict(zip([t.name for t in tasks], untrained_accuracies(tasks, cache, protos, cfg)))  # no expert at all
    print(f"  untrained encoder: {100 * sum(base.values()) / len(base):.1f} "
          f"({', '.join(f'{k} {100 * v:.1f}' for k, v in base.items())})", flush=True)
    variants = args.kinds.split(",") if args.kinds else list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown}; known: {list(VARIANTS)}")
    rows = []
    for v in variants:
        rows.append(accuracy_variant(v, tasks, cache, protos, cfg, args))
        print(f"  {v}: " + ", ".join(f"{s} {100 * rows[-1][s]:.1f}" for s in SETTINGS) + f" ({rows[-1]['seconds']} s)",
              flush=True)
    return {"config": cfg.to_dict() | {"tasks": [t.name for t in tasks], "router_epochs": args.router_epochs,
                                       "router_lr": args.router_lr, "riemann_lr": args.riemann_lr},
            "cache_seconds": cache_s, "untrained": base, "rows": rows}


# ---------------------------------------------------------------------------------------------- tiny UNet
UNET_VARIANTS = ("lora", "t_lora", "blockwise", "timestep")


def unet_model(variant: str, rank: int, T: int):
    """The tiny UNet of ``examples/diffusers_timestep.py`` with experts on its attention projections:
    ``lora`` (one rank-r expert), ``t_lora`` (Ortho-LoRA, r rank-1 experts behind the T-LoRA rank
    mask, r_min 1), ``blockwise`` (one expert, rank 2r in the down blocks, r/2 in the up blocks, r in
    the mid block: Block-wise LoRA's per-block ranks), ``timestep`` (TimeStep Master, granularities
    1, 2, 4 of rank r: core plus gated interval experts)."""
    from diffusers_timestep import build_unet, make_model

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if variant == "timestep":
        return make_model(build_unet(), (1, 2, 4), T, rank=rank)
    cfg = {"lora": dict(num_experts=1, rank=rank, alpha=rank, router="static"),
           "t_lora": dict(num_experts=rank, rank=1, alpha=1.0, router="tlora", expert_kind="ortho_lora",
                          router_kwargs={"num_timesteps": T, "min_rank": 1}),
           "blockwise": dict(num_experts=1, rank=rank, alpha=rank, router="static",
                             block_ranks={"down_blocks": 2 * rank, "up_blocks": max(rank // 2, 1)})}[variant]
    return get_molora_model(build_unet(), MoLoRAConfig(target_modules=targets, **cfg))


def unet_run(args: argparse.Namespace) -> dict:
    """Epsilon-prediction denoising loss (DDPM schedule, T=1000) of each UNet variant after
    ``--unet-steps`` AdamW steps on the same fixed synthetic latents, text, noise and timesteps."""
    from diffusers import DDPMScheduler
    from diffusers_timestep import train_step

    T = 1000
    scheduler = DDPMScheduler(num_train_timesteps=T)
    g = torch.Generator().manual_seed(0)
    B = args.unet_batch
    latents, text = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 5, 16, generator=g)
    rows = []
    for variant in UNET_VARIANTS:
        model = unet_model(variant, args.unet_rank, T)
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=args.unet_lr, weight_decay=0.0)
        steps = torch.Generator().manual_seed(1)  # the same noise and timesteps, step by step, for every variant
        losses = []
        t0 = time.perf_counter()
        for _ in range(args.unet_steps):
            loss, _ = train_step(model, scheduler, opt, latents, text, generator=steps)
            losses.append(loss)
        rows.append({"variant": variant, "first_loss": losses[0], "final_loss": losses[-1],
                     "mean_last5": sum(losses[-5:]) / len(losses[-5:]),
                     "trainable": sum(p.numel() for p in model.trainable_parameters()),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  unet {variant}: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return {"config": {"steps": args.unet_steps, "batch": B, "rank": args.unet_rank, "lr": args.unet_lr,
                       "scheduler": "DDPMScheduler(num_train_timesteps=1000)"}, "rows": rows}


def format_accuracy(result: dict) -> str:
    """The accuracy table (points) and, when present, the UNet loss table."""
    lines = []
    if "accuracy" in result:
        acc = result["accuracy"]
        lines.append(f"mean accuracy over {', '.join(acc['config']['tasks'])} (points)")
        lines.append(f"{'kind':<13} {'single':>7} {'task-routed':>12} {'soft-routed':>12} {'sec':>6}")
        if "untrained" in acc:
            u = 100 * sum(acc["untrained"].values()) / len(acc["untrained"])
            lines.append(f"{'(untrained)':<13} {u:7.1f} {u:12.1f} {u:12.1f} {'-':>6}")
        for r in acc["rows"]:
            lines.append(f"{r['kind']:<13} {100 * r['single']:7.1f} {100 * r['task_routed']:12.1f} "
                         f"{100 * r['soft_routed']:12.1f} {r['seconds']:6.0f}")
    if "unet" in result:
        u = result["unet"]
        lines.append(f"tiny UNet, {u['config']['steps']} steps: denoising loss (epsilon MSE)")
        lines.append(f"{'variant':<13} {'trainable':>10} {'first':>8} {'final':>8} {'last-5':>8}")
        for r in u["rows"]:
            lines.append(f"{r['variant']:<13} {r['trainable']:>10,d} {r['first_loss']:8.4f} {r['final_loss']:8.4f} "
                         f"{r['mean_last5']:8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="result file (default: benchmarks/results/expert-kinds[-DEVICE].json; "
                    "with --accuracy/--unet: benchmarks/results/expert-kinds-accuracy.json)")
    acc = ap.add_argument_group("accuracy on clbench (--accuracy) and the tiny-UNet denoising loss (--unet)")
    acc.add_argument("--accuracy", action="store_true", help="single / task-routed / soft-routed accuracy per kind")
    acc.add_argument("--unet", action="store_true", help="denoising loss: LoRA, T-LoRA, block-wise ranks, TimeStep Master")
    acc.add_argument("--data", default=str(DATA))
    acc.add_argument("--tasks", default=ACC_TASKS)
    acc.add_argument("--kinds", default=None, help=f"comma-separated subset of {list(VARIANTS)}")
    acc.add_argument("--train-limit", type=int, default=300, help="train rows per task")
    acc.add_argument("--test-limit", type=int, default=150, help="test rows per task")
    acc.add_argument("--max-length", type=int, default=48)
    acc.add_argument("--frozen-layers", type=int, default=4, help="cached bottom layers (experts on the rest)")
    acc.add_argument("--acc-rank", type=int, default=8)
    acc.add_argument("--epochs", type=float, default=2.0)
    acc.add_argument("--batch-size", type=int, default=16)
    acc.add_argument("--lr", type=float, default=2e-3, help="AdamW / LoFT learning rate of the experts")
    acc.add_argument("--riemann-lr", type=float, default=0.05, help="RiemannianSGD learning rate")
    acc.add_argument("--router-epochs", type=float, default=1.0)
    acc.add_argument("--router-lr", type=float, default=1e-2)
    acc.add_argument("--unet-steps", type=int, default=40)
    acc.add_argument("--unet-batch", type=int, default=8)
    acc.add_argument("--unet-rank", type=int, default=4)
    acc.add_argument("--unet-lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.accuracy or args.unet:
        t0 = time.perf_counter()
        result: dict = {"threads": torch.get_num_threads()}
        if args.accuracy:
            result["accuracy"] = accuracy_run(args)
        if args.unet:
            result["unet"] = unet_run(args)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        print(format_accuracy(result))
        path = Path(args.out) if args.out else RESULTS / "expert-kinds-accuracy.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path} ({result['seconds']} s)")
        return
    built = {variant: build(variant, args) for variant in VARIANTS}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    med = interleaved_medians({k: v[0] for k, v in built.items()}, args.rounds, sync=sync)
    rows = []
    print(f"d={args.d} layers={args.layers} E={args.experts} r={args.rank} top_k={args.top_k} T={args.tokens} "
          f"device={args.device} threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"{'kind':<12} {'trainable (stored)':>19} {'free':>9} {'vs lora':>8} {'step ms':>9} {'vs lora':>8}")
    for kind, (_, stored, free) in built.items():
        row = {"kind": kind, "trainable_stored": stored, "trainable_free": free,
               "params_vs_lora": free / built["lora"][2], "step_ms": 1e3 * med[kind],
               "step_vs_lora": med[kind] / med["lora"]}
        rows.append(row)
        print(f"{kind:<12} {stored:>19,d} {free:>9,d} {row['params_vs_lora']:>8.3f} {row['step_ms']:>9.2f} "
              f"{row['step_vs_lora']:>8.3f}")
    name = "expert-kinds" + ("" if args.device == "cpu" else f"-{args.device.split(':')[0]}")
    path = Path(args.out) if args.out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
