"""Exporting a static mixture of experts as one PEFT LoRA adapter."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as st_save

from molora.checks import finite_tensor, mixture_weights
from molora.errors import MoLoRAError
from molora.persistence import atomic_write

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from molora.model import MoLoRAModel


def export_peft(model: MoLoRAModel, directory: str | os.PathLike, weights: Mapping[str, float] | Sequence[float]) -> None:
    """Write ``delta W = sum_e w_e s_e B_e A_e`` per layer as one PEFT LoRA adapter, exactly.

    PEFT's ``add_weighted_adapter(combination_type="cat")`` construction: the scaled ``A``s are
    stacked along the rank axis and the ``B``s side by side,

        A' = [w_1 s_1 A_1; ...; w_n s_n A_n]     B' = [B_1, ..., B_n]     B' A' = sum_e w_e s_e B_e A_e,

    so ranks add up (per module through ``rank_pattern``) and the adapter's scaling is 1
    (``lora_alpha = r``). Experts with weight 0 are left out; a module whose experts all have
    weight 0 is not targeted. Every expert kind exports through its bank's
    :meth:`~molora.bank.BaseExpertBank.mixture_factors` (the factors the kernel sees; a bank
    whose experts share ``B``, QR-LoRA's ``Q``, exports ``B = Q``, ``A = sum_e w_e s_e A_e``).

    ``weights`` maps expert names to weights (missing = 0) or lists one per expert; a NaN/inf
    weight, an unknown expert name or a wrong count is a MoLoRAError naming it
    (:func:`molora.checks.mixture_weights`), and so is an expert whose factors hold NaN/inf:
    nothing non-finite is ever written.
    """
    w_all = mixture_weights(weights, model.expert_names, "export_peft")
    per_layer = model.layer_weights(w_all)
    folder = Path(directory) if isinstance(directory, (str, os.PathLike)) else None
    if folder is None or not os.fspath(folder):
        raise MoLoRAError(f"export_peft: directory must be a folder path; got {directory!r}")
    if folder.exists() and not folder.is_dir():
        raise MoLoRAError(f"export_peft: {folder} exists and is not a folder")
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    transposed = False
    for name, layer in model.routed_layers().items():
        bank, w = layer.bank, per_layer[name]
        factors = bank.mixture_factors(w)
        if factors is None:
            continue
        for ab, t in (("lora_A", factors[0].cpu()), ("lora_B", factors[1].cpu())):
            key = f"base_model.model.{name}.{ab}.weight"
            # NaN/inf experts (a diverged training run) would write an adapter PEFT loads silently.
            state[key] = finite_tensor(t.contiguous(), f"export_peft: module {name!r}", f"{ab} (tensor {key!r})")
        ranks[name] = int(factors[0].shape[0])
        transposed |= layer.transposed
    if not state:
        raise MoLoRAError("export_peft: every weight is 0; nothing to export")
    r = max(ranks.values())
    patterns = {re.escape(n): k for n, k in ranks.items()}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model.base_model, "config", None), "_name_or_path", None),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "fan_in_fan_out": transposed,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "adapter_model.safetensors", st_save(state, metadata={"format": "pt"}))
    atomic_write(folder / "adapter_config.json", json.dumps(config, indent=2).encode())
