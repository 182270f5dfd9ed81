"""Triton kernels for ``instance_blend`` (IPRB, architecture §3): masked cross-image blending of pooled features.

Formula (the torch backend ``dsrb/ops/instance_blend.py`` is the contract):

    w[b, c]  = 1 where T[b, c] == 0 and T[partner[b], c] == +1, else 0      (the blended entries)
    m[b, c]  = alpha where w[b, c] else 1
    S1       = m * S + (1 - m) * S[partner]
    T1       = 1 - alpha where w[b, c] else T                             (= m * T + (1 - m) * T[partner])

Backward, for upstream gradients grad_S1 (B, C, D) and grad_T1 (B, C):

    grad_S[b]  = grad_S1[b] * (1 - w[b] + w[b] * alpha) + sum_{j : partner[j] == b} grad_S1[j] * w[j] * (1 - alpha)
    grad_alpha = sum w * <grad_S1, S - S[partner]>  -  (0 if detach_target else sum w * grad_T1)

Shapes: S (B, C, D) floating point; T (B, C) in S's dtype with values in {-1, 0, 1}; alpha a one-element tensor (0-d
or (1,)) of any floating dtype, rounded to S's for the arithmetic; partner (B,) int64 with values in [0, B). Every
input may have arbitrary strides (they are passed to the kernels); every output is a new contiguous tensor: S1 (B,
C, D) and T1 (B, C) in S's dtype, grad_S like S, grad_alpha shaped and typed like alpha.

Dtype policy: arithmetic runs in float32 for float16 / bfloat16 / float32 inputs and in float64 for float64 inputs;
results are rounded once to the output dtype. alpha is read from device memory (no host sync).

Partner collisions: ``partner`` is any index vector, not necessarily a permutation (two images may share a
partner, an image may be its own partner). The backward kernel gathers instead of scattering: the program that owns
grad_S[b] loops over j = 0 .. B-1 in ascending order, reads partner[j] (one scalar per j) and, only where
partner[j] == b, adds image j's contribution. Each output element is therefore written by exactly one program, with
a fixed summation order (own term first, then sources by ascending j): deterministic, no atomics, no host sync, one
launch; the extra cost is B scalar loads per program.

grad_alpha reduction: every program writes one partial sum into a float32 (float64 for float64 inputs) buffer
indexed by its program id, and ``torch.sum`` over that buffer finishes the reduction; with a fixed grid the result is
bitwise reproducible (no atomics).

Launch grid: (B, cdiv(C, BLOCK_C), cdiv(D, BLOCK_D)) with power-of-two blocks chosen from the shape and masks for
any C and D; an empty problem (B * C == 0) launches nothing.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import acc_dtype, cdiv, device_guard, idx, needs_int64, next_power_of_2, tl_acc

__all__ = ["instance_blend_forward", "instance_blend_backward"]

_MAX_BLOCK_D = 128
_MAX_TILE = 2048  # BLOCK_C * BLOCK_D elements per program


def _blocks(C: int, D: int) -> Tuple[int, int]:
    block_d = min(next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    block_c = min(next_power_of_2(max(C, 1)), max(1, _MAX_TILE // block_d))
    return block_c, block_d


@triton.jit
def _own_if_invalid(pb, b, B):
    # A partner outside [0, B) (possible only with validate=False) becomes the image itself, which blends nothing
    # (T[b, c] cannot be both 0 and 1): out-of-range values never reach memory. The backward's gather never matches
    # them either.
    return tl.where((pb >= 0) & (pb < B), pb, b)


@triton.jit
def _instance_blend_fwd_kernel(
    S_ptr, T_ptr, alpha_ptr, partner_ptr, S1_ptr, T1_ptr,
    C, D,
    s_sb, s_sc, s_sd,
    t_sb, t_sc,
    p_s,
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

    pb = _own_if_invalid(tl.load(partner_ptr + b * p_s), b, tl.num_programs(0))
    alpha = tl.load(alpha_ptr).to(COMPUTE)
    t_own = tl.load(T_ptr + b * t_sb + offs_c * t_sc, mask=mask_c, other=0).to(COMPUTE)
    t_par = tl.load(T_ptr + pb * t_sb + offs_c * t_sc, mask=mask_c, other=0).to(COMPUTE)
    blend = (t_own == 0) & (t_par == 1)

    if pid_d == 0:
        t1 = tl.where(blend, 1 - alpha, t_own)
        tl.store(T1_ptr + b * C + offs_c, t1.to(T1_ptr.dtype.element_ty), mask=mask_c)

    s_off = offs_c[:, None] * s_sc + offs_d[None, :] * s_sd
    s_own = tl.load(S_ptr + b * s_sb + s_off, mask=mask, other=0).to(COMPUTE)
    s_par = tl.load(S_ptr + pb * s_sb + s_off, mask=mask & blend[:, None], other=0).to(COMPUTE)
    s1 = tl.where(blend[:, None], alpha * s_own + (1 - alpha) * s_par, s_own)
    out_off = b * C * D + offs_c[:, None] * D + offs_d[None, :]
    tl.store(S1_ptr + out_off, s1.to(S1_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _instance_blend_bwd_kernel(
    gS1_ptr, gT1_ptr, S_ptr, T_ptr, alpha_ptr, partner_ptr, gS_ptr, partial_ptr,
    B, C, D,
    g_sb, g_sc, g_sd,
    gt_sb, gt_sc,
    s_sb, s_sc, s_sd,
    t_sb, t_sc,
    p_s,
    DETACH_TARGET: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    IDX64: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_c = idx(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    offs_d = idx(pid_d * BLOCK_D + tl.arange(0, BLOCK_D), IDX64)
    mask_c = offs_c < C
    mask_d = offs_d < D
    mask = mask_c[:, None] & mask_d[None, :]

    pb = _own_if_invalid(tl.load(partner_ptr + b * p_s), b, B)
    alpha = tl.load(alpha_ptr).to(COMPUTE)
    t_own = tl.load(T_ptr + b * t_sb + offs_c * t_sc, mask=mask_c, other=0).to(COMPUTE)
    t_par = tl.load(T_ptr + pb * t_sb + offs_c * t_sc, mask=mask_c, other=0).to(COMPUTE)
    blended = (t_own == 0) & (t_par == 1)  # (BLOCK_C,) the blended entries of image b

    g_off = offs_c[:, None] * g_sc + offs_d[None, :] * g_sd
    s_off = offs_c[:, None] * s_sc + offs_d[None, :] * s_sd
    g_own = tl.load(gS1_ptr + b * g_sb + g_off, mask=mask, other=0).to(COMPUTE)
    s_own = tl.load(S_ptr + b * s_sb + s_off, mask=mask, other=0).to(COMPUTE)
    s_par = tl.load(S_ptr + pb * s_sb + s_off, mask=mask, other=0).to(COMPUTE)

    # grad_alpha partial over this tile: sum over blended entries of grad_S1 * (S - S[partner]) (+ the target term
    # once per (b, c)); selected, never multiplied by a 0/1 mask: an inf at an entry left alone would give NaN.
    part = tl.sum(tl.sum(tl.where(blended[:, None], g_own * (s_own - s_par), 0), axis=1), axis=0)
    if not DETACH_TARGET:
        if pid_d == 0:
            gt = tl.load(gT1_ptr + b * gt_sb + offs_c * gt_sc, mask=mask_c, other=0).to(COMPUTE)
            part -= tl.sum(tl.where(blended, gt, 0), axis=0)
    pid = (b * tl.num_programs(1) + pid_c) * tl.num_programs(2) + pid_d
    tl.store(partial_ptr + pid, part)

    # grad_S[b]: own term, then every source image j with partner[j] == b in ascending j (gather, no atomics).
    acc = tl.where(blended[:, None], g_own * alpha, g_own)
    one_minus_alpha = 1 - alpha
    # Row pointers advance by one image per step (64-bit pointer arithmetic, no int32 index products).
    p_row = partner_ptr
    t_row = T_ptr + offs_c * t_sc
    g_row = gS1_ptr + g_off
    for _ in range(0, B):
        pj = tl.load(p_row)
        if pj == b:
            # w[j, c] = T[j, c] == 0 and T[partner[j], c] == T[b, c] == 1
            t_j = tl.load(t_row, mask=mask_c, other=0).to(COMPUTE)
            w_j = (t_j == 0) & (t_own == 1)
            g_j = tl.load(g_row, mask=mask & w_j[:, None], other=0).to(COMPUTE)
            acc += tl.where(w_j[:, None], g_j * one_minus_alpha, 0)
        p_row += p_s
        t_row += t_sb
        g_row += g_sb
    out_off = b * C * D + offs_c[:, None] * D + offs_d[None, :]
    tl.store(gS_ptr + out_off, acc.to(gS_ptr.dtype.element_ty), mask=mask)


def instance_blend_forward(S: Tensor, T: Tensor, alpha: Tensor, partner: Tensor) -> Tuple[Tensor, Tensor]:
    """Forward of ``instance_blend``: returns contiguous (S1 (B, C, D), T1 (B, C)) in S's dtype.

    S (B, C, D) float; T (B, C) in S's dtype, values in {-1, 0, 1}; alpha one-element tensor; partner (B,) int64.
    """
    B, C, D = S.shape
    S1 = torch.empty((B, C, D), dtype=S.dtype, device=S.device)
    T1 = torch.empty((B, C), dtype=S.dtype, device=S.device)
    if B * C == 0:
        return S1, T1
    block_c, block_d = _blocks(C, D)
    grid = (B, cdiv(C, block_c), max(1, cdiv(D, block_d)))
    with device_guard(S):
        _instance_blend_fwd_kernel[grid](
            S, T, alpha.to(S.dtype), partner, S1, T1,
            C, D,
            S.stride(0), S.stride(1), S.stride(2),
            T.stride(0), T.stride(1),
            partner.stride(0),
            COMPUTE=tl_acc(S.dtype), BLOCK_C=block_c, BLOCK_D=block_d, IDX64=needs_int64(S, T, S1),
        )
    return S1, T1


def instance_blend_backward(
    grad_S1: Tensor, grad_T1: Tensor, S: Tensor, T: Tensor, alpha: Tensor, partner: Tensor, detach_target: bool
) -> Tuple[Tensor, Tensor]:
    """Backward of ``instance_blend``: returns (grad_S contiguous like S, grad_alpha shaped and typed like alpha).

    grad_S1 (B, C, D) and grad_T1 (B, C) are the upstream gradients (any strides); the rest are the forward inputs.
    ``partner`` may hold repeated indices (see the module docstring: gathered per destination, deterministic).
    """
    B, C, D = S.shape
    grad_S = torch.empty((B, C, D), dtype=S.dtype, device=S.device)
    if B * C == 0:
        return grad_S, torch.zeros(alpha.shape, dtype=alpha.dtype, device=alpha.device)
    block_c, block_d = _blocks(C, D)
    grid = (B, cdiv(C, block_c), max(1, cdiv(D, block_d)))
    partials = torch.empty(grid[0] * grid[1] * grid[2], dtype=acc_dtype(S.dtype), device=S.device)
    with device_guard(S):
        _instance_blend_bwd_kernel[grid](
            grad_S1, grad_T1, S, T, alpha.to(S.dtype), partner, grad_S, partials,
            B, C, D,
            grad_S1.stride(0), grad_S1.stride(1), grad_S1.stride(2),
            grad_T1.stride(0), grad_T1.stride(1),
            S.stride(0), S.stride(1), S.stride(2),
            T.stride(0), T.stride(1),
            partner.stride(0),
            DETACH_TARGET=bool(detach_target), COMPUTE=tl_acc(S.dtype), BLOCK_C=block_c, BLOCK_D=block_d,
            IDX64=needs_int64(grad_S1, grad_T1, S, T, grad_S),
        )
    grad_alpha = partials.sum().to(alpha.dtype).reshape(alpha.shape)
    return grad_S, grad_alpha
