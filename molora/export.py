"""Exporting a static mixture of experts as one PEFT LoRA adapter (merged by :mod:`molora.merging`)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as st_save

from molora.bank import lora_scaling
from molora.checks import finite_tensor, mixture_weights
from molora.errors import MoLoRAError
from molora.kinds.dora import dora_export
from molora.layer import Conv1D
from molora.merging import TENSOR_RULES, merge_module, merge_options
from molora.persistence import atomic_write
from molora.routed_copies import ORIGINAL
from molora.routed_tokens import TokenRows

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from molora.model import MoLoRAModel


def export_peft(
    model: MoLoRAModel,
    directory: str | os.PathLike,
    weights: Mapping[str, float] | Sequence[float],
    combination: str = "cat",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int = 0,
) -> None:
    """Write the static mixture ``sum_e w_e s_e B_e A_e`` of every layer as one PEFT LoRA adapter,
    merged by ``combination`` (:mod:`molora.merging`: the combination types of PEFT's
    ``add_weighted_adapter``).

    ``"cat"`` (default) is exact: the scaled ``A``s are stacked along the rank axis and the ``B``s
    side by side, ``A' = [w_1 s_1 A_1; ...]``, ``B' = [B_1, ...]``, so ``B' A'`` is the mixture and
    ranks add up. ``"svd"`` truncates the exact delta to ``svd_rank`` (default: the module's largest
    expert rank); ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` and
    ``"magnitude_prune"`` merge the ``A``s and the ``B``s separately (equal ranks per module; not
    the mixture's delta); their ``"_svd"`` forms apply the rule to the full deltas, then SVD.
    ``density`` (in ``(0, 1]``) is what TIES/DARE/magnitude pruning keep, ``majority_sign_method``
    (``"total"``/``"frequency"``) how TIES elects signs, ``svd_clamp`` a quantile clamp of the SVD
    factors, ``seed`` seeds DARE's drops (the same seed writes the same adapter).

    Each module's rank is recorded in ``rank_pattern`` and its alpha equals its rank (scaling 1,
    no rsLoRA), whatever the experts used. Experts with weight 0 are left out (they take no part in
    TIES's sign election either); a module whose experts all have weight 0 is not targeted.

    ``weights`` maps expert names to weights (missing = 0) or lists one per expert. Bad input is a
    MoLoRAError naming it, raised before anything is written: an unknown combination or a
    parameter it does not use, a density outside ``(0, 1]``, ``svd_rank < 1``, a NaN/inf weight
    (:func:`molora.checks.mixture_weights`), an unknown expert, unequal ranks for the factor-wise
    rules, an expert whose factors hold NaN/inf: nothing non-finite is ever written.
    Every expert kind exports the factors its kernel sees (:meth:`~molora.bank.BaseExpertBank.expert_factors`;
    a bank whose experts share ``B``, QR-LoRA's ``Q``, gives ``B = Q`` for each expert).

    DoRA experts (:mod:`molora.kinds.dora`): any static mixture of them is one DoRA adapter exactly,
    ``use_dora=True`` with ``lora_B = diag(1/a) B'`` and ``m = a ||W0 + diag(1/a) B' A'||_c``
    (:func:`~molora.kinds.dora.dora_export`); only ``"cat"`` keeps that exact, so the other
    combinations are refused for them. Plain LoRA layers of such an export get ``m = ||W0 + B A||_c``
    (DoRA's identity); a channel the mixture scales to 0 is refused.
    """
    options = merge_options(combination, density=density, majority_sign_method=majority_sign_method,
                            svd_rank=svd_rank, svd_clamp=svd_clamp, seed=seed, where="export_peft")
    w_all = mixture_weights(weights, model.expert_names, "export_peft")
    per_layer = model.layer_weights(w_all, dtype=torch.float64)
    folder = Path(directory) if isinstance(directory, (str, os.PathLike)) else None
    if folder is None or not os.fspath(folder):
        raise MoLoRAError(f"export_peft: directory must be a folder path; got {directory!r}")
    if folder.exists() and not folder.is_dir():
        raise MoLoRAError(f"export_peft: {folder} exists and is not a folder")
    # One generator for the whole export, visited in module order: a seed fixes every drop.
    generator = torch.Generator().manual_seed(options.seed) if options.random else None
    layers = model.routed_layers()
    # a mixture that rescales W0 somewhere (a DoRA expert with weight and c != 1) is one DoRA adapter
    scales = {n: layer.bank.static_scale(per_layer[n]) for n, layer in layers.items() if layer.bank.rescales_base}
    dora = [n for n, a in scales.items() if a is not None and not bool((a == 1).all())]
    if dora and options.combination != "cat":
        raise MoLoRAError(f"export_peft: modules {dora[:3]} hold DoRA experts, whose mixture is exact only as "
                          f"combination 'cat' (one DoRA adapter); got {options.combination!r}")
    if dora:
        other = [n for n, layer in layers.items() if layer.expert_kinds is not None and "dora" not in layer.expert_kinds]
        if other:
            raise MoLoRAError(f"export_peft: modules {dora[:3]} hold DoRA experts, so the export is one DoRA adapter, "
                              f"and modules {other[:3]} ({type(layers[other[0]].base_layer).__name__}) cannot be "
                              "written as DoRA layers; export them separately")
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    transposed = False
    for name, layer in layers.items():
        bank, w = layer.bank, per_layer[name]
        where = f"export_peft: module {name!r}"
        experts = [e for e in range(bank.num_experts) if float(w[e]) != 0.0]
        if not experts:
            continue
        names = [model.expert_names[layer.expert_ids[e]] for e in experts]
        with torch.no_grad():  # the bank's stack is made once (its cache), not per expert
            factors = [bank.expert_factors(e) for e in experts]
        As, Bs = [f[0] for f in factors], [f[1] for f in factors]
        for n, a, b in zip(names, As, Bs):
            # NaN/inf experts (a diverged training run) would write an adapter PEFT loads silently.
            finite_tensor(a.detach(), where, f"lora_A of expert {n!r}")
            finite_tensor(b.detach(), where, f"lora_B of expert {n!r}")
        expert_ranks = [int(b.shape[1]) for b in Bs]
        if options.combination in TENSOR_RULES and len(set(expert_ranks)) > 1:
            raise MoLoRAError(f"{where}: combination {options.combination!r} merges A and B entry by entry and needs "
                              f"experts of equal rank; got ranks {dict(zip(names, expert_ranks))} (use 'cat' or an SVD "
                              "combination)")
        # The scalings from alpha and rank in float64 (bank.scaling is their float32 copy).
        scalings = [lora_scaling(bank.alphas[e], bank.ranks[e], bank.rslora[e]) for e in experts]
        A, B = merge_module(As, Bs, [float(w[e]) for e in experts], scalings, options, generator)
        if dora:  # the mixture as one DoRA adapter (a plain LoRA layer: a = 1, m = its own norm)
            a = scales.get(name)
            a = torch.ones(bank.d_out, dtype=torch.float64) if a is None else a
            try:
                B, m = dora_export(layer.base_weight_rows(), A, B, a)
            except MoLoRAError as exc:
                raise MoLoRAError(f"{where}: {exc}") from None
        # PEFT's layout of this layer type (an embedding's lora_embedding_A/B, a conv's kernels)
        parts = {**layer.peft_factors(A, B), **({"lora_magnitude_vector": m} if dora else {})}
        for suffix, t in parts.items():
            key = f"base_model.model.{name}.{suffix}"
            state[key] = finite_tensor(t.float().contiguous(), where, f"{suffix.split('.')[0]} (tensor {key!r})")
        ranks[name] = int(A.shape[0])
        transposed |= Conv1D is not None and isinstance(layer.base_layer, Conv1D)  # an embedding's [V, d] is not fan_in_fan_out
    if not state:
        raise MoLoRAError("export_peft: every weight is 0; nothing to export")
    # whole per-expert module copies (PEFT's modules_to_save): the one copy the mix picks is
    # written back as PEFT saves it; a blend of several copies is refused (static_choice)
    saved, token_indices = [], {}
    for path, copies in model.routed_copies().items():
        pick = copies.static_choice(w_all, "export_peft")
        if pick == ORIGINAL or copies.tied_to is not None:  # PEFT re-ties the output layer itself
            continue
        chosen = copies.copy_of(pick)
        if isinstance(chosen, TokenRows):  # trained tokens, as PEFT saves them
            key = f"base_model.model.{path}.token_adapter.trainable_tokens_delta"
            state[key] = finite_tensor(chosen.values.detach(), f"export_peft: module {path!r}",
                                       "trained tokens").cpu().contiguous()
            token_indices[path] = chosen.indices.tolist()
            continue
        for key, t in chosen.state_dict().items():
            name = f"base_model.model.{path}.{key}"
            state[name] = (finite_tensor(t.detach(), f"export_peft: module {path!r}", f"tensor {key!r}")
                           if t.is_floating_point() else t.detach()).cpu().contiguous()
        saved.append(path)
    r = max(ranks.values())
    patterns = {re.escape(n): k for n, k in ranks.items()}
    from peft import LoraConfig

    # PEFT writes its own config (every field, peft_version) so PEFT and molora read back the same.
    config = LoraConfig(
        base_model_name_or_path=getattr(getattr(model.base_model, "config", None), "_name_or_path", None),
        r=r,
        lora_alpha=r,
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        fan_in_fan_out=transposed,
        bias="none",
        use_rslora=False,
        use_dora=bool(dora),
        init_lora_weights=True,
        inference_mode=True,
        modules_to_save=saved or None,
        trainable_token_indices=token_indices or None,
    )
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
        config.save_pretrained(tmp)
        config_bytes = (Path(tmp) / "adapter_config.json").read_bytes()
    atomic_write(folder / "adapter_model.safetensors", st_save(state, metadata={"format": "pt"}))
    atomic_write(folder / "adapter_config.json", config_bytes)
