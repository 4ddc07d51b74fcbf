"""DoRA experts (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353;
as PEFT implements it, ``peft/tuners/lora/dora.py``).

One DoRA adapter computes ``y = m / ||W0 + s B A||_c * (W0 + s B A) x (+ b)``: a trained magnitude
``m [d_out]`` over the column norm of the adapted weight. ``||.||_c`` is, as in PEFT, the L2 norm of
each *output* row of ``W0 + s B A`` over the input dim (PEFT transposes a ``fan_in_fan_out``
weight, GPT-2's ``Conv1D``, to ``[d_out, d_in]`` first; the bank always sees ``W0 [d_out, d_in]``),
and it is detached from the graph (the paper's section 4.3): ``B`` and ``A`` get gradient through
``s B A x`` only, ``m`` through both terms. The bias is not rescaled. With ``c = m / ||.||_c``:

    y = W0 x + b + (c - 1) * (W0 x') + c * s B A x'

``x'`` is the LoRA input: PEFT uses the dropped-out input for ``W0 x'`` in training when there is
dropout, else the base output minus its bias (:meth:`RoutedLoRALinear.forward` does the same).

A mixture's routed output is defined as ``sum_e g_e y_e`` (for gates summing to 1), exact for one-hot
routing (PEFT's DoRA with that adapter active):

    y = W0 x + b + (sum_e g_e (c_e - 1)) * (W0 x') + sum_e g_e s_e (diag(c_e) B_e) A_e x'

The second sum is the routed op with the rows of each ``B_e`` rescaled, so the kernel sees
``B'_e = diag(c_e) B_e`` (:meth:`DoRABank._stack`) and nothing else changes; the first term is the
gate-weighted per-channel rescaling of the base output (:meth:`DoRABank.output_scale`).

The norm needs the frozen base weight at every call: the routed layer that owns the bank hands it
over (:meth:`~molora.bank.BaseExpertBank.attach_base`, the live unmerged weight, never a copy).
The norms (``[E, d_out]``, detached; :meth:`DoRABank.weight_norm`) are cached on the experts' and the base weight's versions, so
a forward computes them once, and an eval forward of frozen experts not at all.

A static mixture ``w`` is one linear map, ``diag(a) W0 + sum_e w_e c_e s_e B_e A_e`` with
``a = 1 + sum_e w_e (c_e - 1)``: merging writes it exactly (:meth:`DoRABank.delta_weight`), and it is
one PEFT DoRA adapter exactly (:func:`dora_export`).

Limits: the base must be a dense ``nn.Linear``/``Conv1D`` weight (a quantised base is refused when the
layer is built); the norm is computed in float32 (PEFT: in the input's dtype); inside ``generate``
the stacked factors are read once per call, but the per-channel factor ``c_e`` is formed per forward
(a stack of the ``E`` magnitudes over the cached norm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molora.bank import ExpertBank, _stack_padded, lora_scaling, resident_base_weight
from molora.errors import MoLoRAError
from molora.kernels.reference import dense_gates

def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(base_weight: Tensor, deltas: Tensor) -> Tensor:
    """``||W0 + D_e||_c``: the L2 norm of each output row of ``W0 [d_out, d_in] + D_e`` for
    ``deltas [E, d_out, d_in]`` -> ``[E, d_out]``, in float32 (float64 for float64), no gradient."""
    with torch.no_grad():
        dtype = _norm_dtype(base_weight.dtype)
        return torch.linalg.norm(base_weight.to(dtype) + deltas.to(dtype), dim=-1)


class DoRABank(ExpertBank):
    """E DoRA experts over one frozen base weight (kind ``"dora"``): expert ``e`` has LoRA factors
    ``A_e [r_e, d_in]``, ``B_e [d_out, r_e]`` and a trainable magnitude ``m_e [d_out]``.

    Args:
        d_in, d_out: the base layer's features.
        base_weight: the base weight ``[d_out, d_in]`` for a bank used on its own; a routed layer
            attaches its own (:meth:`attach_base`), which replaces it.
        init, dtype, device: as :class:`~molora.bank.ExpertBank` (no shared ``A``).
    """

    kind = "dora"
    rescales_base = True

    def __init__(self, d_in: int, d_out: int, *, base_weight: Tensor | None = None, init: str = "kaiming",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(d_in, d_out, init=init, dtype=dtype, device=device)
        self.magnitude = nn.ParameterList()
        self._norm_cache: tuple | None = None
        # a function, not a tensor attribute: the base weight is the layer's, never a parameter
        # or buffer of the bank (not saved with it, not copied per expert)
        self._base_fn: Callable[[], Tensor] | None = None
        if base_weight is not None:
            self.attach_base(_Fixed(resident_base_weight(self.kind, base_weight)))

    # ------------------------------------------------------------------ the base weight
    def attach_base(self, base_weight: Callable[[], Tensor]) -> None:
        """Read ``W0`` through ``base_weight()`` from now on; checked here, so a base the norm
        cannot use (another shape: a quantised, packed weight) fails when the layer is built."""
        previous = self._base_fn
        self._base_fn = base_weight
        try:
            self.base_weight()
        except MoLoRAError:
            self._base_fn = previous
            raise
        self._norm_cache = None

    def base_weight(self) -> Tensor:
        """``W0 [d_out, d_in]`` as the owning layer holds it (unmerged); MoLoRAError without one."""
        if self._base_fn is None:
            raise MoLoRAError("DoRABank: DoRA experts need the base weight (the column norm of W0 + s B A); give "
                              "base_weight= or put the bank in a routed layer")
        W = self._base_fn()
        if tuple(W.shape) != (self.d_out, self.d_in) or not W.is_floating_point():
            raise MoLoRAError(f"DoRABank: the base weight must be a floating [d_out={self.d_out}, d_in={self.d_in}] "
                              f"matrix (DoRA's norm reads W0; a quantised base is not supported); got "
                              f"{list(W.shape)} {W.dtype}")
        return W

    # ------------------------------------------------------------------ experts
    def add_expert(self, rank: int, alpha: float, *, use_rslora: bool = False, init: str = "kaiming",
                   A: Tensor | None = None, B: Tensor | None = None, magnitude: Tensor | None = None,
                   trainable: bool = True) -> int:
        """Append one expert and return its index. ``magnitude`` (copied) defaults to DoRA's
        initialisation ``||W0 + s B A||_c`` (the expert starts as its plain LoRA, ``c = 1``; with
        ``B = 0`` as the base), which needs the base weight. Everything is checked and made
        before anything is appended."""
        rank = self._check_rank(rank)
        if magnitude is not None:
            m = self._given("magnitude", magnitude, (self.d_out,), trainable)
        else:  # DoRA's init reads the expert's factors: make them here, hand them on as given
            A = self._factors_a(rank, init, A, trainable).detach()
            B = self._given("B", B, (self.d_out, rank), trainable).detach() if B is not None else \
                torch.zeros(self.d_out, rank, **self._factory)
            W = self.base_weight()
            dtype = _norm_dtype(B.dtype)
            delta = lora_scaling(alpha, rank, use_rslora) * (B.to(W.device, dtype) @ A.to(W.device, dtype))
            m = nn.Parameter(row_norms(W, delta.unsqueeze(0))[0].to(dtype=B.dtype, device=B.device),
                             requires_grad=trainable)
        index = super().add_expert(rank, alpha, use_rslora=use_rslora, init=init, A=A, B=B, trainable=trainable)
        self.magnitude.append(m)
        return index

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return super().expert_parameters(expert) + [self.magnitude[expert]]

    def _sources(self) -> list[Tensor]:
        base = [self.base_weight()] if self._base_fn is not None else []
        return super()._sources() + list(self.magnitude._parameters.values()) + base

    # ------------------------------------------------------------------ the DoRA scale
    def weight_norm(self) -> Tensor:
        """``||W0 + s_e B_e A_e||_c`` for every expert, ``[E, d_out]`` float32, detached (as PEFT).
        Cached on the factors' and the base weight's versions (detached: safe to reuse across
        forwards; it moves only when ``A``, ``B`` or ``W0`` do)."""
        W = self.base_weight()
        sources = [*self.A._parameters.values(), *self.B._parameters.values(), W]
        if torch.compiler.is_compiling():
            return self._weight_norm(W)
        # inference tensors cannot be saved for a later backward: a norm made under
        # inference_mode is not reused outside it
        key = (torch.is_inference_mode_enabled(), self.state_key(sources))
        cached = self._norm_cache
        if cached is not None and cached[0] == key:
            return cached[2]
        value = self._weight_norm(W)
        self._norm_cache = (key, sources, value)
        return value

    def _weight_norm(self, W: Tensor) -> Tensor:
        # ||W0_i + s (B A)_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 B_i (A A^T) B_i^T: the
        # same norm as PEFT's, without materialising the [E, d_out, d_in] adapted weights (that
        # took about a third of a train step at d = 512, E = 8); float32 keeps it within a few
        # ulps of the direct form (no cancellation unless s B A ~ -W0, which no LoRA delta is)
        with torch.no_grad():
            dtype = _norm_dtype(W.dtype)
            W = W.to(dtype)
            A = self._stack_a().to(W.device, dtype)  # [E, r, d_in]
            B = _stack_padded(list(self.B), self.max_rank, rows=False).to(W.device, dtype)  # [E, d_out, r]
            s = self.scaling.to(W.device, dtype).unsqueeze(-1)
            cross = (B * torch.matmul(W, A.transpose(1, 2))).sum(-1)
            own = (torch.bmm(B, torch.bmm(A, A.transpose(1, 2))) * B).sum(-1)
            return ((W * W).sum(1) + 2 * s * cross + s * s * own).clamp_min(0).sqrt()

    def dora_scale(self) -> Tensor:
        """``c_e = m_e / ||W0 + s_e B_e A_e||_c``, ``[E, d_out]`` in the experts' dtype;
        differentiable in ``m`` only (the norm is detached)."""
        m = torch.stack(list(self.magnitude._parameters.values()))
        return m / self.weight_norm().to(m.dtype)

    def _stack(self) -> tuple[Tensor, Tensor]:
        A, B = super()._stack()
        return A, B * self.dora_scale().unsqueeze(-1).to(B.dtype)

    def output_scale(self, gates: Tensor, indices: Tensor | None) -> Tensor:
        """``sum_e g_e (c_e - 1)`` per decision row, ``[rows, d_out]``: the factor of the base
        output ``W0 x`` (dense gates ``[rows, E]``, or top-k gates with ``indices``, ``-1`` = none)."""
        scale = self.dora_scale() - 1
        # top-k gates as dense [rows, E]: one small GEMM, cheaper than gathering [rows, k, d_out]
        return dense_gates(gates.to(scale.dtype), indices, self.num_experts) @ scale

    def static_scale(self, weights: Sequence[float] | Tensor) -> Tensor:
        """``a = 1 + sum_e w_e (c_e - 1)`` ``[d_out]`` (float64) of a static mixture ``w``."""
        w = torch.as_tensor(weights, dtype=torch.float64)
        with torch.no_grad():
            return 1 + w.to(self.device) @ (self.dora_scale().double() - 1)

    def delta_weight(self, weights: Sequence[float] | Tensor) -> Tensor:
        """The static mixture minus ``W0``: ``(a - 1) * W0 + sum_e w_e c_e s_e B_e A_e`` (float32),
        so that ``W0 + delta`` is the mixture's weight exactly."""
        delta = super().delta_weight(weights)  # the routed term, through the rescaled B'
        with torch.no_grad():
            a = self.static_scale(weights)
            return delta + ((a - 1).unsqueeze(-1) * self.base_weight().double()).float()

    # ------------------------------------------------------------------ spec
    @classmethod
    def _from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None, device: Any,
                   base_weight: Tensor | None) -> DoRABank:
        """Fresh experts (``A`` by ``spec["init"]``, ``B = 0``, ``m = ||W0||_c``), or, without
        ``base_weight`` (a checkpoint, whose tensors fill them), placeholder magnitudes of 1."""
        if spec.get("shared_a"):
            raise ValueError("DoRABank: DoRA experts do not share A (shared_a must be false)")
        init = spec.get("init", "kaiming")
        bank = cls(spec["d_in"], spec["d_out"], base_weight=base_weight, init=init, dtype=dtype, device=device)
        trainable = spec.get("trainable", [True] * len(spec["ranks"]))
        for r, a, s, t in zip(spec["ranks"], spec["alphas"], spec["rslora"], trainable):
            m = None if base_weight is not None else torch.ones(spec["d_out"], dtype=dtype, device=device)
            bank.add_expert(int(r), float(a), use_rslora=bool(s), init=init, magnitude=m, trainable=bool(t))
        return bank

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"


