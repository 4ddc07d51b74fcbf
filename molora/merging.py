"""Merging several LoRA experts of one module into one LoRA adapter (the combination types).

Every function here is pure: it takes the experts' factors ``A_i [r_i, d_in]``, ``B_i [d_out, r_i]``,
their mixture weights ``w_i`` and LoRA scalings ``s_i`` and returns new factors ``(A', B')`` whose
adapter scaling is 1 (``delta W' = B' A'``). The combination types are those of PEFT's
``LoraModel.add_weighted_adapter`` (PEFT 0.x, ``peft/utils/merge_utils.py``), whose rules are
followed where they are sound (sections below say where they are not):

===================  ========  ========================================================================
combination          exact?    ``(A', B')``
===================  ========  ========================================================================
``cat``              yes       ranks stacked: ``B' A' = sum_i w_i s_i B_i A_i``, rank ``sum_i r_i``
``linear``           no        ``A' = sum_i sgn(w_i s_i) sqrt|w_i s_i| A_i``, ``B' = sum_i sqrt|w_i s_i| B_i``
``svd``              rank-cut  ``D = sum_i w_i s_i B_i A_i`` truncated to rank ``svd_rank`` by SVD
``ties``             no        TIES on the ``A_i`` and on the ``B_i`` separately (weights as ``linear``)
``dare_linear``      no        DARE drop + rescale, then ``linear``, on ``A_i`` and ``B_i``
``dare_ties``        no        DARE drop + rescale, then TIES, on ``A_i`` and ``B_i``
``magnitude_prune``  no        top-``density`` magnitudes of each ``A_i``/``B_i``, then ``linear``
``*_svd``            no        the same rule on the full deltas ``s_i B_i A_i`` (weights ``w_i``), then SVD
===================  ========  ========================================================================

Computation is in float64 on the CPU; DARE's drops come from a :class:`torch.Generator` passed in,
so a merge is reproducible from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from molora.checks import finite_number, positive_int
from molora.errors import MoLoRAError

__all__ = [
    "COMBINATIONS",
    "MergeOptions",
    "cat_factors",
    "dare_drop",
    "disjoint_mean",
    "elect_sign",
    "factor_merge",
    "magnitude_prune",
    "merge_module",
    "merge_options",
    "merge_tensors",
    "svd_factors",
]

# The rules that combine same-shaped tensors (task vectors); "<rule>" acts on A and B, "<rule>_svd"
# (and "svd" for "linear") on the full deltas.
TENSOR_RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_COMBINATIONS = ("svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat", *TENSOR_RULES, *SVD_COMBINATIONS)
MAJORITY_SIGN_METHODS = ("total", "frequency")
_DENSITY_RULES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class MergeOptions:
    """A checked combination and its parameters (build it with :func:`merge_options`)."""

    combination: str = "cat"
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int = 0

    @property
    def rule(self) -> str:
        """The tensor rule: ``"ties_svd" -> "ties"``, ``"svd" -> "linear"``, ``"cat" -> "cat"``."""
        if self.combination == "svd":
            return "linear"
        return self.combination.removesuffix("_svd")

    @property
    def uses_svd(self) -> bool:
        return self.combination in SVD_COMBINATIONS

    @property
    def random(self) -> bool:
        """Whether the merge draws DARE's random drops."""
        return self.rule.startswith("dare")


def merge_options(
    combination: str = "cat",
    *,
    density: Any = None,
    majority_sign_method: str = "total",
    svd_rank: Any = None,
    svd_clamp: Any = None,
    seed: Any = 0,
    where: str = "merge",
) -> MergeOptions:
    """Check a combination and its parameters; a :class:`MoLoRAError` naming the bad one otherwise.

    ``density`` (the fraction of entries kept, in ``(0, 1]``) is required by the ``ties``,
    ``dare_*`` and ``magnitude_prune`` families and refused by the others; ``svd_rank`` (an int
    >= 1) and ``svd_clamp`` (a quantile in ``(0.5, 1]``) only by the SVD forms;
    ``majority_sign_method`` is ``"total"`` or ``"frequency"``; ``seed`` (an int >= 0) seeds
    DARE's drops.
    """
    if not isinstance(combination, str) or combination not in COMBINATIONS:
        raise MoLoRAError(f"{where}: unknown combination {combination!r}; combinations are {list(COMBINATIONS)}")
    if not isinstance(majority_sign_method, str) or majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise MoLoRAError(f"{where}: majority_sign_method must be one of {list(MAJORITY_SIGN_METHODS)}; got {majority_sign_method!r}")
    opts = MergeOptions(combination=combination, majority_sign_method=majority_sign_method)
    if opts.rule in _DENSITY_RULES:
        if density is None:
            raise MoLoRAError(f"{where}: combination {combination!r} needs a density (the fraction of entries kept, in (0, 1])")
        density = finite_number(density, where, "density", low=0.0, low_open=True, high=1.0)
    elif density is not None:
        raise MoLoRAError(f"{where}: density is used by {[c for c in COMBINATIONS if c.removesuffix('_svd') in _DENSITY_RULES]}"
                          f" only; got density={density!r} with combination {combination!r}")
    for name, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp)):
        if value is not None and not opts.uses_svd:
            raise MoLoRAError(f"{where}: {name} is used by {list(SVD_COMBINATIONS)} only; got {name}={value!r} with "
                              f"combination {combination!r}")
    if svd_rank is not None:
        svd_rank = positive_int(svd_rank, where, "svd_rank")
    if svd_clamp is not None:
        # The clamp bound is a quantile of the signed entries: at or below the median it is <= 0.
        svd_clamp = finite_number(svd_clamp, where, "svd_clamp", low=0.5, low_open=True, high=1.0)
    seed = positive_int(seed, where, "seed", low=0)
    return MergeOptions(combination, density, majority_sign_method, svd_rank, svd_clamp, seed)


