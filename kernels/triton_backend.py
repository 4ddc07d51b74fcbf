"""Triton kernels of the routed LoRA op (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Two forward paths, each with backward kernels; fp32 accumulation throughout:

* **fused dense** (small ``E r``): one program per token tile reads its x rows once, computes
  ``H = X A_cat^T`` for all experts at once (``[BT, E_P * R_P]`` columns, column ``e R_P + j``),
  applies gate, scale and rank mask, and writes ``Y = H' B_cat^T`` tile by tile: no
  ``[T, k, d_out]`` buffer. With a shared A (HydraLoRA) ``H = X A^T`` has only ``R_P`` columns
  and is broadcast to the experts' columns, so ``A x`` is computed once, not once per expert.
  The backward token kernel recomputes ``H``, forms ``U = dY B_cat``, the gate gradient
  ``dc_e = sum_j m U H`` (reduced per expert in registers), ``dH = c m U`` and ``dX = dH A_cat``
  (shared A: ``dX = (sum_e dH_e) A``).
* **grouped** (many experts, small k; vLLM / Punica SGMV / ScatterMoE style): the valid
  ``(token, slot)`` pairs are stably sorted by expert; every expert's segment is cut into
  padding-free row blocks (the last block of a segment is masked, never padded with other
  experts' rows); one program per block gathers its x rows, shrinks with ``A_e``, gates and
  scales at rank ``r``, expands with ``B_e`` and atomically adds into an fp32 ``Y``.
  Backward: ``U = dY_s B_e``, per-pair gate gradients, ``dH``, and ``dX`` by atomic adds.

Weight gradients of both paths come from one segment-reduction kernel:
``out[e] = sum_{i in seg e} (w_i L_i)^T R_{row_i}`` over the rows of expert e's segment
(``dA_e = dH_e^T X_e``, ``dB_e^T = H'_e^T dY_e``): a per-expert reduction with no atomics.

Under the interpreter bf16 ``tl.dot`` is wrong, so bf16 (and fp32) operands are upcast to fp32
inside the kernels there; fp16 operands stay fp16 with fp32 accumulation.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .grouped import _scaling_vector
from .reference import dense_gates
from .torch_backend import use_grouped

#: True when the kernels below were built for the interpreter (CPU tensors allowed).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: The fused dense kernel keeps ``E_P * R_P`` fp32 columns per token in registers.
MAX_DENSE_COLUMNS = 128


def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _load_cast(ptrs, mask, UPCAST: tl.constexpr):
    v = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _w_tile(w_ptr, woff, wmask, ks, km, CS, UPCAST: tl.constexpr):
    """Tile ``W[w, k]`` at ``w_ptr + woff[w] + k CS``: rows of A (``woff = row d_in``, ``CS = 1``) and
    ``B_e^T`` read in place (``woff = e d_out r + j``, ``CS = r``), so no kernel transposes B."""
    return _load_cast(w_ptr + woff[:, None] + ks[None, :] * CS, wmask[:, None] & km[None, :], UPCAST)


@triton.jit
def _shrink(l_ptr, rows, rmask, w_ptr, woff, wmask, CS, K, BR: tl.constexpr, W: tl.constexpr,
            BK: tl.constexpr, UPCAST: tl.constexpr):
    """``[BR, W]`` fp32 ``sum_k L[rows, k] W[w, k]`` over the ``K`` columns of row-major ``L``:
    ``H = X A^T`` and ``U = dY B`` (``d -> r``) of every kernel."""
    acc = tl.zeros((BR, W), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < K
        lt = _load_cast(l_ptr + rows[:, None] * K + ks[None, :], rmask[:, None] & km[None, :], UPCAST)
        acc += tl.dot(lt, tl.trans(_w_tile(w_ptr, woff, wmask, ks, km, CS, UPCAST)))
    return acc


@triton.jit
def _expand(h, w_ptr, woff, wmask, CS, out_ptr, rows, rmask, N, BN: tl.constexpr, UPCAST: tl.constexpr,
            ATOMIC: tl.constexpr):
    """``out[rows, n] = sum_w h[:, w] W[w, n]`` over the ``N`` columns of row-major ``out``:
    ``Y = H' B^T`` and ``dX = dH A`` (``r -> d``). ``ATOMIC``: added into an fp32 ``out``, because
    the grouped kernels' blocks share tokens; else stored in ``out``'s dtype (one writer per row)."""
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        nm = ns < N
        wt = _w_tile(w_ptr, woff, wmask, ns, nm, CS, UPCAST)
        out = tl.dot(h.to(wt.dtype), wt)
        ptrs = out_ptr + rows[:, None] * N + ns[None, :]
        if ATOMIC:
            tl.atomic_add(ptrs, out, rmask[:, None] & nm[None, :])
        else:
            tl.store(ptrs, out.to(out_ptr.dtype.element_ty), rmask[:, None] & nm[None, :])


@triton.jit
def _dense_tile(x_ptr, a_ptr, coef_ptr, mask_ptr, T, D_IN, E, R, SHARED: tl.constexpr, E_P: tl.constexpr,
                R_P: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    """This program's token tile for the dense kernels: ``rows``/``rmask``, the expert columns
    ``col = e R_P + j`` (``ce``, ``cr``, valid ``cvalid``), ``H [BT, E_P R_P]`` fp32, the coefficients
    ``c`` and the rank mask ``m`` per column. The backward recomputes ``H`` rather than store it."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    col = tl.arange(0, E_P * R_P)
    ce = col // R_P
    cr = col % R_P
    cvalid = (ce < E) & (cr < R)
    if SHARED:  # H = X A^T at R_P columns, broadcast to the experts' columns: A x once, not per expert
        rr = tl.arange(0, R_P)
        h = _shrink(x_ptr, rows, rmask, a_ptr, rr * D_IN, rr < R, 1, D_IN, BT, R_P, BK, UPCAST)
        h = tl.reshape(tl.broadcast_to(h[:, None, :], (BT, E_P, R_P)), (BT, E_P * R_P))
    else:
        h = _shrink(x_ptr, rows, rmask, a_ptr, (ce * R + cr) * D_IN, cvalid, 1, D_IN, BT, E_P * R_P, BK, UPCAST)
    c = tl.load(coef_ptr + rows[:, None] * E + ce[None, :], rmask[:, None] & cvalid[None, :], other=0.0)
    m = tl.load(mask_ptr + ce * R + cr, cvalid, other=0.0)
    return rows, rmask, col, ce, cr, cvalid, h, c, m


