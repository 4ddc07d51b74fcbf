"""Task-id routing: each example goes to the expert of its task (one-hot gate per example).

    g_e(x_b) = 1  if e = mapping[task_ids[b]],  else 0

A shared, context-level router: it reads ``task_ids`` from the routing signals and decides once
per forward for all layers. Many-to-one mappings are allowed (several tasks share an expert).
Followed by MOELoRA (Liu et al., 2024, task-motivated gates) and PEFT's mixed-adapter batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from molora.context import RoutingSignals
from molora.errors import RoutingError

from .base import Router, RoutingDecision, require_signal


class TaskRouter(Router):
    """One-hot routing of each example to ``mapping[task_id]`` (MOELoRA; PEFT mixed batches)."""

    name = "task"
    shared = True

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        mapping: list[int] | None = None,
        task_names: list[str] | None = None,
        fallback: int | None = None,
    ) -> None:
        super().__init__(num_experts, d_in)
        mapping = list(range(num_experts)) if mapping is None else [int(m) for m in mapping]
        if not mapping:
            raise ValueError("router 'task': mapping must name at least one task")
        bad = [m for m in mapping if not 0 <= m < num_experts]
        if bad:
            raise ValueError(f"router 'task': mapping names experts {bad} outside [0, {num_experts})")
        if task_names is not None and len(task_names) != len(mapping):
            raise ValueError(f"router 'task': {len(task_names)} task_names for {len(mapping)} mapped tasks")
        if task_names is not None and len(set(task_names)) != len(task_names):
            raise ValueError(f"router 'task': task_names must be distinct; got {list(task_names)}")
        if fallback is not None and (not isinstance(fallback, int) or not 0 <= fallback < num_experts):
            raise ValueError(f"router 'task': fallback expert {fallback!r} outside [0, {num_experts})")
        self.mapping = mapping
        self.task_names = list(task_names) if task_names is not None else None
        self.fallback = fallback
        self.register_buffer("_table", torch.tensor(mapping, dtype=torch.long), persistent=False)

    @property
    def num_tasks(self) -> int:
        return len(self.mapping)

    def get_config(self) -> dict[str, Any]:
        return {"mapping": self.mapping, "task_names": self.task_names, "fallback": self.fallback}

    def task_index(self, task: int | str) -> int:
        """The task id of a task name (or an int id, checked)."""
        if isinstance(task, str):
            if self.task_names is None or task not in self.task_names:
                raise RoutingError(f"router 'task': unknown task name {task!r}; known: {self.task_names}")
            return self.task_names.index(task)
        return int(task)

    def add_expert(self, name: str | None = None) -> None:
        """A new expert serves a new task (id ``num_tasks``, named ``name``)."""
        super().add_expert(name)
        self.mapping.append(self.num_experts - 1)
        if self.task_names is not None:
            self.task_names.append(name if name is not None else f"task_{len(self.mapping) - 1}")
        self._table = torch.tensor(self.mapping, dtype=torch.long, device=self._table.device)

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        ids = require_signal(self.name, signals, "task_ids").to(self._table.device)
        unknown = (ids < 0) | (ids >= self.num_tasks)
        if self.fallback is None:
            if torch.compiler.is_compiling():  # no host sync in a compiled graph: a device-side check
                torch._assert_async(~unknown.any(), f"router 'task': task ids outside [0, {self.num_tasks})")
            elif unknown.any():
                raise RoutingError(
                    f"router 'task': task ids {ids[unknown].unique().tolist()} outside [0, {self.num_tasks}) "
                    "and no fallback expert is set"
                )
        known = self._table[ids.clamp(0, self.num_tasks - 1)]
        experts = known if self.fallback is None else torch.where(unknown, torch.full_like(ids, self.fallback), known)
        gates = torch.ones(ids.shape[0], 1, device=ids.device)
        return RoutingDecision(gates=gates, indices=experts.unsqueeze(1), per_example=True)
