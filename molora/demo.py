"""``molora demo``: the whole story on an embedded default, offline, on a CPU.

1. Load the shipped all-MiniLM-L6-v2 encoder and generate small text-classification tasks.
2. Train one rank-8 LoRA expert per task (one molora expert each, routed by task id).
3. Export every expert as a Hugging Face PEFT adapter folder.
4. Compose the adapter folders into one routed model (:func:`molora.compose`), and train a
   sequence-level soft router on a few shots per task (experts frozen), so that no task id is
   needed at inference.
5. Print per-task accuracy: zero-shot base, each single expert, task-id routing (oracle) and
   the learned router.

Classification needs no per-task head: a text's score for a label is the cosine similarity of
its embedding to the frozen embedding of the label's name (see :mod:`molora.textcls`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import molora
from molora.data import TextTask, make_synthetic_tasks
from molora.textcls import LabelPrototypes, evaluate, load_encoder, train


def _routing_to(model: molora.MoLoRAModel, task_id: int):
    """batch_context that routes every example of a batch to ``task_id``."""
    return lambda texts, ids: model.routing(task_ids=[task_id] * len(texts))


def run_demo(
    out_dir: str | Path = "molora-demo-out",
    *,
    seed: int = 0,
    num_experts: int = 3,
    epochs: float = 5,
    shots: int = 16,
    n_train: int = 240,
    n_test: int = 120,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``out_dir/results.json``)."""
    start = time.perf_counter()
    out = Path(out_dir)
    torch.manual_seed(seed)
    print("molora demo: loading all-MiniLM-L6-v2 (offline) and generating tasks ...")
    base, tok = load_encoder()
    tasks: list[TextTask] = make_synthetic_tasks(seed=seed, n_train=n_train, n_test=n_test)[:num_experts]
    names = [t.name for t in tasks]
    # Label prototypes come from the frozen encoder, computed before any adapter exists.
    protos = LabelPrototypes(base, tok).precompute(tasks)

    def acc(model: torch.nn.Module, task_index: int, context=None) -> float:
        return evaluate(model, tok, tasks[task_index], prototypes=protos, task_index=task_index, batch_context=context)

    results: dict[str, dict[str, float]] = {t.name: {} for t in tasks}
    for i, t in enumerate(tasks):
        results[t.name]["zero-shot"] = acc(base, i)

    print(f"training {len(tasks)} LoRA experts (rank 8 on query/value), one per task: {', '.join(names)}")
    config = molora.MoLoRAConfig(target_modules=["query", "value"], num_experts=len(tasks), rank=8, alpha=16,
                                 router="task", expert_names=names)
    model = molora.get_molora_model(base, config)
    for i, t in enumerate(tasks):
        train(model, tok, t, params=[p for n, p in model.named_parameters() if p.requires_grad], epochs=epochs,
              lr=2e-3, seed=seed + i, prototypes=protos, batch_context=_routing_to(model, i), progress=progress)
    adapters = {}
    for name in names:
        adapters[name] = out / "adapters" / name
        model.export_peft(adapters[name], weights={name: 1.0})
    base = model.unload()
    print(f"exported {len(adapters)} PEFT adapters to {out / 'adapters'}; composing them with a learned router")

    # Each single expert on every task, and the oracle (each task's own expert), by task routing.
    fixed = molora.compose(base, adapters, router="task")
    for i, t in enumerate(tasks):
        for j, expert in enumerate(names):
            results[t.name][f"expert {expert}"] = acc(fixed, i, _routing_to(fixed, j))
        results[t.name]["task-id routing"] = results[t.name][f"expert {t.name}"]

    # No task id: a soft router per layer, deciding per example, trained on a few shots.
    routed = molora.compose(fixed.unload(), adapters, router="soft", granularity="sequence")
    few = [t.with_limits(train=shots, seed=seed) for t in tasks]
    train(routed, tok, few, params=routed.trainable_parameters(), epochs=20, lr=5e-2, seed=seed,
          prototypes=protos, progress=progress)
    for i, t in enumerate(tasks):
        results[t.name]["learned router"] = acc(routed, i)

    _print_table(results, names, shots)
    summary = {"tasks": names, "accuracy": results, "shots_per_task": shots, "seconds": round(time.perf_counter() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['seconds']} s; results in {out / 'results.json'}")
    return summary


def _print_table(results: dict[str, dict[str, float]], names: list[str], shots: int) -> None:
    methods = list(next(iter(results.values())).keys())
    width = max(len(m) for m in methods) + 2
    print()
    print("accuracy".ljust(width) + "".join(n.rjust(12) for n in names) + "mean".rjust(10))
    for m in methods:
        row = [results[n][m] for n in names]
        print(m.ljust(width) + "".join(f"{v:12.3f}" for v in row) + f"{sum(row) / len(row):10.3f}")
    print(f"(learned router: a soft sequence-level router per layer trained on {shots} shots per task, no task id)")
