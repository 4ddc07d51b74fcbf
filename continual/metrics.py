"""Continual-learning metrics from an accuracy matrix.

``R[i][j]`` is the accuracy on task ``j`` measured right after training on task ``i`` (T tasks in
training order, so ``R`` is T x T). With ``b_j`` the accuracy on task ``j`` before any training,
and indices 1-based as in the papers:

    ACC          = 1/T       * sum_{j=1..T}    R[T, j]
    BWT          = 1/(T-1)   * sum_{j=1..T-1}  (R[T, j] - R[j, j])
    FWT          = 1/(T-1)   * sum_{j=2..T}    (R[j-1, j] - b_j)
    forgetting_j = max_{l=1..T-1} R[l, j] - R[T, j],   averaged over j = 1..T-1

ACC, BWT and FWT follow GEM (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017); average forgetting follows Chaudhry et al. ("Riemannian Walk for
Incremental Learning", ECCV 2018). Negative BWT means forgetting; positive FWT means training on
earlier tasks helped later ones before they were seen.

With a single task (T = 1) BWT, FWT and forgetting are averages over an empty set: they are
reported as ``None`` (undefined), not 0, so a one-task run cannot pass for a run without forgetting.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["as_matrix", "summarize", "to_json", "plot_matrix"]


def _to_list(x: Any) -> Any:
    # Tensors and arrays both offer tolist(); plain sequences pass through.
    return x.tolist() if hasattr(x, "tolist") else x


def as_matrix(R: Any) -> list[list[float]]:
    """Validate an accuracy matrix and return it as a list of lists of floats.

    Accepts a list of lists, a numpy array or a torch tensor. Raises ``ValueError`` (naming the
    shape) unless it is a non-empty square T x T matrix of finite numbers.
    """
    rows = _to_list(R)
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f"accuracy matrix must be a non-empty T x T matrix, got {R!r}")
    try:
        rows = [list(_to_list(r)) for r in rows]
    except TypeError:
        raise ValueError(f"accuracy matrix must be 2-D (T x T), got a 1-D sequence of length {len(rows)}") from None
    shape = (len(rows), [len(r) for r in rows])
    T = len(rows)
    if any(len(r) != T for r in rows):
        raise ValueError(f"accuracy matrix must be square (T x T); got {T} rows with lengths {shape[1]}")
    out = []
    for i, r in enumerate(rows):
        try:
            vals = [float(v) for v in r]
        except (TypeError, ValueError):
            raise ValueError(f"accuracy matrix ({T}x{T}) row {i} is not numeric: {r!r}") from None
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"accuracy matrix ({T}x{T}) has a non-finite value in row {i}: {vals}")
        out.append(vals)
    return out


def summarize(R: Any, untrained: Sequence[float] | Any | None = None) -> dict[str, float | None]:
    """ACC, BWT, FWT and average forgetting of an accuracy matrix (formulas in the module docstring).

    Args:
        R: T x T accuracies, ``R[i][j]`` = accuracy on task j after training task i (0-based here).
        untrained: ``b``, length-T accuracies of the model before any training; needed for FWT.

    Returns:
        ``{"acc", "bwt", "fwt", "forgetting"}``. ``fwt`` is None without ``untrained``; ``bwt``,
        ``fwt`` and ``forgetting`` are None when T = 1 (empty averages).
    """
    M = as_matrix(R)
    T = len(M)
    last = M[T - 1]
    acc = sum(last) / T
    bwt = fwt = forgetting = None
    if T > 1:
        bwt = sum(last[j] - M[j][j] for j in range(T - 1)) / (T - 1)
        forgetting = sum(max(M[l][j] for l in range(T - 1)) - last[j] for j in range(T - 1)) / (T - 1)
    if untrained is not None:
        b = [float(v) for v in _to_list(untrained)]
        if len(b) != T:
            raise ValueError(f"untrained accuracies must have length T={T} (matrix {T}x{T}), got {len(b)}")
        if not all(math.isfinite(v) for v in b):
            raise ValueError(f"untrained accuracies must be finite, got {b}")
        if T > 1:
            fwt = sum(M[j - 1][j] - b[j] for j in range(1, T)) / (T - 1)
    return {"acc": acc, "bwt": bwt, "fwt": fwt, "forgetting": forgetting}


def to_json(summary: dict, R: Any, path: str | Path, *, task_names: Sequence[str] | None = None,
            untrained: Sequence[float] | None = None, extra: dict | None = None) -> Path:
    """Write the summary, the matrix (and optionally task names, ``b`` and run metadata) as JSON."""
    M = as_matrix(R)
    if task_names is not None and len(task_names) != len(M):
        raise ValueError(f"{len(task_names)} task names for a {len(M)}x{len(M)} matrix")
    record: dict[str, Any] = {"summary": dict(summary), "matrix": M}
    if task_names is not None:
        record["task_names"] = list(task_names)
    if untrained is not None:
        record["untrained"] = [float(v) for v in _to_list(untrained)]
    if extra:
        record.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def plot_matrix(R: Any, task_names: Sequence[str], path: str | Path, *, title: str | None = None) -> Path:
    """Save a PNG heatmap of the accuracy matrix (rows: after training task i; columns: task j).

    matplotlib is imported lazily (Agg backend) so the metrics work without it.
    """
    M = as_matrix(R)
    T = len(M)
    if len(task_names) != T:
        raise ValueError(f"{len(task_names)} task names for a {T}x{T} matrix")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_matrix needs matplotlib: pip install matplotlib (or molora[demo])") from e

    size = max(3.0, 0.6 * T + 1.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(M, vmin=0.0, vmax=max(1.0, max(max(r) for r in M)), cmap="viridis")
    ax.set_xticks(range(T), labels=list(task_names), rotation=45, ha="right")
    ax.set_yticks(range(T), labels=[f"after {n}" for n in task_names])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training stage")
    for i in range(T):
        for j in range(T):
            ax.text(j, i, f"{M[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if M[i][j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
