"""Triton kernels for ``prototype_blend`` (PPRB, architecture §3): location-sensitive prototype blending.

Formula (the torch backend ``dsrb/ops/prototype_blend.py`` is the contract):

    k[b, c]  = (quadrant[b, c] - shift[b, c]) mod 4        (non-negative modulo: ((x % 4) + 4) % 4)
    p[b, c]  = bank[c, k[b, c]]                            (a prototype of the same class, another quadrant)
    S2       = beta * S + (1 - beta) * p   where select[b, c], else S
    T2       = 1 - beta                    where select[b, c], else T

Backward, with w = select as 0/1, for upstream gradients grad_S2 (B, C, D) and grad_T2 (B, C):

    grad_S            = grad_S2 * (1 - w + w * beta)
    grad_beta         = sum w * <grad_S2, S - p>  -  (0 if detach_target else sum w * grad_T2)
    grad_bank[c, q]   = sum_{b : k[b, c] == q} w[b, c] * (1 - beta) * grad_S2[b, c]     (zeros unless bank_grad)

Shapes: S (B, C, D) float; T (B, C) in S's dtype; beta one-element tensor (0-d or (1,)) of any floating dtype,
rounded to S's for the arithmetic; bank (C, 4, D) in S's dtype; quadrant, shift (B, C) int64; select (B, C) bool.
Inputs may have arbitrary strides (passed to the kernels); outputs are new contiguous tensors: S2, T2 in S's
dtype; grad_S like S; grad_beta like beta; grad_bank (C, 4, D) like bank.

Dtype policy: arithmetic in float32 for float16 / bfloat16 / float32 inputs, float64 for float64; one rounding to the
output dtype. beta is read from device memory (no host sync).

Reductions, deterministic and without atomics:
- grad_beta: each program writes one partial sum (float32, float64 for float64 inputs) indexed by its program id;
  ``torch.sum`` over the partials finishes it (fixed grid, fixed order: bitwise reproducible).
- grad_bank (bank_grad=True): the backward grid is (1, cdiv(C, BLOCK_C), cdiv(D, BLOCK_D)) and each program loops
  over b = 0 .. B-1 in order, keeping four register accumulators (one per quadrant) for its (class block, feature
  block); every bank element is written by exactly one program. With bank_grad=False the same kernel runs with one
  image per program (grid (B, cdiv(C, BLOCK_C), cdiv(D, BLOCK_D)), B on axis 0, which has no 65535 limit) and skips
  the accumulators; grad_bank is zeros.

Launch: one kernel launch per function; an empty problem (B * C == 0) launches nothing.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import acc_dtype, cdiv, device_guard, idx, needs_int64, next_power_of_2, tl_acc

__all__ = ["prototype_blend_forward", "prototype_blend_backward"]

_MAX_BLOCK_D = 128
_MAX_TILE = 2048  # BLOCK_C * BLOCK_D elements per program
_MAX_TILE_BANK_GRAD = 1024  # the backward with bank_grad keeps four more accumulator tiles in registers


def _blocks(C: int, D: int, max_tile: int = _MAX_TILE) -> Tuple[int, int]:
    block_d = min(next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    block_c = min(next_power_of_2(max(C, 1)), max(1, max_tile // block_d))
    return block_c, block_d


def _as_bytes(select: Tensor) -> Tensor:
    """A bool tensor reinterpreted as uint8 (same strides), which every Triton version loads as a plain byte."""
    return select.view(torch.uint8) if select.dtype == torch.bool else select


@triton.jit
def _prototype_blend_fwd_kernel(
    S_ptr, T_ptr, beta_ptr, bank_ptr, q_ptr, shift_ptr, sel_ptr, S2_ptr, T2_ptr,
    C, D,
    s_sb, s_sc, s_sd,
    t_sb, t_sc,
    k_sc, k_sq, k_sd,
    q_sb, q_sc,
    h_sb, h_sc,
    e_sb, e_sc,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, IDX64: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_c = idx(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    offs_d = idx(pid_d * BLOCK_D + tl.arange(0, BLOCK_D), IDX64)
    mask_c = offs_c < C
    mask_d = offs_d < D
    mask = mask_c[:, None] & mask_d[None, :]

    beta = tl.load(beta_ptr).to(COMPUTE)
    sel = tl.load(sel_ptr + b * e_sb + offs_c * e_sc, mask=mask_c, other=0) != 0
    t = tl.load(T_ptr + b * t_sb + offs_c * t_sc, mask=mask_c, other=0).to(COMPUTE)
    if pid_d == 0:
        t2 = tl.where(sel, 1 - beta, t)
        tl.store(T2_ptr + b * C + offs_c, t2.to(T2_ptr.dtype.element_ty), mask=mask_c)

    q = tl.load(q_ptr + b * q_sb + offs_c * q_sc, mask=mask_c, other=0)
    sh = tl.load(shift_ptr + b * h_sb + offs_c * h_sc, mask=mask_c, other=0)
    k = ((q - sh) % 4 + 4) % 4  # non-negative whatever the sign convention of %
    s = tl.load(S_ptr + b * s_sb + offs_c[:, None] * s_sc + offs_d[None, :] * s_sd, mask=mask, other=0).to(COMPUTE)
    p_off = offs_c[:, None] * k_sc + k[:, None] * k_sq + offs_d[None, :] * k_sd
    p = tl.load(bank_ptr + p_off, mask=mask & sel[:, None], other=0).to(COMPUTE)
    s2 = tl.where(sel[:, None], beta * s + (1 - beta) * p, s)
    tl.store(S2_ptr + b * C * D + offs_c[:, None] * D + offs_d[None, :], s2.to(S2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prototype_blend_bwd_kernel(
    gS2_ptr, gT2_ptr, S_ptr, beta_ptr, bank_ptr, q_ptr, shift_ptr, sel_ptr, gS_ptr, gbank_ptr, partial_ptr,
    B, C, D, B_PER_PROG,
    g_sb, g_sc, g_sd,
    gt_sb, gt_sc,
    s_sb, s_sc, s_sd,
    k_sc, k_sq, k_sd,
    q_sb, q_sc,
    h_sb, h_sc,
    e_sb, e_sc,
    DETACH_TARGET: tl.constexpr, BANK_GRAD: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, IDX64: tl.constexpr,
):
    pid_b = tl.program_id(0)  # axis 0: the only one without the 65535 limit
    pid_c = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_c = idx(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    offs_d = idx(pid_d * BLOCK_D + tl.arange(0, BLOCK_D), IDX64)
    mask_c = offs_c < C
    mask_d = offs_d < D
    mask = mask_c[:, None] & mask_d[None, :]

    beta = tl.load(beta_ptr).to(COMPUTE)
    one_minus_beta = 1 - beta
    part_tile = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    part_t = tl.zeros([BLOCK_C], dtype=COMPUTE)
    acc0 = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    acc1 = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    acc2 = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    acc3 = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    b0 = pid_b.to(tl.int64) * B_PER_PROG
    for i in range(0, B_PER_PROG):
        b = b0 + i
        row_ok = b < B
        mc = mask_c & row_ok
        m = mask & row_ok
        w = tl.load(sel_ptr + b * e_sb + offs_c * e_sc, mask=mc, other=0) != 0
        q = tl.load(q_ptr + b * q_sb + offs_c * q_sc, mask=mc, other=0)
        sh = tl.load(shift_ptr + b * h_sb + offs_c * h_sc, mask=mc, other=0)
        k = ((q - sh) % 4 + 4) % 4
        g = tl.load(gS2_ptr + b * g_sb + offs_c[:, None] * g_sc + offs_d[None, :] * g_sd, mask=m, other=0).to(COMPUTE)
        s = tl.load(S_ptr + b * s_sb + offs_c[:, None] * s_sc + offs_d[None, :] * s_sd, mask=m, other=0).to(COMPUTE)
        p_off = offs_c[:, None] * k_sc + k[:, None] * k_sq + offs_d[None, :] * k_sd
        p = tl.load(bank_ptr + p_off, mask=m & w[:, None], other=0).to(COMPUTE)

        # Selected, never multiplied by the 0/1 mask: an inf at an entry left alone would give 0 * inf = NaN.
        gs = tl.where(w[:, None], g * beta, g)
        tl.store(gS_ptr + b * C * D + offs_c[:, None] * D + offs_d[None, :], gs.to(gS_ptr.dtype.element_ty), mask=m)
        part_tile += tl.where(w[:, None], g * (s - p), 0)
        if not DETACH_TARGET:
            if pid_d == 0:
                gt = tl.load(gT2_ptr + b * gt_sb + offs_c * gt_sc, mask=mc, other=0).to(COMPUTE)
                part_t += tl.where(w, gt, 0)
        if BANK_GRAD:
            contrib = tl.where(w[:, None], g * one_minus_beta, 0)
            acc0 += tl.where((k == 0)[:, None], contrib, 0)
            acc1 += tl.where((k == 1)[:, None], contrib, 0)
            acc2 += tl.where((k == 2)[:, None], contrib, 0)
            acc3 += tl.where((k == 3)[:, None], contrib, 0)

    part = tl.sum(tl.sum(part_tile, axis=1), axis=0) - tl.sum(part_t, axis=0)
    pid = (pid_b * tl.num_programs(1) + pid_c) * tl.num_programs(2) + pid_d
    tl.store(partial_ptr + pid, part)
    if BANK_GRAD:
        # grad_bank is contiguous (C, 4, D)
        base = gbank_ptr + offs_c[:, None] * (4 * idx(D, IDX64)) + offs_d[None, :]
        ty = gbank_ptr.dtype.element_ty
        tl.store(base, acc0.to(ty), mask=mask)
        tl.store(base + D, acc1.to(ty), mask=mask)
        tl.store(base + 2 * D, acc2.to(ty), mask=mask)
        tl.store(base + 3 * D, acc3.to(ty), mask=mask)


def prototype_blend_forward(
    S: Tensor, T: Tensor, beta: Tensor, bank: Tensor, quadrant: Tensor, shift: Tensor, select: Tensor
) -> Tuple[Tensor, Tensor]:
    """Forward of ``prototype_blend``: returns contiguous (S2 (B, C, D), T2 (B, C)) in S's dtype."""
    B, C, D = S.shape
    S2 = torch.empty((B, C, D), dtype=S.dtype, device=S.device)
    T2 = torch.empty((B, C), dtype=S.dtype, device=S.device)
    if B * C == 0:
        return S2, T2
    block_c, block_d = _blocks(C, D)
    grid = (B, cdiv(C, block_c), max(1, cdiv(D, block_d)))
    sel = _as_bytes(select)
    with device_guard(S):
        _prototype_blend_fwd_kernel[grid](
            S, T, beta.to(S.dtype), bank, quadrant, shift, sel, S2, T2,
            C, D,
            S.stride(0), S.stride(1), S.stride(2),
            T.stride(0), T.stride(1),
            bank.stride(0), bank.stride(1), bank.stride(2),
            quadrant.stride(0), quadrant.stride(1),
            shift.stride(0), shift.stride(1),
            sel.stride(0), sel.stride(1),
            COMPUTE=tl_acc(S.dtype), BLOCK_C=block_c, BLOCK_D=block_d,
            IDX64=needs_int64(S, T, bank, quadrant, shift, sel, S2),
        )
    return S2, T2


