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
(BLOCK_H x BLOCK_W, powers of two, masked to -inf outside the map). An empty problem (B * C == 0) launches nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import cdiv, device_guard, next_power_of_2, tl_acc

__all__ = ["quadrant_index"]

_MAX_TILE = 4096  # BLOCK_C * BLOCK_H * BLOCK_W elements per program


@triton.jit
def _quadrant_index_kernel(
    a_ptr, x_ptr, out_ptr,
    C, H, W,
    a_sb, a_sc, a_sn,
    x_sb, x_sn,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_H)
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
    block_c = min(next_power_of_2(C), max(1, _MAX_TILE // (block_h * block_w)))
    grid = (B, cdiv(C, block_c))
    with device_guard(a):
        _quadrant_index_kernel[grid](
            a, x_sum, out,
            C, height, width,
            a.stride(0), a.stride(1), a.stride(2),
            x_sum.stride(0), x_sum.stride(1),
            COMPUTE=tl_acc(a.dtype), BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
        )
    return out
