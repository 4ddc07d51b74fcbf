"""Benchmark of the routed LoRA layer's kernels against the frozen base linear.

For each shape (d_in = d_out = d, T tokens, E experts of rank r, top-k routing) it times, in
one run and interleaved round-robin (so background load hits every variant alike), the median
of forward and of forward+backward for:

* ``base``: the frozen base linear alone (``x`` requires grad, ``W`` does not: LoRA training);
* ``routed[<backend>]``: base + router (linear, softmax, top-k, renormalise) + ``routed_lora``
  through each available backend (``reference``, ``torch``; ``triton`` on CUDA only), as
  the routed layer runs them (``molora.kernels.project``: the torch backend computes the base
  output, the router logits and the LoRA shrink in one GEMM; the router; ``expand``);
* ``layer``: the library's ``RoutedLoRALinear`` around the same base linear, with a
  ``TopKRouter`` and an ``ExpertBank`` holding the same weights (the default backend, plus the
  layer's own bookkeeping: stacking the bank, the routing decision it records);
* ``model``: the layer as a user builds it, ``get_molora_model`` around a module holding the
  same frozen ``nn.Linear`` (top-k router, same weights), called through the ``MoLoRAModel``
  (its forward scope, hooks, the ``[1, T, d]`` input a model passes);
* ``naive-loop``: every expert on every token, masked by its gate (HydraLoRA / LoRAMoE style);
* ``index_add-loop``: per expert ``where(idx == e)``, gather, LoRA, ``index_add_`` (MoE-PEFT).

Ratios are to ``base`` in the same run. Writes ``benchmarks/results/kernels-<device>.json``.

    python benchmarks/grouped_kernels.py            # default: the CPU target shapes + a few more
    python benchmarks/grouped_kernels.py --full     # the issue's whole grid (slow on a CPU)
    python benchmarks/grouped_kernels.py --shapes 1024x4096x64x8x2   # d x T x E x r x k, comma separated
    python benchmarks/grouped_kernels.py --switch   # the dense/grouped switch point of the torch backend
    python benchmarks/grouped_kernels.py --gather   # the grouped/gathered switch point (few rows per expert)
    python benchmarks/grouped_kernels.py --threads 1   # one CPU thread (steadier when the machine is shared)
    python benchmarks/grouped_kernels.py --threads 1 --clock cpu   # the thread's CPU time, not wall time
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from molora import kernels
from molora.kernels import available_backends, shared_input_linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402

#: The timer: wall clock, or (``--clock cpu``, one thread only) the CPU time of the calling
#: thread, which leaves out the time other jobs on a shared machine held the core.
CLOCK = time.perf_counter

TARGETS = [(1024, 4096, 8, 8, 2), (1024, 4096, 64, 8, 2)]
DEFAULT = TARGETS + [(1024, 4096, 4, 8, 1), (1024, 4096, 64, 16, 1), (1024, 512, 64, 8, 2)]
FULL = list(itertools.product([1024, 4096], [512, 4096], [4, 8, 64], [8, 16], [1, 2]))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return device.type


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Problem:
    """One shape's tensors: frozen base linear, trainable router and experts."""

    def __init__(self, d: int, T: int, E: int, r: int, k: int, device, dtype, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        mk = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
        self.base = torch.nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
        self.x = mk(T, d).requires_grad_()
        self.Wr = mk(E, d, std=d**-0.5).requires_grad_()
        self.A = mk(E, r, d, std=d**-0.5).requires_grad_()
        self.B = mk(E, d, r, std=0.1).requires_grad_()
        self.dy = mk(T, d)
        self.k, self.E, self.s = k, E, 2.0
        self.layer = self._layer(d, E, r, k)
        self.model = self._model(d, E, r, k)

    def _layer(self, d: int, E: int, r: int, k: int):
        """RoutedLoRALinear around ``self.base`` with this problem's router and expert weights."""
        from molora.bank import ExpertBank
        from molora.layer import RoutedLoRALinear
        from molora.routers import TopKRouter

        bank = ExpertBank(d, d, dtype=self.x.dtype, device=self.x.device)
        for e in range(E):  # alpha = s r gives the scaling s of the other variants
            bank.add_expert(r, self.s * r, A=self.A[e], B=self.B[e])
        router = TopKRouter(E, d, top_k=k).to(device=self.x.device, dtype=self.x.dtype)
        with torch.no_grad():
            router.proj.weight.copy_(self.Wr)
        return RoutedLoRALinear(self.base, bank, router, name="bench")

    def _model(self, d: int, E: int, r: int, k: int):
        """``get_molora_model`` around a module holding ``self.base``, with this problem's weights."""
        from molora import MoLoRAConfig, get_molora_model

        holder = torch.nn.Module()
        holder.proj = self.base
        holder.forward = lambda x: holder.proj(x)
        model = get_molora_model(holder, MoLoRAConfig(target_modules=["proj"], num_experts=E, rank=r, alpha=self.s * r,
                                                      router="topk", top_k=k))
        layer = model.routed_layers()["proj"]
        with torch.no_grad():
            for e in range(E):
                layer.bank.A[e].copy_(self.A[e])
                layer.bank.B[e].copy_(self.B[e])
            layer.router.proj.weight.copy_(self.Wr)
        return model

    def layer_call(self):
        return self.layer(self.x)

    def route_logits(self, logits):
        """The top-k router's softmax, top-k and renormalisation (molora.routers.TopKRouter)."""
        probs = torch.softmax(logits, dim=-1)
        gates, idx = probs.topk(self.k, dim=-1)
        return gates / gates.sum(-1, keepdim=True), idx

    def route(self):
        # the router projection as molora's routers compute it (one GEMM each way, fast dx)
        return self.route_logits(shared_input_linear(self.x, self.Wr))

    def base_only(self):
        return self.base(self.x)

    def routed(self, backend: str):
        # as RoutedLoRALinear does: project (base output, logits, shrink in one GEMM over x),
        # route, expand the delta into the base output
        return self.steps(kernels.plan(backend, self.E, self.A.shape[1], self.k))

    def form(self, grouped: bool):
        # the whole layer's steps in the given form of the torch backend
        return self.steps(kernels.Plan("torch", grouped))

    def steps(self, plan):
        proj = kernels.project(self.x, plan, self.A, self.base.weight, self.base.bias, router_weight=self.Wr)
        gates, idx = self.route_logits(proj.logits)
        return kernels.expand(self.x, plan, proj.shrink, self.A, self.B, gates, idx, self.s, out=proj.out)

    def model_call(self):
        return self.model(self.x.unsqueeze(0)).squeeze(0)

    def naive_loop(self):
        """Every expert on every token, weighted by its (mostly zero) gate."""
        gates, idx = self.route()
        y = self.base(self.x)
        for e in range(self.E):
            g_e = (gates * (idx == e)).sum(-1, keepdim=True)
            y = y + g_e * self.s * ((self.x @ self.A[e].T) @ self.B[e].T)
        return y

    def index_add_loop(self):
        """Per expert: the tokens that chose it, their LoRA, index_add_ back."""
        gates, idx = self.route()
        y = self.base(self.x)
        delta = torch.zeros_like(y)
        for e in range(self.E):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            out = (self.x[tok] @ self.A[e].T) @ self.B[e].T
            delta = delta.index_add(0, tok, out * (gates[tok, slot, None] * self.s))
        return y + delta


def time_variants(variants: dict, device, repeats: int, backward: bool) -> dict[str, float]:
    """Median seconds per variant, interleaved round-robin after one warm-up each."""
    def call(fn, p):
        for t in (p.x, p.Wr, p.A, p.B, *p.layer.parameters(), *p.model.parameters()):
            t.grad = None
        y = fn()
        if backward:
            y.backward(p.dy)
        return y

    calls = {name: (lambda fn=fn, p=p: call(fn, p)) for name, (fn, p) in variants.items()}
    return interleaved_medians(calls, repeats, clock=CLOCK, sync=lambda: sync(device))


def bench_shape(shape, device, dtype, repeats: int, backends: list[str], skip: frozenset[str] = frozenset()) -> dict:
    d, T, E, r, k = shape
    p = Problem(d, T, E, r, k, device, dtype)
    variants = {"base": (p.base_only, p)}
    for b in backends:
        variants[f"routed[{b}]"] = ((lambda b=b: p.routed(b)), p)
    variants["layer"] = (p.layer_call, p)
    variants["model"] = (p.model_call, p)
    variants["naive-loop"] = (p.naive_loop, p)
    variants["index_add-loop"] = (p.index_add_loop, p)
    variants = {name: v for name, v in variants.items() if name not in skip}
    out = {"d": d, "T": T, "E": E, "r": r, "k": k}
    for mode, bw in (("fwd", False), ("fwd+bwd", True)):
        ctx = torch.enable_grad() if bw else torch.no_grad()
        with ctx:
            t = time_variants(variants, device, repeats, bw)
        out[mode] = {name: {"ms": 1e3 * v, "ratio": v / t["base"]} for name, v in t.items()}
    return out


def _variant_names(rows: list[dict]) -> list[str]:
    """Every timed variant but the base, in order (``--skip`` leaves some out of some rows)."""
    return [n for n in dict.fromkeys(n for row in rows for n in row["fwd"]) if n != "base"]


def _ratio(cell: dict | None, width: int = 0) -> str:
    return f"{cell['ratio']:.2f}x".rjust(width) if cell else "-".rjust(width)


def print_table(rows: list[dict]) -> None:
    names = _variant_names(rows)
    head = f"{'d':>5} {'T':>5} {'E':>3} {'r':>3} {'k':>2} {'mode':>8} {'base ms':>8}  " + "  ".join(f"{n:>16}" for n in names)
    print(head)
    for row in rows:
        for mode in ("fwd", "fwd+bwd"):
            m = row[mode]
            cells = "  ".join(_ratio(m.get(n), 16) for n in names)
            print(f"{row['d']:>5} {row['T']:>5} {row['E']:>3} {row['r']:>3} {row['k']:>2} {mode:>8} {m['base']['ms']:>8.1f}  {cells}")


def markdown_table(rows: list[dict]) -> str:
    """The README table: fwd+bwd (and fwd) ratios to the base linear."""
    names = _variant_names(rows)
    lines = ["| d | T | E | r | k | base fwd+bwd ms | " + " | ".join(names) + " |",
             "|---" * (6 + len(names)) + "|"]
    for row in rows:
        fb, f = row["fwd+bwd"], row["fwd"]
        cells = " | ".join(f"{_ratio(fb.get(n))} ({_ratio(f.get(n))})" if n in fb else "-" for n in names)
        lines.append(f"| {row['d']} | {row['T']} | {row['E']} | {row['r']} | {row['k']} | {fb['base']['ms']:.0f} | {cells} |")
    return "\n".join(lines)


def switch_point(device, dtype, repeats: int) -> list[dict]:
    """Grouped / dense time ratio of the torch forms, forward + backward, d=1024, T=4096."""
    rows = []
    for r, k in [(8, 1), (8, 2), (16, 1), (16, 2)]:
        line = []
        for E in [2, 4, 8, 16, 32, 64]:
            if E <= k:
                continue
            p = Problem(1024, 4096, E, r, k, device, dtype)
            v = {"dense": ((lambda: p.form(False)), p), "grouped": ((lambda: p.form(True)), p)}
            with torch.enable_grad():
                t = time_variants(v, device, repeats, True)
            rows.append({"E": E, "r": r, "k": k, "dense_ms": 1e3 * t["dense"], "grouped_ms": 1e3 * t["grouped"],
                         "ratio": t["grouped"] / t["dense"]})
            line.append(f"E={E} {t['grouped'] / t['dense']:.2f}")
        print(f"k={k} r={r:<2}: " + "  ".join(line), flush=True)
    return rows


def gather_point(device, dtype, repeats: int) -> list[dict]:
    """Gathered / grouped time ratio, forward (decoding), r = 8, k = 1, 64 active experts of 512,
    ``rows`` tokens per active expert (:data:`molora.kernels.grouped.GATHER_MAX_WEIGHTS_PER_EXPERT`)."""
    from molora.kernels.grouped import routed_lora_grouped

    rows, r, E, active = [], 8, 512, 64
    for d in (256, 1024, 4096):
        A = torch.randn(E, r, d, device=device, dtype=dtype) * 0.01
        B = torch.randn(E, d, r, device=device, dtype=dtype) * 0.01
        s = torch.ones(E, device=device, dtype=dtype)
        line = []
        for per in (1, 2, 4, 8, 16):
            T = per * active
            x = torch.randn(T, d, device=device, dtype=dtype)
            idx = ((torch.arange(T, device=device) % active) * (E // active)).unsqueeze(1)
            g = torch.rand(T, 1, device=device, dtype=dtype)
            calls = {"grouped": lambda: routed_lora_grouped(x, A, B, g, idx, s, gather=False),
                     "gather": lambda: routed_lora_grouped(x, A, B, g, idx, s, gather=True)}
            with torch.no_grad():
                t = interleaved_medians(calls, repeats, clock=CLOCK, sync=lambda: sync(device))
            rows.append({"d": d, "rows_per_expert": per, "r": r, "active": active, "E": E,
                         "grouped_ms": 1e3 * t["grouped"], "gather_ms": 1e3 * t["gather"],
                         "ratio": t["gather"] / t["grouped"], "weights_per_expert": per * r * 2 * d})
            line.append(f"{per} rows {t['gather'] / t['grouped']:.2f}")
        print(f"d={d:<5}: " + "  ".join(line), flush=True)
    return rows


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        parts = tuple(int(v) for v in item.lower().split("x"))
        if len(parts) != 5:
            raise SystemExit(f"benchmarks/grouped_kernels.py: a shape is d x T x E x r x k; got {item!r}")
        shapes.append(parts)
    return shapes


def main(argv=None) -> int:
    """Run the benchmark; ``--markdown PATH`` only reprints a results JSON as a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the issue's whole grid")
    ap.add_argument("--shapes", help="comma-separated d x T x E x r x k (the targets are always added)")
    ap.add_argument("--switch", action="store_true", help="measure the torch dense/grouped switch point")
    ap.add_argument("--gather", action="store_true", help="measure the grouped/gathered switch point")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock (default), or the thread's CPU time (needs --threads 1): steadier on a shared machine")
    ap.add_argument("--skip", default="",
                    help="comma-separated variants not to time, except at the target shapes (e.g. "
                         "'routed[reference],naive-loop' for the --full grid on a CPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None, help="print the markdown table of a results JSON and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())["rows"]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            raise SystemExit("benchmarks/grouped_kernels.py: --clock cpu times one thread; add --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    meta = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "clock": args.clock,
            "torch": torch.__version__, "command": " ".join(["python", "benchmarks/grouped_kernels.py", *(argv or sys.argv[1:])])}
    results_dir = Path(__file__).resolve().parent / "results"
    # CPU results of more than one thread get their own file: kernels-cpu-threads2.json
    suffix = f"-threads{meta['threads']}" if device.type == "cpu" and meta["threads"] != 1 else ""
    suffix += "-cpuclock" if args.clock == "cpu" else ""
    results_dir.mkdir(exist_ok=True)
    if args.switch:
        rows = switch_point(device, dtype, args.repeats)
        path = Path(args.out or results_dir / f"kernels-switch-{meta['device']}{suffix}.json")
        path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
        print(f"wrote {path}")
        return 0
    if args.gather:
        rows = gather_point(device, dtype, args.repeats)
        path = Path(args.out or results_dir / f"kernels-gather-{meta['device']}{suffix}.json")
        path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
        print(f"wrote {path}")
        return 0
    shapes = FULL if args.full else (parse_shapes(args.shapes) if args.shapes else DEFAULT)
    shapes = list(dict.fromkeys(TARGETS + shapes))
    backends = [b for b in available_backends() if b != "triton" or device.type == "cuda"]
    rows = []
    skip = frozenset(v for v in args.skip.split(",") if v)
    for shape in shapes:
        rows.append(bench_shape(shape, device, dtype, args.repeats, backends, frozenset() if shape in TARGETS else skip))
        print_table(rows[-1:])
        sys.stdout.flush()
    print("\nratios to the base linear (median of %d, interleaved):" % args.repeats)
    print_table(rows)
    print("\nfwd+bwd (fwd) ratios, markdown:\n" + markdown_table(rows))
    path = Path(args.out or results_dir / f"kernels-{meta['device']}{suffix}.json")
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
