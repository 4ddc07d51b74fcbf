"""Routed Embedding / Conv2d LoRA (molora/routed_embedding.py, molora/routed_conv.py) against PEFT.

E PEFT LoRA adapters (rank r) on one ``nn.Embedding(V, d)`` (``T`` token ids) or one
``nn.Conv2d(c, c, 3, padding=1)`` (``[N, c, H, W]``), composed by ``molora.compose``; forward only,
eval, one intra-op thread, interleaved medians (:mod:`timing`). Variants, as time / the bare base
layer's time in the same round:

* ``peft``: PEFT's ``lora.Embedding`` / ``lora.Conv2d`` with one adapter active;
* ``task``: molora, ``router="task"``, each example routed to one of the E adapters;
* ``topk``: molora, a per-layer top-2 router over the E adapters.

    python benchmarks/embconv.py --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402


def _holder(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.layer = module
    holder.forward = lambda x: holder.layer(x)
    return holder.eval()


def _variants(kind: str, E: int, r: int, tmp: Path) -> tuple[dict, torch.Tensor]:
    from peft import LoraConfig, PeftModel, get_peft_model

    import molora

    if kind == "embedding":
        base = _holder(torch.nn.Embedding(32000, 512))
        x = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(1))
    else:
        base = _holder(torch.nn.Conv2d(64, 64, 3, padding=1))
        x = torch.randn(4, 64, 32, 32, generator=torch.Generator().manual_seed(1))
    folders = {}
    for e in range(E):
        torch.manual_seed(e)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"],
                                                            init_lora_weights=False))
        folders[f"a{e}"] = tmp / f"a{e}"
        pm.save_pretrained(str(folders[f"a{e}"]))
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(folders["a0"])).eval()
    task = molora.compose(copy.deepcopy(base), folders, router="task").eval()
    topk = molora.compose(copy.deepcopy(base), folders, router="topk", top_k=2).eval()
    ids = [e % E for e in range(x.shape[0])]

    def run_task():
        with task.routing(task_ids=ids):
            return task(x)

    return {"base": lambda: base(x), "peft": lambda: peft(x), "task": run_task, "topk": lambda: topk(x)}, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for kind in ("embedding", "conv2d"):
            calls, _ = _variants(kind, args.experts, args.rank, Path(tmp) / kind)
            med = interleaved_medians(calls, args.rounds)
            results[kind] = {"base_ms": 1e3 * med["base"], **{k: med[k] / med["base"] for k in ("peft", "task", "topk")}}
            print(f"{kind:9s} base {1e3 * med['base']:.2f} ms | x base: peft {results[kind]['peft']:.2f}  "
                  f"task {results[kind]['task']:.2f}  topk {results[kind]['topk']:.2f}  (E={args.experts}, r={args.rank})")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
