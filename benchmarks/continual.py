"""How much does each continual-learning strategy forget? clbench, all-MiniLM-L6-v2, 2 CPU cores.

Strategies: SeqLoRA, IncLoRA, O-LoRA, retrieval experts, multitask (upper bound); orders
standard4-1/2/3 and long (``ORDERS`` in :mod:`molora.apps.continual_bench`). Classification has no
per-task head: :mod:`molora.apps.textcls` scores "instruction + text" against the frozen embeddings of
the task's label names (README, "Continual learning"). The budget is the same for every strategy
(:class:`~molora.apps.continual_bench.RunConfig`); the frozen bottom layers are computed once per
order and shared by all strategies.

Run: ``python benchmarks/continual.py [--orders standard4-1,...] [--strategies ...]``; prints
the table and writes ``benchmarks/results/continual.json`` (accuracies as fractions in [0, 1]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from molora.apps.continual_bench import (ORDERS, STRATEGIES, RunConfig, build_cache, format_table, load_order, run_strategy,
                                     untrained_accuracies)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clbench"
OUT = Path(__file__).resolve().parent / "results" / "continual.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--orders", default="standard4-1", help=f"comma-separated, from {list(ORDERS)}")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge", action="store_true", help="keep the other orders already in --out (same config only)")
    for f in dataclasses.fields(RunConfig):
        if f.type in ("int", "float", "int | None", "str") and f.name != "seed":
            kind = {"float": float, "str": str}.get(f.type, int)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = RunConfig(**overrides)
    orders = args.orders.split(",")
    strategies = args.strategies.split(",")
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    results: dict = {}
    cache_seconds = {}
    for order in orders:
        t0 = time.perf_counter()
        tasks = load_order(args.data, ORDERS[order], cfg)
        cache, protos = build_cache(tasks, cfg, progress=not args.no_progress)
        b = untrained_accuracies(tasks, cache, protos, cfg)
        cache_seconds[order] = round(time.perf_counter() - t0, 1)
        print(f"{order}: {[t.name for t in tasks]}; cached {len(cache)} inputs in {cache_seconds[order]} s; "
              f"untrained accuracies {[round(x, 3) for x in b]}")
        results[order] = {}
        for s in strategies:
            results[order][s] = run_strategy(s, tasks, cache, protos, cfg, untrained=b, progress=not args.no_progress)
            r = results[order][s]
            bwt = "-" if r["bwt"] is None else f"{100 * r['bwt']:.1f}"
            print(f"  {s}: ACC {100 * r['acc']:.1f} BWT {bwt} ({r['seconds']} s)")
        results[order]["untrained"] = b  # type: ignore[assignment]
    table = {o: {s: r for s, r in per.items() if s != "untrained"} for o, per in results.items()}
    print()
    print(format_table(table))
    total = round(time.perf_counter() - start, 1)
    record = {
        "units": "acc, bwt, fwt, forgetting, task_id_acc and R are fractions in [0, 1]; seconds are wall-clock",
        "results": table,
        "untrained": {o: per["untrained"] for o, per in results.items()},
        "orders": {o: ORDERS[o] for o in orders},
        "config": cfg.to_dict(),
        "cache_seconds": cache_seconds,
        "total_seconds": total,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_avg_1min_start": round(load_start, 2), "load_avg_1min_end": round(os.getloadavg()[0], 2)},
    }
    out = Path(args.out)
    if args.merge and out.is_file():
        old = json.loads(out.read_text())
        if old.get("config") != record["config"]:
            raise SystemExit(f"--merge: {out} was made with another config; not merging")
        for key in ("results", "untrained", "orders", "cache_seconds"):
            record[key] = {**{k: v for k, v in old[key].items() if k not in record[key]}, **record[key]}
        record["runs"] = old.get("runs", [{"orders": list(old["orders"]), "total_seconds": old["total_seconds"],
                                            "machine": old["machine"]}])
        record["runs"].append({"orders": orders, "total_seconds": total, "machine": record["machine"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"total {total} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
