"""Triton kernels for ``semantic_attention`` (architecture §3): category-wise spatial attention.

Maths (x (B, N, D), u (B, N, I), e (C, I), v (I,))::

    s[b, c, n] = sum_k v[k] * tanh(u[b, n, k] * e[c, k])
    a[b, c, :] = softmax_n(s[b, c, :])                       (B, C, N)
    S[b, c, :] = sum_n a[b, c, n] * x[b, n, :]                (B, C, D)

Backward, with gS = dL/dS and ga = dL/da given, z = tanh(u[b, n, k] * e[c, k])::

    grad_x    = a^T @ gS                                       (torch bmm: O(B*C*N*D), not the hot spot)
    ga_total  = ga + gS @ x^T;  gs = a * (ga_total - sum_n a * ga_total)      (softmax backward, torch)
    grad_v[k] = sum_{b, n, c} gs[b, c, n] * z                                  (Triton, kernel B)
    grad_u    = sum_c gs[b, c, n] * v[k] * (1 - z^2) * e[c, k]                 (Triton, kernel A)
    grad_e    = sum_{b, n} gs[b, c, n] * v[k] * (1 - z^2) * u[b, n, k]         (Triton, kernel B)

Memory. The official formulation materialises z as a (B, N, C, I) tensor and the attention-weighted map as
(B, N, C, D). Neither is ever written here: the forward builds the (BLOCK_C, BLOCK_N) score tile in registers,
chunk by chunk over I, and the backward *recomputes* z tile by tile (flash-attention style) instead of storing it,
because recomputing a tanh is far cheaper than writing and re-reading B*N*C*I values. Extra memory is
O(B*C*N + B*C*D) (a, gs, an fp32 score scratch for large N, and per-class-block partial sums of grad_v).

Dtype policy. Outputs are contiguous and in the input dtypes (S and a in x's dtype; each gradient in its input's
dtype). fp16/bf16 inputs are upcast on load and everything (tanh, scores, softmax, the a @ x product, gradient
sums) accumulates in fp32; fp32 stays fp32 (tl.dot with input_precision="ieee", never tf32); fp64 computes in fp64.

Determinism. No atomics: grad_v is written as one partial row per class block and summed by torch, so two runs give
bitwise-equal results.

Kernels:
    * ``_sa_fwd_kernel``   grid (B, cdiv(C, BLOCK_C)): scores, softmax, store a, then S = a @ x per BLOCK_D chunk.
      N <= MAX_SINGLE_BLOCK_N keeps the whole row in registers (one pass); larger N uses three passes over N blocks
      (scores + online max/sum into an fp32 scratch, normalise, then S), separated by block barriers.
    * ``_sa_bwd_u_kernel`` grid (B, cdiv(N, BLOCK_N), cdiv(I, BLOCK_K)): loops over all classes, writes grad_u.
    * ``_sa_bwd_e_kernel`` grid (cdiv(C, BLOCK_C), cdiv(I, BLOCK_K)): loops over (b, n), writes grad_e and a
      partial grad_v per class block.

Triton notes: there is no tl.tanh (and libdevice.tanh fails under the interpreter), so tanh(x) = 2*sigmoid(2x) - 1.
tl.dot operands keep M, N, K >= 16 (BLOCK_C, BLOCK_N, BLOCK_D >= 16) as the GPU requires; the backward has no
tl.dot, so its blocks are free.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["semantic_attention_forward", "semantic_attention_backward", "block_sizes", "MAX_SINGLE_BLOCK_N"]

# N up to this (rounded up to a power of two) keeps a whole score row in registers; beyond it the multi-pass path.
MAX_SINGLE_BLOCK_N = 256
# Budget of elements for the (BLOCK_C, BLOCK_N, BLOCK_K) tanh tile held in registers.
_TILE_BUDGET = 8192


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def block_sizes(N: int, C: int, D: int, I: int) -> dict:
    """Power-of-two block sizes for the three kernels, chosen from the shape.

    Forward: BLOCK_C = 16 and BLOCK_N, BLOCK_D >= 16 (the operands of tl.dot on the GPU need M, N, K >= 16);
    BLOCK_N covers N when N <= MAX_SINGLE_BLOCK_N (single pass), else it is MAX_SINGLE_BLOCK_N / 4 (multi-pass);
    BLOCK_K is what keeps the (BLOCK_C, BLOCK_N, BLOCK_K) tanh tile within a register budget. Backward (no tl.dot):
    BLOCK_C = 16, BLOCK_N <= 64 (more programs for kernel A), BLOCK_K by the same budget.
    """
    fwd_single = _np2(N) <= MAX_SINGLE_BLOCK_N
    f_bn = max(16, _np2(N)) if fwd_single else max(16, MAX_SINGLE_BLOCK_N // 4)
    f_bc = 16
    f_bk = max(1, min(32, _np2(I), _TILE_BUDGET // (f_bc * f_bn)))
    f_bd = max(16, min(64 if f_bn <= 128 else 32, _np2(D)))
    b_bc = 16
    b_bn = max(16, min(64, _np2(N)))
    b_bk = max(1, min(32, _np2(I), _TILE_BUDGET // (b_bc * b_bn)))
    return dict(
        fwd=dict(BLOCK_C=f_bc, BLOCK_N=f_bn, BLOCK_K=f_bk, BLOCK_D=f_bd, SINGLE=fwd_single,
                 num_warps=8 if f_bn >= 128 else 4),
        bwd=dict(BLOCK_C=b_bc, BLOCK_N=b_bn, BLOCK_K=b_bk, num_warps=4),
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _tanh(x):
    # No tl.tanh; libdevice.tanh fails under the interpreter. Saturates cleanly: sigmoid -> 0 or 1.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _score_tile(u_row_ptr, e_ptr, v_ptr, offs_c, mask_c, offs_n, mask_n, I,
                stride_un, stride_uk, stride_ec, stride_ek, stride_vk,
                ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_C, BLOCK_N) tile of s[c, n] = sum_k v[k] * tanh(u[n, k] * e[c, k]) (masked entries: garbage-free 0)."""
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=ACC)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < I
        e = tl.load(e_ptr + offs_c[:, None] * stride_ec + offs_k[None, :] * stride_ek,
                    mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(ACC)
        u = tl.load(u_row_ptr + offs_n[:, None] * stride_un + offs_k[None, :] * stride_uk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(ACC)
        v = tl.load(v_ptr + offs_k * stride_vk, mask=mask_k, other=0.0).to(ACC)
        z = _tanh(u[None, :, :] * e[:, None, :])  # (BLOCK_C, BLOCK_N, BLOCK_K), registers only
        acc += tl.sum(z * v[None, None, :], axis=2)
    return acc


# ----------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _sa_fwd_kernel(x_ptr, u_ptr, e_ptr, v_ptr, S_ptr, a_ptr, scratch_ptr,
                   N, C, D, I,
                   stride_xb, stride_xn, stride_xd,
                   stride_ub, stride_un, stride_uk,
                   stride_ec, stride_ek, stride_vk,
                   ACC: tl.constexpr, SINGLE: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    arange_n = tl.arange(0, BLOCK_N)
    arange_d = tl.arange(0, BLOCK_D)
    x_b = x_ptr + b * stride_xb
    u_b = u_ptr + b * stride_ub
    # Outputs are contiguous: a (B, C, N), S (B, C, D); the scratch (if any) is a contiguous (B, C, N) in ACC.
    a_b = a_ptr + b * C * N
    S_b = S_ptr + b * C * D
    scr_b = scratch_ptr + b * C * N

    if SINGLE:
        # The whole row of N positions fits one tile: scores, softmax and S straight from registers.
        mask_n = arange_n < N
        s = _score_tile(u_b, e_ptr, v_ptr, offs_c, mask_c, arange_n, mask_n, I,
                        stride_un, stride_uk, stride_ec, stride_ek, stride_vk, ACC, BLOCK_C, BLOCK_N, BLOCK_K)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        a = p / tl.sum(p, axis=1)[:, None]
        tl.store(a_b + offs_c[:, None] * N + arange_n[None, :], a.to(a_ptr.dtype.element_ty),
                 mask=mask_c[:, None] & mask_n[None, :])
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < D
            xt = tl.load(x_b + arange_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)
            out = tl.dot(a, xt, input_precision="ieee")
            tl.store(S_b + offs_c[:, None] * D + offs_d[None, :], out.to(S_ptr.dtype.element_ty),
                     mask=mask_c[:, None] & mask_d[None, :])
    else:
        # Pass 1: scores of each N block into the scratch, with an online row max and sum of exponentials.
        m = tl.full((BLOCK_C,), float("-inf"), dtype=ACC)
        l = tl.zeros((BLOCK_C,), dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            mask_n = offs_n < N
            s = _score_tile(u_b, e_ptr, v_ptr, offs_c, mask_c, offs_n, mask_n, I,
                            stride_un, stride_uk, stride_ec, stride_ek, stride_vk, ACC, BLOCK_C, BLOCK_N, BLOCK_K)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            tl.store(scr_b + offs_c[:, None] * N + offs_n[None, :], s, mask=mask_c[:, None] & mask_n[None, :])
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block holds at least one valid position
            p = tl.where(mask_n[None, :], tl.exp(s - m_new[:, None]), 0.0)
            l = l * tl.exp(m - m_new) + tl.sum(p, axis=1)
            m = m_new
        tl.debug_barrier()
        # Pass 2: normalise; a goes to the output and (in ACC precision) back to the scratch for the product.
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            mask = mask_c[:, None] & (offs_n < N)[None, :]
            ptrs = offs_c[:, None] * N + offs_n[None, :]
            s = tl.load(scr_b + ptrs, mask=mask, other=float("-inf"))
            a = tl.exp(s - m[:, None]) / l[:, None]
            tl.store(a_b + ptrs, a.to(a_ptr.dtype.element_ty), mask=mask)
            tl.store(scr_b + ptrs, a, mask=mask)
        tl.debug_barrier()
        # Pass 3: S[c, d-block] = sum over N blocks of a_tile @ x_tile.
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < D
            out = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + arange_n
                mask_n = offs_n < N
                a = tl.load(scr_b + offs_c[:, None] * N + offs_n[None, :],
                            mask=mask_c[:, None] & mask_n[None, :], other=0.0)
                xt = tl.load(x_b + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                             mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)
                out += tl.dot(a, xt, input_precision="ieee")
            tl.store(S_b + offs_c[:, None] * D + offs_d[None, :], out.to(S_ptr.dtype.element_ty),
                     mask=mask_c[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _sa_bwd_u_kernel(gs_ptr, u_ptr, e_ptr, v_ptr, gu_ptr,
                     N, C, I,
                     stride_ub, stride_un, stride_uk,
                     stride_ec, stride_ek, stride_vk,
                     ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_u[b, n, k] = v[k] * sum_c gs[b, c, n] * (1 - z^2) * e[c, k], z recomputed."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < I
    mask_nk = mask_n[:, None] & mask_k[None, :]
    u = tl.load(u_ptr + b * stride_ub + offs_n[:, None] * stride_un + offs_k[None, :] * stride_uk,
                mask=mask_nk, other=0.0).to(ACC)
    v = tl.load(v_ptr + offs_k * stride_vk, mask=mask_k, other=0.0).to(ACC)
    gs_b = gs_ptr + b * C * N  # gs: contiguous (B, C, N) in ACC
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        e = tl.load(e_ptr + offs_c[:, None] * stride_ec + offs_k[None, :] * stride_ek,
                    mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(ACC)
        g = tl.load(gs_b + offs_c[:, None] * N + offs_n[None, :], mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        z = _tanh(u[None, :, :] * e[:, None, :])  # (BLOCK_C, BLOCK_N, BLOCK_K)
        acc += tl.sum(g[:, :, None] * (1.0 - z * z) * e[:, None, :], axis=0)
    gu = acc * v[None, :]
    tl.store(gu_ptr + b * N * I + offs_n[:, None] * I + offs_k[None, :], gu.to(gu_ptr.dtype.element_ty), mask=mask_nk)


@triton.jit
def _sa_bwd_e_kernel(gs_ptr, u_ptr, e_ptr, v_ptr, ge_ptr, gv_partial_ptr,
                     B, N, C, I,
                     stride_ub, stride_un, stride_uk,
                     stride_ec, stride_ek, stride_vk,
                     ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_e[c, k] = v[k] * sum_{b,n} gs * (1 - z^2) * u[b, n, k]; partial grad_v[cb, k] = sum_{b,n,c in cb} gs * z."""
    cb = tl.program_id(0)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_c = offs_c < C
    mask_k = offs_k < I
    mask_ck = mask_c[:, None] & mask_k[None, :]
    e = tl.load(e_ptr + offs_c[:, None] * stride_ec + offs_k[None, :] * stride_ek, mask=mask_ck, other=0.0).to(ACC)
    v = tl.load(v_ptr + offs_k * stride_vk, mask=mask_k, other=0.0).to(ACC)
    acc_e = tl.zeros((BLOCK_C, BLOCK_K), dtype=ACC)
    acc_v = tl.zeros((BLOCK_C, BLOCK_K), dtype=ACC)
    for b in range(0, B):
        b64 = tl.cast(b, tl.int64)
        u_b = u_ptr + b64 * stride_ub
        gs_b = gs_ptr + b64 * C * N
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            u = tl.load(u_b + offs_n[:, None] * stride_un + offs_k[None, :] * stride_uk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(ACC)
            g = tl.load(gs_b + offs_c[:, None] * N + offs_n[None, :],
                        mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            z = _tanh(u[None, :, :] * e[:, None, :])  # (BLOCK_C, BLOCK_N, BLOCK_K)
            gz = g[:, :, None] * z
            acc_v += tl.sum(gz, axis=1)
            acc_e += tl.sum((g[:, :, None] - gz * z) * u[None, :, :], axis=1)  # g * (1 - z^2) * u
    ge = acc_e * v[None, :]
    tl.store(ge_ptr + offs_c[:, None] * I + offs_k[None, :], ge.to(ge_ptr.dtype.element_ty), mask=mask_ck)
    tl.store(gv_partial_ptr + cb * I + offs_k, tl.sum(acc_v, axis=0), mask=mask_k)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def _check_inputs(x: Tensor, u: Tensor, e: Tensor, v: Tensor) -> Tuple[int, int, int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"argument 'x': expected a 3-D tensor (B, N, D), got shape {tuple(x.shape)}")
    B, N, D = x.shape
    if u.dim() != 3 or u.shape[0] != B or u.shape[1] != N:
        raise ValueError(f"argument 'u': expected shape ({B}, {N}, I), got {tuple(u.shape)}")
    I = u.shape[2]
    if e.dim() != 2 or e.shape[1] != I:
        raise ValueError(f"argument 'e': expected shape (C, {I}), got {tuple(e.shape)}")
    if v.dim() != 1 or v.shape[0] != I:
        raise ValueError(f"argument 'v': expected shape ({I},), got {tuple(v.shape)}")
    for name, t in (("u", u), ("e", e), ("v", v)):
        if t.device != x.device:
            raise ValueError(f"argument '{name}': expected device {x.device} (x's), got {t.device}")
    if N == 0:
        raise ValueError("argument 'x': expected at least one spatial position, got N = 0")
    return B, N, e.shape[0], D, I


def semantic_attention_forward(x: Tensor, u: Tensor, e: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """S (B, C, D) and a (B, C, N), contiguous, in x's dtype. Inputs may have any strides."""
    B, N, C, D, I = _check_inputs(x, u, e, v)
    S = torch.empty((B, C, D), dtype=x.dtype, device=x.device)
    a = torch.empty((B, C, N), dtype=x.dtype, device=x.device)
    if B == 0 or C == 0:
        return S, a
    cfg = block_sizes(N, C, D, I)["fwd"]
    acc = _acc_dtype(x.dtype)
    # Scores (then a) in ACC precision for the multi-pass path only; a 1-element dummy otherwise.
    scratch = torch.empty((B, C, N) if not cfg["SINGLE"] else (1,), dtype=acc, device=x.device)
    grid = (B, triton.cdiv(C, cfg["BLOCK_C"]))
    _sa_fwd_kernel[grid](
        x, u, e, v, S, a, scratch,
        N, C, D, I,
        x.stride(0), x.stride(1), x.stride(2),
        u.stride(0), u.stride(1), u.stride(2),
        e.stride(0), e.stride(1), v.stride(0),
        ACC=_tl_acc(x.dtype), SINGLE=cfg["SINGLE"],
        BLOCK_C=cfg["BLOCK_C"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    return S, a


def semantic_attention_backward(
    grad_S: Tensor, grad_a: Tensor, x: Tensor, u: Tensor, e: Tensor, v: Tensor, a: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_u, grad_e, grad_v), contiguous, each in its input's dtype; ``a`` is the forward's output."""
    B, N, C, D, I = _check_inputs(x, u, e, v)
    if tuple(grad_S.shape) != (B, C, D):
        raise ValueError(f"argument 'grad_S': expected shape {(B, C, D)}, got {tuple(grad_S.shape)}")
    for name, t in (("grad_a", grad_a), ("a", a)):
        if tuple(t.shape) != (B, C, N):
            raise ValueError(f"argument '{name}': expected shape {(B, C, N)}, got {tuple(t.shape)}")
    acc = _acc_dtype(x.dtype)
    xc, ac, gS = x.to(acc), a.to(acc), grad_S.to(acc)
    # Not the hot spot (O(B*C*N*D) matrix products): torch.
    grad_x = torch.bmm(ac.transpose(1, 2), gS)
    ga_total = grad_a.to(acc) + torch.bmm(gS, xc.transpose(1, 2))
    gs = (ac * (ga_total - (ac * ga_total).sum(-1, keepdim=True))).contiguous()  # (B, C, N), softmax backward
    grad_u = torch.empty((B, N, I), dtype=u.dtype, device=u.device)
    grad_e = torch.empty((C, I), dtype=e.dtype, device=e.device)
    cfg = block_sizes(N, C, D, I)["bwd"]
    BC, BN, BK = cfg["BLOCK_C"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    n_cblocks = triton.cdiv(C, BC)
    gv_partial = torch.empty((n_cblocks, I), dtype=acc, device=x.device)
    tl_acc = _tl_acc(x.dtype)
    strides = (u.stride(0), u.stride(1), u.stride(2), e.stride(0), e.stride(1), v.stride(0))
    if B > 0 and I > 0:
        if C == 0:
            grad_u.zero_()
        else:
            _sa_bwd_u_kernel[(B, triton.cdiv(N, BN), triton.cdiv(I, BK))](
                gs, u, e, v, grad_u, N, C, I, *strides,
                ACC=tl_acc, BLOCK_C=BC, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg["num_warps"],
            )
    if C > 0 and I > 0:
        if B == 0:
            grad_e.zero_()
            gv_partial.zero_()
        else:
            _sa_bwd_e_kernel[(n_cblocks, triton.cdiv(I, BK))](
                gs, u, e, v, grad_e, gv_partial, B, N, C, I, *strides,
                ACC=tl_acc, BLOCK_C=BC, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg["num_warps"],
            )
    grad_v = gv_partial.sum(0) if n_cblocks > 0 else torch.zeros((I,), dtype=acc, device=x.device)
    return (grad_x.to(x.dtype).contiguous(), grad_u, grad_e, grad_v.to(v.dtype).contiguous())
