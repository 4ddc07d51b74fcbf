"""Does the load-balancing loss balance? Train a top-2 router with and without it.

Setup: E = 8 experts, each a linear map ``R^16 -> R^16``; a :class:`~molora.routers.TopKRouter`
(k = 2) picks two per token and the output is ``sum_{e in K} g_e W_e x``. The synthetic task is
deliberately skewed: every input shares a large common direction (``x = 3 mu + noise``), so the
router's first picks are nearly the same for all tokens and plain training reinforces them
(the rich get richer). The target is a fixed random linear map of ``x``. We compare the
coefficient of variation of the expert load (top-2 assignment counts over a held-out batch,
``CV = std / mean``, population std; 0 = perfectly balanced, sqrt(E/k - 1) = sqrt(3) = 1.73 when
two experts take everything) after training with ``aux_coef = 0`` and ``aux_coef > 0``
(:func:`molora.routers.losses.load_balancing_loss`, transformers' Mixtral semantics).

Run: ``python benchmarks/balance.py`` (writes ``benchmarks/results/balance.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from molora.context import RoutingSignals
from molora.routers import TopKRouter
from molora.routers.losses import load_balancing_loss

E, K, D = 8, 2, 16


def load_cv(indices: torch.Tensor, num_experts: int = E) -> float:
    """Coefficient of variation (population std / mean) of per-expert assignment counts."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).float()
    return float(counts.std(unbiased=False) / counts.mean())


def train(aux_coef: float, steps: int = 150, batch: int = 256, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(D), dim=0)
    target = torch.randn(D, D) / D**0.5

    def sample(n: int) -> torch.Tensor:
        return 3.0 * mu + 0.5 * torch.randn(n, D)

    router = TopKRouter(E, D, top_k=K)
    experts = torch.nn.Parameter(torch.randn(E, D, D) * 0.1)
    opt = torch.optim.Adam([*router.parameters(), experts], lr=1e-2)
    signals = RoutingSignals()
    for _ in range(steps):
        x = sample(batch)
        d = router(x, signals)
        y = torch.einsum("nk,nkij,nj->ni", d.gates, experts[d.indices], x)
        task = (y - x @ target.T).pow(2).mean()
        loss = task + aux_coef * load_balancing_loss(d.logits, K) if aux_coef else task
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.eval()
    with torch.no_grad():
        x = sample(4096)
        d = router(x, signals)
        y = torch.einsum("nk,nkij,nj->ni", d.gates, experts[d.indices], x)
        mse = float((y - x @ target.T).pow(2).mean())
        counts = torch.bincount(d.indices.reshape(-1), minlength=E)
        return {
            "aux_coef": aux_coef,
            "load_cv": load_cv(d.indices),
            "load_share": (counts.float() / counts.sum()).tolist(),
            "aux_loss": float(load_balancing_loss(d.logits, K)),
            "task_mse": mse,
        }


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description="balancing loss: load CV with and without the aux loss")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "balance.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runs = [train(0.0), train(0.1)]
    out = {
        "setup": {"experts": E, "top_k": K, "dim": D, "steps": 150, "batch": 256, "optimizer": "Adam lr 1e-2",
                  "task": "x = 3 mu + 0.5 noise, target = random linear map; CV over 4096 held-out tokens"},
        "without_aux": runs[0],
        "with_aux": runs[1],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(f"load CV without aux loss: {runs[0]['load_cv']:.3f}  (task MSE {runs[0]['task_mse']:.4f})")
    print(f"load CV with aux loss (coef {runs[1]['aux_coef']}): {runs[1]['load_cv']:.3f}  (task MSE {runs[1]['task_mse']:.4f})")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
