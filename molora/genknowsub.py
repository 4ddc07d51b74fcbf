"""GenKnowSub: subtract general knowledge from task adapters before they are composed.

For every module a task adapter targets, with ``G`` general-knowledge adapters of the same rank
there (e.g. LoRAs trained on plain text in a few languages):

    A_e <- A_e - (1/G) sum_g A_g ,    B_e <- B_e - (1/G) sum_g B_g

factor by factor, as PEFT's ``ArrowConfig(use_gks=True)`` does (the general adapters' alphas play
no part; each task adapter keeps its own scaling). "Forgetting via negation" (task arithmetic,
Ilharco et al. 2023) of what the task adapters share, so that they are more task-specific; paired
with Arrow routing in "GenKnowSub" (ACL 2025 short paper, https://aclanthology.org/2025.acl-short.54/).
The general adapters are read for the subtraction only: they are not experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from molora.errors import AdapterError
from molora.peft_io import PeftLoraAdapter


def subtract_general_knowledge(tasks: Sequence[PeftLoraAdapter], general: Sequence[PeftLoraAdapter]) -> list[PeftLoraAdapter]:
    """The task adapters with the mean general factors subtracted (new adapters; the inputs are
    not changed). An AdapterError names the module and adapters where a general adapter does not
    target a module a task adapter targets, or has factors of another shape there."""
    if not general:
        raise AdapterError("GenKnowSub needs at least one general adapter")
    dora = [a.name for a in [*tasks, *general] if any(f.magnitude is not None for f in a.modules.values())]
    if dora:  # subtracting factors would leave each magnitude over a norm it was not trained for
        raise AdapterError(f"GenKnowSub: adapters {dora} are DoRA adapters; GenKnowSub subtracts plain LoRA factors only")
    means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in sorted({m for t in tasks for m in t.modules}):
        missing = [g.name for g in general if path not in g.modules]
        if missing:
            raise AdapterError(f"GenKnowSub: general adapters {missing} do not target module {path!r}, which the task "
                               "adapters do")
        factors = [g.modules[path] for g in general]
        shapes = {(tuple(f.A.shape), tuple(f.B.shape)) for f in factors}
        if len(shapes) > 1:
            raise AdapterError(f"GenKnowSub: the general adapters' factors at module {path!r} differ in shape: {sorted(shapes)}")
        mean_A = torch.stack([f.A.double() for f in factors]).mean(0)
        mean_B = torch.stack([f.B.double() for f in factors]).mean(0)
        means[path] = mean_A, mean_B
    out = []
    for task in tasks:
        modules = {}
        for path, f in task.modules.items():
            mean_A, mean_B = means[path]
            if f.A.shape != mean_A.shape or f.B.shape != mean_B.shape:
                raise AdapterError(f"GenKnowSub: task adapter {task.name!r} has lora_A {list(f.A.shape)} and lora_B "
                                   f"{list(f.B.shape)} at module {path!r}; the general adapters have {list(mean_A.shape)} "
                                   f"and {list(mean_B.shape)} (the same rank is needed)")
            modules[path] = dataclasses.replace(f, A=(f.A.double() - mean_A).to(f.A.dtype),
                                                B=(f.B.double() - mean_B).to(f.B.dtype))
        out.append(dataclasses.replace(task, modules=modules))
    return out
