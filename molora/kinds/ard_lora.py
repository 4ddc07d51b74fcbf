"""ARD-LoRA experts (Shinwari & Usama, 2025, "ARD-LoRA: Dynamic Rank Allocation for
Parameter-Efficient Fine-Tuning of Foundation Models with Heterogeneous Adaptation Needs", arXiv
2506.18267).

ARD-LoRA learns non-negative scaling factors that decide how much rank each place of the
network gets, trained with an ``l1`` sparsity term (minimal rank) and a total-variation term
(smooth rank transitions between neighbouring layers) added to the task loss. Here the factors
gate the rank channels of every expert:

    delta W_e = s_e B_e diag(alpha_e) A_e,    alpha_e in R^{r_e}, alpha_e >= 0,

so the kernel sees ``A'_e = diag(alpha_e) A_e`` (one broadcast multiply over the stacked
experts) and the unchanged ``B_e``; merging, export (a plain PEFT LoRA with ``lora_A = diag(alpha)
A``) and routing are those of every kind. ``alpha`` starts at 1 and ``B`` at 0: the delta starts
at zero and training starts as plain LoRA. The effective rank of an expert is its number of live
channels (``alpha_j > threshold``); :func:`prune_ard` drops the dead ones from storage.

Non-negativity is a projection, not a reparametrisation: the stored ``alpha`` is free, the
forward reads ``max(alpha, 0)``, and :func:`project_ard` writes ``alpha <- max(alpha, 0)`` after an
optimizer step. On ``alpha >= 0`` the l1 norm is the linear ``sum(alpha)``, whose gradient is the
constant ``l1`` (also at 0, where ``clamp``'s gradient passes), so an SGD step followed by the
projection is exactly the proximal step of ``l1 ||alpha||_1 + [alpha >= 0]``:
``alpha <- max(alpha - lr (grad_task + l1), 0)``. Channels therefore reach exact zeros (a softplus
or exp parametrisation never does) and can revive when the task gradient pulls them back up.

The regulariser (:func:`ard_penalty`):

    R = l1 * sum_{layers, experts} ||alpha_{l,e}||_1
        + tv * sum_{groups} sum_{consecutive l, l+1 in the group} sum_e ||alpha_{l,e} - alpha_{l+1,e}||_1

The paper's text available to us (its abstract) names the two terms but not their exact form;
this is the anisotropic (l1) total variation over depth. A *group* is one projection type along
the depth (the module paths that differ only in their numeric parts, e.g.
``encoder.layer.<i>.attention.self.query``), layers in model order; channel ``j`` of expert ``e``
is compared with channel ``j`` of the same (global) expert in the next layer, missing channels
(a smaller rank) counting as 0.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from molora.bank import ExpertBank, _stack_padded, lora_scaling
from molora.errors import MoLoRAError


class ARDLoRABank(ExpertBank):
    """E ARD-LoRA experts: ``delta_e(x) = s_e B_e diag(max(alpha_e, 0)) A_e x`` (kind ``"ard_lora"``).

    Arguments as :class:`~molora.bank.ExpertBank`, without HydraLoRA's shared ``A`` (the gates act
    on each expert's own ``A`` rows, and pruning removes rows per expert). ``rank_alpha[e]`` is the
    ``[r_e]`` gate vector of expert ``e`` (named so to keep it apart from LoRA's ``alpha``, the
    numerator of ``s_e``). Experts of different ranks are zero-padded (gates included): exact.
    """

    kind = "ard_lora"

    def __init__(self, d_in: int, d_out: int, *, shared_a: bool = False, shared_rank: int | None = None,
                 init: str = "kaiming", dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        if shared_a:
            raise ValueError("ARDLoRABank: ARD-LoRA gates and prunes each expert's own A rows; "
                             "shared_a=True is not supported")
        super().__init__(d_in, d_out, init=init, dtype=dtype, device=device)
        self.rank_alpha = nn.ParameterList()

    def add_expert(self, rank: int, alpha: float, *, use_rslora: bool = False, init: str = "kaiming",
                   A: Tensor | None = None, B: Tensor | None = None, rank_alpha: Tensor | None = None,
                   trainable: bool = True) -> int:
        """Append one expert (``A`` by ``init``, ``B = 0``, gates ``1`` unless given; copied) and
        return its index. Given gates must be ``[rank]``, finite and ``>= 0``."""
        r = self._check_rank(rank)
        if rank_alpha is not None:
            g = self._given("rank_alpha", rank_alpha, (r,), trainable)
            if not torch.isfinite(g).all() or (g < 0).any():
                raise ValueError(f"ARDLoRABank: rank_alpha must be finite and >= 0; got {rank_alpha.tolist()}")
        else:
            g = nn.Parameter(torch.ones(r, **self._factory), requires_grad=trainable)
        index = super().add_expert(r, alpha, use_rslora=use_rslora, init=init, A=A, B=B, trainable=trainable)
        self.rank_alpha.append(g)  # once the parent's checks passed: nothing half-added
        return index

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return super().expert_parameters(expert) + [self.rank_alpha[expert]]

    def _sources(self) -> list[Tensor]:
        return super()._sources() + list(self.rank_alpha._parameters.values())

    def gates(self) -> Tensor:
        """The effective gates ``max(alpha_e, 0)`` stacked ``[E, r_max]`` (zero-padded), in the graph."""
        stacked = _stack_padded([a.unsqueeze(1) for a in self.rank_alpha], self.max_rank, rows=True)
        return stacked.squeeze(2).clamp_min(0)

    def _stack(self) -> tuple[Tensor, Tensor]:
        A, B = super()._stack()
        return self.gates().unsqueeze(2) * A, B

    def effective_ranks(self, threshold: float = 0.0) -> list[int]:
        """Live channels per expert: the number of gates ``max(alpha_j, 0) > threshold``."""
        threshold = _threshold(threshold, "effective_ranks")
        return [int((a.detach().clamp_min(0) > threshold).sum()) for a in self.rank_alpha]

    @torch.no_grad()
    def project_(self) -> None:
        """``alpha <- max(alpha, 0)`` in place (the projection after an optimizer step)."""
        for a in self.rank_alpha:
            a.clamp_(min=0)

    def _prune_plan(self, threshold: float) -> list[tuple[Tensor, float]]:
        """Per expert: the indices of the channels to keep (live ones; the largest gate if none
        is) and the LoRA alpha that keeps ``s_e`` at the new rank. Changes nothing."""
        plan = []
        for e, a in enumerate(self.rank_alpha):
            g = a.detach().clamp_min(0)
            keep = torch.nonzero(g > threshold).flatten()
            if keep.numel() == 0:  # a rank-0 expert cannot be stored: one (dead) channel stays
                keep = g.argmax().reshape(1)
            s = lora_scaling(self.alphas[e], self.ranks[e], self.rslora[e])
            r = int(keep.numel())
            plan.append((keep, s * (math.sqrt(r) if self.rslora[e] else r)))
        return plan

    def _apply_prune(self, plan: list[tuple[Tensor, float]]) -> None:
        """Replace every expert's factors by the kept channels (cannot fail halfway: only assignments)."""
        def kept(p: nn.Parameter, part: Tensor) -> nn.Parameter:
            return nn.Parameter(part.clone(), requires_grad=p.requires_grad)

        A = [kept(a, a.detach()[keep]) for a, (keep, _) in zip(self.A, plan)]
        B = [kept(b, b.detach()[:, keep]) for b, (keep, _) in zip(self.B, plan)]
        G = [kept(g, g.detach()[keep]) for g, (keep, _) in zip(self.rank_alpha, plan)]
        self.A, self.B, self.rank_alpha = nn.ParameterList(A), nn.ParameterList(B), nn.ParameterList(G)
        self.ranks = [int(keep.numel()) for keep, _ in plan]
        self.alphas = [float(alpha) for _, alpha in plan]
        self._refresh_scaling()
        self._stacked_cache = None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", ard_lora"


