"""O-LoRA: orthogonal subspaces, one LoRA per task, summed at inference without a task id.

Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning"
(cmnfriend/O-LoRA). Task ``t`` trains a new LoRA ``(A_t, B_t)`` beside the frozen earlier ones,
with the loss

    L = L_task + l1 * sum_layers sum_{i<t} sum_{j,k} |(A_i A_t^T)_{jk}|  +  l2 * sum_{p in theta_t} ||p||_F

(entry-wise absolute value; ``squared=True`` uses ``(A_i A_t^T)_{jk}^2`` instead). At the end of
the task ``A_t``/``B_t`` are frozen and stay in the bank: concatenating them onto the earlier
ones along the rank axis (rank grows by ``r``) is the same as one more expert whose gate is 1,
because ``[B_1 .. B_t] [A_1; ..; A_t] = sum_i B_i A_i``. Inference is that static sum of all
subspaces (:class:`molora.routers.StaticRouter`), so no task id is needed. With ``merge=True``
each finished task's ``s_t B_t A_t`` is folded into the base weights instead (its gate becomes 0;
``A_t`` stays for the orthogonality penalty of later tasks).

Paper settings: r = 8, alpha = 32, dropout 0.1 on the q and v projections, l1 = 0.5, l2 = 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from molora.routers import StaticRouter

from .manager import MANAGERS, ContinualError, ContinualManager, ContinualStateError

__all__ = ["OLoRAManager", "orthogonality_penalty"]


def orthogonality_penalty(old: Tensor, new: Tensor, squared: bool = False) -> Tensor:
    """``sum_{jk} |(old new^T)_{jk}|`` (or squared entries) for ``old [R, d]`` (earlier tasks'
    A rows stacked) and ``new [r, d]``; 0 when ``old`` has no rows."""
    if old.shape[-1] != new.shape[-1]:
        raise ValueError(f"orthogonality_penalty: A widths differ: old {tuple(old.shape)}, new {tuple(new.shape)}")
    prod = old.to(new.dtype) @ new.T
    return prod.pow(2).sum() if squared else prod.abs().sum()


class OLoRAManager(ContinualManager):
    """O-LoRA (module docstring). ``l1``/``l2`` weigh the orthogonality and the L2 terms."""

    strategy = "olora"

    def __init__(self, base_model: torch.nn.Module, *, l1: float = 0.5, l2: float = 0.0, squared: bool = False,
                 merge: bool = False, **kwargs: Any) -> None:
        for key, v in (("l1", l1), ("l2", l2)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ContinualError(f"{type(self).__name__}: {key} must be a number >= 0; got {v!r}")
        super().__init__(base_model, **kwargs)
        self.l1, self.l2, self.squared, self.merge = float(l1), float(l2), bool(squared), bool(merge)
        self.merged: list[str] = []
        self._old_A: dict[str, Tensor] = {}

    def options(self) -> dict[str, Any]:
        return {**super().options(), "l1": self.l1, "l2": self.l2, "squared": self.squared, "merge": self.merge}

    # ------------------------------------------------------------------ task hooks
    def _begin(self, name: str, **kwargs: Any) -> None:
        self._add_expert(name)
        # The earlier A's are frozen: stack them once per task instead of once per step.
        idx = self.model.expert_names.index(name)
        self._old_A = {}
        for lname, layer in self.model.routed_layers().items():
            olds = [layer.bank.A[i].detach() for i in range(idx)]
            if olds:
                self._old_A[lname] = torch.cat(olds)

    def _end(self, name: str) -> None:
        self.model.set_experts_trainable(False, [name])
        if self.merge:
            self._merge_expert(name)
            self.merged.append(name)
        self._old_A = {}

    def penalty(self) -> Tensor:
        """``l1 * sum_layers sum_{i<t} sum |A_i A_t^T| + l2 * sum ||theta_t||`` of the running task."""
        if self.current is None:
            raise ContinualError(f"{type(self).__name__}: penalty() outside a task; call begin_task(name) first")
        total = self._zero()
        t = self.model.expert_names.index(self.current)
        for lname, layer in self.model.routed_layers().items():
            A_t, B_t = layer.bank.A[t], layer.bank.B[t]
            if self.l1 and lname in self._old_A:
                total = total + self.l1 * orthogonality_penalty(self._old_A[lname], A_t, self.squared)
            if self.l2:
                total = total + self.l2 * (A_t.norm() + B_t.norm())
        return total

    # ------------------------------------------------------------------ merging
    def _merge_expert(self, name: str) -> None:
        """Fold ``s B A`` of expert ``name`` into the base weights and set its static gate to 0."""
        model = self.model
        idx = model.expert_names.index(name)
        onehot = [1.0 if i == idx else 0.0 for i in range(model.num_experts)]
        model.fold(onehot)
        weights = list(model.shared_router.weights)
        weights[idx] = 0.0
        router = StaticRouter(model.num_experts, model.shared_router.d_in, weights=weights)
        model.set_router(router.to(model.shared_router._w.device))

    def _extra_state(self) -> dict[str, Any]:
        return {"merged": list(self.merged)}

    def _restore(self, extra: dict[str, Any]) -> None:
        if self._model is None:
            return
        self.model.set_experts_trainable(False)
        # The checkpoint holds the adapters, not the base: re-fold merged experts into the fresh base.
        merged = extra.get("merged", [])
        unknown = [n for n in merged if n not in self.model.expert_names] if isinstance(merged, list) else None
        if unknown is None or unknown:
            raise ContinualStateError(f"O-LoRA state: merged experts {unknown or merged!r} are not experts of the "
                                      f"checkpoint ({self.model.expert_names})")
        for name in merged:
            self._merge_expert(name)
            self.merged.append(name)


MANAGERS[OLoRAManager.strategy] = OLoRAManager
