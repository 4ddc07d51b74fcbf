"""Arrow routing: zero-data, per-token routing from each LoRA expert's own weights.

For a routed layer with experts ``delta_e = B_e A_e`` (``A_e [r, d_in]``, ``B_e [d_out, r]``):

    v_e = top right singular vector of B_e A_e        (the expert's prototype, ||v_e|| = 1)
    s_e(x) = |<x, v_e>|                                (sign-free: v_e is defined up to sign)
    K(x) = argtopk_k s(x)
    g_e(x) = exp(s_e / T) / sum_{j in K} exp(s_j / T)  (e in K), else 0

    y = W x (+ b) + sum_e g_e(x) * scale_e * B_e A_e x

Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"
(arXiv 2405.11157), as PEFT's ``ArrowConfig`` / ``create_arrow_model`` (default ``k = 3``,
``T = 1``). No example data and no training: the prototypes are read off the experts. Each
layer's router holds the prototypes of that layer's experts.

The prototypes are computed exactly, in float64, from a thin factorisation (``B = Q R``, then the
SVD of the ``r x d_in`` matrix ``R A``, whose right singular vectors are those of ``B A``);
PEFT runs 15 power iterations on ``A^T B^T B A`` from a random start, which agrees when the top
singular value is well separated. Each prototype's sign is fixed (largest-magnitude entry
positive) and an expert with a zero delta has the zero prototype (score 0). They are a buffer
``prototypes [E, d_in]`` (saved and loaded with the model, never trained), refreshed from the
layer's experts whenever those change (the routed layer hands them to :meth:`ArrowRouter.sync_experts`
before each decision; a change is seen from the factors' storage and in-place version counters,
as an optimizer step or a checkpoint load bumps them), or on request with
:meth:`ArrowRouter.update_prototypes`. Under ``torch.compile`` the check is skipped: call
``update_prototypes`` after changing the experts of a compiled model.

The scores ``x V^T`` are a linear map of the token rows, so the routed layer computes them in the
same GEMM as its base output and LoRA shrink (:meth:`ArrowRouter.fusable_weight`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from molora.context import RoutingSignals
from molora.errors import MoLoRAError

from .base import Router, RoutingDecision, check_positive, check_top_k

if TYPE_CHECKING:
    from molora.bank import ExpertBank

#: Arrow's (and PEFT's) default number of experts per token.
DEFAULT_TOP_K = 3


@torch.no_grad()
def arrow_prototypes(A: Tensor, B: Tensor) -> Tensor:
    """The top right singular vector of every ``B_e A_e``, as ``[E, d_in]`` float64.

    ``A [E, r, d_in]`` (or one shared ``[r, d_in]``, HydraLoRA), ``B [E, d_out, r]``; zero-padded
    ranks are exact (a zero rank component adds nothing to ``B A``). The sign is fixed so that
    the largest-magnitude entry is positive; an expert with ``B A = 0`` gets the zero vector.
    """
    B64 = B.detach().to(torch.float64)
    A64 = A.detach().to(torch.float64)
    if A64.dim() == 2:
        A64 = A64.expand(B64.shape[0], -1, -1)
    # B A = Q (R A) with Q orthonormal columns: the right singular vectors of R A are those of B A,
    # and R A is only [min(d_out, r), d_in]
    R = torch.linalg.qr(B64, mode="r").R
    _, S, Vh = torch.linalg.svd(R @ A64, full_matrices=False)
    v = Vh[:, 0, :]
    pivot = v.gather(-1, v.abs().argmax(dim=-1, keepdim=True))
    sign = torch.where(pivot < 0, -1.0, 1.0).to(v.dtype)
    return torch.where(S[:, :1] > 0, v * sign, torch.zeros_like(v))


class ArrowRouter(Router):
    """Per-token top-k routing by ``|<x, v_e>|`` against each expert's top right singular vector
    (Arrow, Ostapenko et al. 2024; PEFT ``create_arrow_model``).

    Args:
        top_k: experts per token, ``1 <= k <= E`` (default 3, or every expert when the layer
            holds fewer).
        temperature: ``T > 0`` of the softmax over the kept scores.
    """

    name = "arrow"
    reads_experts = True
    expert_dims = {"prototypes": 0}

    def __init__(self, num_experts: int, d_in: int, top_k: int | None = None, temperature: float = 1.0) -> None:
        super().__init__(num_experts, d_in)
        self.top_k = check_top_k(self.name, min(DEFAULT_TOP_K, num_experts) if top_k is None else top_k, num_experts)
        self.temperature = check_positive(self.name, "temperature", temperature)
        self.register_buffer("prototypes", torch.zeros(num_experts, d_in))
        self._stamp: tuple | None = None  # the experts the prototypes were computed from

    def get_config(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "temperature": self.temperature}

    # ------------------------------------------------------------------ prototypes
    def sync_experts(self, bank: ExpertBank) -> None:
        """Recompute the prototypes if ``bank`` (the layer's experts) changed since they were made."""
        if torch.compiler.is_compiling():
            return
        if self._stamp != bank.state_key():
            self.update_prototypes(bank)

    @torch.no_grad()
    def update_prototypes(self, bank: ExpertBank) -> None:
        """Compute the prototypes from ``bank`` now (:func:`arrow_prototypes`)."""
        if (bank.num_experts, bank.d_in) != (self.num_experts, self.d_in):
            raise MoLoRAError(f"router {self.name!r} is over {self.num_experts} experts of input width {self.d_in}; "
                              f"the layer's bank holds {bank.num_experts} of width {bank.d_in}")
        key = bank.state_key()
        A, B = bank.stacked()
        # a new buffer, not a copy into the old one: a forward in another thread reads the old or the new whole
        self.prototypes = arrow_prototypes(A, B).to(self.prototypes)
        self._stamp = key

    def fusable_weight(self) -> Tensor:
        """``V [E, d_in]``: the signed scores ``x V^T`` of the layer's token rows, which the routed
        layer computes in its base GEMM and passes to :meth:`forward` as ``logits``."""
        return self.prototypes

    # ------------------------------------------------------------------ routing
    def forward(self, x: Tensor, signals: RoutingSignals, logits: Tensor | None = None) -> RoutingDecision:
        if logits is None:
            rows = x.reshape(-1, self.d_in)
            logits = rows.to(self.prototypes.dtype) @ self.prototypes.T
        elif logits.dim() != 2 or logits.shape[-1] != self.num_experts:
            raise ValueError(f"router {self.name!r}: given logits must be [tokens, {self.num_experts}]; "
                             f"got {list(logits.shape)}")
        scores = logits.abs()
        kept, indices = scores.topk(self.top_k, dim=-1)
        gates = torch.softmax(kept / self.temperature, dim=-1)
        return RoutingDecision(gates=gates, indices=indices, logits=scores, task_ids=signals.task_ids)
