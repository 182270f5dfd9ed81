"""Triton kernels for ``semantic_attention`` (architecture §3): category-wise spatial attention.

Maths (x (B, N, D), u (B, N, I), e (C, I), v (I,))::

    s[b, c, n] = sum_k v[k] * tanh(u[b, n, k] * e[c, k])
    a[b, c, :] = softmax_n(s[b, c, :])                       (B, C, N)
    S[b, c, :] = sum_n a[b, c, n] * x[b, n, :]                (B, C, D)

Backward, with gS = dL/dS and ga = dL/da given, z = tanh(u[b, n, k] * e[c, k])::

    grad_x    = a^T @ gS                                       (torch bmm: O(B*C*N*D), not the hot spot)
    ga_total  = ga + gS @ x^T (torch);  gs = a * (ga_total - sum_n a * ga_total)    (softmax backward, in the
                                                                               Triton kernel, from dot = sum_n)
    grad_v[k] = sum_{b, n, c} gs[b, c, n] * z                                  (Triton, one fused pass:
    grad_u    = sum_c gs[b, c, n] * v[k] * (1 - z^2) * e[c, k]                  z is recomputed once per
    grad_e    = sum_{b, n} gs[b, c, n] * v[k] * (1 - z^2) * u[b, n, k]          (row, class, k) triple)

Memory. The official formulation materialises z as a (B, N, C, I) tensor and the attention-weighted map as
(B, N, C, D). Neither is ever written here: the forward builds each score tile in registers, chunk by chunk over I,
and the backward *recomputes* z tile by tile (flash-attention style) instead of storing it, because recomputing a
tanh is far cheaper than writing and re-reading B*N*C*I values. Extra memory is O(ksplit*B*C*N + B*C*D + G*C*I):
the k-split partial scores, a, gs, and the backward's (G, C, I) partial sums of grad_e (G <= 8 * SMs / cdiv(I, 16)).

Dtype policy. Outputs are contiguous and in the input dtypes (S and a in x's dtype; each gradient in its input's
dtype). fp16/bf16 inputs are upcast on load and everything (tanh, scores, softmax, the a @ x product, gradient
sums) accumulates in fp32; fp32 stays fp32 (tl.dot with input_precision="ieee", never tf32; the backward's two
torch.bmm follow torch's float32 matmul precision, full fp32 by default); fp64 computes in fp64.

Determinism. No atomics: the k-split partial scores and the per-group partials of grad_e and grad_v are summed in a
fixed order, so two runs give bitwise-equal results.

Kernels:
    * ``_sa_scores_kernel`` grid (cdiv(B*N, BLOCK_R), cdiv(C, BLOCK_C), ksplit): partial scores of a tile of flattened
      rows r = b*N + n (odd N wastes nothing) and classes over one of ksplit ranges of I (:func:`k_split`: small
      problems split I so that the grid fills the GPU).
    * ``_sa_softmax_product_kernel`` grid (B, cdiv(C, BLOCK_C), cdiv(D, BLOCK_D)): sums the partials, softmax over
      N (an online max/sum pass and a normalising pass over N blocks), stores a (D block 0 only) and S = a @ x for
      its D block.
    * ``_sa_bwd_kernel`` grid (G, cdiv(I, BLOCK_K)): program g walks row tiles g, g + G, ... and all classes,
      forms the softmax backward gs on the fly, writes grad_u and the group's partial grad_e (G, C, I) and grad_v
      (G, I) (:func:`bwd_groups` picks G to fill the GPU).
    * ``_sa_bwd_finalize_kernel`` grid (C + 1, cdiv(I, BLOCK_K)): sums the groups' partials in order, applies v to
      grad_e and writes grad_e and grad_v in their dtypes. Besides these two the backward makes three torch calls
      (two bmm, the row term of the softmax backward: one product and one sum).

Triton notes: there is no tl.tanh (and libdevice.tanh fails under the interpreter), so tanh(x) = 2*sigmoid(2x) - 1.
tl.dot operands keep M, N, K >= 16 (BLOCK_C, BLOCK_N, BLOCK_D >= 16) as the GPU requires; the score and backward
kernels have no tl.dot, so their blocks are free.
"""

from __future__ import annotations

import functools
import types
from typing import Mapping, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import acc_dtype, cdiv, device_guard, idx, needs_int64, next_power_of_2, tl_acc