# ---------------------------------------------------------------------------------------------- model level
def _ard_layers(model: nn.Module, where: str) -> dict[str, Any]:
    from molora.layer import RoutedLoRALinear
    from molora.model import MoLoRAModel

    # a MoLoRAModel's own paths (relative to its base model), as routed_layers() names them
    routed = model.routed_layers() if isinstance(model, MoLoRAModel) else \
        {n: m for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)}
    layers = {}
    for n, m in routed.items():
        found = m.bank.part_of(ARDLoRABank) if m.bank is not None else None
        if found is not None and found[0].num_experts:  # the bank, or a mixed bank's ARD part
            part, local = found
            layers[n] = _ARDLayer(m, part, [m.expert_ids[i] for i in local])
    if not layers:
        raise MoLoRAError(f"{where}: the model has no 'ard_lora' experts (MoLoRAConfig(expert_kind='ard_lora'))")
    return layers


class _ARDLayer(NamedTuple):
    """A routed layer with ARD experts: the layer, its ARD bank (the layer's own or a mixed bank's
    part) and the global expert ids of that bank's experts."""

    layer: Any
    bank: ARDLoRABank
    expert_ids: list[int]


def _threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MoLoRAError(f"{where}: threshold must be a finite number >= 0; got {value!r}")
    return float(value)


