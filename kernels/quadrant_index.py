"""Triton kernel for ``quadrant_index``: the quadrant of the official peak of each (image, class) score map.

Formula (the torch backend ``dsrb/ops/quadrant_index.py`` is the contract):

    G[b, c, h, w] = a[b, c, h * W + w] * x_sum[b, h * W + w]
    row = argmax_h max_w G[b, c, h, w]        col = argmax_w max_h G[b, c, h, w]        (first index on ties)
    q[b, c] = 2 * [row >= H // 2] + [col >= W // 2]          (0 TL, 1 TR, 2 BL, 3 BR; uneven halves at odd H, W)

Shapes: a (B, C, N) float with N == height * width; x_sum (B, N) in a's dtype; both with arbitrary strides. Output:
a new contiguous (B, C) int64 tensor. No gradient.

Dtype policy: the product is formed in float32 (float64 for float64 inputs) and rounded to the input dtype before
any comparison, so G holds exactly the values the torch backend compares (the product of two float16 / bfloat16 /
float32 numbers rounded once) and ties, including those created by rounding, resolve the same way. Ties resolve to
the first index, as ``torch.argmax`` does: the arg-max is computed as the smallest index whose value equals the
maximum. NaN scores follow ``torch.amax`` / ``torch.argmax`` too (a NaN is the maximum, the first NaN wins): a row
or column holding a NaN has a NaN maximum, so the first such one is the arg-max (``tl.max`` itself does not order
NaNs).

Launch: one program per (b, block of BLOCK_C classes); the whole (H, W) grid of each class is one register tile
(BLOCK_H x BLOCK_W, powers of two, masked to -inf outside the map). A map larger than that budget (padded beyond
_MAX_TILE elements: one tile would exceed Triton's 2**20-element limit from 1025 x 1025 on, and spill long before)
runs ``_quadrant_index_tiled_kernel`` instead: one (image, class) per program, in tiles. An empty problem
(B * C == 0) launches nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import cdiv, device_guard, idx, needs_int64, next_power_of_2, tl_acc

__all__ = ["quadrant_index"]

_MAX_TILE = 4096  # BLOCK_C * BLOCK_H * BLOCK_W elements per program
_TILED_TILE = 1024  # BLOCK_H * BLOCK_W of the tiled kernel (4096 spilled registers on sm_90 with 4 warps)
_TILED_WARPS = 8  # with 4, triton 3.6's ptxas spilled 8 bytes at 32 x 32 float32 tiles on sm_90


@triton.jit
def _quadrant_index_kernel(
    a_ptr, x_ptr, out_ptr,
    C, H, W,
    a_sb, a_sc, a_sn,
    x_sb, x_sn,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    IDX64: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    offs_c = idx(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    offs_h = idx(tl.arange(0, BLOCK_H), IDX64)
    offs_w = tl.arange(0, BLOCK_W)
    mask_c = offs_c < C
    mask_hw = (offs_h[:, None] < H) & (offs_w[None, :] < W)  # (BLOCK_H, BLOCK_W)
    n = offs_h[:, None] * W + offs_w[None, :]

    x = tl.load(x_ptr + b * x_sb + n * x_sn, mask=mask_hw, other=0).to(COMPUTE)
    mask3 = mask_c[:, None, None] & mask_hw[None, :, :]
    a = tl.load(a_ptr + b * a_sb + offs_c[:, None, None] * a_sc + n[None, :, :] * a_sn, mask=mask3, other=0)
    # Round the product to the input dtype (exact for float32 / float64, one rounding for float16 / bfloat16).
    g = (a.to(COMPUTE) * x[None, :, :]).to(a_ptr.dtype.element_ty).to(COMPUTE)
    g = tl.where(mask3, g, float("-inf"))

    nan = (g != g).to(tl.int32)
    row_max = tl.max(g, axis=2)  # (BLOCK_C, BLOCK_H): the maximum of every row
    row_peak = tl.max(row_max, axis=1)
    row = tl.min(tl.where(row_max == row_peak[:, None], offs_h[None, :], BLOCK_H), axis=1)
    row_nan = tl.min(tl.where(tl.max(nan, axis=2) > 0, offs_h[None, :], BLOCK_H), axis=1)  # first row with a NaN
    row = tl.where(row_nan < BLOCK_H, row_nan, row)
    col_max = tl.max(g, axis=1)  # (BLOCK_C, BLOCK_W): the maximum of every column
    col_peak = tl.max(col_max, axis=1)
    col = tl.min(tl.where(col_max == col_peak[:, None], offs_w[None, :], BLOCK_W), axis=1)
    col_nan = tl.min(tl.where(tl.max(nan, axis=1) > 0, offs_w[None, :], BLOCK_W), axis=1)
    col = tl.where(col_nan < BLOCK_W, col_nan, col)

    q = 2 * (row >= H // 2).to(tl.int64) + (col >= W // 2).to(tl.int64)
    tl.store(out_ptr + b * C + offs_c, q, mask=mask_c)


@triton.jit
def _peak_index(a_bc, x_b, a_sn, x_sn, n_out, n_in, so, si,
                COMPUTE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """argmax over o of max over i of G at position o * so + i * si (rows: o = h, so = W; columns: o = w, si = W),
    with the single-tile kernel's rules: first index on ties, and the first o holding a NaN wins. int64 offsets."""
    best = tl.cast(float("-inf"), COMPUTE)
    best_o = tl.cast(0, tl.int64)
    first_nan = tl.cast(n_out, tl.int64)
    for o0 in range(0, n_out, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
        mask_o = offs_o < n_out
        m = tl.full((BLOCK_O,), float("-inf"), COMPUTE)
        nan = tl.zeros((BLOCK_O,), dtype=tl.int32)
        for i0 in range(0, n_in, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
            mask = mask_o[:, None] & (offs_i < n_in)[None, :]
            n = offs_o[:, None] * so + offs_i[None, :] * si
            a = tl.load(a_bc + n * a_sn, mask=mask, other=0)
            x = tl.load(x_b + n * x_sn, mask=mask, other=0).to(COMPUTE)
            g = (a.to(COMPUTE) * x).to(a_bc.dtype.element_ty).to(COMPUTE)  # rounded as in the single-tile kernel
            g = tl.where(mask, g, float("-inf"))
            m = tl.maximum(m, tl.max(g, axis=1))
            nan = tl.maximum(nan, tl.max((g != g).to(tl.int32), axis=1))
        peak = tl.max(m, axis=0)
        o_peak = tl.min(tl.where(m == peak, offs_o, n_out), axis=0)
        # A later block only with a strictly larger peak: the first index wins ties. A first block whose peak is -inf
        # keeps best_o = 0, its first index (triton 3.2's interpreter cannot compare the loop index: no int1 type).
        take = peak > best
        best_o = tl.where(take, o_peak, best_o)
        best = tl.where(take, peak, best)
        first_nan = tl.minimum(first_nan, tl.min(tl.where(nan > 0, offs_o, n_out), axis=0))
    return tl.where(first_nan < n_out, first_nan, best_o)


@triton.jit
def _quadrant_index_tiled_kernel(
    a_ptr, x_ptr, out_ptr,
    C, H, W,
    a_sb, a_sc, a_sn,
    x_sb, x_sn,
    COMPUTE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One (image, class) per program, for maps too large for one register tile: the rows' maxima in (BLOCK_H,
    BLOCK_W) tiles, then the columns' (a second read of the map). Grid (B * C,): axis 0 has no 65535 limit."""
    bc = tl.program_id(0).to(tl.int64)
    b = bc // C
    c = bc - b * C
    a_bc = a_ptr + b * a_sb + c * a_sc
    x_b = x_ptr + b * x_sb
    row = _peak_index(a_bc, x_b, a_sn, x_sn, H, W, W, 1, COMPUTE, BLOCK_H, BLOCK_W)
    col = _peak_index(a_bc, x_b, a_sn, x_sn, W, H, 1, W, COMPUTE, BLOCK_W, BLOCK_H)
    q = 2 * (row >= H // 2).to(tl.int64) + (col >= W // 2).to(tl.int64)
    tl.store(out_ptr + b * C + c, q)


def quadrant_index(a: Tensor, x_sum: Tensor, height: int, width: int) -> Tensor:
    """Quadrant (B, C) int64 of the official peak of a * x_sum on the (height, width) grid.

    a (B, C, N) float, x_sum (B, N) in a's dtype, N == height * width; any strides. First index wins ties.
    """
    B, C, N = a.shape
    height, width = int(height), int(width)
    if height * width != N:
        raise ValueError(f"arguments 'height', 'width': expected height * width == N = {N}, got {height} x {width}")
    out = torch.empty((B, C), dtype=torch.int64, device=a.device)
    if B * C == 0:
        return out
    block_h = next_power_of_2(height)
    block_w = next_power_of_2(width)
    args = (a, x_sum, out, C, height, width, a.stride(0), a.stride(1), a.stride(2), x_sum.stride(0), x_sum.stride(1))
    if block_h * block_w > _MAX_TILE:  # tiles of at most _TILED_TILE elements, as square as the map allows
        side = 1 << (_TILED_TILE.bit_length() - 1) // 2  # 32 for 1024
        block_w = min(block_w, max(side, _TILED_TILE // block_h))
        block_h = max(1, min(block_h, _TILED_TILE // block_w))
        with device_guard(a):
            _quadrant_index_tiled_kernel[(B * C,)](*args, COMPUTE=tl_acc(a.dtype), BLOCK_H=block_h, BLOCK_W=block_w,
                                                   num_warps=_TILED_WARPS)
        return out
    block_c = min(next_power_of_2(C), max(1, _MAX_TILE // (block_h * block_w)))
    grid = (B, cdiv(C, block_c))
    with device_guard(a):
        _quadrant_index_kernel[grid](
            *args, COMPUTE=tl_acc(a.dtype), BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
            IDX64=needs_int64(a, x_sum, out),
        )
    return out
