"""Do ``layer_overhead.py`` and ``grouped_kernels.py`` time the same model the same? One process.

Both benchmarks time "the routed layer as a user builds it" (``get_molora_model`` around a frozen
``nn.Linear(1024, 1024)``, top-2, r = 8, T = 4096, forward + backward, one thread) against the bare
linear, and their ratios have differed by up to 0.15. This script builds each benchmark's model
and base in one process and times all four interleaved (medians over rounds, wall clock), so the
harness is the only difference: equal model times mean the two measure the same thing and the
spread comes from elsewhere (the base GEMM's speed from one process to the next).

    python benchmarks/harness_check.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grouped_kernels  # noqa: E402
import layer_overhead  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(E: int, rounds: int, d: int = 1024, T: int = 4096, r: int = 8, k: int = 2) -> dict:
    variants, run = layer_overhead._build(d, T, E, r, k, False)
    p = grouped_kernels.Problem(d, T, E, r, k, "cpu", torch.float32)

    def kernels_run(fn) -> float:
        for t in (p.x, p.Wr, p.A, p.B, *p.layer.parameters(), *p.model.parameters()):
            t.grad = None
        t0 = time.perf_counter()
        fn().backward(p.dy)
        return time.perf_counter() - t0

    calls = {"layer_overhead base": lambda: run(variants["base"])[0],
             "layer_overhead model": lambda: run(variants["model"])[0],
             "grouped_kernels base": lambda: kernels_run(p.base_only),
             "grouped_kernels model": lambda: kernels_run(p.model_call)}
    for fn in calls.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {n: [] for n in calls}
    for i in range(rounds):
        names = list(calls)
        for n in names[i % len(names):] + names[: i % len(names)]:
            times[n].append(calls[n]())
    ms = {n: 1e3 * statistics.median(v) for n, v in times.items()}
    return {"E": E, "ms": ms, "layer_overhead_ratio": ms["layer_overhead model"] / ms["layer_overhead base"],
            "grouped_kernels_ratio": ms["grouped_kernels model"] / ms["grouped_kernels base"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--experts", default="8,64")
    ap.add_argument("--out", default=str(RESULTS / "harness-check.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(int(E), args.rounds) for E in args.experts.split(",")]
    print("| E | layer_overhead: base ms | model ms | ratio | grouped_kernels: base ms | model ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        m = row["ms"]
        print(f"| {row['E']} | {m['layer_overhead base']:.1f} | {m['layer_overhead model']:.1f} | "
              f"{row['layer_overhead_ratio']:.3f}x | {m['grouped_kernels base']:.1f} | {m['grouped_kernels model']:.1f} | "
              f"{row['grouped_kernels_ratio']:.3f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/harness_check.py", *(argv or sys.argv[1:])]),
                               "torch": torch.__version__, "threads": 1, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