def depth_group(path: str) -> str:
    """The projection type of a module path along the depth: its numeric parts replaced by ``*``
    (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query``)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", path)


def ard_penalty(model: nn.Module, *, l1: float = 0.0, tv: float = 0.0) -> Tensor:
    """ARD-LoRA's regulariser ``l1 * sum ||alpha||_1 + tv * TV(alpha)`` over the model's ARD banks
    (the formula in the module docstring), on the effective gates ``max(alpha, 0)``; add it to
    the task loss. A float32 scalar on the experts' device, differentiable in the gates.

    Raises MoLoRAError for a negative or non-finite coefficient or a model without ARD experts."""
    for name, value in (("l1", l1), ("tv", tv)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise MoLoRAError(f"ard_penalty: {name} must be a finite number >= 0; got {value!r}")
    layers = _ard_layers(model, "ard_penalty")
    device = next(iter(layers.values())).bank.device
    total = torch.zeros((), dtype=torch.float32, device=device)
    gates = {n: ard.bank.gates().float() for n, ard in layers.items()}
    if l1:
        total = total + l1 * sum(g.sum() for g in gates.values())
    if tv:
        groups: dict[str, list[str]] = {}
        for n in layers:
            groups.setdefault(depth_group(n), []).append(n)
        for names in groups.values():
            for lo, hi in zip(names, names[1:]):
                total = total + tv * _tv_pair(gates[lo], layers[lo].expert_ids, gates[hi], layers[hi].expert_ids)
    return total


def _tv_pair(g_lo: Tensor, ids_lo: list[int], g_hi: Tensor, ids_hi: list[int]) -> Tensor:
    """``sum_e ||alpha_{l,e} - alpha_{l+1,e}||_1`` over the global experts both layers hold."""
    common = sorted(set(ids_lo) & set(ids_hi))
    if not common:
        return g_lo.new_zeros(())
    r = max(g_lo.shape[1], g_hi.shape[1])

    def rows(g: Tensor, ids: list[int]) -> Tensor:  # the common experts' gates, padded to r channels
        return nn.functional.pad(g[[ids.index(e) for e in common]], (0, r - g.shape[1]))

    return (rows(g_lo, ids_lo) - rows(g_hi, ids_hi)).abs().sum()


def project_ard(model: nn.Module) -> None:
    """``alpha <- max(alpha, 0)`` in every ARD bank: call after each optimizer step (or register
    it: ``opt.register_step_post_hook(lambda *_: project_ard(model))``)."""
    for ard in _ard_layers(model, "project_ard").values():
        ard.bank.project_()


def effective_rank(model: nn.Module, threshold: float = 0.0) -> dict[str, list[int]]:
    """Per ARD layer (by path): each local expert's number of live channels (gate ``> threshold``)."""
    threshold = _threshold(threshold, "effective_rank")
    return {n: ard.bank.effective_ranks(threshold) for n, ard in _ard_layers(model, "effective_rank").items()}


def prune_ard(model: nn.Module, threshold: float = 0.0) -> dict[str, list[int]]:
    """Drop the dead channels (gate ``max(alpha_j, 0) <= threshold``) of every ARD expert from
    storage: ``A`` rows, ``B`` columns and gates go, the rank shrinks, and the LoRA alpha is
    rescaled so ``s_e`` stays. With ``threshold = 0`` the dead channels contribute exactly 0, so
    the outputs do not change (up to float rounding of the new alpha); a larger threshold also
    drops the small channels' contribution. An expert with no live channel keeps one (rank 1,
    its largest gate). Returns the new ranks per layer.

    The experts get new parameter tensors (rebuild optimizers afterwards). Refused, changing
    nothing, for a merged layer (its folded weight holds the unpruned delta: unmerge first)."""
    threshold = _threshold(threshold, "prune_ard")
    layers = _ard_layers(model, "prune_ard")
    merged = sorted(n for n, ard in layers.items() if ard.layer.merged_weights is not None)
    if merged:
        raise MoLoRAError(f"prune_ard: modules {merged} are merged; unmerge() first")
    plans = {n: ard.bank._prune_plan(threshold) for n, ard in layers.items()}
    for n, ard in layers.items():
        ard.bank._apply_prune(plans[n])
        if ard.layer.bank is not ard.bank:  # a mixed bank's part: the bank takes the new ranks
            ard.layer.bank.sync_parts()
    return {n: list(ard.bank.ranks) for n, ard in layers.items()}

