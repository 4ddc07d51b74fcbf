"""Baseline strategies of the O-LoRA paper's comparison (Wang et al., 2023, Table 1).

* **SeqLoRA**: one LoRA, trained on task after task with nothing to protect earlier tasks (the
  lower bound: it shows how much plain fine-tuning forgets).
* **IncLoRA**: a new LoRA per task beside the frozen earlier ones, summed at inference, with no
  orthogonality constraint: O-LoRA with ``l1 = l2 = 0``.
* **Multitask** (the upper bound): one LoRA trained once on all tasks mixed. Use SeqLoRA with a
  single task holding every task's data (``begin_task("multitask")``, train on the union).
"""

from __future__ import annotations

from typing import Any

import torch

from .manager import MANAGERS, ContinualManager
from .olora import OLoRAManager

__all__ = ["IncLoRAManager", "SeqLoRAManager"]


class SeqLoRAManager(ContinualManager):
    """One LoRA expert (named ``expert``) that keeps training on every new task."""

    strategy = "seqlora"
    expert = "lora"

    def _begin(self, name: str, **kwargs: Any) -> None:
        if self._model is None:
            self._add_expert(self.expert)

    def _restore(self, extra: dict[str, Any]) -> None:
        pass  # the one expert stays trainable


class IncLoRAManager(OLoRAManager):
    """A new LoRA per task, earlier ones frozen and summed; no penalty (O-LoRA with l1 = l2 = 0)."""

    strategy = "inclora"

    def __init__(self, base_model: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(base_model, l1=0.0, l2=0.0, **kwargs)

    def options(self) -> dict[str, Any]:
        opts = super().options()
        for key in ("l1", "l2", "squared"):
            opts.pop(key)
        return opts


MANAGERS[SeqLoRAManager.strategy] = SeqLoRAManager
MANAGERS[IncLoRAManager.strategy] = IncLoRAManager
