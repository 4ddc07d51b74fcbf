"""One forward of N composed LoRA adapters: molora (one pass) against PEFT's X-LoRA (two passes).

X-LoRA is built for causal LMs, so the model here is a tiny LLaMA (``transformers.LlamaConfig``,
random init, built from the config: no download). For each N in ``--experts``:

1. N PEFT LoRA adapters (random non-zero A and B, ``--rank``, on ``--targets``) are made with
   ``peft`` and saved to a temporary folder.
2. molora composes them from those folders (:func:`molora.compose`, the real path) and routes
   them three ways: ``static_mixture`` (weights 1/N), ``gradient_router`` (per-layer soft
   routers of :func:`molora.train_router`, untrained) and ``xlora_style`` (the one-pass
   X-LoRA-style classifier of :mod:`molora.xlora_style`, hidden width ``--xlora-hidden``).
3. PEFT's X-LoRA loads the same folders (``XLoraConfig(adapters=...)``, layer-wise scalings,
   classifier depth 2 of width ``--xlora-hidden``, so its classifier has the shape of ours).

Checks before timing (recorded in the JSON): every output is finite and of the same shape;
the number of passes through the decoder and of LoRA products per forward is counted with
hooks; and with X-LoRA's classifier output layer set to zero (softmax: scalings 1/N for every
token and layer) its logits must equal molora's static 1/N mixture (and our untrained
classifier, which starts uniform) and differ from the base model's.

Timing: one forward of batch ``--batch`` x ``--seq`` tokens under ``torch.no_grad()``, the
variants interleaved round-robin, median of ``--rounds`` rounds after one warm-up round, for
each thread count in ``--threads`` (0 = torch's default). Ratios peft_xlora_ms / molora_ms are
within one run. Writes ``benchmarks/results/xlora-forward.json``.

    python benchmarks/xlora_forward.py
    python benchmarks/xlora_forward.py --experts 4 --layers 2 --hidden 64 --batch 4 --seq 8 --rounds 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import molora  # noqa: E402
from molora.layer import RoutedLoRALinear  # noqa: E402
from molora.train_router import install_router  # noqa: E402
from molora.xlora_style import attach_xlora_style  # noqa: E402
from peft_xlora import load_peft_xlora  # noqa: E402
from timing import interleaved_medians  # noqa: E402

MOLORA = ["static_mixture", "gradient_router", "xlora_style"]


def tiny_llama(args) -> nn.Module:
    """A random LLaMA causal LM of the requested size (eval mode, no KV cache)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(2 * args.seq, 128), use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def make_adapters(base: nn.Module, n: int, folder: Path, args) -> dict[str, Path]:
    """``n`` PEFT LoRA adapters with random non-zero factors, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","),
                         lora_dropout=0.0, init_lora_weights=False)
        pm = get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():  # deltas ~ 0.1 |x| per adapter, the size of trained ones (PEFT's random init is far larger)
            for name, w in pm.named_parameters():
                if "lora_A" in name:
                    w.normal_(0.0, w.shape[1] ** -0.5)
                elif "lora_B" in name:
                    w.normal_(0.0, 0.1 * w.shape[1] ** -0.5)
        dirs[f"expert{i}"] = folder / f"expert{i}"
        pm.save_pretrained(str(dirs[f"expert{i}"]))
    return dirs


def build_variants(base: nn.Module, dirs: dict[str, Path], args) -> dict[str, nn.Module]:
    n = len(dirs)
    variants: dict[str, nn.Module] = {"base": copy.deepcopy(base)}
    variants["molora static_mixture"] = molora.compose(copy.deepcopy(base), dirs, router="static", weights=[1.0 / n] * n)
    variants["molora gradient_router"] = molora.compose(copy.deepcopy(base), dirs)
    install_router(variants["molora gradient_router"], "per_layer")
    variants["molora xlora_style"] = molora.compose(copy.deepcopy(base), dirs)
    attach_xlora_style(variants["molora xlora_style"], hidden=args.xlora_hidden)
    variants["peft_xlora"] = load_peft_xlora(base, dirs, task_type="CAUSAL_LM", xlora_depth=2,
                                             xlora_size=args.xlora_hidden, layerwise_scalings=True)
    return variants


def count_work(model: nn.Module, inputs: dict) -> dict[str, int]:
    """Hooks count, in one forward, the calls of the first decoder layer (= passes through the
    model) and the LoRA products (PEFT: ``lora_A`` calls, one per adapter; molora: routed-layer
    calls, all experts at once)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    counts = {"decoder_passes": 0, "lora_calls": 0}

    def bump(key):
        return lambda *_: counts.__setitem__(key, counts[key] + 1)

    first = next(m for m in model.modules() if isinstance(m, LlamaDecoderLayer))
    hooks = [first.register_forward_hook(bump("decoder_passes"))]
    hooks += [m.register_forward_hook(bump("lora_calls")) for name, m in model.named_modules()
              if isinstance(m, RoutedLoRALinear) or (".lora_A." in name and isinstance(m, nn.Linear))]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return counts


