"""``molora demo``: the whole story on an embedded default, offline, on a CPU.

1. Load the shipped all-MiniLM-L6-v2 encoder and generate small text-classification tasks.
2. Train one rank-8 LoRA expert per task (one molora expert each, routed by task id).
3. Export every expert as a Hugging Face PEFT adapter folder.
4. Compose the adapter folders into one routed model (:func:`molora.compose`), and train a
   sequence-level soft router on a few shots per task (experts frozen), so that no task id is
   needed at inference.
5. A *new* task arrives with only a few labelled shots: compose the existing experts for it and
   weigh them from the shots: uniform weights, the best single expert by retrieval, LoRAHub's
   CMA-ES (:func:`molora.lorahub.lorahub`), a gradient-trained router (:func:`molora.train_router`),
   and the default ``method="auto"``, which picks one of them by cross-validation on the shots.
6. Another task arrives with a full training set: add one expert for it
   (:meth:`MoLoRAModel.add_expert`), train only that expert (the earlier ones are frozen), then
   serve every task by retrieval routing (each expert's key = the mean sentence embedding of a
   few of its task's inputs), and check that the earlier tasks kept their accuracy.
7. Print a summary table, save ``results.json`` and a plot (``summary.png``).

Classification needs no per-task head: a text's score for a label is the cosine similarity of
its embedding to the frozen embedding of the label's name (see :mod:`molora.apps.textcls`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import molora
from molora.apps.data import TextTask, make_synthetic_tasks
from molora.expert_retrieval import retrieve_expert, route_to_expert
from molora.lorahub import lorahub
from molora.routers import RetrievalRouter
from molora.routers.retrieval import embed_texts
from molora.apps.textcls import LabelPrototypes, evaluate, format_input, text_classification_loss, train
from molora.encoder import load_encoder


def _routing_to(model: molora.MoLoRAModel, task_id: int):
    """batch_context that routes every example of a batch to ``task_id``."""
    return lambda texts, ids: model.routing(task_ids=[task_id] * len(texts))


def _key_texts(task: TextTask, n: int = 16) -> list[str]:
    return [format_input(task.instruction, t) for t, _ in task.train[:n]]


def run_demo(
    out_dir: str | Path = "molora-demo-out",
    *,
    seed: int = 0,
    num_experts: int = 3,
    epochs: float = 4,
    shots: int = 16,
    n_train: int = 200,
    n_test: int = 100,
    budget: int = 40,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``out_dir/results.json``).

    ``num_experts`` tasks get experts first; the next synthetic task is the few-shot task and
    the one after it is added continually, so ``num_experts`` is at most 4 (six tasks exist).
    """
    from molora.apps.data import SYNTHETIC_TASK_NAMES

    if not 2 <= num_experts <= len(SYNTHETIC_TASK_NAMES) - 2:
        raise ValueError(f"molora demo: num_experts must be in [2, {len(SYNTHETIC_TASK_NAMES) - 2}] "
                         f"(one more task is few-shot, one is added continually); got {num_experts}")
    start = time.perf_counter()
    out = Path(out_dir)
    torch.manual_seed(seed)
    print("molora demo: loading all-MiniLM-L6-v2 (offline) and generating tasks ...")
    base, tok = load_encoder()
    all_tasks = make_synthetic_tasks(seed=seed, n_train=n_train, n_test=n_test)[:num_experts + 2]
    tasks, new_task, added_task = all_tasks[:num_experts], all_tasks[num_experts], all_tasks[num_experts + 1]
    names = [t.name for t in tasks]
    # Label prototypes come from the frozen encoder, computed before any adapter exists.
    protos = LabelPrototypes(base, tok).precompute(all_tasks)
    # Retrieval keys and queries come from a second, never adapted copy of the encoder.
    encoder = load_encoder()
    key_emb = {t.name: embed_texts(_key_texts(t), encoder) for t in all_tasks}
    shot_task = new_task.with_limits(train=shots, seed=seed)
    shot_emb = embed_texts(_key_texts(shot_task, shots), encoder)

    def acc(model: torch.nn.Module, task: TextTask, context=None, index: int = 0) -> float:
        return evaluate(model, tok, task, prototypes=protos, task_index=index, batch_context=context)

    results: dict[str, dict[str, float]] = {t.name: {} for t in tasks}
    for t in tasks:
        results[t.name]["zero-shot"] = acc(base, t)

    # ---------------------------------------------------------------- 1-3: experts, PEFT export
    print(f"[1/4] training {len(tasks)} LoRA experts (rank 8 on query/value), one per task: {', '.join(names)}")
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
    print(f"      exported {len(adapters)} PEFT adapters to {out / 'adapters'}")

    # ---------------------------------------------------------------- 4: compose, learned router
    print("[2/4] composing the adapters; single experts, task-id routing and a learned router (no task id)")
    fixed = molora.compose(base, adapters, router="task")
    for i, t in enumerate(tasks):
        for j, expert in enumerate(names):
            results[t.name][f"expert {expert}"] = acc(fixed, t, _routing_to(fixed, j), i)
        results[t.name]["task-id routing"] = results[t.name][f"expert {t.name}"]
    routed = molora.compose(fixed.unload(), adapters, router="soft", granularity="sequence")
    few = [t.with_limits(train=shots, seed=seed) for t in tasks]
    train(routed, tok, few, params=routed.trainable_parameters(), epochs=20, lr=5e-2, seed=seed,
          prototypes=protos, progress=progress)
    for t in tasks:
        results[t.name]["learned router"] = acc(routed, t)
    base = routed.unload()

    # ---------------------------------------------------------------- 5: a new task from a few shots
    print(f"[3/4] new task {new_task.name!r} with {shots} shots: weighing the {len(names)} experts")
    loss_fn = text_classification_loss(tok, new_task, prototypes=protos)
    shot_rows = list(shot_task.train)
    fewshot: dict[str, float] = {"zero-shot": acc(base, new_task)}
    composed = molora.compose(base, adapters, router="static", weights=[1.0 / len(names)] * len(names))
    fewshot["uniform weights"] = acc(composed, new_task)
    best, _ = retrieve_expert(torch.stack([key_emb[n].mean(0) for n in names]), shot_emb)
    route_to_expert(composed, best)
    fewshot[f"retrieval top-1 ({names[best]})"] = acc(composed, new_task)
    hub = lorahub(composed, loss_fn, shot_rows, budget=budget, seed=seed, progress=progress)
    fewshot[f"LoRAHub CMA-ES ({budget} evals)"] = acc(composed, new_task)
    base = composed.unload()
    composed = molora.compose(base, adapters)
    molora.train_router(composed, shot_rows, loss_fn=loss_fn, router="weights", steps=60, seed=seed, progress=progress)
    weights = composed.shared_router.weights().detach()
    fewshot["gradient router (weights)"] = acc(composed, new_task)
    base = composed.unload()
    # the default a user gets: choose among the above (and per-layer routers) by CV on the shots alone
    composed = molora.compose(base, adapters)
    keys = torch.stack([key_emb[n].mean(0) for n in names])

    def embed_rows(rows: list) -> torch.Tensor:
        return embed_texts([format_input(new_task.instruction, t) for t, _ in rows], encoder)

    auto = molora.train_router(composed, shot_rows, loss_fn=loss_fn, method="auto", retrieval=(keys, embed_rows),
                               folds=3, steps=60, seed=seed)
    fewshot[f"auto: {auto.method} (3-fold CV on the shots)"] = acc(composed, new_task)
    base = composed.unload()

    # ---------------------------------------------------------------- 6: add a task continually
    print(f"[4/4] adding task {added_task.name!r} continually: one new expert, earlier experts frozen, retrieval routing")
    cl = molora.compose(base, adapters, router="task")
    task_router = cl.shared_router
    d_in = next(iter(cl.routed_layers().values())).bank.d_in
    retrieval = RetrievalRouter(len(names), d_in, top_k=1, key_dim=key_emb[names[0]].shape[1])
    for i, n in enumerate(names):
        retrieval.fit_keys(i, key_emb[n])
    cl.set_router(retrieval)

    def retrieval_ctx(task: TextTask):
        return lambda texts, ids: cl.routing(embeddings=embed_texts(texts, encoder))

    before = {t.name: acc(cl, t, retrieval_ctx(t)) for t in tasks}
    cl.set_router(task_router)
    new_id = cl.add_expert(added_task.name)  # fresh expert; the composed experts stay frozen
    train(cl, tok, added_task, params=cl.trainable_parameters(), epochs=epochs, lr=2e-3, seed=seed + 99,
          prototypes=protos, batch_context=_routing_to(cl, new_id), progress=progress)
    retrieval.add_expert(added_task.name)  # the task router grew with the model; this one is detached
    retrieval.fit_keys(new_id, key_emb[added_task.name])
    cl.set_router(retrieval)
    after = {t.name: acc(cl, t, retrieval_ctx(t)) for t in [*tasks, added_task]}

    # ---------------------------------------------------------------- summary
    seconds = round(time.perf_counter() - start, 1)
    summary = {
        "tasks": names, "accuracy": results, "shots_per_task": shots,
        "fewshot": {"task": new_task.name, "shots": shots, "accuracy": fewshot,
                    "lorahub_weights": hub.weights, "gradient_weights": dict(zip(names, weights.tolist())),
                    "auto": {"method": auto.method, "cv_loss": auto.scores, "cv_std_error": auto.std_errors,
                             "folds": auto.folds, "seconds": round(auto.seconds, 1)}},
        "continual": {"added_task": added_task.name, "retrieval_accuracy_before": before, "retrieval_accuracy_after": after},
        "seconds": seconds,
    }
    _print_table(results, names, shots)
    _print_story(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot = _plot(summary, out / "summary.png")
    print(f"done in {seconds} s; results in {out / 'results.json'}" + (f", plot in {plot}" if plot else ""))
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


def _print_story(summary: dict[str, Any]) -> None:
    fs = summary["fewshot"]
    print(f"\nnew task {fs['task']!r} from {fs['shots']} shots (experts of the other tasks, frozen):")
    width = max(len(m) for m in fs["accuracy"]) + 2
    for m, v in fs["accuracy"].items():
        print(f"  {m.ljust(width)}{v:.3f}")
    auto = fs["auto"]
    chosen = next(v for m, v in fs["accuracy"].items() if m.startswith("auto:"))
    cv = ", ".join(f"{m} {v:.3f}" for m, v in sorted(auto["cv_loss"].items(), key=lambda kv: kv[1]))
    print(f"  auto chose {auto['method']!r} ({auto['folds']}-fold CV loss: {cv}); "
          f"{chosen - fs['accuracy']['uniform weights']:+.3f} accuracy against uniform weights")
    cl = summary["continual"]
    print(f"\ncontinual: task {cl['added_task']!r} added as a new expert; retrieval routing, no task id:")
    names = list(cl["retrieval_accuracy_after"])
    print("  " + "".ljust(10) + "".join(n.rjust(12) for n in names))
    print("  " + "before".ljust(10) + "".join(
        (f"{cl['retrieval_accuracy_before'][n]:12.3f}" if n in cl["retrieval_accuracy_before"] else "-".rjust(12)) for n in names))
    print("  " + "after".ljust(10) + "".join(f"{cl['retrieval_accuracy_after'][n]:12.3f}" for n in names))
    drops = [cl["retrieval_accuracy_before"][n] - cl["retrieval_accuracy_after"][n] for n in cl["retrieval_accuracy_before"]]
    print(f"  largest drop on an earlier task: {max(drops):+.3f} (earlier experts are frozen; only routing can change)")


def _plot(summary: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install 'molora[demo]')")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    acc = summary["accuracy"]
    names = summary["tasks"]
    for i, m in enumerate(["zero-shot", "task-id routing", "learned router"]):
        axes[0].bar([x + 0.27 * (i - 1) for x in range(len(names))], [acc[n][m] for n in names], width=0.27, label=m)
    axes[0].set_xticks(range(len(names)), names)
    axes[0].set_title("experts composed, routed")
    fs = summary["fewshot"]["accuracy"]
    axes[1].barh(list(fs), list(fs.values()), color="tab:purple")
    axes[1].set_title(f"new task {summary['fewshot']['task']!r}, {summary['fewshot']['shots']} shots")
    cl = summary["continual"]
    after = cl["retrieval_accuracy_after"]
    tasks = list(after)
    axes[2].bar([x - 0.2 for x in range(len(tasks))], [cl["retrieval_accuracy_before"].get(t, 0.0) for t in tasks],
                width=0.4, label="before adding")
    axes[2].bar([x + 0.2 for x in range(len(tasks))], [after[t] for t in tasks], width=0.4, label="after adding")
    axes[2].set_xticks(range(len(tasks)), tasks)
    axes[2].set_title(f"continual: {cl['added_task']!r} added")
    for ax in (axes[0], axes[2]):
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    axes[1].set_xlim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