# ---------------------------------------------------------------------------- tensor rules
def magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the ``k = floor(density * numel)`` entries of largest ``|t|``, zero the rest (the
    "trim" step of TIES, Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging
    Models"; PEFT's ``magnitude_based_pruning``). ``density = 1`` returns ``t``."""
    if density >= 1.0:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[torch.topk(t.abs().reshape(-1), k).indices] = True
    return torch.where(keep.reshape(t.shape), t, torch.zeros((), dtype=t.dtype))


def dare_drop(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch"): keep each entry with probability ``density`` (``m ~ Bernoulli(density)``)
    and rescale, ``t * m / density``, so the expectation is ``t``. ``density = 1`` returns ``t``
    and draws nothing.

    The mask is one float32 ``torch.bernoulli`` draw of ``t``'s shape from ``generator``: the same
    stream PEFT draws from the global generator (for float32 adapters, visiting the same tensors in
    the same order), so a seeded merge reproduces PEFT's after ``torch.manual_seed(seed)``.
    """
    if density >= 1.0:
        return t
    mask = torch.bernoulli(torch.full(tuple(t.shape), density, dtype=torch.float32), generator=generator)
    return t * mask.to(t.dtype) / density


def elect_sign(stacked: Tensor, method: str = "total") -> Tensor:
    """TIES sign election over the tasks on dim 0: ``gamma = sgn(sum_i t_i)`` (``"total"``, the
    paper's mass) or ``sgn(sum_i sgn(t_i))`` (``"frequency"``), ties going to +1. Returns the mask
    ``sgn(t_i) == gamma`` (zeros never agree)."""
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    gamma = torch.where(votes >= 0, torch.ones_like(votes), -torch.ones_like(votes))
    return sign == gamma


def disjoint_mean(weighted: Tensor, agree: Tensor) -> Tensor:
    """TIES disjoint merge: per entry, the sum of the (weighted) tasks whose sign agrees with the
    elected one, divided by how many agree (at least 1): ``sum_{i in A_p} w_i t_i / max(|A_p|, 1)``."""
    kept = torch.where(agree, weighted, torch.zeros((), dtype=weighted.dtype)).sum(0)
    return kept / agree.sum(0).clamp(min=1).to(weighted.dtype)


def merge_tensors(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    rule: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Merge same-shaped task tensors ``t_i`` with weights ``w_i`` by one rule:

    - ``linear`` (task arithmetic, Ilharco et al., 2023): ``sum_i w_i t_i``;
    - ``magnitude_prune``: ``sum_i w_i trim(t_i)``;
    - ``ties``: ``disjoint_mean(w_i trim(t_i))`` over the entries agreeing with the sign elected on
      the trimmed ``t_i``;
    - ``dare_linear`` / ``dare_ties``: as ``linear`` / ``ties`` with ``trim`` replaced by
      :func:`dare_drop` (one draw per tensor, in order).

    As in PEFT, the sign is elected on the unweighted tensors and the weights enter the disjoint
    mean; with a negative ``w_i`` the task's contribution ``w_i t_i`` then counts where ``t_i``,
    not ``w_i t_i``, agrees with the elected sign.
    """
    if rule not in TENSOR_RULES:
        raise MoLoRAError(f"merge_tensors: unknown rule {rule!r}; rules are {list(TENSOR_RULES)}")
    if rule != "linear" and density is None:
        raise MoLoRAError(f"merge_tensors: rule {rule!r} needs a density")
    if rule.startswith("dare") and generator is None:
        raise MoLoRAError(f"merge_tensors: rule {rule!r} needs a torch.Generator (its drops are random)")
    if rule in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif rule.startswith("dare"):
        tensors = [dare_drop(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    if rule.endswith("ties"):
        return disjoint_mean(stacked * w, elect_sign(stacked, majority_sign_method))
    return (stacked * w).sum(0)


# ---------------------------------------------------------------------------- factors
def cat_factors(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], scalings: Sequence[float]) -> tuple[Tensor, Tensor]:
    """The exact merge ("cat"; PEFT ``combination_type="cat"``): the ranks are stacked,

        A' = [w_1 s_1 A_1; ...; w_n s_n A_n]    B' = [B_1, ..., B_n]    B' A' = sum_i w_i s_i B_i A_i,

    so the rank is ``sum_i r_i``."""
    A = torch.cat([a * (float(w) * float(s)) for a, w, s in zip(As, weights, scalings)], dim=0)
    return A, torch.cat(list(Bs), dim=1)


def factor_merge(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float],
    scalings: Sequence[float],
    rule: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """PEFT's ``linear``/``ties``/``dare_*``/``magnitude_prune`` on the factors: with
    ``c_i = w_i s_i``, the ``A_i`` are merged with weights ``sgn(c_i) sqrt|c_i|`` and the ``B_i``
    with ``sqrt|c_i|`` (:func:`merge_tensors`; all ``A``s first, then all ``B``s), so each
    expert alone gives back ``c_i B_i A_i``. Needs equal ranks. For several experts this is not
    the mixture's delta: ``B' A' = sum_{i,j} sqrt|c_i| sgn(c_j) sqrt|c_j| B_i A_j`` has the cross
    terms ``i != j`` (PEFT calls "linear" "a very rough approximation"); use ``cat`` or ``svd``
    for the mixture itself."""
    ranks = {a.shape[0] for a in As} | {b.shape[1] for b in Bs}
    if len(ranks) != 1:
        raise MoLoRAError(f"factor_merge: rule {rule!r} needs experts of equal rank; got ranks {[a.shape[0] for a in As]}")
    c = [float(w) * float(s) for w, s in zip(weights, scalings)]
    wa = [math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0 for x in c]
    wb = [math.sqrt(abs(x)) for x in c]
    kw = dict(density=density, majority_sign_method=majority_sign_method, generator=generator)
    A = merge_tensors(As, wa, rule, **kw)
    B = merge_tensors(Bs, wb, rule, **kw)
    return A, B


def svd_factors(delta: Tensor, rank: int, clamp: float | None = None) -> tuple[Tensor, Tensor]:
    """The best rank-``r`` factors of ``delta [d_out, d_in]`` (Eckart-Young): with
    ``delta = U S V^T``, ``B = U_r S_r^(1/2)`` and ``A = S_r^(1/2) V_r^T``, ``r = min(rank, d_out,
    d_in)``. The singular values are split evenly between the factors (PEFT puts all of ``S`` in
    ``B``); the product is the same.

    ``clamp`` (a quantile ``q``; PEFT's ``svd_clamp``, after kohya-ss ``svd_merge_lora``): with
    ``h`` the ``q``-quantile of the signed entries of ``B`` and ``A`` together, both are clamped to
    ``[-h, h]``. The signs of the singular pairs are fixed (the largest ``|entry|`` of each column
    of ``U`` is positive), so the clamp does not depend on the SVD routine's sign choice. As the
    split differs from PEFT's, so does what a clamp cuts.
    """
    r = min(int(rank), delta.shape[0], delta.shape[1])
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    U, Vh = U[:, :r], Vh[:r]
    # Each pair (u_k, v_k) is defined up to a common sign, and a quantile of signed entries is not:
    # fix it so the largest |entry| of u_k is positive (the product is unchanged).
    flip = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
    flip[flip == 0] = 1
    U, Vh = U * flip, Vh * flip.reshape(-1, 1)
    root = S[:r].sqrt()
    B = U * root
    A = root[:, None] * Vh
    if clamp is not None:
        h = torch.quantile(torch.cat([B.reshape(-1), A.reshape(-1)]), float(clamp))
        B, A = B.clamp(-h, h), A.clamp(-h, h)
    return A, B


def merge_module(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float],
    scalings: Sequence[float],
    options: MergeOptions,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One module's merged factors ``(A' [r', d_in], B' [d_out, r'])``, adapter scaling 1, by
    ``options.combination`` (see the module docstring), in float64.

    The ``*_svd`` forms apply their rule to the full deltas ``D_i = s_i B_i A_i`` with weights
    ``w_i`` (``svd``: ``D = sum_i w_i D_i``, exact before truncation), then :func:`svd_factors`
    at rank ``options.svd_rank`` (default: the largest ``r_i``).
    """
    As = [a.detach().to("cpu", torch.float64) for a in As]
    Bs = [b.detach().to("cpu", torch.float64) for b in Bs]
    if not As or len(As) != len(Bs) or len(As) != len(weights) or len(As) != len(scalings):
        raise MoLoRAError(f"merge_module: need as many A, B, weights and scalings (>= 1); got "
                          f"{len(As)}, {len(Bs)}, {len(weights)}, {len(scalings)}")
    kw = dict(density=options.density, majority_sign_method=options.majority_sign_method, generator=generator)
    if options.combination == "cat":
        return cat_factors(As, Bs, weights, scalings)
    if not options.uses_svd:
        return factor_merge(As, Bs, weights, scalings, options.rule, **kw)
    deltas = [float(s) * (b @ a) for a, b, s in zip(As, Bs, scalings)]
    delta = merge_tensors(deltas, weights, options.rule, **kw)
    return svd_factors(delta, options.svd_rank or max(a.shape[0] for a in As), options.svd_clamp)
