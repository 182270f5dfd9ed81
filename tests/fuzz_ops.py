"""Randomised differential fuzzing of the fused ops (dsrb.ops) against the float64 oracle (dsrb.reference).

    PYTHONPATH=$PWD python tests/fuzz_ops.py --seconds 600 --backend cpu --seed 0
    PYTHONPATH=$PWD python tests/fuzz_ops.py --backend cpu --seed 0 --case 17      # one case again, verbosely

Each case is drawn from its own generator, seeded by (seed, case index), so any case is reproduced alone. A case is
one op on random sizes that cross the kernels' tile, chunk and vector widths (1, block - 1, block, block + 1, ...;
N from H x W grids with H, W in 1..9 and, where the op allows, any N), layouts (contiguous, transposed, sliced with
steps, expanded), a random subset of inputs requiring grad, a dtype (float32, float64; bfloat16 on cpu), an OpenMP
thread count (1, 2, 3), coefficients at and near 0 and 1, targets with all-unknown, all-positive and all-negative rows,
and quadrant maps with ties and peaks on the halves' borders. Every output and every gradient (for a random
grad_output, on a random subset of the outputs) is compared with the oracle on the same rounded inputs, with the
tolerance table of tests/helpers.py; bfloat16 results outside the table pass when within twice the torch backend's
error (tests/helpers.assert_within_baseline). On the cpu backend the case runs twice (bit-equal results) and, for the
ops whose kernels give every element one writer in a fixed order, at another thread count too (bit-equal). A small
share of cases pass one invalid argument and expect an error that names it. Exits 1 when any case failed.

Backends: torch, cpu (the C++ extension), triton (under TRITON_INTERPRET=1 without a GPU: tiny sizes only) and
cuda-emu (csrc/cuda run on the CPU by tests/cuda_emulator.py: tiny sizes only).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

if not torch.cuda.is_available():  # as tests/conftest.py: the Triton kernels run interpreted on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dsrb.ops as ops  # noqa: E402
from dsrb import reference  # noqa: E402
import cuda_emulator  # noqa: E402
from helpers import TOLERANCES  # noqa: E402

BACKENDS = ("torch", "cpu", "triton", "cuda-emu")
OPS = ("semantic_attention", "instance_blend", "prototype_blend", "quadrant_index", "prototype_bank_update",
       "prototype_bank_update_")
# Sizes around the block widths: 4 (quadrant lanes), 8 (AVX2 floats, CUDA row warps), 16 (AVX-512 floats, Triton
# class/row tiles), 32 (a warp, the CUDA backward's k block), 64 (the CUDA forward's k chunk), 128 (Triton's largest
# D block, 4 values per lane of a warp), primes between.
WIDE = (1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
NARROW = (1, 2, 3, 4, 5, 7, 8, 9, 11, 15, 16, 17, 31, 32, 33)
TINY = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33)
# Elements of the oracle's largest temporary per case: (B, N, C, I) of semantic_attention.
BUDGET = {"torch": 150_000, "cpu": 150_000, "triton": 3_000, "cuda-emu": 30_000}
BLEND_BUDGET = {"torch": 40_000, "cpu": 40_000, "triton": 4_000, "cuda-emu": 20_000}


class Case:
    """One drawn case: ``call(fn)`` runs it through ``fn`` (the backend's op), ``oracle()`` the same in float64."""

    def __init__(self, op: str, dtype: torch.dtype, threads: int, info: Dict):
        self.op, self.dtype, self.threads, self.info = op, dtype, threads, info
        self.leaves: Dict[str, torch.Tensor] = {}  # float inputs (backend dtype and layout), some requiring grad
        self.views: Dict[str, Callable] = {}  # leaf -> the op's argument (an expansion), where not the leaf itself
        self.fixed: Dict[str, object] = {}  # everything else the op takes
        self.grad_out: List[Optional[torch.Tensor]] = []  # per floating output, None: not in the loss
        self.expect_error: Optional[str] = None  # an invalid case: the argument its error must name
        self.n_outputs = 0  # floating outputs that a loss can take
        self.keep: List[bool] = []  # which of them the loss takes
        self.scale = 1.0  # magnitude of the values: the table's atol is for values of order 1

    def describe(self) -> str:
        parts = [f"{self.op} {str(self.dtype).replace('torch.', '')} threads={self.threads}"]
        parts += [f"{k}={v}" for k, v in self.info.items()]
        return " ".join(parts)


# ---- drawing ---------------------------------------------------------------------------------------------------------

def _pick(rng, values):
    return values[rng.randrange(len(values))]


def _layout(rng, t: torch.Tensor, name: str, info: Dict, allow_expand_dim: Optional[int] = None):
    """``t`` (already in its dtype) in a random memory layout; returns (leaf, view or None)."""
    kind = _pick(rng, ("contiguous", "contiguous", "transposed", "sliced", "strided", "expanded"))
    if kind == "expanded" and (allow_expand_dim is None or t.shape[allow_expand_dim] <= 1):
        kind = "contiguous"
    if t.dim() == 0 or t.numel() == 0:
        kind = "contiguous"
    info[f"{name}_layout"] = kind
    if kind == "transposed":  # reversed dimension order in memory
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims), None
    if kind == "sliced":  # every other (step 2, odd offset) entry of the first dimension of a larger buffer
        buf = torch.full((2 * t.shape[0] + 1,) + tuple(t.shape[1:]), float("nan") if t.is_floating_point() else 7,
                         dtype=t.dtype)
        buf[1::2] = t
        return buf[1::2], None
    if kind == "strided":  # every third element of a wider last dimension
        buf = torch.zeros(tuple(t.shape) + (3,), dtype=t.dtype)
        buf[..., 1] = t
        return buf[..., 1], None
    if kind == "expanded":  # one slice along allow_expand_dim, expanded: the leaf is the slice
        one = t.narrow(allow_expand_dim, 0, 1).clone()
        shape = list(t.shape)
        return one, (lambda leaf, shape=shape: leaf.expand(shape))
    return t.clone(), None