__all__ = ["semantic_attention_forward", "semantic_attention_backward", "block_sizes", "k_split", "bwd_groups"]

# Budgets of elements for the (BLOCK_C, BLOCK_R, BLOCK_K) tanh tiles held in registers. The backward keeps several
# such tiles live: at 8192 elements and 4 warps ptxas gives it 240 registers per thread (sm_90); 4096 with 8 warps
# about 125.
_TILE_BUDGET = 8192
_BWD_TILE_BUDGET = 4096
# The score kernel splits the I reduction until the grid holds about this many programs per SM (4 warps each).
_PROGRAMS_PER_SM = 8


@functools.lru_cache(maxsize=1024)
def block_sizes(N: int, C: int, D: int, I: int) -> Mapping[str, Mapping[str, int]]:
    """Power-of-two block sizes of the three kernels, chosen from the shape (cached, read-only: a few microseconds
    of host time per launcher call, which bounds these ops at training sizes on a GPU).

    Scores (no tl.dot): a (BLOCK_C = 16, BLOCK_R = 16, BLOCK_K) tanh tile, BLOCK_K within the register budget.
    Softmax/product: BLOCK_C = 16, 16 <= BLOCK_N <= 64, 16 <= BLOCK_D <= 32 (tl.dot on the GPU needs M, N, K >= 16).
    Backward (no tl.dot): the score tile within the smaller budget. Block sizes and warps are those for which ptxas
    reports no register spills on sm_90 (``tests/gpu_compile.py``; BLOCK_D = 64 with 4 warps spilled).
    """
    s_bk = max(1, min(32, next_power_of_2(I), _TILE_BUDGET // 256))
    b_bk = max(1, min(32, next_power_of_2(I), _BWD_TILE_BUDGET // 256))
    frozen = types.MappingProxyType
    return frozen(dict(
        scores=frozen(dict(BLOCK_C=16, BLOCK_R=16, BLOCK_K=s_bk, num_warps=4)),
        product=frozen(dict(BLOCK_C=16, BLOCK_N=max(16, min(64, next_power_of_2(N))),
                            BLOCK_D=max(16, min(32, next_power_of_2(D))), num_warps=8)),
        bwd=frozen(dict(BLOCK_C=16, BLOCK_R=16, BLOCK_K=b_bk, num_warps=8)),
    ))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter: few programs keep it fast)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)
def k_split(B: int, N: int, C: int, I: int, sm_count: int) -> Tuple[int, int]:
    """(ksplit, k_per): the score kernel's I range is cut into ksplit ranges of k_per (a multiple of BLOCK_K).

    A small problem (COCO: B*N = 392 rows x 80 classes is 125 tiles) would leave most of a large GPU idle with one
    program per tile, so the I reduction is split until the grid holds about _PROGRAMS_PER_SM programs per SM; the
    partial sums are added in a fixed order by the softmax kernel. One range when the tiles already fill the GPU.
    """
    cfg = block_sizes(N, C, 1, I)["scores"]
    tiles = cdiv(B * N, cfg["BLOCK_R"]) * cdiv(C, cfg["BLOCK_C"])
    return _k_ranges(I, cfg["BLOCK_K"], cdiv(_PROGRAMS_PER_SM * sm_count, max(tiles, 1)))


def _k_ranges(I: int, block_k: int, want: int) -> Tuple[int, int]:
    """(ksplit, k_per): I cut into about ``want`` equal ranges of whole BLOCK_K blocks, none empty."""
    k_blocks = cdiv(max(I, 1), block_k)
    k_per = cdiv(k_blocks, min(k_blocks, max(1, want))) * block_k
    return cdiv(max(I, 1), k_per), k_per


@functools.lru_cache(maxsize=1024)
def bwd_groups(B: int, N: int, C: int, I: int, sm_count: int) -> int:
    """G, the backward kernel's row-tile groups: enough (G x k tiles) programs for about _PROGRAMS_PER_SM per SM,
    at most one group per row tile. The partial grad_e buffer is (G, C, I)."""
    cfg = block_sizes(N, C, 1, I)["bwd"]
    row_tiles = cdiv(B * N, cfg["BLOCK_R"])
    want = cdiv(_PROGRAMS_PER_SM * sm_count, cdiv(max(I, 1), cfg["BLOCK_K"]))
    return max(1, min(row_tiles, want))


# ----------------------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _tanh(x):
    # No tl.tanh; libdevice.tanh fails under the interpreter. Saturates cleanly: sigmoid -> 0 or 1.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _sa_scores_kernel(u_ptr, e_ptr, v_ptr, part_ptr,
                      R, N, C, I, K_PER,
                      stride_ub, stride_un, stride_uk,
                      stride_ec, stride_ek, stride_vk,
                      ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                      IDX64: tl.constexpr):
    """part[ks, b, c, n] = sum_{k in split ks} v[k] * tanh(u[b, n, k] * e[c, k]) for a (BLOCK_C, BLOCK_R) tile.

    Rows r = b * N + n are flattened over the batch, so odd N (49) wastes nothing but the last tile's tail.
    """
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = idx(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    ks = tl.program_id(2)
    mask_r = offs_r < R
    mask_c = offs_c < C
    b = offs_r // N
    n = offs_r - b * N
    u_rows = u_ptr + b * stride_ub + n * stride_un  # (BLOCK_R,) row pointers
    k_end = tl.minimum(I, (ks + 1) * K_PER)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=ACC)
    for k0 in range(ks * K_PER, k_end, BLOCK_K):
        offs_k = k0 + idx(tl.arange(0, BLOCK_K), IDX64)
        mask_k = offs_k < k_end
        e = tl.load(e_ptr + offs_c[:, None] * stride_ec + offs_k[None, :] * stride_ek,
                    mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(ACC)
        u = tl.load(u_rows[:, None] + offs_k[None, :] * stride_uk,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(ACC)
        v = tl.load(v_ptr + offs_k * stride_vk, mask=mask_k, other=0.0).to(ACC)
        z = _tanh(u[None, :, :] * e[:, None, :])  # (BLOCK_C, BLOCK_R, BLOCK_K), registers only
        acc += tl.sum(z * v[None, None, :], axis=2)
    # part: contiguous (KSPLIT, B, C, N) in ACC; row r of image b sits at b * C * N + n.
    ptrs = part_ptr + ks.to(tl.int64) * R * C + (b * C * N + n)[None, :] + offs_c[:, None] * N
    tl.store(ptrs, acc, mask=mask_c[:, None] & mask_r[None, :])


@triton.jit
def _load_scores(part_b, ks_stride, KSPLIT, offs_c, mask_c, offs_n, mask_n, N, ACC: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_C, BLOCK_N) scores: the k-split partials summed in a fixed order; -inf at positions beyond N (rows
    beyond C are 0, so that their softmax stays finite)."""
    s = tl.zeros((BLOCK_C, BLOCK_N), dtype=ACC)
    ptrs = part_b + offs_c[:, None] * N + offs_n[None, :]
    for ks in range(0, KSPLIT):
        s += tl.load(ptrs + ks * ks_stride, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
    return tl.where(mask_n[None, :], s, float("-inf"))


@triton.jit
def _sa_softmax_product_kernel(part_ptr, x_ptr, S_ptr, a_ptr,
                               KSPLIT, N, C, D,
                               stride_xb, stride_xn, stride_xd,
                               ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, IDX64: tl.constexpr):
    """a = softmax_n(scores) and S[:, d-block] = a @ x[:, d-block] for one (image, class block, D block).

    Two passes over the N blocks (one block for N <= BLOCK_N): the online row max and sum of exponentials, then
    normalise and accumulate S. Every D block recomputes the (cheap) softmax of its class block; only D block 0
    stores a.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_c = idx(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    pid_d = tl.program_id(2)
    offs_d = idx(pid_d * BLOCK_D + tl.arange(0, BLOCK_D), IDX64)
    mask_c = offs_c < C
    mask_d = offs_d < D
    arange_n = idx(tl.arange(0, BLOCK_N), IDX64)
    ks_stride = tl.num_programs(0).to(tl.int64) * C * N  # B * C * N
    part_b = part_ptr + b * C * N
    x_b = x_ptr + b * stride_xb
    a_b = a_ptr + b * C * N  # outputs are contiguous: a (B, C, N), S (B, C, D)
    m = tl.full((BLOCK_C,), float("-inf"), dtype=ACC)
    l = tl.zeros((BLOCK_C,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + arange_n
        s = _load_scores(part_b, ks_stride, KSPLIT, offs_c, mask_c, offs_n, offs_n < N, N, ACC, BLOCK_C, BLOCK_N)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # -inf while every score so far is -inf (a sum of v overflowed): shifting by it gave exp(-inf - -inf) = NaN
        # in l for good; shifted by 0 those terms are 0, as torch.softmax gives them.
        m_sh = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_sh) + tl.sum(tl.exp(s - m_sh[:, None]), axis=1)
        m = m_new
    out = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + arange_n
        mask_n = offs_n < N
        s = _load_scores(part_b, ks_stride, KSPLIT, offs_c, mask_c, offs_n, mask_n, N, ACC, BLOCK_C, BLOCK_N)
        a = tl.exp(s - m[:, None]) / l[:, None]
        tl.store(a_b + offs_c[:, None] * N + offs_n[None, :], a.to(a_ptr.dtype.element_ty),
                 mask=mask_c[:, None] & mask_n[None, :] & (pid_d == 0))
        xt = tl.load(x_b + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)
        out += tl.dot(a, xt, input_precision="ieee")
    tl.store(S_ptr + b * C * D + offs_c[:, None] * D + offs_d[None, :], out.to(S_ptr.dtype.element_ty),
             mask=mask_c[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _sa_bwd_kernel(a_ptr, gat_ptr, dot_ptr, u_ptr, e_ptr, v_ptr, gu_ptr, ge_part_ptr, gv_part_ptr,
                   R, N, C, I, ROW_TILES,
                   stride_ub, stride_un, stride_uk,
                   stride_ec, stride_ek, stride_vk,
                   ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   IDX64: tl.constexpr):
    """One pass over the (row, class, k) triples of row tiles g, g + G, g + 2G, ... and one k tile.

    Per row tile (rows r = b * N + n flattened over the batch) and class block, the softmax backward
    gs = a * (ga_total - dot) is formed from its three inputs (dot[b, c] = sum_n a * ga_total) and z = tanh(u e) is
    recomputed once; both feed all three gradients: grad_u of the row tile accumulates over the classes in
    registers; the group's partial grad_e[g, c, k] is written by the group's first row tile, then read, added to
    and written back (this program owns it; a block barrier separates row tiles); the group's partial grad_v[g, k]
    accumulates in registers and is written at the end.
    """
    g = tl.program_id(0)
    G = tl.num_programs(0)
    offs_k = idx(tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K), IDX64)
    mask_k = offs_k < I
    v = tl.load(v_ptr + offs_k * stride_vk, mask=mask_k, other=0.0).to(ACC)
    ge_g = ge_part_ptr + g.to(tl.int64) * C * I  # ge_part: contiguous (G, C, I) in ACC
    acc_v = tl.zeros((BLOCK_K,), dtype=ACC)
    for rt in range(g, ROW_TILES, G):
        offs_r = tl.cast(rt, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        b = offs_r // N
        n = offs_r - b * N
        mask_rk = mask_r[:, None] & mask_k[None, :]
        u = tl.load(u_ptr + (b * stride_ub + n * stride_un)[:, None] + offs_k[None, :] * stride_uk,
                    mask=mask_rk, other=0.0).to(ACC)
        bcn_rows = b * C * N + n  # a and ga_total: contiguous (B, C, N); dot: contiguous (B, C)
        acc_u = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + idx(tl.arange(0, BLOCK_C), IDX64)
            mask_c = offs_c < C
            mask_ck = mask_c[:, None] & mask_k[None, :]
            e = tl.load(e_ptr + offs_c[:, None] * stride_ec + offs_k[None, :] * stride_ek,
                        mask=mask_ck, other=0.0).to(ACC)
            mask_cr = mask_c[:, None] & mask_r[None, :]
            bcn = bcn_rows[None, :] + offs_c[:, None] * N
            a = tl.load(a_ptr + bcn, mask=mask_cr, other=0.0).to(ACC)
            gat = tl.load(gat_ptr + bcn, mask=mask_cr, other=0.0)
            dot = tl.load(dot_ptr + b[None, :] * C + offs_c[:, None], mask=mask_cr, other=0.0)
            gsv = a * (gat - dot)  # (BLOCK_C, BLOCK_R): dL/ds, the softmax backward
            # (BLOCK_C, BLOCK_R, BLOCK_K). Padding lanes hold 0, whose product with an infinite u or e of a real
            # lane is NaN: they are set to 0, or the sums over classes and rows would carry it into real gradients.
            z = tl.where(mask_cr[:, :, None], _tanh(u[None, :, :] * e[:, None, :]), 0.0)
            gz = gsv[:, :, None] * z
            acc_v += tl.sum(tl.sum(gz, axis=1), axis=0)
            t = gsv[:, :, None] * (1.0 - z * z)  # not gs - gz * z: an infinite gs would give inf - inf = NaN
            acc_u += tl.sum(t * e[:, None, :], axis=0)
            ge_ptrs = ge_g + offs_c[:, None] * I + offs_k[None, :]
            ge = tl.load(ge_ptrs, mask=mask_ck & (rt != g), other=0.0)  # the first row tile writes it
            tl.store(ge_ptrs, ge + tl.sum(t * u[None, :, :], axis=1), mask=mask_ck)
        tl.store(gu_ptr + offs_r[:, None] * I + offs_k[None, :], (acc_u * v[None, :]).to(gu_ptr.dtype.element_ty),
                 mask=mask_rk)
        tl.debug_barrier()  # this row tile's grad_e stores land before the next tile reads them back
    tl.store(gv_part_ptr + g * I + offs_k, acc_v, mask=mask_k)


@triton.jit
def _sa_bwd_finalize_kernel(ge_part_ptr, gv_part_ptr, v_ptr, ge_ptr, gv_ptr, G, C, I, stride_vk,
                            ACC: tl.constexpr, BLOCK_K: tl.constexpr, IDX64: tl.constexpr):
    """grad_e[c] = v * sum_g ge_part[g, c] for rows c < C, and grad_v = sum_g gv_part[g] for row C: the groups summed
    in order (deterministic), v applied once, each result rounded once to its output's dtype. One launch instead of
    the sums, the product and the casts."""
    row = idx(tl.program_id(0), IDX64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < I
    acc = tl.zeros((BLOCK_K,), dtype=ACC)
    if row < C:
        src = ge_part_ptr + row * I + offs_k  # ge_part: contiguous (G, C, I); C * I below 2**31 unless IDX64
        for _ in range(0, G):
            acc += tl.load(src, mask=mask_k, other=0.0)
            src += idx(C, IDX64) * I
        acc *= tl.load(v_ptr + offs_k * stride_vk, mask=mask_k, other=0.0).to(ACC)
        tl.store(ge_ptr + row * I + offs_k, acc.to(ge_ptr.dtype.element_ty), mask=mask_k)
    else:
        src = gv_part_ptr + offs_k  # gv_part: contiguous (G, I)
        for _ in range(0, G):
            acc += tl.load(src, mask=mask_k, other=0.0)
            src += I
        tl.store(gv_ptr + offs_k, acc.to(gv_ptr.dtype.element_ty), mask=mask_k)


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


def semantic_attention_forward(x: Tensor, u: Tensor, e: Tensor, v: Tensor, *,
                               ksplit: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """S (B, C, D) and a (B, C, N), contiguous, in x's dtype. Inputs may have any strides.

    ``ksplit`` forces the number of I ranges of the score kernel (tests); default: :func:`k_split`'s choice.
    """
    B, N, C, D, I = _check_inputs(x, u, e, v)
    S = torch.empty((B, C, D), dtype=x.dtype, device=x.device)
    a = torch.empty((B, C, N), dtype=x.dtype, device=x.device)
    if B == 0 or C == 0:
        return S, a
    cfg = block_sizes(N, C, D, I)
    sc, pc = cfg["scores"], cfg["product"]
    if ksplit is None:
        ksplit, k_per = k_split(B, N, C, I, _sm_count(x.device))
    else:
        ksplit, k_per = _k_ranges(I, sc["BLOCK_K"], ksplit)
    acc = acc_dtype(x.dtype)
    part = torch.empty((ksplit, B, C, N), dtype=acc, device=x.device)
    R = B * N
    idx64 = needs_int64(x, u, e, v, S, a, part)
    with device_guard(x):
        _sa_scores_kernel[(cdiv(R, sc["BLOCK_R"]), cdiv(C, sc["BLOCK_C"]), ksplit)](
            u, e, v, part, R, N, C, I, k_per,
            u.stride(0), u.stride(1), u.stride(2), e.stride(0), e.stride(1), v.stride(0),
            ACC=tl_acc(x.dtype), BLOCK_R=sc["BLOCK_R"], BLOCK_C=sc["BLOCK_C"], BLOCK_K=sc["BLOCK_K"], IDX64=idx64,
            num_warps=sc["num_warps"],
        )
        # max(1, ...): at D = 0 the D-block 0 programs still write a.
        _sa_softmax_product_kernel[(B, cdiv(C, pc["BLOCK_C"]), max(1, cdiv(D, pc["BLOCK_D"])))](
            part, x, S, a, ksplit, N, C, D, x.stride(0), x.stride(1), x.stride(2),
            ACC=tl_acc(x.dtype), BLOCK_C=pc["BLOCK_C"], BLOCK_N=pc["BLOCK_N"],
            BLOCK_D=pc["BLOCK_D"], IDX64=idx64, num_warps=pc["num_warps"],
        )
    return S, a


def semantic_attention_backward(
    grad_S: Tensor, grad_a: Tensor, x: Tensor, u: Tensor, e: Tensor, v: Tensor, a: Tensor, *,
    groups: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_u, grad_e, grad_v), contiguous, each in its input's dtype; ``a`` is the forward's output.

    ``groups`` forces the number of row-tile groups of the backward kernel (tests); default: :func:`bwd_groups`.
    """
    B, N, C, D, I = _check_inputs(x, u, e, v)
    if tuple(grad_S.shape) != (B, C, D):
        raise ValueError(f"argument 'grad_S': expected shape {(B, C, D)}, got {tuple(grad_S.shape)}")
    for name, t in (("grad_a", grad_a), ("a", a)):
        if tuple(t.shape) != (B, C, N):
            raise ValueError(f"argument '{name}': expected shape {(B, C, N)}, got {tuple(t.shape)}")
    acc = acc_dtype(x.dtype)
    xc, ac, gS = x.to(acc), a.to(acc).contiguous(), grad_S.to(acc)
    # Not the hot spot (O(B*C*N*D) matrix products): torch. ga_total = dL/da, through S = a @ x too.
    grad_x = torch.bmm(ac.transpose(1, 2), gS)
    ga_total = torch.baddbmm(grad_a.to(acc), gS, xc.transpose(1, 2)).contiguous()  # (B, C, N)
    dot = (ac * ga_total).sum(-1)  # (B, C): sum_n a * ga_total, the softmax backward's row term (full fp32)
    grad_u = torch.empty((B, N, I), dtype=u.dtype, device=u.device)
    grad_e = torch.empty((C, I), dtype=e.dtype, device=e.device)
    grad_v = torch.empty((I,), dtype=v.dtype, device=v.device)
    cfg = block_sizes(N, C, D, I)["bwd"]
    R = B * N
    row_tiles = cdiv(R, cfg["BLOCK_R"])
    G = bwd_groups(B, N, C, I, _sm_count(x.device)) if groups is None else max(1, min(groups, row_tiles))
    if C == 0 or R == 0 or I == 0:
        grad_u.zero_()
        grad_e.zero_()
        grad_v.zero_()
    else:  # every (group, k tile) program writes its whole slice of both partials: no zero fill
        ge_part = torch.empty((G, C, I), dtype=acc, device=x.device)
        gv_part = torch.empty((G, I), dtype=acc, device=x.device)
        k_tiles = cdiv(I, cfg["BLOCK_K"])
        idx64 = needs_int64(x, u, e, v, ac, grad_u, ge_part)
        with device_guard(x):
            _sa_bwd_kernel[(G, k_tiles)](
                ac, ga_total, dot, u, e, v, grad_u, ge_part, gv_part, R, N, C, I, row_tiles,
                u.stride(0), u.stride(1), u.stride(2), e.stride(0), e.stride(1), v.stride(0),
                ACC=tl_acc(x.dtype), BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"],
                IDX64=idx64, num_warps=cfg["num_warps"],
            )
            _sa_bwd_finalize_kernel[(C + 1, k_tiles)](
                ge_part, gv_part, v, grad_e, grad_v, G, C, I, v.stride(0), ACC=tl_acc(x.dtype), BLOCK_K=cfg["BLOCK_K"],
                IDX64=idx64,
            )
    return grad_x.to(x.dtype).contiguous(), grad_u, grad_e, grad_v