@triton.jit
def _dense_fwd_kernel(x_ptr, a_ptr, b_ptr, coef_ptr, mask_ptr, y_ptr, T, D_IN, D_OUT, E, R,
                      SHARED: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr):
    rows, rmask, col, ce, cr, cvalid, h, c, m = _dense_tile(x_ptr, a_ptr, coef_ptr, mask_ptr, T, D_IN, E, R,
                                                            SHARED, E_P, R_P, BT, BK, UPCAST)
    hp = h * c * m[None, :]
    _expand(hp, b_ptr, ce * (D_OUT * R) + cr, cvalid, R, y_ptr, rows, rmask, D_OUT, BN, UPCAST, False)


@triton.jit
def _dense_bwd_kernel(x_ptr, a_ptr, b_ptr, coef_ptr, mask_ptr, dy_ptr, dx_ptr, dcoef_ptr, hp_ptr, dh_ptr,
                      T, D_IN, D_OUT, E, R, SHARED: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
                      NEED_X: tl.constexpr):
    rows, rmask, col, ce, cr, cvalid, h, c, m = _dense_tile(x_ptr, a_ptr, coef_ptr, mask_ptr, T, D_IN, E, R,
                                                            SHARED, E_P, R_P, BT, BK, UPCAST)
    u = _shrink(dy_ptr, rows, rmask, b_ptr, ce * (D_OUT * R) + cr, cvalid, R, D_OUT, BT, E_P * R_P, BN, UPCAST)
    hm = h * m[None, :]
    # gate gradient: reduce each expert's R_P columns in registers
    dc = tl.sum(tl.reshape(u * hm, (BT, E_P, R_P)), axis=2)
    ecol = tl.arange(0, E_P)
    tl.store(dcoef_ptr + rows[:, None] * E + ecol[None, :], dc, rmask[:, None] & (ecol[None, :] < E))
    dh = u * c * m[None, :]
    tile = rows[:, None] * (E_P * R_P) + col[None, :]
    tl.store(hp_ptr + tile, hm * c, rmask[:, None])
    if SHARED:
        dhs = tl.sum(tl.reshape(dh, (BT, E_P, R_P)), axis=1)  # sum_e dH_e: one [BT, R_P] for the shared A
        rr = tl.arange(0, R_P)
        tl.store(dh_ptr + rows[:, None] * R_P + rr[None, :], dhs, rmask[:, None])
        if NEED_X:
            _expand(dhs, a_ptr, rr * D_IN, rr < R, 1, dx_ptr, rows, rmask, D_IN, BK, UPCAST, False)
    else:
        tl.store(dh_ptr + tile, dh, rmask[:, None])
        if NEED_X:
            _expand(dh, a_ptr, (ce * R + cr) * D_IN, cvalid, 1, dx_ptr, rows, rmask, D_IN, BK, UPCAST, False)