def _fixed(rng, t: torch.Tensor, name: str, info: Dict, expand_dim: Optional[int] = 0) -> torch.Tensor:
    """An input without gradient in a random layout, expanded ones included (the oracle sees the same tensor)."""
    t, view = _layout(rng, t, name, info, expand_dim)
    return view(t) if view else t


def _values(gen, shape, scale=1.0, kind="normal"):
    if kind == "normal":
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if kind == "small-int":  # exact in every dtype: ties and exact sums
        return torch.randint(-3, 4, shape, generator=gen).double() * scale
    return torch.rand(shape, generator=gen, dtype=torch.float64) * scale


def _add_leaf(case: Case, rng, gen, name, master: torch.Tensor, grad_ok=True, expand_dim=None):
    """Round ``master`` to the case's dtype, lay it out, and maybe require grad."""
    leaf, view = _layout(rng, master.to(case.dtype), name, case.info, expand_dim)
    if view is not None:
        case.views[name] = view
    if grad_ok and rng.random() < 0.6:
        leaf.requires_grad_()
    case.leaves[name] = leaf


def _targets(rng, gen, B, C, case: Case, name="T"):
    """(B, C) in {-1, 0, 1}, some rows all unknown, all positive or all negative; any real dtype."""
    T = torch.randint(-1, 2, (B, C), generator=gen)
    for b in range(B):
        r = rng.random()
        if r < 0.15:
            T[b] = 0
        elif r < 0.3:
            T[b] = 1
        elif r < 0.4:
            T[b] = -1
    dtype = _pick(rng, (case.dtype, case.dtype, torch.float32, torch.int64, torch.int8, torch.int32, torch.uint8,
                        torch.bool))
    if dtype in (torch.uint8, torch.bool):  # cannot hold -1: known negatives become unknown
        T = T.clamp(min=0)
    case.info[f"{name}_dtype"] = str(dtype).replace("torch.", "")
    return _fixed(rng, T.to(dtype), name, case.info)


def _validate_flag(rng, case: Case):
    """validate=False (values trusted) takes other paths in the wrappers and the cpu in-place kernel."""
    case.fixed["validate"] = rng.random() < 0.75
    case.info["validate"] = case.fixed["validate"]


def _coefficient(rng, case: Case, name: str):
    """A one-element coefficient at or near the edges of [0, 1], in S's dtype or another floating one."""
    value = _pick(rng, (0.0, 1.0, 0.5, 1e-7, 1 - 2 ** -10, 1 - 1e-7, 2 ** -24, 1e-30, rng.random(), rng.random()))
    dtype = _pick(rng, (case.dtype, case.dtype, torch.float32, torch.float64))
    shape = _pick(rng, ((), (1,)))
    case.info[name] = f"{value!r}:{str(dtype).replace('torch.', '')}{list(shape)}"
    t = torch.full(shape, value, dtype=dtype)
    if rng.random() < 0.7:
        t.requires_grad_()
    case.leaves[name] = t


def _size(rng, pool, zero=0.0):
    return 0 if rng.random() < zero else _pick(rng, pool)