def prototype_blend_backward(
    grad_S2: Tensor, grad_T2: Tensor, S: Tensor, beta: Tensor, bank: Tensor, quadrant: Tensor, shift: Tensor,
    select: Tensor, detach_target: bool, bank_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of ``prototype_blend``: returns (grad_S like S, grad_beta like beta, grad_bank (C, 4, D) like bank).

    grad_bank is zeros unless ``bank_grad``; then it is accumulated per (class block, feature block) over the batch
    in order (deterministic, no atomics).
    """
    B, C, D = S.shape
    grad_S = torch.empty((B, C, D), dtype=S.dtype, device=S.device)
    alloc = torch.empty if (bank_grad and B * C > 0) else torch.zeros
    grad_bank = alloc((C, 4, D), dtype=bank.dtype, device=bank.device)
    if B * C == 0:
        return grad_S, torch.zeros(beta.shape, dtype=beta.dtype, device=beta.device), grad_bank
    block_c, block_d = _blocks(C, D, _MAX_TILE_BANK_GRAD if bank_grad else _MAX_TILE)
    b_per_prog = B if bank_grad else 1
    grid = (cdiv(B, b_per_prog), cdiv(C, block_c), max(1, cdiv(D, block_d)))
    partials = torch.empty(grid[0] * grid[1] * grid[2], dtype=acc_dtype(S.dtype), device=S.device)
    sel = _as_bytes(select)
    with device_guard(S):
        _prototype_blend_bwd_kernel[grid](
            grad_S2, grad_T2, S, beta.to(S.dtype), bank, quadrant, shift, sel, grad_S, grad_bank, partials,
            B, C, D, b_per_prog,
            grad_S2.stride(0), grad_S2.stride(1), grad_S2.stride(2),
            grad_T2.stride(0), grad_T2.stride(1),
            S.stride(0), S.stride(1), S.stride(2),
            bank.stride(0), bank.stride(1), bank.stride(2),
            quadrant.stride(0), quadrant.stride(1),
            shift.stride(0), shift.stride(1),
            sel.stride(0), sel.stride(1),
            DETACH_TARGET=bool(detach_target), BANK_GRAD=bool(bank_grad), COMPUTE=tl_acc(S.dtype),
            BLOCK_C=block_c, BLOCK_D=block_d,
            IDX64=needs_int64(grad_S2, grad_T2, S, bank, quadrant, shift, sel, grad_S),
        )
    grad_beta = partials.sum().to(beta.dtype).reshape(beta.shape)
    return grad_S, grad_beta, grad_bank