@triton.jit
def _segment_tn_kernel(l_ptr, w_ptr, r_ptr, idx_ptr, off_ptr, out_ptr, M, N, LD_L,
                       GATHER: tl.constexpr, ROW_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BI: tl.constexpr, UPCAST: tl.constexpr):
    """``out[e, m, n] = sum_{i in [off[e], off[e+1])} w_i L[i, m] R[row_i, n]`` (fp32 out)."""
    e = tl.program_id(0)
    ms = tl.program_id(1) * BM + tl.arange(0, BM)
    ns = tl.program_id(2) * BN + tl.arange(0, BN)
    mm = ms < M
    nm = ns < N
    start = tl.load(off_ptr + e)
    end = tl.load(off_ptr + e + 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i0 in range(start, end, BI):
        i = i0 + tl.arange(0, BI)
        im = i < end
        lt = tl.load(l_ptr + i[:, None] * LD_L + ms[None, :], im[:, None] & mm[None, :], other=0.0)
        if ROW_SCALE:
            lt = lt * tl.load(w_ptr + i, im, other=0.0)[:, None]
        if GATHER:
            rows = tl.load(idx_ptr + i, im, other=0)
        else:
            rows = i
        rt = _load_cast(r_ptr + rows[:, None] * N + ns[None, :], im[:, None] & nm[None, :], UPCAST)
        acc += tl.dot(tl.trans(lt.to(rt.dtype)), rt)
    tl.store(out_ptr + e * M * N + ms[:, None] * N + ns[None, :], acc, mm[:, None] & nm[None, :])


@triton.jit
def _grouped_block(blk, e, bstart_ptr, off_ptr, tok_ptr, coef_ptr, mask_ptr, R, R_P: tl.constexpr,
                   BM: tl.constexpr):
    """Block ``blk`` of expert ``e``'s segment: sorted pair rows ``i`` (valid ``im``: the segment's
    last block is masked, not padded), their tokens ``tok`` and coefficients ``c``, the rank range
    ``cr`` (valid ``rm``) and expert e's rank mask ``m``. The kernels test ``e >= 0`` before calling
    this, so the spare blocks past the last segment load nothing more."""
    start = tl.load(bstart_ptr + blk)
    end = tl.load(off_ptr + e + 1)
    i = start + tl.arange(0, BM)
    im = i < end
    tok = tl.load(tok_ptr + i, im, other=0)
    c = tl.load(coef_ptr + i, im, other=0.0)
    cr = tl.arange(0, R_P)
    rm = cr < R
    m = tl.load(mask_ptr + e * R + cr, rm, other=0.0)
    return i, im, tok, c, cr, rm, m


@triton.jit
def _grouped_fwd_kernel(x_ptr, a_ptr, b_ptr, hsh_ptr, tok_ptr, coef_ptr, mask_ptr, bexp_ptr, bstart_ptr, off_ptr,
                        h_ptr, y_ptr, D_IN, D_OUT, R, SHARED: tl.constexpr, R_P: tl.constexpr, BM: tl.constexpr,
                        BK: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr):
    blk = tl.program_id(0)
    e = tl.load(bexp_ptr + blk)
    if e >= 0:
        i, im, tok, c, cr, rm, m = _grouped_block(blk, e, bstart_ptr, off_ptr, tok_ptr, coef_ptr, mask_ptr, R, R_P, BM)
        if SHARED:  # H = X A^T was computed once per token; gather its rows
            h = tl.load(hsh_ptr + tok[:, None] * R_P + cr[None, :], im[:, None], other=0.0)
        else:
            h = _shrink(x_ptr, tok, im, a_ptr, e * R * D_IN + cr * D_IN, rm, 1, D_IN, BM, R_P, BK, UPCAST)
        h = h * m[None, :]
        tl.store(h_ptr + i[:, None] * R_P + cr[None, :], h, im[:, None])
        hp = h * c[:, None]
        _expand(hp, b_ptr, e * D_OUT * R + cr, rm, R, y_ptr, tok, im, D_OUT, BN, UPCAST, True)


@triton.jit
def _grouped_bwd_kernel(a_ptr, b_ptr, dy_ptr, tok_ptr, coef_ptr, scale_ptr, mask_ptr, bexp_ptr, bstart_ptr, off_ptr,
                        h_ptr, dpair_ptr, dh_ptr, dx_ptr, D_IN, D_OUT, R, SHARED: tl.constexpr, R_P: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
                        NEED_X: tl.constexpr):
    blk = tl.program_id(0)
    e = tl.load(bexp_ptr + blk)
    if e >= 0:
        i, im, tok, c, cr, rm, m = _grouped_block(blk, e, bstart_ptr, off_ptr, tok_ptr, coef_ptr, mask_ptr, R, R_P, BM)
        u = _shrink(dy_ptr, tok, im, b_ptr, e * D_OUT * R + cr, rm, R, D_OUT, BM, R_P, BN, UPCAST)
        h = tl.load(h_ptr + i[:, None] * R_P + cr[None, :], im[:, None], other=0.0)
        s = tl.load(scale_ptr + e)
        tl.store(dpair_ptr + i, tl.sum(u * h, axis=1) * s, im)
        dh = u * c[:, None] * m[None, :]
        tl.store(dh_ptr + i[:, None] * R_P + cr[None, :], dh, im[:, None])
        if NEED_X and not SHARED:
            _expand(dh, a_ptr, e * R * D_IN + cr * D_IN, rm, 1, dx_ptr, tok, im, D_IN, BK, UPCAST, True)


# ---------------------------------------------------------------------------------------- host side
def _blocks(device: torch.device) -> dict[str, int]:
    # Interpreter: small tiles keep the CPU emulation fast and exercise many tiles and tails.
    if device.type != "cuda":
        return {"BT": 16, "BK": 16, "BN": 16, "BM": 16, "BI": 16}
    return {"BT": 64, "BK": 64, "BN": 64, "BM": 64, "BI": 64}


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(
            "routed_lora: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            "molora.kernels.triton_backend is imported); use backend='torch' on a CPU"
        )