def check_outputs(variants: dict[str, nn.Module], inputs: dict, n: int) -> dict:
    """Finite outputs of one shape; X-LoRA at scalings 1/N == molora's 1/N mixture != base."""
    with torch.no_grad():
        logits = {k: m(**inputs).logits for k, m in variants.items()}
        shapes = {k: list(v.shape) for k, v in logits.items()}
        if len(set(map(tuple, shapes.values()))) != 1 or not all(torch.isfinite(v).all() for v in logits.values()):
            raise RuntimeError(f"xlora_forward: outputs differ in shape or are not finite: {shapes}")
        peft = variants["peft_xlora"]
        last = peft.base_model.internal_xlora_classifier.layers[-1]
        saved = copy.deepcopy(last.state_dict())
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        try:
            uniform = peft(**inputs).logits
            scalings = peft.base_model.get_latest_scalings()
        finally:
            last.load_state_dict(saved)
    torch.testing.assert_close(scalings, torch.full_like(scalings, 1.0 / n))
    ref = logits["molora static_mixture"]
    diff = {k: float((logits[k] - uniform).abs().max()) for k in ("molora static_mixture", "molora xlora_style", "base")}
    scale = float(ref.abs().max())
    if diff["molora static_mixture"] > 1e-4 * scale or diff["molora xlora_style"] > 1e-4 * scale:
        raise RuntimeError(f"xlora_forward: PEFT X-LoRA at scalings 1/N differs from molora's 1/N mixture: {diff}")
    if diff["base"] < 1e-3 * scale:
        raise RuntimeError(f"xlora_forward: PEFT X-LoRA output equals the base model's: the adapters are not applied ({diff})")
    return {"shape": shapes["base"], "finite": True, "max_abs_logit": scale,
            "max_abs_diff_peft_xlora_uniform_vs": diff}


def time_variants(variants: dict[str, nn.Module], inputs: dict, rounds: int) -> dict[str, float]:
    with torch.no_grad():
        seconds = interleaved_medians({k: (lambda m=m: m(**inputs)) for k, m in variants.items()}, rounds)
    return {k: 1000 * v for k, v in seconds.items()}


def run(n: int, base: nn.Module, inputs: dict, thread_counts: list[int], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(base, n, Path(tmp), args)
        variants = build_variants(base, dirs, args)
    checks = check_outputs(variants, inputs, n)
    work = {k.removeprefix("molora "): count_work(m, inputs) for k, m in variants.items()}
    lora_layers = len(variants["molora static_mixture"].routed_layers())
    for k, w in work.items():
        per_pass = 0 if k == "base" else lora_layers * (n if k == "peft_xlora" else 1)
        w["passes_with_lora"] = w["lora_calls"] // per_pass if per_pass else 0
    by_threads = {}
    for t in thread_counts:
        torch.set_num_threads(t)
        ms = time_variants(variants, inputs, args.rounds)
        ms = {k.removeprefix("molora "): v for k, v in ms.items()}
        by_threads[str(t)] = {"ms": ms, "ratio_peft_xlora_over_molora": {m: ms["peft_xlora"] / ms[m] for m in MOLORA},
                              "ratio_over_base": {k: v / ms["base"] for k, v in ms.items()}}
    return {"experts": n, "lora_layers": lora_layers, "checks": checks, "work_per_forward": work, "threads": by_threads}


def print_table(out: dict) -> None:
    s = out["setup"]
    print(f"\nforward of a random LLaMA ({s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}), batch "
          f"{s['batch']} x {s['seq']} tokens, LoRA r={s['rank']} on {s['targets']}; median of {s['rounds']} rounds, no_grad")
    labels = ["base"] + MOLORA + ["peft_xlora"]
    print(f"{'N':>3} {'threads':>7} " + "".join(f"{lab + ' ms':>20}" for lab in labels)
          + "".join(f"{'xlora/' + m:>24}" for m in MOLORA))
    for n, res in out["results"].items():
        for t, r in res["threads"].items():
            print(f"{n:>3} {t:>7} " + "".join(f"{r['ms'][lab]:20.1f}" for lab in labels)
                  + "".join(f"{r['ratio_peft_xlora_over_molora'][m]:23.2f}x" for m in MOLORA))
    print("\npasses through the decoder per forward (passes that compute the LoRA products):")
    for n, res in out["results"].items():
        print(f"  N={n}: " + ", ".join(f"{k} {w['decoder_passes']} ({w['passes_with_lora']})"
                                      for k, w in res["work_per_forward"].items()))
    for n, res in out["results"].items():
        d = res["checks"]["max_abs_diff_peft_xlora_uniform_vs"]
        print(f"  N={n}: outputs finite, shape {res['checks']['shape']}; X-LoRA with scalings 1/N vs molora static 1/N: "
              f"max |diff| {d['molora static_mixture']:.2e}, vs molora xlora_style (untrained = uniform) "
              f"{d['molora xlora_style']:.2e}, vs base {d['base']:.2e} (max |logit| {res['checks']['max_abs_logit']:.2f})")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", default="4,8", help="comma-separated numbers of adapters N")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--xlora-hidden", type=int, default=32, help="hidden width of both classifiers")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", default="1,0", help="comma-separated thread counts; 0 = torch's default")
    p.add_argument("--out", default=str(ROOT / "results" / "xlora-forward.json"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    default_threads = torch.get_num_threads()
    thread_counts = [int(t) or default_threads for t in args.threads.split(",")]
    base = tiny_llama(args)
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    import peft

    out = {"setup": {k: v for k, v in vars(args).items() if k != "out"} | {
        "model": "LlamaForCausalLM, random init from LlamaConfig", "default_threads": default_threads,
        "peft": peft.__version__, "torch": torch.__version__,
        "peft_xlora": "XLoraConfig(layerwise_scalings=True, xlora_depth=2, xlora_size=--xlora-hidden)"},
        "results": {}}
    try:
        for n in [int(x) for x in args.experts.split(",")]:
            out["results"][str(n)] = run(n, base, inputs, thread_counts, args)
    finally:
        torch.set_num_threads(default_threads)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(out)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path} ({out['seconds']} s)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
