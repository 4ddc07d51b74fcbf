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

    python benchmarks/expert_kinds.py --rounds 10
    python benchmarks/expert_kinds.py --device cuda --d 2048 --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402

from molora import MoLoRAConfig, get_molora_model  # noqa: E402
from molora.kinds import EXPERT_KINDS, ARDLoRABank, QRLoRABank, RiemannLoRABank, ard_penalty, project_ard  # noqa: E402
from molora.kinds.riemann_lora import random_orthonormal  # noqa: E402
from molora.optim import LoFT, RiemannianSGD  # noqa: E402

# row name -> (expert kind, optimizer of the experts)
VARIANTS = {**{kind: (kind, "adamw") for kind in EXPERT_KINDS}, "lora+loft": ("lora", "loft")}

RESULTS = Path(__file__).resolve().parent / "results"


class Stack(torch.nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return x


def build(variant: str, args: argparse.Namespace):
    kind, optimizer = VARIANTS[variant]
    torch.manual_seed(0)
    model = get_molora_model(Stack(args.d, args.layers).to(args.device),
                             MoLoRAConfig(target_modules=r"layers\.\d+", num_experts=args.experts, rank=args.rank,
                                          alpha=2.0 * args.rank, router="topk", top_k=args.top_k, expert_kind=kind))
    banks = [layer.bank for layer in model.routed_layers().values()]
    with torch.no_grad():  # non-zero factors everywhere, so no kind takes a shortcut through zeros
        for bank in banks:
            if isinstance(bank, RiemannLoRABank):  # a random point; the probes stay 0
                for e, r in enumerate(bank.ranks):
                    bank.set_point_(e, random_orthonormal(bank.d_out, r, device=args.device),
                                    torch.randn(r, r, device=args.device) * 0.02,
                                    random_orthonormal(bank.d_in, r, device=args.device))
                continue
            for p in bank.parameters():
                p.normal_(0, 0.02)
            if isinstance(bank, ARDLoRABank):  # gates around 1: every channel live
                for a in bank.rank_alpha:
                    a.add_(1.0)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="result file (default: benchmarks/results/expert-kinds[-DEVICE].json)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
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