def segment_reduce(L: Tensor, Rm: Tensor, offsets: Tensor, row_idx: Tensor | None = None,
                   row_scale: Tensor | None = None, upcast: bool = True) -> Tensor:
    """``out[e] = sum_{i in seg e} (w_i L[i])^T Rm[row_i]`` -> ``[S, L.shape[1], Rm.shape[1]]`` fp32."""
    S = offsets.numel() - 1
    M, N = L.shape[1], Rm.shape[1]
    out = torch.empty(S, M, N, dtype=torch.float32, device=L.device)
    bs = _blocks(L.device)
    BM, BN = max(16, min(_p2(M), 64)), bs["BN"]
    grid = (S, triton.cdiv(M, BM), triton.cdiv(N, BN))
    _segment_tn_kernel[grid](
        L, row_scale if row_scale is not None else L, Rm, row_idx if row_idx is not None else offsets, offsets, out,
        M, N, L.stride(0), GATHER=row_idx is not None, ROW_SCALE=row_scale is not None,
        BM=BM, BN=BN, BI=bs["BI"], UPCAST=upcast,
    )
    return out


class _DenseTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, coef, mask):
        T, d_in = x.shape
        E, d_out, r = B.shape
        shared = A.dim() == 2
        E_P = _p2(E)
        R_P = dense_columns(E, r, shared) // E_P
        bs = _blocks(x.device)
        y = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
        _dense_fwd_kernel[(triton.cdiv(T, bs["BT"]),)](
            x, A, B, coef, mask, y, T, d_in, d_out, E, r, SHARED=shared, E_P=E_P, R_P=R_P,
            BT=bs["BT"], BK=bs["BK"], BN=bs["BN"], UPCAST=_upcast(x.dtype),
        )
        ctx.save_for_backward(x, A, B, coef, mask)
        ctx.pads = (E_P, R_P)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, coef, mask = ctx.saved_tensors
        E_P, R_P = ctx.pads
        T, d_in = x.shape
        E, d_out, r = B.shape
        shared = A.dim() == 2
        bs = _blocks(x.device)
        up = _upcast(x.dtype)
        dy = dy.contiguous()
        need_x = ctx.needs_input_grad[0]
        dx = torch.empty_like(x) if need_x else x
        dcoef = torch.empty(T, E, dtype=torch.float32, device=x.device)
        hp = torch.empty(T, E_P * R_P, dtype=torch.float32, device=x.device)
        dh = torch.empty(T, R_P if shared else E_P * R_P, dtype=torch.float32, device=x.device)
        _dense_bwd_kernel[(triton.cdiv(T, bs["BT"]),)](
            x, A, B, coef, mask, dy, dx, dcoef, hp, dh, T, d_in, d_out, E, r, SHARED=shared, E_P=E_P, R_P=R_P,
            BT=bs["BT"], BK=bs["BK"], BN=bs["BN"], UPCAST=up, NEED_X=need_x,
        )
        whole = torch.tensor([0, T], dtype=torch.long, device=x.device)  # one segment: all tokens
        dA = dB = None
        if ctx.needs_input_grad[1]:
            dA = segment_reduce(dh, x, whole, upcast=up)[0]
            dA = dA[:r] if shared else dA.view(E_P, R_P, d_in)[:E, :r]
            dA = dA.to(A.dtype)
        if ctx.needs_input_grad[2]:
            dBt = segment_reduce(hp, dy, whole, upcast=up)[0].view(E_P, R_P, d_out)[:E, :r]
            dB = dBt.transpose(1, 2).to(B.dtype)
        return (dx if need_x else None), dA, dB, dcoef, None