class _Fixed:
    """A base weight given as a tensor (a bank used on its own): returns it."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight

    def __call__(self) -> Tensor:
        return self.weight


def dora_export(base_weight: Tensor, A: Tensor, B: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """A static mixture as one PEFT DoRA adapter (scaling 1), exactly: the mixture's weight is
    ``diag(a) W0 + B A`` (``a`` = ``scale``, ``B A`` the cat-merged ``sum_e w_e c_e s_e B_e A_e``),
    which DoRA writes as ``lora_B = diag(1 / a) B`` and ``m = a * ||W0 + diag(1 / a) B A||_c``
    (PEFT then finds ``c = a``). Returns ``(lora_B, m)`` in float64. ``a`` must have no zero
    entry (a channel the mixture scales to 0 is no DoRA adapter); MoLoRAError otherwise."""
    a = scale.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all() or (a == 0).any():
        raise MoLoRAError("a channel of the mixture has DoRA scale 0 or non-finite (sum_e w_e (c_e - 1) = -1): it "
                          "cannot be written as one DoRA adapter")
    B_out = B.detach().to("cpu", torch.float64) / a.unsqueeze(-1)
    W = base_weight.detach().to("cpu", torch.float64)
    m = a * row_norms(W, (B_out @ A.detach().to("cpu", torch.float64)).unsqueeze(0))[0]
    return B_out, m
