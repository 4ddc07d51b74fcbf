"""LoFT: an AdamW for LoRA factors whose moments live in the low-rank subspace.

Tastan, Laskaridis, Takáč, Nandakumar, Horváth, "LoFT: Low-Rank Adaptation That Behaves Like
Full Fine-Tuning", ICLR 2026, arXiv 2505.21289 (official code: github.com/tnurbek/loft,
``loft_optim/optimizer.py``, ``LoFTAdamW``).

One LoRA expert is ``W = s B A`` with ``A [r, d_in]``, ``B [d_out, r]`` (molora's layout, the
same as PEFT's ``lora_A``/``lora_B`` weights) and scaling ``s``; ``G = dL/dW`` is the gradient a
full fine-tuning of ``W`` would see, so ``g_A = s B^T G`` and ``g_B = s G A^T``. LoFT keeps, per
factor, an AdamW first moment in the factor's coordinates and, instead of an elementwise second
moment, the ``r x r`` outer products of the factor's gradient per row of ``W`` (``B``) or per
column (``A``), from which the second moment of the *full* projected gradient is exact. At step
``t`` (1-based), with the factors as they were when the gradients were computed:

- calibrated gradients (the projection of ``G`` onto the span of the partner, in coordinates)::

      S_B = (B^T B + delta_A I)^-1,   h_A = S_B g_A / s      (B h_A = P_B G,  P_B = B S_B B^T)
      S_A = (A A^T + delta_B I)^-1,   h_B = g_B S_A / s      (h_B A = G P_A,  P_A = A^T S_A A)

- moments (``j`` runs over the ``d_in`` columns of ``h_A``, ``i`` over the ``d_out`` rows of ``h_B``)::

      m_A <- b1 m_A + (1 - b1) h_A            Q_A[j] <- b2 Q_A[j] + (1 - b2) h_A[:, j] h_A[:, j]^T
      m_B <- b1 m_B + (1 - b1) h_B            Q_B[i] <- b2 Q_B[i] + (1 - b2) h_B[i, :]^T h_B[i, :]

- the factor that moves (``alternate=True``: ``B`` on odd steps, ``A`` on even steps, ``B``
  first because it starts at zero; ``alternate=False``: both, each against its partner's old
  value) takes the AdamW step of the full weight, projected back onto its subspace::

      A:  M = B m_A,   V[i, j] = B[i, :] Q_A[j] B[i, :]^T,   U = (M / c1) / (sqrt(V / c2) + eps)
          A <- (1 - lr wd) A - (lr / s) S_B B^T U
      B:  M = m_B A,   V[i, j] = A[:, j]^T Q_B[i] A[:, j],   U = (M / c1) / (sqrt(V / c2) + eps)
          B <- (1 - lr wd) B - (lr / s) U A^T S_A

  with ``c1 = 1 - b1^t``, ``c2 = 1 - b2^t``; ``M`` and ``V`` are the first and second moments of
  the projected full gradient ``P_B G`` (``G P_A``), so ``U`` is AdamW's update of ``W``.

- the moments of the other factor follow its partner into the new basis (``A -> A'``,
  ``B -> B'``)::

      R = A A'^T S_A'   (r x r):   m_B <- m_B R,   Q_B[i] <- R^T Q_B[i] R
      R = S_B' B'^T B   (r x r):   m_A <- R m_A,   Q_A[j] <- R Q_A[j] R^T

  (``h_B A = (h_B R) A'`` on the row space of ``A'``: the full-space moment is kept, projected.)

**Full-rank limit** (the paper's sanity check): with ``A`` and ``B`` square and invertible
(``r = d_in = d_out``) and ``delta = 0``, ``P_A = P_B = I`` and ``s B A`` follows AdamW on ``W``
with the same ``lr``, ``betas``, ``eps`` and (decoupled, ``p <- (1 - lr wd) p``) weight decay,
exactly, for any ``betas`` (``tests/test_loft.py`` checks it against ``torch.optim.AdamW``).

Where this differs from the official code, and why:

- the second moments are reprojected as ``R Q R^T`` (``A``) / ``R^T Q R`` (``B``), the transform
  that matches the first moment's ``R m`` / ``m R``; the official code applies the transposed
  one (``R^T Q R`` for ``A``), which agrees only for symmetric ``R`` (its sanity check runs with
  ``betas = (0, 0)``, where the old second moment is discarded). With ours the full-rank limit
  holds for every ``betas``.
- everything in a step is computed from the factors at the time of the backward pass, for
  every pair, in any parameter order; the official code rescales ``B``'s gradient with the
  ``A`` it has just updated in the same step (PEFT lists ``lora_A`` first), which mixes two bases.
- the scaling ``s`` is divided out (of the gradients and of the update), so ``lr``, ``eps`` and
  ``weight_decay`` are those of AdamW on ``W = s B A`` whatever LoRA's ``alpha``; the official
  code takes the factors as they are (``s = 1``: pass plain pairs without a scaling to get that).
- weight decay is AdamW's decoupled ``p <- (1 - lr wd) p`` (as ``torch.optim.AdamW``), applied to
  the factor that moves; the official code subtracts ``wd p`` without the learning rate.
- the moments of the resting factor are reprojected once, at the end of the step that moved its
  partner, instead of keeping a copy of the partner and reprojecting at every step: the official
  code's reprojection of an unmoved partner, ``R = (B^T B + delta I)^-1 B^T B``, shrinks the
  moments by ``O(delta / sigma^2)`` each step; ours leaves them as they are.
  Writing the factors outside the optimizer (merging, re-initialising) leaves the moments in the
  old basis; build a new optimizer then.

Checked once against the official ``LoFTAdamW`` (float64, ``s = 1``, ``weight_decay = 0``, a
7 x 5 rank-2 regression, 6 steps): with ``betas = (0, 0)`` the factors agree to 1e-15; with
``betas = (0.9, 0.999)`` they differ by 5e-2, and agree to 1e-15 again once the official code is
given the first two changes above and ``delta = 0`` (which removes the fifth's effect): the
remaining changes are the scaling and the weight decay, both neutral there.

Defaults follow the official code: ``eps = 1e-4`` (its default, also in its Hugging Face example),
``delta_A = 1e-6``, ``delta_B = 1e-8``; ``weight_decay = 0`` (its Hugging Face example trains with 0).
The gradient clipping on the projected full gradients of the official code is not part of this
optimizer (clip ``g`` before :meth:`LoFT.step` as usual, or not at all).

Cost: per expert, ``(d_in + d_out) r^2`` numbers of second-moment state (AdamW: ``(d_in + d_out) r``)
and, per step, one ``[d_out, r^2] x [r^2, d_in]`` product for the moving factor's full second
moment (two without alternation); both factors need gradients at every step (the resting
factor's moments still accumulate).

A NaN or infinite gradient is **refused**: :meth:`LoFT.step` raises
:class:`~molora.errors.MoLoRAError` naming the expert and changes no factor and no state (skip the
step yourself, e.g. with a ``GradScaler``, which never calls ``step`` on non-finite gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from molora.bank import BaseExpertBank, ExpertBank
from molora.checks import finite_number
from molora.errors import MoLoRAError

__all__ = ["LoFT"]

WHERE = "LoFT"
_HYPER = ("lr", "betas", "eps", "weight_decay", "alternate", "ridge")
_OWN = ("scalings", "names")  # what add_param_group derives from the pairs; never given by the caller


class LoFT(torch.optim.Optimizer):
    """LoFT-AdamW over LoRA factor pairs (formulas: :mod:`molora.optim.loft`).

    Args:
        params: what to train, as one of (or a list of) an :class:`~molora.bank.ExpertBank` of
            kind ``"lora"`` with one ``A`` per expert (its trainable experts, with the bank's
            scalings ``s_e``), a module holding such banks (e.g. a ``MoLoRAModel``: every bank
            in it), an ``(A, B)`` pair of tensors (``s = 1``) or an ``(A, B, s)`` triple; or a
            list of param-group dicts whose ``"params"`` is any of those, with per-group overrides
            of the hyperparameters below. Other parameters (routers, heads) go to another
            optimizer.
        lr: learning rate (of AdamW on ``W = s B A``).
        betas: ``(b1, b2)``, each in ``[0, 1)``.
        eps: added to ``sqrt(V)``, > 0.
        weight_decay: decoupled, ``p <- (1 - lr wd) p`` on the factor that moves.
        alternate: update ``B`` on odd and ``A`` on even steps (the paper's schedule); ``False``
            updates both at every step.
        ridge: ``(delta_A, delta_B)`` added to the Gram matrices ``B^T B`` (for ``A``'s step) and
            ``A A^T`` (for ``B``'s), or one number for both; ``0`` needs partners of full rank.

    Each pair keeps its own step count, so an expert whose factors got no gradient (both
    ``grad`` ``None``: frozen, or never used) is skipped without moving the others' schedule.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        *,
        alternate: bool = True,
        ridge: float | tuple[float, float] = (1e-6, 1e-8),
    ) -> None:
        defaults = _hyperparameters(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alternate=alternate,
                                         ridge=ridge), WHERE)
        if isinstance(params, (nn.Module, Tensor, dict)) or (isinstance(params, tuple) and _is_pair(params)):
            groups: list[dict[str, Any]] = [params if isinstance(params, dict) else {"params": params}]
        else:
            items = list(params)
            dicts = [isinstance(g, dict) for g in items]
            if any(dicts) and not all(dicts):
                raise MoLoRAError(f"{WHERE}: params mixes param-group dicts and other entries; give one or the other")
            groups = items if items and all(dicts) else [{"params": items}]
        super().__init__(groups, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of factor pairs (``param_group["params"]``: banks, modules, pairs, triples);
        its hyperparameters default to the optimizer's. Nothing is added if anything is wrong."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise MoLoRAError(f"{WHERE}: a param group must be a dict with a 'params' entry; got {param_group!r}")
        where = f"{WHERE} param group {len(self.param_groups)}"
        own = sorted(k for k in _OWN if k in param_group)
        if own:
            raise MoLoRAError(f"{where}: {own} are derived from the pairs; do not pass them")
        unknown = sorted(set(param_group) - {"params", *_HYPER})
        if unknown:
            raise MoLoRAError(f"{where}: unknown options {unknown}; LoFT takes {list(_HYPER)}")
        group = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        group = _hyperparameters(group, where)
        pairs = _collect(param_group["params"], where)
        if not pairs:
            raise MoLoRAError(f"{where}: no trainable LoRA factor pairs in {type(param_group['params']).__name__}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for A, B, _, name in pairs:
            if id(A) in seen or id(B) in seen:
                raise MoLoRAError(f"{where}: {name} is already optimised (a factor appears twice)")
            seen.update((id(A), id(B)))
        group["params"] = [p for A, B, _, _ in pairs for p in (A, B)]
        group["scalings"] = [s for _, _, s, _ in pairs]
        group["names"] = [n for _, _, _, n in pairs]
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LoFT step for every pair with gradients (raises, changing nothing, on a
        non-finite gradient or a pair with only one factor's gradient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []
        for group in self.param_groups:
            params = group["params"]
            for k in range(0, len(params), 2):
                A, B = params[k], params[k + 1]
                name = group["names"][k // 2]
                if A.grad is None and B.grad is None:
                    continue
                if A.grad is None or B.grad is None:
                    missing = "A" if A.grad is None else "B"
                    raise MoLoRAError(f"{WHERE}: {name}: {missing} has no gradient but its partner has one; LoFT moves "
                                      f"the factors of a pair together (freeze or unfreeze both)")
                for g, f in ((A.grad, "A"), (B.grad, "B")):
                    if g.is_sparse:
                        raise MoLoRAError(f"{WHERE}: {name}: sparse gradient of {f} is not supported")
                todo.append((group, A, B, group["scalings"][k // 2], name))
        if not todo:
            return loss
        _check_finite(todo)
        # every new value is computed before any is written: a failure leaves all as it was
        results = [self._pair_step(group, A, B, s, name) for group, A, B, s, name in todo]
        for (_, A, B, _, _), (new_a, new_b, state_a, state_b) in zip(todo, results):
            if new_a is not None:
                A.copy_(new_a)
            if new_b is not None:
                B.copy_(new_b)
            self.state[A].update(state_a)
            self.state[B].update(state_b)
        return loss

    def _pair_step(self, group: dict[str, Any], A: Tensor, B: Tensor, s: float,
                   name: str) -> tuple[Tensor | None, Tensor | None, dict, dict]:
        """The new factors (``None``: unchanged) and states of one pair; writes nothing."""
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        ridge_a, ridge_b = group["ridge"]
        work = _work_dtype(A.dtype)
        a, b = A.detach().to(work), B.detach().to(work)
        st_a, st_b = self.state[A], self.state[B]
        t = st_a.get("step", 0) + 1
        r, d_in, d_out = a.shape[0], a.shape[1], b.shape[0]
        if t == 1:
            m_a, q_a = torch.zeros_like(a), a.new_zeros(d_in, r, r)
            m_b, q_b = torch.zeros_like(b), b.new_zeros(d_out, r, r)
        else:
            m_a, q_a = st_a["exp_avg"].to(work), st_a["row_products"].to(work)
            m_b, q_b = st_b["exp_avg"].to(work), st_b["row_products"].to(work)

        s_b = _gram_inverse(b.T @ b, ridge_a, name, "B^T B")  # [r, r]
        s_a = _gram_inverse(a @ a.T, ridge_b, name, "A A^T")
        h_a = s_b @ A.grad.to(work) / s  # B h_a = P_B G
        h_b = B.grad.to(work) @ s_a / s  # h_b A = G P_A
        m_a = b1 * m_a + (1 - b1) * h_a
        m_b = b1 * m_b + (1 - b1) * h_b
        q_a = b2 * q_a + (1 - b2) * torch.einsum("kj,lj->jkl", h_a, h_a)
        q_b = b2 * q_b + (1 - b2) * torch.einsum("ik,il->ikl", h_b, h_b)

        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        move_a = (not group["alternate"]) or t % 2 == 0
        move_b = (not group["alternate"]) or t % 2 == 1
        new_a = new_b = None
        if move_a:
            v = _quadratic_rows(b, q_a).clamp_(min=0)  # V of P_B G, [d_out, d_in]
            u = (b @ m_a) / ((v / c2).sqrt_() + eps)
            new_a = (1 - lr * wd) * a - (lr / (c1 * s)) * (s_b @ (b.T @ u))
        if move_b:
            v = _quadratic_rows(a.T, q_b).T.clamp_(min=0)  # V of G P_A
            u = (m_b @ a) / ((v / c2).sqrt_() + eps)
            new_b = (1 - lr * wd) * b - (lr / (c1 * s)) * ((u @ a.T) @ s_a)
        # the resting factor's moments follow the moved partner into its new basis
        if new_a is not None:
            rot = a @ new_a.T @ _gram_inverse(new_a @ new_a.T, ridge_b, name, "A A^T")
            m_b, q_b = m_b @ rot, rot.T @ q_b @ rot
        if new_b is not None:
            rot = _gram_inverse(new_b.T @ new_b, ridge_a, name, "B^T B") @ new_b.T @ b
            m_a, q_a = rot @ m_a, rot @ q_a @ rot.T

        def cast(x: Tensor) -> Tensor:
            return x.to(A.dtype)

        return (None if new_a is None else cast(new_a), None if new_b is None else cast(new_b),
                {"step": t, "exp_avg": cast(m_a), "row_products": cast(q_a)},
                {"step": t, "exp_avg": cast(m_b), "row_products": cast(q_b)})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, after checking that the state is a
        LoFT state for these pairs (same scalings layout, moment shapes); refused otherwise, with
        nothing loaded."""
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(self.param_groups):
            raise MoLoRAError(f"{WHERE}: load_state_dict needs a LoFT state_dict with {len(self.param_groups)} "
                              f"param groups; got {type(state_dict).__name__} with keys {sorted(state_dict)[:5]}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]) or \
                    len(saved.get("scalings", ())) != len(group["scalings"]):
                raise MoLoRAError(f"{WHERE}: load_state_dict: param group {gi} holds {len(group['scalings'])} pairs; "
                                  f"the saved group is not a LoFT group of as many pairs")
            params = group["params"]
            for k in range(0, len(params), 2):
                r = params[k].shape[0]
                for idx, p, rows in ((saved["params"][k], params[k], params[k].shape[1]),
                                     (saved["params"][k + 1], params[k + 1], params[k + 1].shape[0])):
                    st = state.get(idx)
                    if st is None:
                        continue
                    want = {"exp_avg": tuple(p.shape), "row_products": (rows, r, r)}
                    got = {key: tuple(st[key].shape) if isinstance(st.get(key), Tensor) else None for key in want}
                    if got != want or not isinstance(st.get("step"), int):
                        raise MoLoRAError(f"{WHERE}: load_state_dict: the saved state of {group['names'][k // 2]} "
                                          f"(factor {list(p.shape)}) has {got}, step {st.get('step')!r}; expected "
                                          f"{want} and an int step")
        super().load_state_dict(state_dict)


def _is_pair(x: Any) -> bool:
    # tuples only: a list of tensors is torch's "params", whose lone tensors have no partner
    return isinstance(x, tuple) and len(x) in (2, 3) and all(isinstance(t, Tensor) for t in x[:2])


def _collect(spec: Any, where: str) -> list[tuple[Tensor, Tensor, float, str]]:
    """``(A, B, s, name)`` for every pair named by ``spec`` (see :class:`LoFT`), checked."""
    if isinstance(spec, BaseExpertBank):
        return _bank_pairs(spec, "bank", where)
    if isinstance(spec, nn.Module):
        # a mixed bank's parts are banks of their own here (LoFT steps its "lora" part)
        banks = [(path or "bank", m) for path, m in spec.named_modules() if isinstance(m, BaseExpertBank)
                 and m.kind != "mixed"]
        if not banks:
            raise MoLoRAError(f"{where}: {type(spec).__name__} holds no expert bank; pass banks or (A, B) pairs")
        return [pair for path, bank in banks for pair in _bank_pairs(bank, path, where)]
    if isinstance(spec, Tensor):
        raise MoLoRAError(f"{where}: a lone tensor {list(spec.shape)} has no partner; LoFT takes (A, B) pairs, "
                          f"(A, B, scaling) triples or expert banks")
    if _is_pair(spec):
        return [_pair(spec, "pair 0", where)]
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        raise MoLoRAError(f"{where}: params must be banks, modules or (A, B) pairs; got {type(spec).__name__}")
    out = []
    for i, item in enumerate(spec):
        if isinstance(item, nn.Module):
            out += _collect(item, where)
        elif isinstance(item, Tensor):
            raise MoLoRAError(f"{where}: params entry {i} is a lone tensor {list(item.shape)} without its partner; "
                              f"LoFT takes (A, B) pairs, (A, B, scaling) triples or expert banks")
        elif _is_pair(item):
            out.append(_pair(item, f"pair {i}", where))
        else:
            raise MoLoRAError(f"{where}: params entry {i} must be a bank, a module or an (A, B[, scaling]) tuple; "
                              f"got {type(item).__name__}")
    return out


def _bank_pairs(bank: BaseExpertBank, path: str, where: str) -> list[tuple[Tensor, Tensor, float, str]]:
    if type(bank) is not ExpertBank:
        raise MoLoRAError(f"{where}: {path} is a {type(bank).__name__} (kind {bank.kind!r}); LoFT steps plain LoRA "
                          f"factors B_e A_e only (kind 'lora')")
    if bank.shared_a:
        raise MoLoRAError(f"{where}: {path} shares one A between its experts (HydraLoRA); LoFT needs one A per B")
    out = []
    for e in range(bank.num_experts):
        A, B = bank.A[e], bank.B[e]
        name = f"{path} expert {e}"
        if A.requires_grad != B.requires_grad:
            raise MoLoRAError(f"{where}: {name}: only {'A' if A.requires_grad else 'B'} is trainable; LoFT moves the "
                              f"factors of a pair together (freeze or unfreeze both)")
        if A.requires_grad:
            out.append(_pair((A, B, float(bank.scaling[e])), name, where))
    return out


def _pair(item: tuple, name: str, where: str) -> tuple[Tensor, Tensor, float, str]:
    A, B = item[0], item[1]
    s = finite_number(item[2], where, f"scaling of {name}", low=0, low_open=True) if len(item) == 3 else 1.0
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise MoLoRAError(f"{where}: {name}: A must be [r, d_in] and B [d_out, r]; got A {list(A.shape)}, "
                          f"B {list(B.shape)}")
    if A is B:
        raise MoLoRAError(f"{where}: {name}: A and B are the same tensor")
    for t, f in ((A, "A"), (B, "B")):
        if not t.is_floating_point():
            raise MoLoRAError(f"{where}: {name}: {f} must be a floating-point tensor; got {t.dtype}")
        if not t.requires_grad or not t.is_leaf:
            raise MoLoRAError(f"{where}: {name}: {f} must be a leaf tensor that requires grad (a trainable parameter)")
    if A.dtype != B.dtype or A.device != B.device:
        raise MoLoRAError(f"{where}: {name}: A ({A.dtype}, {A.device}) and B ({B.dtype}, {B.device}) must share "
                          f"dtype and device")
    return A, B, s, name


def _hyperparameters(h: dict[str, Any], where: str) -> dict[str, Any]:
    """``h`` with its hyperparameters checked and normalised (betas and ridge as float pairs)."""
    out = dict(h)
    out["lr"] = finite_number(h["lr"], where, "lr", low=0)
    betas = h["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise MoLoRAError(f"{where}: betas must be a pair (b1, b2); got {betas!r}")
    out["betas"] = tuple(finite_number(b, where, f"betas[{i}]", low=0, high=1, high_open=True)
                         for i, b in enumerate(betas))
    out["eps"] = finite_number(h["eps"], where, "eps", low=0, low_open=True)
    out["weight_decay"] = finite_number(h["weight_decay"], where, "weight_decay", low=0)
    if not isinstance(h["alternate"], bool):
        raise MoLoRAError(f"{where}: alternate must be True or False; got {h['alternate']!r}")
    ridge = h["ridge"]
    ridge = (ridge, ridge) if not isinstance(ridge, (tuple, list)) else ridge
    if len(ridge) != 2:
        raise MoLoRAError(f"{where}: ridge must be a number or a pair (delta_A, delta_B); got {h['ridge']!r}")
    out["ridge"] = tuple(finite_number(x, where, f"ridge[{i}]", low=0) for i, x in enumerate(ridge))
    return out


def _quadratic_rows(x: Tensor, q: Tensor) -> Tensor:
    """``out[i, j] = x[i] q[j] x[i]^T`` for ``x [n, r]``, ``q [m, r, r]``: one ``[n, r^2] x [r^2, m]``
    GEMM on the rows' outer products (3-6x faster on CPU than the three-operand einsum)."""
    n, r = x.shape
    return (x[:, :, None] * x[:, None, :]).reshape(n, r * r) @ q.reshape(-1, r * r).T


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # the r x r inverses need float32 at least (linalg has no half kernels)
    return torch.promote_types(dtype, torch.float32)


def _gram_inverse(gram: Tensor, ridge: float, name: str, what: str) -> Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    try:
        return torch.linalg.inv(gram + ridge * eye)
    except RuntimeError as exc:  # torch.linalg.LinAlgError: singular with ridge 0
        raise MoLoRAError(f"{WHERE}: {name}: {what} + {ridge:g} I is singular; use ridge > 0 ({exc})") from None


def _check_finite(todo: list) -> None:
    """One host sync for all gradients; the first non-finite one is named."""
    grads = [(g, name, f) for _, A, B, _, name in todo for g, f in ((A.grad, "A"), (B.grad, "B"))]
    device = grads[0][0].device
    ok = torch.stack([torch.isfinite(g).all().to(device) for g, _, _ in grads])
    if bool(ok.all()):
        return
    g, name, f = grads[int((~ok).nonzero()[0])]
    bad = int((~torch.isfinite(g)).sum())
    raise MoLoRAError(f"{WHERE}: {name}: the gradient of {f} {list(g.shape)} has {bad} NaN/inf entries; step refused "
                      f"(no factor or state changed)")