class _GroupedTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, gates, indices, s, mask):
        T, d_in = x.shape
        E, d_out, r = B.shape
        shared = A.dim() == 2
        k = indices.shape[1]
        R_P = max(16, _p2(r))
        bs = _blocks(x.device)
        BM = bs["BM"]
        # metadata without a host sync: the sorted order keeps the -1 pairs at the end (never read)
        flat = indices.reshape(-1)
        key = torch.where(flat < 0, E, flat)
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=E + 1)[:E]
        offsets = torch.zeros(E + 1, dtype=torch.long, device=x.device)
        offsets[1:] = torch.cumsum(counts, 0)
        nblk = torch.div(counts + BM - 1, BM, rounding_mode="floor")
        cum = torch.cumsum(nblk, 0)
        max_blocks = triton.cdiv(flat.numel(), BM) + E
        b = torch.arange(max_blocks, device=x.device)
        bexp = torch.searchsorted(cum, b, right=True)
        valid = bexp < E
        e_c = bexp.clamp(max=E - 1)
        bstart = offsets[e_c] + (b - (cum[e_c] - nblk[e_c])) * BM
        bexp = torch.where(valid, bexp, -1)
        tok = torch.div(order, k, rounding_mode="floor")
        e_sorted = key[order].clamp(max=E - 1)
        coef = (gates.reshape(-1)[order].float() * s[e_sorted].float()).contiguous()
        hsh = None
        if shared:
            hsh = torch.zeros(T, R_P, dtype=torch.float32, device=x.device)
            hsh[:, :r] = (x @ A.T).float()  # A x once per token, not per expert (HydraLoRA)
        h = torch.empty(flat.numel(), R_P, dtype=torch.float32, device=x.device)
        y = torch.zeros(T, d_out, dtype=torch.float32, device=x.device)
        _grouped_fwd_kernel[(max_blocks,)](
            x, A, B, hsh if shared else x, tok, coef, mask, bexp, bstart, offsets, h, y, d_in, d_out, r,
            SHARED=shared, R_P=R_P, BM=BM, BK=bs["BK"], BN=bs["BN"], UPCAST=_upcast(x.dtype),
        )
        ctx.save_for_backward(x, A, B, s, mask, order, tok, coef, bexp, bstart, offsets, h)
        ctx.meta = (gates.shape, R_P, max_blocks)
        ctx.gates_dtype = gates.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, A, B, s, mask, order, tok, coef, bexp, bstart, offsets, h = ctx.saved_tensors
        gshape, R_P, max_blocks = ctx.meta
        T, d_in = x.shape
        E, d_out, r = B.shape
        shared = A.dim() == 2
        bs = _blocks(x.device)
        up = _upcast(x.dtype)
        dy = dy.contiguous()
        need_x = ctx.needs_input_grad[0]
        n_pairs = order.numel()
        dpair = torch.zeros(n_pairs, dtype=torch.float32, device=x.device)
        dh = torch.zeros(n_pairs, R_P, dtype=torch.float32, device=x.device)
        dx32 = torch.zeros(T, d_in, dtype=torch.float32, device=x.device) if need_x and not shared else dpair
        s32 = s.float().contiguous()
        _grouped_bwd_kernel[(max_blocks,)](
            A, B, dy, tok, coef, s32, mask, bexp, bstart, offsets, h, dpair, dh, dx32, d_in, d_out, r,
            SHARED=shared, R_P=R_P, BM=bs["BM"], BK=bs["BK"], BN=bs["BN"], UPCAST=up, NEED_X=need_x,
        )
        dg = torch.zeros(n_pairs, dtype=torch.float32, device=x.device).scatter_(0, order, dpair).view(gshape)
        dx = dA = dB = None
        if shared:
            dH = torch.zeros(T, R_P, dtype=torch.float32, device=x.device)
            dH.index_add_(0, tok, dh)  # rows of dropped (-1) pairs are zero in dh
            dH = dH[:, :r]
            if need_x:
                dx = (dH @ A.float()).to(x.dtype)
            if ctx.needs_input_grad[1]:
                dA = (dH.T @ x.float()).to(A.dtype)
        else:
            if need_x:
                dx = dx32.to(x.dtype)
            if ctx.needs_input_grad[1]:
                dA = segment_reduce(dh, x, offsets, row_idx=tok, upcast=up)[:, :r].to(A.dtype)
        if ctx.needs_input_grad[2]:
            dBt = segment_reduce(h, dy, offsets, row_idx=tok, row_scale=coef, upcast=up)[:, :r]
            dB = dBt.transpose(1, 2).to(B.dtype)
        return dx, dA, dB, dg.to(ctx.gates_dtype), None, None, None


