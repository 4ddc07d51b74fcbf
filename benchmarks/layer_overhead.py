"""The routed layer as a user builds it, against the bare linear, by wall clock.

``get_molora_model`` around a module holding a frozen ``nn.Linear(d, d)`` (top-k router, E experts
of rank r), called as a model is called (``[1, T, d]`` input, through the ``MoLoRAModel`` and
its forward scope), forward + backward, one intra-op thread (``--threads``: more). Variants, each against the bare
linear (``x`` requires grad, ``W`` does not) timed in the same round:

* ``model``: the model as above; ``layer``: the ``RoutedLoRALinear`` alone (``[T, d]``);
* ``steps``: the layer's kernel steps called directly (``project`` -> top-k -> ``expand``), no
  module (only in checkouts that have them);
* ``compiled``: with ``--compile``, ``torch.compile`` (inductor) of the model and of the bare
  linear, the ratio compiled/compiled.

Each call is timed by the wall clock and by the worker thread's CPU time (``<variant>@cpu``):
where the two ratios differ, the difference is time the thread spent off the core.

``--compare DIR`` runs the same variants of another checkout of molora (e.g. a ``git worktree``
of an earlier commit) at the same time: each checkout runs in its own worker process and the
workers take turns round by round, so background load hits both alike ("before" and "after" in
one run). Ratios are medians over rounds of (variant time / base time of that round).

    python benchmarks/layer_overhead.py --rounds 15
    git worktree add /tmp/before cb53465 && python benchmarks/layer_overhead.py --compare /tmp/before
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- worker side
def _build(d: int, T: int, E: int, r: int, k: int, compile_: bool):
    import torch

    from molora import MoLoRAConfig, get_molora_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(d, d).requires_grad_(False)
    base = torch.nn.Linear(d, d).requires_grad_(False)
    base.load_state_dict(holder.proj.state_dict())
    holder.forward = lambda x: holder.proj(x)
    model = get_molora_model(holder, MoLoRAConfig(target_modules=["proj"], num_experts=E, rank=r, alpha=2.0 * r,
                                                  router="topk", top_k=k))
    layer = model.routed_layers()["proj"]
    with torch.no_grad():
        for b in layer.bank.B:
            b.normal_(0, 0.1)
    x = torch.randn(T, d).requires_grad_()
    dy = torch.randn(T, d)
    params = [x, *model.parameters()]

    def run(fn):
        for p in params:
            p.grad = None
        t0, c0 = time.perf_counter(), time.thread_time()
        fn().backward(dy)
        return time.perf_counter() - t0, time.thread_time() - c0

    variants = {
        "base": lambda: base(x),
        "model": lambda: model(x.unsqueeze(0)).squeeze(0),
        "layer": lambda: layer(x),
    }
    try:
        from molora import kernels

        if hasattr(kernels, "project"):
            A, B = layer.bank.stacked()
            W_r = layer.router.proj.weight

            def steps():
                A, B = layer.bank.stacked()
                plan = kernels.plan("torch", E, r, k)
                proj = kernels.project(x, plan, A, base.weight, base.bias, router_weight=W_r)
                probs = torch.softmax(proj.logits, -1)
                gates, idx = probs.topk(k, -1)
                gates = gates / gates.sum(-1, keepdim=True)
                return kernels.expand(x, plan, proj.shrink, A, B, gates, idx, layer.bank.scaling, out=proj.out)

            variants["steps"] = steps
    except ImportError:
        pass
    if compile_:
        cbase = torch.compile(lambda: base(x))
        cmodel = torch.compile(lambda: model(x.unsqueeze(0)).squeeze(0))
        variants["base-compiled"] = cbase
        variants["model-compiled"] = cmodel
    for fn in variants.values():  # warm-up (and compile)
        run(fn)
        run(fn)
    return variants, run


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    variants, run = _build(args.d, args.T, args.E, args.r, args.k, args.compile)
    names = list(variants)
    print(json.dumps({"ready": names}), flush=True)
    for i, line in enumerate(sys.stdin):
        if line.strip() != "round":
            break
        order = names[i % len(names):] + names[: i % len(names)]  # rotate: no variant always first
        times = {n: run(variants[n]) for n in order}
        print(json.dumps(times), flush=True)


# ----------------------------------------------------------------------------- parent side
def _spawn(checkout: Path, shape: dict, compile_: bool, threads: int = 1) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(_import_root(checkout)), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads),
           *sum(([f"--{k}", str(v)] for k, v in shape.items()), [])]
    if compile_:
        cmd.append("--compile")
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(checkout))


def _import_root(checkout: Path) -> Path:
    """A folder from which ``import molora`` (with its routers/kernels/continual subpackages)
    resolves to ``checkout``'s sources: a shim of symlinks, as the package-dir mapping installs them."""
    shim = Path(os.environ.get("TMPDIR", "/tmp")) / f"molora-shim-{hashlib.md5(str(checkout.resolve()).encode()).hexdigest()[:12]}"
    pkg = shim / "molora"
    if not pkg.exists():
        pkg.mkdir(parents=True)
        for f in (checkout / "molora").iterdir():
            (pkg / f.name).symlink_to(f.resolve())
        for sub in ("routers", "kernels", "continual"):
            if not (pkg / sub).exists():
                (pkg / sub).symlink_to((checkout / sub).resolve())
    return shim


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--E", type=int, default=None, help="one expert count (default: 8 and 64)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--compare", default=None, help="another checkout to time alongside ('before')")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each worker (the CPU-time columns "
                    "then count the calling thread only)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile'd model and base")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer-overhead.json"))
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    checkouts = {"after": ROOT} | ({"before": Path(args.compare)} if args.compare else {})
    experts = [args.E] if args.E else [8, 64]
    workers = {}
    for label, path in checkouts.items():
        for E in experts:
            shape = {"d": args.d, "T": args.T, "E": E, "r": args.r, "k": args.k}
            # "before" checkouts may lack --compile: only the current one compiles
            workers[(label, E)] = _spawn(path, shape, args.compile and label == "after", args.threads)
    names = {key: json.loads(w.stdout.readline())["ready"] for key, w in workers.items()}
    ratios: dict = {key: {n: [] for n in names[key] if n != "base"} for key in workers}
    base_ms: dict = {key: [] for key in workers}
    for i in range(args.rounds):
        for key, w in workers.items():  # one round of each worker in turn
            w.stdin.write("round\n")
            w.stdin.flush()
            t = json.loads(w.stdout.readline())
            base_ms[key].append(1e3 * t["base"][0])
            for n in names[key]:
                if n == "base":
                    continue
                ref = t["base-compiled"] if n == "model-compiled" else t["base"]
                ratios[key][n].append(t[n][0] / ref[0])  # wall clock
                ratios[key].setdefault(f"{n}@cpu", []).append(t[n][1] / ref[1])  # the thread's CPU time
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    rows = []
    for (label, E), rs in ratios.items():
        row = {"checkout": label, "E": E, "d": args.d, "T": args.T, "r": args.r, "k": args.k,
               "base_ms": statistics.median(base_ms[(label, E)]),
               **{n: statistics.median(v) for n, v in rs.items()}}
        rows.append(row)
    cols = sorted({n for r in rows for n in r} - {"checkout", "E", "d", "T", "r", "k", "base_ms"})
    print(f"{'checkout':>8} {'E':>3} {'base ms':>8} " + " ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print(f"{r['checkout']:>8} {r['E']:>3} {r['base_ms']:>8.1f} "
              + " ".join(f"{r[c]:>14.3f}x" if c in r else f"{'-':>15}" for c in cols))
    result = {"command": "python benchmarks/layer_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "clock": f"wall (perf_counter), {args.threads} intra-op thread(s) per worker, fwd+bwd", "rounds": args.rounds,
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