def _shrink(sizes: Dict[str, int], budget: int, keep=()):
    """Halve the largest size (not in ``keep``) until the product is within ``budget``."""
    while True:
        total = 1
        for v in sizes.values():
            total *= max(v, 1)
        if total <= budget:
            return sizes
        name = max((k for k in sizes if k not in keep), key=lambda k: sizes[k])
        if sizes[name] <= 1:
            return sizes
        sizes[name] = max(1, sizes[name] // 2 + (sizes[name] % 2 and sizes[name] > 2))


def _grid(rng):
    return rng.randint(1, 9), rng.randint(1, 9)


def draw_semantic_attention(rng, gen, case: Case, backend: str):
    small = backend in ("triton", "cuda-emu")
    pool = TINY if backend == "triton" else WIDE
    H, W = _grid(rng)
    N = H * W if rng.random() < 0.6 else _pick(rng, (1, 2, 3, 5, 11, 13, 17, 31, 33, 50, 63, 65, 97))
    s = dict(B=_size(rng, (1, 2, 3) if small else (1, 2, 3, 4, 5, 8, 9), zero=0.03), N=N,
             C=_size(rng, TINY if small else NARROW, zero=0.03), D=_size(rng, pool, zero=0.03),
             I=_size(rng, pool, zero=0.03))
    s = _shrink(s, BUDGET[backend], keep=("D",))
    B, N, C, D, I = s["B"], s["N"], s["C"], s["D"], s["I"]
    case.info.update(s)
    scale_u = _pick(rng, (1.0, 1.0, 0.01, 3.0, 30.0))
    case.info["scale_u"] = scale_u
    _add_leaf(case, rng, gen, "x", _values(gen, (B, N, D)), expand_dim=0)
    _add_leaf(case, rng, gen, "u", _values(gen, (B, N, I), scale_u), expand_dim=0)
    _add_leaf(case, rng, gen, "e", _values(gen, (C, I)), expand_dim=0)
    scale_v = _pick(rng, (1.0, 1.0, 1.0, 4.0))  # 4: sharper attention
    case.info["scale_v"] = scale_v
    case.scale = scale_u * scale_v  # grad e carries u's scale, and 1 - tanh^2 cancels in fp32 for large u e
    _add_leaf(case, rng, gen, "v", _values(gen, (I,), scale_v / max(1, I) ** 0.5), expand_dim=0)
    case.n_outputs = 2


def _blend_sizes(rng, case: Case, backend: str):
    """B, C, D of a blend case (recorded in case.info): C is sometimes 0, and tiny on the slow backends."""
    small = backend in ("triton", "cuda-emu")
    s = _shrink(dict(B=_size(rng, TINY if small else NARROW, zero=0.03), C=_size(rng, TINY if small else NARROW),
                     D=_size(rng, WIDE, zero=0.03)), BLEND_BUDGET[backend])
    s["C"] = 0 if rng.random() < 0.03 else s["C"]
    case.info.update(s)
    return s["B"], s["C"], s["D"]


def draw_instance_blend(rng, gen, case: Case, backend: str):
    B, C, D = _blend_sizes(rng, case, backend)
    scale = _pick(rng, (1.0, 1.0, 1e-3, 1e3))
    case.info["scale_S"] = case.scale = scale
    _add_leaf(case, rng, gen, "S", _values(gen, (B, C, D), scale), expand_dim=0)
    case.fixed["T"] = _targets(rng, gen, B, C, case)
    _coefficient(rng, case, "alpha")
    kind = _pick(rng, ("none", "flip", "permutation", "random"))
    case.info["partner"] = kind
    if kind == "none":
        partner = None
    elif kind == "flip":
        partner = torch.arange(B - 1, -1, -1)
    elif kind == "permutation":
        partner = torch.randperm(B, generator=gen)
    else:  # repeats and self-pairs
        partner = torch.randint(0, max(B, 1), (B,), generator=gen)
    if partner is not None and rng.random() < 0.3:
        partner = partner.to(_pick(rng, (torch.int32, torch.int16, torch.uint8)))
        case.info["partner_dtype"] = str(partner.dtype).replace("torch.", "")
    if partner is not None:
        partner = _fixed(rng, partner, "partner", case.info)
    case.fixed["partner"] = partner
    _validate_flag(rng, case)
    case.fixed["detach_target"] = rng.random() < 0.4
    case.info["detach_target"] = case.fixed["detach_target"]
    case.n_outputs = 2


def draw_prototype_blend(rng, gen, case: Case, backend: str):
    B, C, D = _blend_sizes(rng, case, backend)
    _add_leaf(case, rng, gen, "S", _values(gen, (B, C, D)), expand_dim=0)
    case.fixed["T"] = _targets(rng, gen, B, C, case)
    _coefficient(rng, case, "beta")
    _add_leaf(case, rng, gen, "bank", _values(gen, (C, 4, D)), expand_dim=1)
    quadrant = torch.randint(0, 4, (B, C), generator=gen)
    shift = torch.randint(1, 4, (B, C), generator=gen)
    density = _pick(rng, (0.0, 0.5, 1.0, 0.1))
    case.info["select_density"] = density
    select = torch.rand(B, C, generator=gen) < density
    case.fixed["quadrant"] = _fixed(rng, quadrant.to(_pick(rng, (torch.int64, torch.int32, torch.int8, torch.uint8))),
                                    "quadrant", case.info)
    case.fixed["shift"] = _fixed(rng, shift.to(_pick(rng, (torch.int64, torch.int32, torch.int16))), "shift",
                                 case.info)
    _validate_flag(rng, case)
    case.fixed["select"] = _fixed(rng, select, "select", case.info)
    case.fixed["detach_target"] = rng.random() < 0.4
    case.info["detach_target"] = case.fixed["detach_target"]
    case.n_outputs = 2


def _quadrant_maps(rng, gen, B, C, H, W, case: Case):
    """a (B, C, N) and x_sum (B, N): random, tie-rich small integers, or peaks placed on the halves' borders."""
    N = H * W
    kind = _pick(rng, ("normal", "ties", "border", "flat", "special"))
    case.info["maps"] = kind
    if kind == "ties":
        a = torch.randint(0, 3, (B, C, N), generator=gen).double() / 4
        x = torch.randint(-2, 3, (B, N), generator=gen).double()
    elif kind == "flat":
        a = torch.full((B, C, N), 1.0 / N, dtype=torch.float64)
        x = torch.full((B, N), _pick(rng, (1.0, -1.0, 0.0)), dtype=torch.float64)
    else:
        a = torch.softmax(torch.randn(B, C, N, generator=gen, dtype=torch.float64), -1)
        x = torch.randn(B, N, generator=gen, dtype=torch.float64)
    if kind == "border":  # the peak on a row or column next to the split, sometimes tied with one across it
        x = x.abs() + 0.5
        g = a.view(B, C, H, W)
        for b in range(B):
            for c in range(C):
                h = _pick(rng, sorted({max(0, H // 2 - 1), H // 2 if H > 1 else 0, 0, H - 1}))
                w = _pick(rng, sorted({max(0, W // 2 - 1), W // 2 if W > 1 else 0, 0, W - 1}))
                g[b, c, h, w] = 4.0
                if rng.random() < 0.5:  # a tie on the other side: the first index wins
                    h2, w2 = min(H - 1, h + 1), min(W - 1, w + 1)
                    g[b, c, h2, w2] = 4.0
                    x[b, h2 * W + w2] = x[b, h * W + w]
    if kind == "special" and B:  # -0, inf, -inf and NaN scores (NaN is the maximum, the first NaN wins)
        for _ in range(rng.randint(1, 3)):
            x[rng.randrange(B), rng.randrange(N)] = _pick(rng, (-0.0, float("inf"), -float("inf"), float("nan")))
    return a, x


def draw_quadrant_index(rng, gen, case: Case, backend: str):
    small = backend in ("triton", "cuda-emu")
    H, W = _grid(rng)
    if rng.random() < 0.05:  # past the Triton kernel's 4096-element tile: its tiled kernel
        H, W = _pick(rng, ((65, 64), (64, 65), (1, 4097), (4097, 1), (70, 70), (33, 129)))
    B = _size(rng, (1, 2, 3) if small else (1, 2, 3, 4, 5, 7, 9), zero=0.03)
    C = _size(rng, TINY if small else NARROW, zero=0.03)
    if H * W > 81:
        B, C = min(B, 2), min(C, 3)
    case.info.update(B=B, C=C, H=H, W=W)
    a, x = _quadrant_maps(rng, gen, B, C, H, W, case)
    a_t, a_view = _layout(rng, a.to(case.dtype), "a", case.info, 1 if case.info["maps"] == "flat" else None)
    x_dtype = _pick(rng, (case.dtype, case.dtype, torch.float32) + ((torch.float64,) if backend != "triton" else ()))
    case.info["x_sum_dtype"] = str(x_dtype).replace("torch.", "")
    x_t = _fixed(rng, x.to(x_dtype), "x_sum", case.info)
    if rng.random() < 0.2:
        a_t.requires_grad_()
        case.info["a_requires_grad"] = True
    case.fixed.update(a=a_view(a_t) if a_view else a_t, x_sum=x_t, height=H, width=W)
    case.n_outputs = 0


def draw_prototype_bank_update(rng, gen, case: Case, backend: str):
    B, C, D = _blend_sizes(rng, case, backend)
    cap = _pick(rng, (0, 1, 2, 3, max(B, 1), 100, 2 ** 31 - 1, 2 ** 63 - 1))
    if cap > 2 ** 30:  # counts near the largest: count + rank must not overflow
        counts = cap - torch.randint(0, 4, (C, 4), generator=gen)
    else:
        counts = torch.randint(0, cap + 2, (C, 4), generator=gen).clamp(max=cap)
    sums_dtype = _pick(rng, (case.dtype, case.dtype, torch.float32) + ((torch.float64,) if backend != "triton" else ()))
    case.info.update(cap=cap, sums_dtype=str(sums_dtype).replace("torch.", ""))
    S, view = _layout(rng, _values(gen, (B, C, D)).to(case.dtype), "S", case.info, 0)
    S = view(S) if view else S
    in_place = case.op == "prototype_bank_update_"
    sums_master = _values(gen, (C, 4, D)).to(sums_dtype)
    if in_place:  # written in place: no expanded buffers
        case.info["sums_layout"] = "contiguous" if rng.random() < 0.6 else "transposed"
        sums = sums_master.clone() if case.info["sums_layout"] == "contiguous" else \
            sums_master.permute(2, 1, 0).contiguous().permute(2, 1, 0)
        counts_dtype = _pick(rng, (torch.int64, torch.int64, torch.int32) if cap < 2 ** 31 else (torch.int64,))
        counts_t = counts.to(counts_dtype)
        if rng.random() < 0.3:
            counts_t = counts_t.t().contiguous().t()
            case.info["counts_layout"] = "transposed"
        case.info["counts_dtype"] = str(counts_dtype).replace("torch.", "")
    else:
        sums = _fixed(rng, sums_master, "sums", case.info, 1)
        counts_t = _fixed(rng, counts, "counts", case.info, 1)
    quadrant = torch.randint(0, 4, (B, C), generator=gen)
    case.fixed.update(sums=sums, counts=counts_t, S=S, T=_targets(rng, gen, B, C, case),
                      quadrant=_fixed(rng, quadrant, "quadrant", case.info), cap=cap)
    _validate_flag(rng, case)
    case.n_outputs = 0


DRAW = {"semantic_attention": draw_semantic_attention, "instance_blend": draw_instance_blend,
        "prototype_blend": draw_prototype_blend, "quadrant_index": draw_quadrant_index,
        "prototype_bank_update": draw_prototype_bank_update, "prototype_bank_update_": draw_prototype_bank_update}


def _dtypes(backend: str, op: str):
    if backend == "triton":
        return (torch.float32,)
    if backend == "cpu":
        return (torch.float32, torch.float32, torch.float64, torch.float64, torch.bfloat16)
    return (torch.float32, torch.float64)


def _invalidate(rng, case: Case) -> None:
    """Make one argument invalid; the error must name it."""
    f = case.fixed
    choices = []
    if "T" in f and f["T"].numel():
        choices.append("T")
    if case.op == "instance_blend" and f.get("partner") is not None and f["partner"].numel():
        choices.append("partner")
    if case.op == "prototype_blend" and f["quadrant"].numel():
        choices += ["quadrant", "shift"]
    if case.op in ("instance_blend", "prototype_blend"):
        choices.append("alpha" if case.op == "instance_blend" else "beta")
    if case.op == "quadrant_index":
        choices.append("height")
    if case.op.startswith("prototype_bank_update"):
        choices.append("cap")
        if f["quadrant"].numel():
            choices.append("quadrant")
    if case.op == "semantic_attention":
        choices += ["e", "v"]
    if not choices:
        return
    name = _pick(rng, choices)
    if name == "T" and f["T"].dtype == torch.bool:  # holds no invalid value
        return
    if name in ("T", "partner", "quadrant", "shift"):  # values are checked only when asked to
        f["validate"] = True
        case.info["validate"] = True
    case.expect_error = name
    case.info["invalid"] = name
    if name == "T":
        T = f["T"].contiguous()
        T.view(-1)[rng.randrange(T.numel())] = 2
        f["T"] = T
    elif name == "partner":
        p = f["partner"].contiguous()
        p[rng.randrange(p.numel())] = _pick(rng, (-1, p.numel()))
        f["partner"] = p
    elif name in ("quadrant", "shift"):
        q = f[name].contiguous()
        q.view(-1)[rng.randrange(q.numel())] = _pick(rng, (4, -1) if name == "quadrant" else (0, 4))
        f[name] = q
    elif name in ("alpha", "beta"):
        case.leaves[name] = torch.zeros(2, dtype=case.dtype)
    elif name == "height":
        f["height"] += 1
    elif name == "cap":
        f["cap"] = -1
    elif name == "e":
        leaf = case.leaves["e"]
        case.leaves["e"] = torch.zeros(leaf.shape[0], leaf.shape[1] + 1, dtype=leaf.dtype)
        case.views.pop("e", None)
    elif name == "v":
        case.leaves["v"] = case.leaves["v"].detach().to(torch.float64 if case.dtype != torch.float64 else
                                                        torch.float32)
        case.views.pop("v", None)


def draw_case(seed: int, index: int, backend: str, op_names=OPS, invalid_share=0.05) -> Case:
    rng = random.Random(seed * 1_000_003 + index)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    op = _pick(rng, op_names)
    case = Case(op, _pick(rng, _dtypes(backend, op)), _pick(rng, (1, 2, 3)), {})
    DRAW[op](rng, gen, case, backend)
    if backend in ("torch", "cpu") and rng.random() < invalid_share:
        _invalidate(rng, case)
    if case.n_outputs:
        # A random grad_output per floating output (rounded to its dtype), about one in five left out of the loss.
        keep = [rng.random() < 0.8 for _ in range(case.n_outputs)]
        if not any(keep):
            keep[rng.randrange(case.n_outputs)] = True
        case.keep = keep
        case.info["loss_outputs"] = "".join("1" if k else "0" for k in keep)
    return case


# ---- running ---------------------------------------------------------------------------------------------------------

def _emu_op(op: str):
    """The emulated cuda kernels behind the public ops' own argument handling (dtypes, defaults)."""
    if op == "semantic_attention":
        return lambda x, u, e, v: cuda_emulator.SemanticAttention.apply(x, u, e, v)
    if op == "instance_blend":
        def ib(S, T, alpha, partner=None, *, detach_target=False, validate=True):
            partner = torch.arange(S.shape[0] - 1, -1, -1) if partner is None else partner.long()
            return cuda_emulator.InstanceBlend.apply(S, T.to(S.dtype), alpha.reshape(()), partner, detach_target)
        return ib
    if op == "prototype_blend":
        def pb(S, T, beta, bank, quadrant, shift, select, *, detach_target=False, validate=True):
            return cuda_emulator.PrototypeBlend.apply(S, T.to(S.dtype), beta.reshape(()), bank, quadrant.long(),
                                                      shift.long(), select, detach_target)
        return pb
    if op == "quadrant_index":
        def qi(a, x_sum, height, width):
            dtype = torch.promote_types(a.dtype, x_sum.dtype)
            return cuda_emulator.load().quadrant_index_cuda(a.detach().to(dtype), x_sum.to(dtype), height, width)
        return qi
    if op == "prototype_bank_update":
        def pbu(sums, counts, S, T, quadrant, cap, validate=True):
            return cuda_emulator.load().prototype_bank_update_cuda(sums, counts.long(), S, T.to(S.dtype),
                                                                   quadrant.long(), cap)
        return pbu
    raise KeyError(op)


def backend_fn(op: str, backend: str) -> Callable:
    if backend == "cuda-emu":
        return _emu_op(op)
    fn = getattr(ops, op)
    return lambda *args, **kwargs: fn(*args, backend=backend, **kwargs)


def _inputs(case: Case, oracle: bool):
    """(op arguments by name, differentiable leaves by name): the oracle's in float64 from the same rounded values
    (a coefficient rounded to S's dtype first, as the blends use it)."""
    leaves, args = {}, {}
    for name, t in case.leaves.items():
        if oracle:
            if name in ("alpha", "beta") and t.numel() == 1:
                t = t.detach().to(case.dtype).double().requires_grad_(t.requires_grad)
            else:
                t = t.detach().double().requires_grad_(t.requires_grad)
        leaves[name] = t
        args[name] = case.views[name](t) if name in case.views else t
    for name, t in case.fixed.items():
        if oracle and isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.double()
        args[name] = t
    return args, {k: v for k, v in leaves.items() if v.requires_grad}


def _call(case: Case, fn: Callable, args: Dict, oracle: bool):
    op = case.op
    if op == "semantic_attention":
        return fn(args["x"], args["u"], args["e"], args["v"])
    if op == "instance_blend":
        return fn(args["S"], args["T"], args["alpha"], args["partner"], detach_target=args["detach_target"],
                  **_validate(args, oracle))
    if op == "prototype_blend":
        return fn(args["S"], args["T"], args["beta"], args["bank"], args["quadrant"], args["shift"], args["select"],
                  detach_target=args["detach_target"], **_validate(args, oracle))
    if op == "quadrant_index":
        if oracle:  # the op computes a * x_sum in the wider dtype of the two (rounded there): so does its oracle
            dtype = torch.promote_types(case.fixed["a"].dtype, case.fixed["x_sum"].dtype)
            return (reference.quadrant_index(case.fixed["a"].to(dtype), case.fixed["x_sum"].to(dtype),
                                             args["height"], args["width"]),)
        return (fn(args["a"], args["x_sum"], args["height"], args["width"]),)
    sums, counts = args["sums"], args["counts"]
    if oracle:
        return reference.prototype_bank_update(sums.double(), counts.long(), args["S"].double(), args["T"],
                                               args["quadrant"], args["cap"])
    if op == "prototype_bank_update_":
        keep = torch.preserve_format  # the drawn layouts: transposed buffers take the copy-back path
        sums, counts = sums.clone(memory_format=keep), counts.clone(memory_format=keep)
        sums.copy_(args["sums"])
        counts.copy_(args["counts"])
        with torch.no_grad():
            out = fn(sums, counts, args["S"], args["T"], args["quadrant"], args["cap"], **_validate(args, oracle))
        if out is not None:
            raise AssertionError(f"prototype_bank_update_ returned {type(out).__name__}, expected None")
        return sums, counts
    return fn(sums, counts, args["S"], args["T"], args["quadrant"], args["cap"], **_validate(args, oracle))


def _validate(args: Dict, oracle: bool) -> Dict:
    """The public ops' validate flag (the oracle and the emulated kernels' adapters have none)."""
    return {} if oracle or "validate" not in args else {"validate": args["validate"]}


def evaluate(case: Case, fn: Callable, oracle: bool, grad_seed: int):
    """Outputs and gradients of the case: a list of (name, tensor)."""
    args, leaves = _inputs(case, oracle)
    op_fn = {"semantic_attention": reference.semantic_attention, "instance_blend": reference.instance_blend,
             "prototype_blend": reference.prototype_blend}.get(case.op) if oracle else fn
    if oracle and case.op == "instance_blend" and args["partner"] is not None:
        args["partner"] = args["partner"].long()
    if oracle and case.op == "prototype_blend":
        args["quadrant"], args["shift"] = args["quadrant"].long(), args["shift"].long()
    out = _call(case, op_fn, args, oracle)
    names = {"semantic_attention": ("S", "a"), "instance_blend": ("S1", "T1"),
             "prototype_blend": ("S2", "T2"), "quadrant_index": ("quadrant",)}.get(case.op, ("sums", "counts"))
    result = list(zip(names, out))
    if case.n_outputs and leaves:
        g, lay = torch.Generator().manual_seed(grad_seed), random.Random(grad_seed)
        pairs, layouts = [], []
        for keep, o in zip(case.keep, out):
            go = torch.randn(o.shape, generator=g, dtype=torch.float64).to(case.dtype).to(o.dtype)
            go, kind = _grad_output_layout(lay, go, oracle)
            layouts.append(kind)
            if keep and o.requires_grad:
                pairs.append((o, go))
        case.info["grad_layouts"] = ",".join(layouts)
        if pairs:
            grads = torch.autograd.grad([p[0] for p in pairs], list(leaves.values()), [p[1] for p in pairs],
                                        allow_unused=True, materialize_grads=True)
        else:  # the loss holds only outputs without a gradient (T1 with detach_target): zero, as autograd's
            grads = [torch.zeros_like(leaf) for leaf in leaves.values()]
        result += [(f"grad {n}", gr) for n, gr in zip(leaves, grads)]
    return result


def _grad_output_layout(rng, go: torch.Tensor, oracle: bool):
    """A grad_output in a random layout, as a loss hands them over (an expanded one from a sum or a broadcast
    weight, a transposed or strided one from a view): its values for the oracle, its layout too for a backend."""
    kind = _pick(rng, ("contiguous", "contiguous", "expanded", "transposed", "strided", "scalar"))
    if go.dim() == 0 or go.numel() == 0:
        return go, "contiguous"
    if kind == "expanded":  # the first index's values repeated along dimension 0 (stride 0)
        go = go[:1].expand(go.shape)
    elif kind == "scalar":  # one value everywhere (all strides 0), as from out.sum()
        go = go.reshape(-1)[:1].reshape([1] * go.dim()).expand(go.shape)
    if oracle:
        return go.contiguous(), kind
    if kind == "transposed":
        dims = list(range(go.dim()))[::-1]
        go = go.permute(dims).contiguous().permute(dims)
    elif kind == "strided":
        buf = torch.full(tuple(go.shape) + (2,), float("nan"), dtype=go.dtype)
        buf[..., 0] = go
        go = buf[..., 0]
    return go, kind


def _tol_dtype(case: Case, name: str, t: torch.Tensor) -> torch.dtype:
    """The least precise of the value's dtype and the case's: a float32 grad alpha summed from bfloat16 values."""
    cands = [t.dtype, case.dtype] if t.is_floating_point() else [case.dtype]
    if case.op.startswith("prototype_bank_update"):
        cands.append(case.fixed["sums"].dtype)
    return max(cands, key=lambda d: TOLERANCES[d]["rtol"])


def compare(case: Case, got, want, baseline=None) -> List[str]:
    problems = []
    if [n for n, _ in got] != [n for n, _ in want]:
        return [f"results {[n for n, _ in got]}, oracle {[n for n, _ in want]}"]
    for i, ((name, g), (_, w)) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            problems.append(f"{name}: shape {tuple(g.shape)}, expected {tuple(w.shape)}")
            continue
        if not w.is_floating_point():
            g = g.long() if name == "counts" else g  # in place, counts keeps its own integer dtype
            if g.dtype != w.dtype or not torch.equal(g, w):
                bad = (g != w).nonzero()[:3].tolist() if g.dtype == w.dtype else "dtype"
                problems.append(f"{name}: {g.dtype} differs from the oracle at {bad}")
            continue
        tol = dict(TOLERANCES[_tol_dtype(case, name, g)])
        tol["atol"] *= max(1.0, case.scale)  # a blend of values of 1e3 that cancels keeps their rounding error
        g64, w64 = g.detach().double(), w.detach().double()
        try:
            torch.testing.assert_close(g64, w64, **tol, equal_nan=True)
            continue
        except AssertionError as error:
            message = " ".join(str(error).split("\n")[1:4])
        if baseline is not None and case.dtype in (torch.bfloat16, torch.float16) and w64.numel():
            b64 = baseline[i][1].detach().double()
            err = (g64 - w64).abs().nan_to_num(float("inf")).max().item()
            base = (b64 - w64).abs().nan_to_num(float("inf")).max().item()
            if err <= max(2 * base, tol["rtol"] * w64.abs().max().item()) + tol["atol"]:
                continue
            message += f" (twice the torch backend's error is {2 * base:.3g})"
        problems.append(f"{name}: {message}")
    return problems


def _thread_independent(op: str) -> bool:
    """Whether the cpu kernels give every output one writer and a fixed order whatever the thread count (the
    semantic_attention backward's grad e and grad v partials follow the thread count, as documented)."""
    return op != "semantic_attention"


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_case(case: Case, backend: str, grad_seed: int, timeout: int = 0) -> List[str]:
    """The failures of one case (empty when it passes)."""
    before = torch.get_num_threads()
    if timeout:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
    try:
        torch.set_num_threads(case.threads)
        fn = backend_fn(case.op, backend)
        if case.expect_error:
            try:
                evaluate(case, fn, False, grad_seed)
            except (ValueError, TypeError, RuntimeError, IndexError) as error:
                if f"'{case.expect_error}'" not in str(error) and case.expect_error not in str(error).split("'"):
                    return [f"error does not name '{case.expect_error}': {type(error).__name__}: {error}"]
                return []
            return [f"no error for the invalid '{case.expect_error}'"]
        try:
            got = evaluate(case, fn, False, grad_seed)
        except Hang:
            raise
        except Exception as error:  # noqa: BLE001 - every exception on a valid input is a failure
            return [f"raised {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                    f"\n{traceback.format_exc(limit=-3)}"]
        want = evaluate(case, None, True, grad_seed)
        baseline = None
        if case.dtype in (torch.bfloat16, torch.float16) and backend != "torch":
            baseline = evaluate(case, backend_fn(case.op, "torch"), False, grad_seed)
        problems = compare(case, got, want, baseline)
        if backend == "cpu":
            again = evaluate(case, fn, False, grad_seed)
            problems += [f"{n}: not bit-equal on a second run" for (n, a), (_, b) in zip(got, again)
                         if not _same_bits(a, b)]
            if _thread_independent(case.op):
                other = 1 if case.threads != 1 else 3
                torch.set_num_threads(other)
                third = evaluate(case, fn, False, grad_seed)
                problems += [f"{n}: differs at {other} threads from {case.threads}"
                             for (n, a), (_, b) in zip(got, third) if not _same_bits(a, b)]
        return problems
    except Hang:
        return [f"no result within {timeout} s (hang?)"]
    finally:
        if timeout:
            signal.alarm(0)
        torch.set_num_threads(before)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():  # bits, so that NaN payloads and -0 count too
        a, b = (t.detach().contiguous().view(-1).view(torch.uint8) for t in (a, b))
    return torch.equal(a, b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--cases", type=int, default=0, help="stop after this many cases (0: only --seconds)")
    p.add_argument("--case", type=int, default=None, help="run only this case index, and describe it")
    p.add_argument("--start", type=int, default=0, help="first case index")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops to draw from")
    p.add_argument("--timeout", type=int, default=0, help="seconds before a case counts as hung (0: 120, 600 for "
                                                          "the slow backends)")
    args = p.parse_args(argv)
    op_names = tuple(args.ops.split(","))
    for op in op_names:
        if op not in OPS:
            p.error(f"argument --ops: unknown op {op!r}; expected some of {', '.join(OPS)}")
    if args.backend == "cuda-emu":
        op_names = tuple(o for o in op_names if o != "prototype_bank_update_") or op_names
        cuda_emulator.load()
    timeout = args.timeout or (600 if args.backend in ("triton", "cuda-emu") else 120)
    indices = [args.case] if args.case is not None else None
    start, failed, n, stats = time.monotonic(), 0, 0, {}
    index = args.start
    while True:
        if indices is not None:
            if n == len(indices):
                break
            index = indices[n]
        elif time.monotonic() - start > args.seconds or (args.cases and n >= args.cases):
            break
        case = draw_case(args.seed, index, args.backend, op_names)
        if args.case is not None:
            print(f"case {index}: {case.describe()}", flush=True)
        t0 = time.monotonic()
        problems = run_case(case, args.backend, grad_seed=args.seed * 7919 + index, timeout=timeout)
        count, spent = stats.get(case.op, (0, 0.0))
        stats[case.op] = (count + 1, spent + time.monotonic() - t0)
        if problems:
            failed += 1
            print(f"FAIL case {index}: {case.describe()}", flush=True)
            for line in problems:
                print(f"    {line}", flush=True)
            only = f" --ops {args.ops}" if op_names != OPS else ""  # the ops drawn from decide each case too
            print(f"    reproduce: PYTHONPATH=$PWD python tests/fuzz_ops.py --backend {args.backend} "
                  f"--seed {args.seed} --case {index}{only}", flush=True)
        n += 1
        index += 1
    print(f"{n} cases on {args.backend} (seed {args.seed}, {time.monotonic() - start:.0f} s): {failed} failed; "
          + ", ".join(f"{op} {c} ({t:.0f} s)" for op, (c, t) in sorted(stats.items())), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