def routed_lora_triton(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
    path: str | None = None,
) -> Tensor:
    """Routed LoRA delta by the Triton kernels (module docstring).

    ``path``: ``"dense"`` (fused dense kernel) or ``"grouped"``; default :func:`triton_path`.
    """
    _check_device(x)
    E, d_out, r = B.shape
    path = path or triton_path(E, r, None if indices is None else indices.shape[1], A.dim() == 2)
    if path not in ("dense", "grouped"):
        raise ValueError(f"routed_lora_triton: path must be 'dense' or 'grouped'; got {path!r}")
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    mask = (torch.ones(E, r) if rank_mask is None else rank_mask).to(device=x.device, dtype=torch.float32).contiguous()
    s = _scaling_vector(scaling, E, x.float())
    if path == "dense":
        coef = (dense_gates(gates, indices, E).float() * s).contiguous()
        return _DenseTriton.apply(x, A, B, coef, mask).to(x.dtype)
    if indices is None:
        indices = torch.arange(E, device=x.device).expand(x.shape[0], E)
    return _GroupedTriton.apply(x, A, B, gates, indices.contiguous(), s, mask)


def dense_columns(num_experts: int, rank: int, shared_a: bool) -> int:
    """Register columns ``E_P * R_P`` of the fused dense kernel (powers of two, >= 16)."""
    E_P = _p2(num_experts)
    R_P = max(16, _p2(rank)) if shared_a else max(_p2(rank), _p2(max(1, 16 // E_P)))
    return E_P * R_P


def triton_path(num_experts: int, rank: int, top_k: int | None, shared_a: bool) -> str:
    """``dense`` while the experts' columns fit the fused kernel's registers and the torch
    backend's measured rule (:func:`use_grouped`) does not favour grouping; else ``grouped``.
    The GPU crossover has not been measured (no GPU in the session that wrote this): the rule
    reuses the CPU one at one thread."""
    if dense_columns(num_experts, rank, shared_a) <= MAX_DENSE_COLUMNS and not use_grouped(num_experts, rank, top_k, threads=1):
        return "dense"
    return "grouped"
