"""Many adapters on one base: each sequence of a batch routed to its own adapter, against PEFT.

A tiny LLaMA (hidden 256, 4 layers, vocabulary 1024) carries N rank-8 LoRA adapters on q/k/v/o;
a batch of 64 sequences x 64 tokens routes sequence b to adapter ``b * (N // 64)`` (64 distinct
adapters active, all N registered; N < 64: ``b % N``). Timed in the same run, interleaved
(medians over rounds), inference (``torch.no_grad``):

* ``forward``: one forward of the batch: the base model, molora (task routing,
  ``model.routing(task_ids=...)``), PEFT's mixed batch (``adapter_names=``) with the same weights;
* ``generate``: greedy decoding of 16 new tokens with the KV cache, the same three;
* ``layer``: one routed q-projection-sized layer (d = 1024, 1024 tokens as 16 sequences of 64,
  8 active experts, task routing) against its bare linear, for E = 8 ... 1024: the routed layer's
  cost at a fixed number of active experts.

* ``pool``: adapters on demand (:class:`molora.AdapterPool`): ``--pool-adapters`` (default 256)
  PEFT adapter folders on disk served through 64 slots; a batch naming 64 adapters not resident
  (cold: read from disk, memory-mapped safetensors), 64 others evicted into the host cache and
  read back (warm), and all resident (hit): forward time of each batch against the resident one
  and the seconds per adapter load.

Also: the time to build each model with N adapters, and the adapters' bytes. PEFT builds
adapters one ``add_adapter`` at a time (each walks the model); beyond ``--peft-max`` (default
256) it is not built and its cost is extrapolated from the last two sizes, so reported as such.
Outputs of molora and PEFT are checked equal (max |diff| reported) before timing.

    python benchmarks/many_adapters.py                     # N = 4, 16, 64, 256, 1024, one thread
    python benchmarks/many_adapters.py --threads 2
    python benchmarks/many_adapters.py --sizes 64 --rounds 3   # quick

Writes ``benchmarks/results/many-adapters[-threadsN].json`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ, NEW_TOKENS, RANK = 64, 64, 16, 8


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def build_molora(base, n: int):
    """``get_molora_model`` with n task-routed experts; random non-zero B (so every adapter counts)."""
    from molora import MoLoRAConfig, get_molora_model

    model = get_molora_model(base, MoLoRAConfig(target_modules=TARGETS, num_experts=n, rank=RANK, alpha=2.0 * RANK,
                                                router="task"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for b in layer.bank.B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    return model.eval()


def build_peft(base, molora_model, n: int):
    """PEFT with the same n adapters (weights copied from molora's banks)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(base, cfg, adapter_name="a0")
    for e in range(1, n):
        model.add_adapter(f"a{e}", cfg)
    layers = molora_model.routed_layers()
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and name in layers:
                bank = layers[name].bank
                for e in range(n):
                    module.lora_A[f"a{e}"].weight.copy_(bank.A[e])
                    module.lora_B[f"a{e}"].weight.copy_(bank.B[e])
    return model.eval()


def assignment(n: int) -> list[int]:
    """The adapter of each sequence: 64 distinct ones when n >= 64."""
    return [b * (n // BATCH) for b in range(BATCH)] if n >= BATCH else [b % n for b in range(BATCH)]


def bench_size(n: int, rounds: int, peft_max: int) -> dict:
    # token 0 is the pad id generate is given: the prompts hold none
    ids = torch.randint(1, 1024, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    experts = assignment(n)
    task_ids = torch.tensor(experts)
    base = tiny_llama()
    plain = copy.deepcopy(base)
    t0 = time.perf_counter()
    mol = build_molora(copy.deepcopy(base), n)
    build_molora_s = time.perf_counter() - t0
    row = {"N": n, "active": len(set(experts)), "build_molora_s": build_molora_s,
           "adapter_mib": sum(p.numel() * p.element_size() for p in mol.parameters() if p is not None) / 2**20
           - sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20}
    peft = None
    if n <= peft_max:
        t0 = time.perf_counter()
        peft = build_peft(copy.deepcopy(base), mol, n)
        row["build_peft_s"] = time.perf_counter() - t0
    names = [f"a{e}" for e in experts]
    gen = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "use_cache": True, "pad_token_id": 0, "attention_mask": mask}

    def mol_forward():
        with mol.routing(task_ids=task_ids):
            return mol(ids).logits

    def mol_generate():
        with mol.routing(task_ids=task_ids):
            return mol.generate(ids, **gen)

    with torch.no_grad():
        y_mol = mol_forward()
        if peft is not None:
            y_peft = peft(input_ids=ids, adapter_names=names).logits
            row["max_abs_diff_vs_peft"] = float((y_mol - y_peft).abs().max())
            row["generate_equal_to_peft"] = bool(torch.equal(mol_generate(), peft.generate(input_ids=ids, adapter_names=names, **gen)))
        fwd = {"base": lambda: plain(ids).logits, "molora": mol_forward}
        gen_calls = {"base": lambda: plain.generate(ids, **gen), "molora": mol_generate}
        if peft is not None:
            fwd["peft"] = lambda: peft(input_ids=ids, adapter_names=names).logits
            gen_calls["peft"] = lambda: peft.generate(input_ids=ids, adapter_names=names, **gen)
        tf = interleaved_medians(fwd, rounds)
        tg = interleaved_medians(gen_calls, rounds)
    row["forward_ms"] = {k: 1e3 * v for k, v in tf.items()}
    row["generate_ms"] = {k: 1e3 * v for k, v in tg.items()}
    row["forward_vs_base"] = {k: v / tf["base"] for k, v in tf.items() if k != "base"}
    row["generate_vs_base"] = {k: v / tg["base"] for k, v in tg.items() if k != "base"}
    if peft is not None:
        row["forward_speedup_vs_peft"] = tf["peft"] / tf["molora"]
        row["generate_speedup_vs_peft"] = tg["peft"] / tg["molora"]
    return row


def bench_layer(sizes: list[int], rounds: int) -> list[dict]:
    """One routed d=1024 layer, 1024 tokens (16 sequences x 64), 8 active experts, vs its bare linear."""
    from molora import MoLoRAConfig, get_molora_model

    d, seqs, per = 1024, 16, 64
    x = torch.randn(seqs, per, d, generator=torch.Generator().manual_seed(0))
    rows = []
    for E in sizes:
        torch.manual_seed(0)
        holder = torch.nn.Module()
        holder.proj = torch.nn.Linear(d, d).requires_grad_(False)
        bare = copy.deepcopy(holder.proj)
        holder.forward = lambda t: holder.proj(t)
        model = get_molora_model(holder, MoLoRAConfig(target_modules=["proj"], num_experts=E, rank=RANK,
                                                      alpha=2.0 * RANK, router="task"))
        task_ids = torch.tensor([(s % 8) * (E // 8) for s in range(seqs)])

        def routed():
            with model.routing(task_ids=task_ids):
                return model(x)

        with torch.no_grad():
            t = interleaved_medians({"base": lambda: bare(x), "routed": routed}, rounds)
        rows.append({"E": E, "active": 8, "base_ms": 1e3 * t["base"], "routed_ms": 1e3 * t["routed"],
                     "vs_base": t["routed"] / t["base"]})
        print(f"layer E={E:<5} routed/base {t['routed'] / t['base']:.3f}x  ({1e3 * t['routed']:.2f} ms)", flush=True)
    return rows


def write_adapters(base, folder: Path, n: int) -> list[Path]:
    """n rank-8 PEFT adapter folders for ``base`` (random factors, PEFT's key names and config)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    template = get_peft_model_state_dict(get_peft_model(copy.deepcopy(base), cfg))
    g = torch.Generator().manual_seed(2)
    dirs = []
    for i in range(n):
        d = folder / f"a{i}"
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(str(d))
        save_file({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in template.items()}, str(d / "adapter_model.safetensors"))
        dirs.append(d)
    return dirs


def bench_pool(n_adapters: int, rounds: int) -> dict:
    """Adapters on demand: cold (disk), warm (host cache) and resident batches of 64 adapters."""
    import tempfile

    from molora import AdapterPool

    ids = torch.randint(1, 1024, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    base = tiny_llama()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(base, Path(tmp), n_adapters)
        model = build_molora(copy.deepcopy(base), BATCH)
        pool = AdapterPool(model, host_cache_bytes=2**40)  # large enough: every evicted adapter stays warm
        for i, d in enumerate(dirs):
            pool.register(f"a{i}", d)
        groups = [[f"a{i}" for i in range(g * BATCH, (g + 1) * BATCH)] for g in range(n_adapters // BATCH)]
        if len(groups) < 2:
            raise SystemExit("--pool-adapters must be at least 128 (two batches of 64 distinct adapters)")

        def forward(names):
            with pool.routing(names):
                return model(ids).logits

        times: dict[str, list[float]] = {"cold": [], "warm": [], "resident": []}
        per_load: dict[str, list[float]] = {"cold": [], "warm": []}
        with torch.no_grad():
            # round r: group r from disk (cold, while unread groups are left; it evicts the resident
            # group), then the group evicted last back from the host cache (warm); each batch then
            # runs again, all resident
            resident, evicted = None, None
            for r in range(rounds):
                order = [("cold", groups[r])] if r < len(groups) else []
                order += [("warm", None)]
                for kind, names in order:
                    names = names if kind == "cold" else evicted
                    if names is None:
                        continue
                    stat = ("cold_seconds", "cold_loads") if kind == "cold" else ("warm_seconds", "warm_loads")
                    before = [getattr(pool.stats, f) for f in stat]
                    t0 = time.perf_counter()
                    forward(names)
                    times[kind].append(time.perf_counter() - t0)
                    secs, loads = (getattr(pool.stats, f) - v for f, v in zip(stat, before))
                    if loads:
                        per_load[kind].append(secs / loads)
                    resident, evicted = names, resident
                    t0 = time.perf_counter()
                    forward(names)
                    times["resident"].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items() if v}
    row = {"adapters": n_adapters, "slots": BATCH, "rounds": rounds,
           "forward_ms": {k: 1e3 * v for k, v in med.items()},
           "forward_vs_resident": {k: v / med["resident"] for k, v in med.items() if k != "resident"},
           # the whole cost of bringing an adapter in (read + copy into its slot), from the batch times
           "load_ms_per_adapter": {k: 1e3 * (med[k] - med["resident"]) / BATCH for k in ("cold", "warm") if k in med},
           # the read alone (disk or host cache), from the pool's own counters
           "read_ms_per_adapter": {k: 1e3 * sorted(v)[len(v) // 2] for k, v in per_load.items() if v},
           "stats": vars(pool.stats)}
    print(f"pool: {n_adapters} adapters, 64 slots: forward with 64 cold loads {row['forward_vs_resident'].get('cold', float('nan')):.2f}x "
          f"the resident batch, 64 warm {row['forward_vs_resident'].get('warm', float('nan')):.2f}x; per adapter cold "
          f"{row['load_ms_per_adapter'].get('cold', float('nan')):.2f} ms (read {row['read_ms_per_adapter'].get('cold', float('nan')):.2f}), "
          f"warm {row['load_ms_per_adapter'].get('warm', float('nan')):.2f} ms", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,16,64,256,1024")
    ap.add_argument("--layer-sizes", default="8,64,256,1024")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peft-max", type=int, default=256, help="largest N for which PEFT is built")
    ap.add_argument("--pool-adapters", type=int, default=256, help="adapters on disk for the pool benchmark (0: skip)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows = []
    for n in sizes:
        rows.append(bench_size(n, args.rounds, args.peft_max))
        r = rows[-1]
        peft = f" | peft fwd {r['forward_vs_base'].get('peft', float('nan')):.2f}x gen {r['generate_vs_base'].get('peft', float('nan')):.2f}x"
        print(f"N={n:<5} molora fwd {r['forward_vs_base']['molora']:.2f}x gen {r['generate_vs_base']['molora']:.2f}x{peft}"
              f" | build molora {r['build_molora_s']:.1f}s peft {r.get('build_peft_s', float('nan')):.1f}s"
              f" | max|diff| {r.get('max_abs_diff_vs_peft', float('nan')):.1e}", flush=True)
    layer = bench_layer([int(s) for s in args.layer_sizes.split(",") if s], args.rounds)
    pool = bench_pool(args.pool_adapters, args.rounds) if args.pool_adapters else None
    print("\n| N adapters | forward: PEFT / base | molora / base | molora vs PEFT | generate: PEFT / base | molora / base | molora vs PEFT |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f, g = r["forward_vs_base"], r["generate_vs_base"]
        fp = f"{f['peft']:.2f}x" if "peft" in f else "not built"
        gp = f"{g['peft']:.2f}x" if "peft" in g else "not built"
        sf = f"{r['forward_speedup_vs_peft']:.2f}x" if "peft" in f else "-"
        sg = f"{r['generate_speedup_vs_peft']:.2f}x" if "peft" in g else "-"
        print(f"| {r['N']} | {fp} | {f['molora']:.2f}x | {sf} | {gp} | {g['molora']:.2f}x | {sg} |")
    meta = {"command": "python benchmarks/many_adapters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads, "torch": torch.__version__, "rounds": args.rounds,
            "shape": {"batch": BATCH, "seq": SEQ, "new_tokens": NEW_TOKENS, "rank": RANK, "hidden": 256, "layers": 4}}
    suffix = f"-threads{args.threads}" if args.threads != 1 else ""
    path = Path(args.out or Path(__file__).resolve().parent / "results" / f"many-adapters{suffix}.json")
    path.write_text(json.dumps({**meta, "rows": rows, "layer": layer, "pool": pool}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
