"""Triton kernel for ``prototype_bank_update``: capped per-(class, quadrant) sums and counts of the prototypes.

Formula (the torch backend ``dsrb/ops/prototype_bank_update.py`` is the contract): every known positive
(T[b, c] == +1) adds S[b, c] to bucket (c, quadrant[b, c]) while that bucket holds fewer than ``cap`` samples;
within the batch, samples are met in batch order, so each bucket keeps its first ``cap - counts[c, q]`` candidates:

    keep[b, c]      = T[b, c] == 1  and  counts[c, q] + #{b' < b : T[b', c] == 1, quadrant[b', c] == q} < cap,
                      with q = quadrant[b, c]
    new_sums[c, q]  = sums[c, q] + sum_{b : keep[b, c], quadrant[b, c] == q} S[b, c]
    new_counts[c, q] = counts[c, q] + #{b : keep[b, c], quadrant[b, c] == q}

Shapes: sums (C, 4, D) float; counts (C, 4) int64; S (B, C, D) float; T (B, C) real (float, integer or bool);
quadrant (B, C) int64 in [0, 3]; cap a non-negative int. Any strides. Outputs: new contiguous (C, 4, D) sums in
sums' dtype and (C, 4) int64 counts; the inputs are not modified. No gradient.

Dtype policy, the op contract's (the torch backend's, bit for bit): S rounded to sums' dtype, the batch sum
accumulated in float32 (float64 for float64 sums), rounded to sums' dtype and added to sums (in half precision two
roundings, not one).

Determinism: one program per (block of BLOCK_C classes, block of BLOCK_D features) loops over b = 0 .. B-1 in batch
order, keeping the four running counts of each of its classes in registers; each output element is written by
exactly one program, with a fixed summation order (no atomics). Every feature block recomputes the same counts (cheap,
(B, C) integers); the first feature block writes new_counts. Empty batch (B == 0) or no class (C == 0): no launch,
the outputs are copies of the inputs.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import cdiv, device_guard, idx, needs_int64, next_power_of_2

__all__ = ["prototype_bank_update"]

_MAX_BLOCK_D = 128
_MAX_TILE = 1024  # BLOCK_C * BLOCK_D elements per program (four accumulators of this size)


@triton.jit
def _prototype_bank_update_kernel(
    sums_ptr, counts_ptr, S_ptr, T_ptr, q_ptr, new_sums_ptr, new_counts_ptr,
    B, C, D, cap,
    u_sc, u_sq, u_sd,
    n_sc, n_sq,
    s_sb, s_sc, s_sd,
    t_sb, t_sc,
    q_sb, q_sc,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, S_VIA_F32: tl.constexpr, IDX64: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_c = idx(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    offs_d = idx(pid_d * BLOCK_D + tl.arange(0, BLOCK_D), IDX64)
    mask_c = offs_c < C
    mask_d = offs_d < D
    mask = mask_c[:, None] & mask_d[None, :]
    n_sq, u_sq, D4 = idx(n_sq, IDX64), idx(u_sq, IDX64), 4 * idx(D, IDX64)  # their multiples below too

    cnt_base = counts_ptr + offs_c * n_sc
    n0 = tl.load(cnt_base, mask=mask_c, other=0).to(tl.int64)
    n1 = tl.load(cnt_base + n_sq, mask=mask_c, other=0).to(tl.int64)
    n2 = tl.load(cnt_base + 2 * n_sq, mask=mask_c, other=0).to(tl.int64)
    n3 = tl.load(cnt_base + 3 * n_sq, mask=mask_c, other=0).to(tl.int64)
    acc0 = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    acc1 = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    acc2 = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    acc3 = tl.zeros([BLOCK_C, BLOCK_D], dtype=COMPUTE)
    # Row pointers advance by one image per step (64-bit pointer arithmetic, no int32 index products).
    t_row = T_ptr + offs_c * t_sc
    q_row = q_ptr + offs_c * q_sc
    s_row = S_ptr + offs_c[:, None] * s_sc + offs_d[None, :] * s_sd
    ty = new_sums_ptr.dtype.element_ty
    for _ in range(0, B):
        t = tl.load(t_row, mask=mask_c, other=0)
        q = tl.load(q_row, mask=mask_c, other=0)
        pos = (t == 1) & mask_c
        k0 = pos & (q == 0) & (n0 < cap)
        k1 = pos & (q == 1) & (n1 < cap)
        k2 = pos & (q == 2) & (n2 < cap)
        k3 = pos & (q == 3) & (n3 < cap)
        n0 += k0.to(tl.int64)
        n1 += k1.to(tl.int64)
        n2 += k2.to(tl.int64)
        n3 += k3.to(tl.int64)
        keep = k0 | k1 | k2 | k3
        # rounded to the bank's dtype first, as the op contract (the torch backend) and the CUDA kernel do; float64
        # to half precision through float32, as torch converts
        s = tl.load(s_row, mask=mask & keep[:, None], other=0)
        if S_VIA_F32:
            s = s.to(tl.float32)
        s = s.to(ty).to(COMPUTE)
        t_row += t_sb
        q_row += q_sb
        s_row += s_sb
        acc0 += tl.where(k0[:, None], s, 0)
        acc1 += tl.where(k1[:, None], s, 0)
        acc2 += tl.where(k2[:, None], s, 0)
        acc3 += tl.where(k3[:, None], s, 0)

    in_base = sums_ptr + offs_c[:, None] * u_sc + offs_d[None, :] * u_sd
    out_base = new_sums_ptr + offs_c[:, None] * D4 + offs_d[None, :]  # new_sums is contiguous (C, 4, D)
    u0 = tl.load(in_base, mask=mask, other=0).to(COMPUTE)
    tl.store(out_base, (u0 + acc0.to(ty).to(COMPUTE)).to(ty), mask=mask)
    u1 = tl.load(in_base + u_sq, mask=mask, other=0).to(COMPUTE)
    tl.store(out_base + D, (u1 + acc1.to(ty).to(COMPUTE)).to(ty), mask=mask)
    u2 = tl.load(in_base + 2 * u_sq, mask=mask, other=0).to(COMPUTE)
    tl.store(out_base + 2 * D, (u2 + acc2.to(ty).to(COMPUTE)).to(ty), mask=mask)
    u3 = tl.load(in_base + 3 * u_sq, mask=mask, other=0).to(COMPUTE)
    tl.store(out_base + 3 * D, (u3 + acc3.to(ty).to(COMPUTE)).to(ty), mask=mask)
    if pid_d == 0:
        cnt_out = new_counts_ptr + offs_c * 4  # new_counts is contiguous (C, 4)
        tl.store(cnt_out, n0, mask=mask_c)
        tl.store(cnt_out + 1, n1, mask=mask_c)
        tl.store(cnt_out + 2, n2, mask=mask_c)
        tl.store(cnt_out + 3, n3, mask=mask_c)


def prototype_bank_update(
    sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor, cap: int
) -> Tuple[Tensor, Tensor]:
    """Accumulate one batch into the capped prototype buckets; returns contiguous (new_sums, new_counts).

    sums (C, 4, D) float, counts (C, 4) int64, S (B, C, D), T (B, C), quadrant (B, C) int64, cap >= 0.
    The inputs are not modified.
    """
    B, C, D = S.shape
    cap = int(cap)
    if B * C == 0:
        return sums.clone(memory_format=torch.contiguous_format), counts.to(torch.int64, copy=True).contiguous()
    new_sums = torch.empty((C, 4, D), dtype=sums.dtype, device=sums.device)
    new_counts = torch.empty((C, 4), dtype=torch.int64, device=counts.device)
    block_d = min(next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    block_c = min(next_power_of_2(C), max(1, _MAX_TILE // block_d))
    grid = (cdiv(C, block_c), max(1, cdiv(D, block_d)))
    # The op contract: S rounded to the bank's dtype, summed in float32 (float64 for a float64 bank), the sum rounded
    # to the bank's dtype and added to it (two roundings in half precision, as the torch backend).
    compute = tl.float64 if sums.dtype == torch.float64 else tl.float32
    Tv = T.view(torch.uint8) if T.dtype == torch.bool else T
    with device_guard(S):
        _prototype_bank_update_kernel[grid](
            sums, counts, S, Tv, quadrant, new_sums, new_counts,
            B, C, D, cap,
            sums.stride(0), sums.stride(1), sums.stride(2),
            counts.stride(0), counts.stride(1),
            S.stride(0), S.stride(1), S.stride(2),
            Tv.stride(0), Tv.stride(1),
            quadrant.stride(0), quadrant.stride(1),
            COMPUTE=compute, BLOCK_C=block_c, BLOCK_D=block_d,
            IDX64=needs_int64(sums, counts, S, Tv, quadrant, new_sums),
            S_VIA_F32=S.dtype == torch.float64 and sums.dtype in (torch.float16, torch.bfloat16),
        )
    return new_sums, new_counts
