"""RiemannLoRA experts (Bogachev et al., 2025, "RiemannLoRA: A Unified Riemannian Framework for
Ambiguity-Free LoRA Optimization", arXiv 2507.12142; v2 "LoRA meets Riemannion").

An expert is a point of the manifold of fixed-rank matrices, stored in the ambiguity-free form

    X_e = U_e S_e V_e^T,    U_e [d_out, r], V_e [d_in, r] orthonormal columns, S_e [r, r],

and the routed delta is ``s_e X_e`` (``s_e`` LoRA's ``alpha / r``). The kernel sees
``A_e = S_e V_e^T``, ``B_e = U_e``. ``U, S, V`` are not trained by autograd: they are written by
the Riemannian optimizer (:class:`molora.optim.RiemannianSGD`), which needs the Euclidean gradient
``G_e = dL/dX_e`` only through the products ``G_e V_e`` and ``G_e^T U_e`` (the tangent projection
``P_T(G) = U U^T G + G V V^T - U U^T G V V^T`` is built from them). The paper gets both from one
backward pass with a doubled-rank adapter (its eq. 18, Algorithm 4 line 1): here every expert has
two zero *gradient probes*, ``Z_left [d_out, r]`` and ``Z_right [d_in, r]``, and under grad mode
the kernel sees

    B_e = [U_e | Z_left_e],   A_e = [S_e V_e^T + Z_right_e^T ; V_e^T]      (rank 2 r)

whose value is ``U S V^T`` (the probes are 0) while ``dL/dZ_left = s G V`` and
``dL/dZ_right = s G^T U`` (``s G`` is the gradient with respect to ``X``). No Gram matrix or
``S^{-1}`` is ever formed, so the point may be rank deficient (``S = 0`` at the zero init).
Outside grad mode (evaluation, merging, export) the kernel sees rank ``r`` only. The probes are
the expert's trainable parameters (freezing an expert freezes them; DDP averages their
gradients, which are the gradients the optimizer reads); they are not saved and must stay 0, so a
Euclidean optimizer over them is refused (:class:`~molora.errors.MoLoRAError`) rather than
silently training a delta that evaluation would not see.

Initialisation (the paper, Sec. 7 and Table 2): ``"zero"`` (the default, "as in basic LoRA"):
``U, V`` random orthonormal, ``S = 0``, so the delta starts at 0. (The paper's zero init takes
``V = qr(0).Q``; a random ``V`` avoids tying the first step's tangent space to the first input
coordinates.) The locally optimal initialisation (LOI, Sec. 5, Theorem 5.1) is
:meth:`RiemannLoRABank.init_loi_` / :func:`riemann_loi_`: with the SVD of the full-weight gradient
``grad_W L = [U_1 U_2 U_perp] diag(...) [V_1 V_2 V_perp]^T`` (blocks of r singular vectors), the
start is ``dW0 = alpha U_1 V_2^T`` (*the next* r right singular vectors, not the top r: then
``P_T(grad) = truncSVD_2r(grad)``, the largest possible, ``sum_{i <= 2r} sigma_i^2`` against
``sum_{i <= r} sigma_i^2`` for the top-r pair). The paper then trains ``W' + dW`` with
``W' = W - dW0`` (Algorithm 5 line 3). molora keeps the base weight as it is (unmerge, base
fingerprints, export and routing work as for every kind) and stores ``dW0`` with the expert as a
frozen offset: the routed delta is ``s_e (X_e - X0_e)``, zero at init and equal to the paper's
``W' + dW`` at every step; in a mixture each expert's offset is scaled by its own gate, which a
single change of ``W`` could not do. With an offset the kernel (and a PEFT export) sees rank
``2 r`` (``[U | -U0]``, ``[S V^T ; S0 V0^T]``); ``subtract_init=False`` drops it and starts the delta
at ``dW0`` itself (the model's output then moves at init by ``dW0``). The gradient's SVD is the
exact one (the paper's BackPropRSVD is a randomised approximation of it for large layers).

Experts of different ranks are zero-padded within each block (exact).

Sources: no official code of the paper was found in the stored public corpus; this follows the
paper's text (v2: eqs. 4-18, Algorithms 1-6, Theorem 5.1, Appendix A) and the standard geometry of
the fixed-rank manifold (Absil, Mahony & Sepulchre 2008; Vandereycken 2013; Absil & Oseledets
2015). Choices of ours, named where they are made: the random ``V`` of the zero init, the offset in
place of ``W' = W - dW0``, the exact SVD in place of BackPropRSVD, the default ``alpha = -1/sqrt(r)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from molora.bank import BaseExpertBank, _stack_padded
from molora.errors import MoLoRAError

ORTHONORMAL_TOL = 1e-4  # max |U^T U - I| accepted for a given factor (float32 round-off of a QR is ~1e-6)


def random_orthonormal(rows: int, rank: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> Tensor:
    """``[rows, rank]`` with orthonormal columns: the Q of a Gaussian matrix (torch's global RNG)."""
    g = torch.randn(rows, rank, dtype=torch.float32, device=device)
    return torch.linalg.qr(g, mode="reduced").Q.to(dtype or torch.get_default_dtype())


def loi_point(grad: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """RiemannLoRA's locally optimal initial point (Theorem 5.1) for a full-weight gradient
    ``grad [d_out, d_in]``: ``U = U_1`` (top r left singular vectors), ``V = V_2`` (right singular
    vectors r+1..2r), ``S = scale * I``; ``U S V^T`` maximises ``||P_T grad||_F`` over rank-r
    points. Float32 (float64 for a float64 gradient); needs ``2 r <= min(d_out, d_in)``."""
    if grad.dim() != 2:
        raise ValueError(f"loi_point: grad must be a [d_out, d_in] matrix; got shape {list(grad.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= 2 * rank <= min(grad.shape):
        raise ValueError(f"loi_point: LOI takes 2 r singular vectors, so 2 * rank must be <= min(d_out, d_in) = "
                         f"{min(grad.shape)}; got rank {rank!r}")
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"loi_point: scale (the paper's alpha) must be finite and non-zero; got {scale!r}")
    G = grad.detach().to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(G).all():
        raise ValueError("loi_point: the gradient holds NaN/inf")
    Uf, _, Vh = torch.linalg.svd(G, full_matrices=False)
    U = Uf[:, :rank].contiguous()
    V = Vh[rank:2 * rank].mT.contiguous()
    return U, torch.eye(rank, dtype=G.dtype, device=G.device) * scale, V


class RiemannLoRABank(BaseExpertBank):
    """E RiemannLoRA experts: ``delta_e(x) = s_e (U_e S_e V_e^T - X0_e) x`` (kind ``"riemann_lora"``).

    Args:
        d_in, d_out: the base layer's features.
        dtype, device: of the factors.

    Per expert: ``U[e] [d_out, r]``, ``S[e] [r, r]``, ``V[e] [d_in, r]`` (parameters without
    ``requires_grad``: the Riemannian optimizer writes them), the probes ``Z_left[e]``,
    ``Z_right[e]`` (zero, trainable, not saved) and, after an LOI with ``subtract_init``, the frozen
    offset ``X0_e = init_U[e] init_A[e]`` (saved). See the module docstring.
    """

    kind = "riemann_lora"

    def __init__(self, d_in: int, d_out: int, *, shared_a: bool = False, shared_rank: int | None = None,
                 init: str = "zero", dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        if shared_a:
            raise ValueError("RiemannLoRABank: every RiemannLoRA expert is its own point U S V^T; "
                             "shared_a=True is not supported")
        super().__init__(d_in, d_out, dtype=dtype, device=device)
        self.U, self.S, self.V = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self.Z_left, self.Z_right = nn.ParameterList(), nn.ParameterList()
        self.init_U, self.init_A = nn.ParameterDict(), nn.ParameterDict()  # keyed by str(expert)
        self.A_shared = None  # not a shared-A bank
        # the probes are zero by construction and are never saved (their gradient is the product)
        self._register_state_dict_hook(_drop_probes)
        self.register_load_state_dict_post_hook(_probes_not_missing)

    # ------------------------------------------------------------------ experts
    def add_expert(self, rank: int, alpha: float, *, use_rslora: bool = False, init: str = "zero",
                   U: Tensor | None = None, S: Tensor | None = None, V: Tensor | None = None,
                   trainable: bool = True) -> int:
        """Append one expert and return its index: random orthonormal ``U, V`` and ``S = 0`` (a zero
        delta) unless given (copied; ``U, V`` must have orthonormal columns, all three or none).
        ``init`` is accepted for the common interface (LoRA's ``A`` inits do not apply); use
        :meth:`init_loi_` for the locally optimal start."""
        r = self._check_rank(rank)
        if r > min(self.d_in, self.d_out):
            raise ValueError(f"RiemannLoRABank: rank {r} exceeds min(d_in, d_out) = {min(self.d_in, self.d_out)}")
        given = [t is not None for t in (U, S, V)]
        if any(given) and not all(given):
            raise ValueError("RiemannLoRABank: give all of U, S and V or none of them")
        if all(given):
            u = self._given("U", U, (self.d_out, r), False)
            s = self._given("S", S, (r, r), False)
            v = self._given("V", V, (self.d_in, r), False)
            for name, f in (("U", u), ("V", v)):
                _check_orthonormal(f.detach(), name)
        else:
            dtype, device = self._factory["dtype"], self._factory["device"]
            u = nn.Parameter(random_orthonormal(self.d_out, r, dtype=dtype, device=device), requires_grad=False)
            v = nn.Parameter(random_orthonormal(self.d_in, r, dtype=dtype, device=device), requires_grad=False)
            s = nn.Parameter(torch.zeros(r, r, **self._factory), requires_grad=False)
        zl = nn.Parameter(torch.zeros(self.d_out, r, dtype=u.dtype, device=u.device), requires_grad=trainable)
        zr = nn.Parameter(torch.zeros(self.d_in, r, dtype=u.dtype, device=u.device), requires_grad=trainable)
        for lst, p in ((self.U, u), (self.S, s), (self.V, v), (self.Z_left, zl), (self.Z_right, zr)):
            lst.append(p)  # all checks passed: nothing half-added
        return self._register(r, alpha, use_rslora)

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        """The expert's trainable handles: its two gradient probes (``U, S, V`` are written by the
        Riemannian optimizer, never by autograd)."""
        return [self.Z_left[expert], self.Z_right[expert]]

    def point(self, expert: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, S, V)`` of one expert (the live parameters)."""
        return self.U[expert], self.S[expert], self.V[expert]

    def has_offset(self, expert: int) -> bool:
        return str(expert) in self.init_U

    def euclidean_products(self, expert: int) -> tuple[Tensor, Tensor] | None:
        """``(G V [d_out, r], G^T U [d_in, r])`` of the last backward(s), with ``G = dL/dX_e``
        (the probes' gradients), or ``None`` if the expert received none."""
        gl, gr = self.Z_left[expert].grad, self.Z_right[expert].grad
        if gl is None or gr is None:
            return None
        return gl, gr

    def check_probes(self) -> None:
        """MoLoRAError if a probe is not 0 (something other than the Riemannian optimizer wrote it)."""
        probes = [*self.Z_left._parameters.values(), *self.Z_right._parameters.values()]
        if probes and bool(torch.stack([p.detach().abs().amax() for p in probes]).amax() != 0):
            raise MoLoRAError("RiemannLoRABank: the gradient probes Z_left/Z_right were written; they must stay 0. "
                              "riemann_lora experts are trained by molora.optim.RiemannianSGD (which reads the "
                              "probes' gradients), not by a Euclidean optimizer over model.trainable_parameters()")

    @torch.no_grad()
    def set_point_(self, expert: int, U: Tensor, S: Tensor, V: Tensor) -> None:
        """Write ``(U, S, V)`` of one expert in place (shapes as stored; cast to the bank's dtype)."""
        for name, dst, src in (("U", self.U[expert], U), ("S", self.S[expert], S), ("V", self.V[expert], V)):
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"RiemannLoRABank: {name} of expert {expert} must have shape {list(dst.shape)}; "
                                 f"got {list(src.shape)}")
        for dst, src in ((self.U[expert], U), (self.S[expert], S), (self.V[expert], V)):
            dst.copy_(src)

    @torch.no_grad()
    def init_loi_(self, expert: int, grad: Tensor, *, scale: float | None = None, subtract_init: bool = True) -> None:
        """Locally optimal initialisation of one expert from the full-weight gradient
        ``grad [d_out, d_in]`` (``dL/dW`` at the base weight): the effective start is
        ``s_e X_e = scale * U_1 V_2^T`` (:func:`loi_point`; ``scale`` is the paper's ``alpha``,
        default ``-1/sqrt(r)``, its subject-driven setting). With ``subtract_init`` (the paper's
        ``W' = W - dW0``) the start is also stored as the frozen offset, so the delta stays 0.
        Checks everything before writing."""
        r = self.ranks[expert]
        if tuple(grad.shape) != (self.d_out, self.d_in):
            raise ValueError(f"RiemannLoRABank.init_loi_: grad must be [d_out={self.d_out}, d_in={self.d_in}]; "
                             f"got {list(grad.shape)}")
        alpha = -1.0 / math.sqrt(r) if scale is None else float(scale)
        s = float(self.scaling[expert])
        U, S, V = loi_point(grad, r, alpha / s)
        dtype, device = self.U[expert].dtype, self.U[expert].device
        U, S, V = (t.to(dtype=dtype, device=device) for t in (U, S, V))
        self.set_point_(expert, U, S, V)
        key = str(expert)
        if subtract_init:
            self.init_U[key] = nn.Parameter(U.clone(), requires_grad=False)
            self.init_A[key] = nn.Parameter((S @ V.mT).contiguous(), requires_grad=False)
        elif key in self.init_U:
            del self.init_U[key], self.init_A[key]
        self._stacked_cache = None

    # ------------------------------------------------------------------ the kernel's view
    def _sources(self) -> list[Tensor]:
        return [*self.U._parameters.values(), *self.S._parameters.values(), *self.V._parameters.values(),
                *self.Z_left._parameters.values(), *self.Z_right._parameters.values(),
                *self.init_U.values(), *self.init_A.values()]

    def _probing(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.Z_left._parameters.values())

    def _stack(self) -> tuple[Tensor, Tensor]:
        r = self.max_rank
        U = _stack_padded(list(self.U), r, rows=False)  # [E, d_out, r]
        V = _stack_padded(list(self.V), r, rows=False)  # [E, d_in, r]
        S = torch.stack([torch.nn.functional.pad(s, (0, r - s.shape[0], 0, r - s.shape[0])) for s in self.S])
        A_main = torch.bmm(S, V.mT)  # [E, r, d_in]
        As, Bs = [A_main], [U]
        if self._probing():
            # B = [U | Z_left], A = [S V^T + Z_right^T ; V^T]: value U S V^T, gradients s G V and s G^T U
            As = [A_main + _stack_padded(list(self.Z_right), r, rows=False).mT, V.mT]
            Bs = [U, _stack_padded(list(self.Z_left), r, rows=False)]
        elif not torch.compiler.is_compiling():
            self.check_probes()  # a trained probe would be dropped here: refuse instead
        if len(self.init_U):
            zeros_b = U.new_zeros(self.d_out, r)
            zeros_a = U.new_zeros(r, self.d_in)
            U0 = torch.stack([_pad_cols(self.init_U[str(e)], r) if self.has_offset(e) else zeros_b
                              for e in range(self.num_experts)])
            A0 = torch.stack([_pad_rows(self.init_A[str(e)], r) if self.has_offset(e) else zeros_a
                              for e in range(self.num_experts)])
            As.append(A0)
            Bs.append(-U0)
        return torch.cat(As, dim=1), torch.cat(Bs, dim=2)

    def _unpadded(self, stack: tuple[Tensor, Tensor], expert: int) -> tuple[Tensor, Tensor]:
        """Expert ``expert``'s own rows/columns of its point and, if it has one, its offset (the probe
        block of a training stack adds 0 and is left out)."""
        A, B = stack
        r, r_max = self.ranks[expert], self.max_rank
        offsets = bool(len(self.init_U))
        blocks = [0] + ([A.shape[1] // r_max - 1] if offsets and self.has_offset(expert) else [])
        idx = torch.tensor([i for b in blocks for i in range(b * r_max, b * r_max + r)], device=A.device)
        return A[expert].index_select(0, idx), B[expert].index_select(1, idx)

    # ------------------------------------------------------------------ persistence
    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "offsets": [self.has_offset(e) for e in range(self.num_experts)]}

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None, device: Any,
                   base_weight: Tensor | None) -> RiemannLoRABank:
        """A bank of that layout; experts with an offset get zero placeholders a checkpoint fills."""
        bank = cls(spec["d_in"], spec["d_out"], dtype=dtype, device=device)
        trainable = spec.get("trainable", [True] * len(spec["ranks"]))
        offsets = spec.get("offsets", [False] * len(spec["ranks"]))
        if len(offsets) != len(spec["ranks"]):
            raise ValueError(f"RiemannLoRABank: 'offsets' has {len(offsets)} entries for {len(spec['ranks'])} experts")
        for e, (r, a, s, t) in enumerate(zip(spec["ranks"], spec["alphas"], spec["rslora"], trainable)):
            bank.add_expert(int(r), float(a), use_rslora=bool(s), trainable=bool(t))
            if offsets[e]:
                bank.init_U[str(e)] = nn.Parameter(torch.zeros(bank.d_out, int(r), **bank._factory), requires_grad=False)
                bank.init_A[str(e)] = nn.Parameter(torch.zeros(int(r), bank.d_in, **bank._factory), requires_grad=False)
        return bank

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={self.num_experts}, riemann_lora(ranks={self.ranks})"


def _pad_cols(t: Tensor, r: int) -> Tensor:
    return t if t.shape[1] == r else torch.nn.functional.pad(t, (0, r - t.shape[1]))


def _pad_rows(t: Tensor, r: int) -> Tensor:
    return t if t.shape[0] == r else torch.nn.functional.pad(t, (0, 0, 0, r - t.shape[0]))


def _check_orthonormal(f: Tensor, name: str) -> None:
    gram = f.float().mT @ f.float()
    err = float((gram - torch.eye(gram.shape[0], device=f.device)).abs().max())
    if not err <= ORTHONORMAL_TOL:
        raise ValueError(f"RiemannLoRABank: {name} must have orthonormal columns (max |{name}^T {name} - I| = "
                         f"{err:.2e} > {ORTHONORMAL_TOL})")


def _drop_probes(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith((prefix + "Z_left.", prefix + "Z_right."))]:
        del state[key]


def _probes_not_missing(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if ".Z_left." not in f".{k}" and ".Z_right." not in f".{k}"]


# ---------------------------------------------------------------------------------------------- model level
def riemann_layers(model: nn.Module, where: str) -> dict[str, Any]:
    """The routed layers of ``model`` whose bank is a :class:`RiemannLoRABank`, by path."""
    from molora.layer import RoutedLoRALinear
    from molora.model import MoLoRAModel

    routed = model.routed_layers() if isinstance(model, MoLoRAModel) else \
        {n: m for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)}
    layers = {n: m for n, m in routed.items() if isinstance(m.bank, RiemannLoRABank)}
    if not layers:
        raise MoLoRAError(f"{where}: the model has no 'riemann_lora' experts (MoLoRAConfig(expert_kind='riemann_lora'))")
    return layers


def riemann_loi_(model: nn.Module, closure: Callable[[], Tensor], *, scale: float | None = None,
                 subtract_init: bool = True) -> dict[str, Tensor]:
    """RiemannLoRA's locally optimal initialisation of every ``riemann_lora`` expert of ``model``.

    ``closure()`` runs a forward on a batch and returns the loss; its backward gives each layer's
    full-weight gradient ``dL/dW`` (the base weights are made differentiable for that one pass),
    and every expert of the layer starts at :meth:`RiemannLoRABank.init_loi_` of it. The
    gradients of the model's parameters are as before afterwards. All experts of a layer get the
    same start (the paper adapts one LoRA per layer; the router, not the init, tells them apart).
    Returns the gradients used, by layer path. Refused for merged or offloaded layers; nothing is
    written if the closure or a check fails."""
    layers = riemann_layers(model, "riemann_loi_")
    for name, layer in layers.items():
        if layer.merged_weights is not None:
            raise MoLoRAError(f"riemann_loi_: module {name!r} is merged; unmerge() first")
        if layer.base_layer.weight.is_meta:
            raise MoLoRAError(f"riemann_loi_: module {name!r}: the base weight is offloaded (meta); LOI needs its gradient")
    params = list({id(p): p for p in model.parameters()}.values())
    saved = [(p, p.grad) for p in params]
    weights = [(layer.base_layer.weight, layer.base_layer.weight.requires_grad) for layer in layers.values()]
    grads: dict[str, Tensor] = {}
    try:
        for p in params:
            p.grad = None
        for w, _ in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise MoLoRAError(f"riemann_loi_: closure() must return the scalar loss; got {type(loss).__name__}")
            loss.backward()
        for name, layer in layers.items():
            g = layer.base_layer.weight.grad
            if g is None:
                raise MoLoRAError(f"riemann_loi_: module {name!r} got no gradient from the closure's loss")
            grads[name] = (g.T if layer.transposed else g).detach().clone()
    finally:
        for w, flag in weights:
            w.requires_grad_(flag)
        for p, g in saved:
            p.grad = g
    for name, layer in layers.items():  # checked before any expert is written
        for e in range(layer.bank.num_experts):
            if 2 * layer.bank.ranks[e] > min(layer.bank.d_in, layer.bank.d_out):
                raise MoLoRAError(f"riemann_loi_: module {name!r}: LOI needs 2 * rank <= min(d_in, d_out) = "
                                  f"{min(layer.bank.d_in, layer.bank.d_out)}; expert {e} has rank {layer.bank.ranks[e]}")
    for name, layer in layers.items():
        for e in range(layer.bank.num_experts):
            layer.bank.init_loi_(e, grads[name], scale=scale, subtract_init=subtract_init)
    return grads
