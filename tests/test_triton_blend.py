"""Triton kernels of the blending ops, launchers called directly, against the torch backend and the oracles.

Covers kernels/instance_blend.py, kernels/prototype_blend.py, kernels/quadrant_index.py and
kernels/prototype_bank_update.py: forward outputs and every gradient, compared with the torch backend's custom ops
(``torch.ops.dsrb.*_torch``, forward and backward) and with the oracles of ``dsrb.reference`` (autograd in float64
on the same rounded inputs for the gradients).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set here before triton
and the kernels are imported). Triton reads the flag when ``@triton.jit`` decorates a kernel, i.e. when the kernel
module is imported; if another test module imported a kernel module earlier without the flag, a private copy is
loaded here with the flag set. On a CUDA host the flag is left alone, the compiled kernels run on CUDA tensors and the
GPU-only cases (COCO sizes) run too.

The interpreter costs 10-50 ms per program, so every case keeps its grids to a few programs.
"""

import importlib
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import dsrb.ops  # noqa: E402,F401 (registers the torch backend's custom ops used as the second reference)
from dsrb import reference  # noqa: E402
from helpers import (assert_close, check_blends_ignore_what_they_leave_alone, noncontiguous,  # noqa: E402
                     triton_interpreter_problem)

if triton_interpreter_problem():
    pytest.skip(triton_interpreter_problem(), allow_module_level=True)

pytestmark = pytest.mark.usefixtures("uninitialized_memory_is_nan")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")


def _interpreted(module, kernel_name) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of other triton versions
        return os.environ.get("TRITON_INTERPRET") == "1"
    return isinstance(getattr(module, kernel_name), InterpretedFunction)


def _load(name, kernel_name):
    module = importlib.import_module(f"dsrb.kernels.{name}")
    if HAS_CUDA or _interpreted(module, kernel_name):
        return module
    # Imported earlier in this session without TRITON_INTERPRET=1: decorate a private copy with the flag set.
    spec = importlib.util.spec_from_file_location(f"_dsrb_triton_{name}_interp", module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    if not _interpreted(fresh, kernel_name):
        pytest.skip(
            "no CUDA GPU and the Triton interpreter is off (TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET')!r}): the Triton kernels cannot run here",
            allow_module_level=True,
        )
    return fresh


IB = _load("instance_blend", "_instance_blend_fwd_kernel")
PB = _load("prototype_blend", "_prototype_blend_fwd_kernel")
QI = _load("quadrant_index", "_quadrant_index_kernel")
BU = _load("prototype_bank_update", "_prototype_bank_update_kernel")
INTERPRETED = _interpreted(IB, "_instance_blend_fwd_kernel")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, g, dtype):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _check_out(out, like_shape, dtype):
    assert out.shape == like_shape and out.dtype == dtype and out.is_contiguous()


def _partner(kind, B, g):
    if kind == "flip":
        p = torch.arange(B - 1, -1, -1)
    elif kind == "perm":
        p = torch.randperm(B, generator=g)
    elif kind == "repeat":  # not a permutation: collisions, images nobody points to, possibly self-partners
        p = torch.randint(0, B, (B,), generator=g)
        if B >= 3:
            p[-1] = p[0]
            p[1] = p[0]
    else:
        raise ValueError(kind)
    return p.to(DEVICE)


class _NoLaunch:
    """Stands in for a kernel: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError(f"kernel launched with grid {grid}")


# ---------------------------------------------------------------------------------------------------------------
# instance_blend


def ib_inputs(B, C, D, dtype, seed=0, partner="flip", alpha_shape=()):
    g = _gen(seed)
    S = _randn((B, C, D), g, dtype)
    T = torch.randint(-1, 2, (B, C), generator=g).to(device=DEVICE, dtype=dtype)
    alpha = torch.full(alpha_shape, 0.3, dtype=dtype, device=DEVICE)
    p = _partner(partner, B, g)
    gS1 = _randn((B, C, D), g, dtype)
    gT1 = _randn((B, C), g, dtype)
    return (S, T, alpha, p), (gS1, gT1)


def ib_compare(inputs, grads_out, detach_target, dtype):
    S, T, alpha, p = inputs
    gS1, gT1 = grads_out
    S1, T1 = IB.instance_blend_forward(S, T, alpha, p)
    gS, ga = IB.instance_blend_backward(gS1, gT1, S, T, alpha, p, detach_target)
    _check_out(S1, S.shape, S.dtype)
    _check_out(T1, T.shape, S.dtype)
    _check_out(gS, S.shape, S.dtype)
    assert ga.shape == alpha.shape and ga.dtype == alpha.dtype

    # torch backend (same dtype)
    tS1, tT1 = torch.ops.dsrb.instance_blend_torch(S, T, alpha.reshape(()), p, detach_target)
    tgS, tga = torch.ops.dsrb.instance_blend_torch_backward(gS1, gT1, S, T, alpha.reshape(()), p, detach_target)
    for name, got, want in (("S1", S1, tS1), ("T1", T1, tT1), ("grad S", gS, tgS), ("grad alpha", ga, tga)):
        assert_close(got, want.reshape(got.shape), dtype=dtype, what=f"torch backend {name}")

    # oracle, float64 autograd on the same values
    S64 = S.detach().double().requires_grad_()
    a64 = alpha.detach().double().requires_grad_()
    rS1, rT1 = reference.instance_blend(S64, T.double(), a64, p, detach_target=detach_target)
    rgS, rga = torch.autograd.grad((rS1 * gS1.double()).sum() + (rT1 * gT1.double()).sum(), (S64, a64),
                                   allow_unused=True, materialize_grads=True)
    for name, got, want in (("S1", S1, rS1), ("T1", T1, rT1), ("grad S", gS, rgS), ("grad alpha", ga, rga)):
        assert_close(got, want.detach(), dtype=dtype, what=f"oracle {name}")


# (B, C, D): B = 1, odd C (1, 3, 20), D not a multiple of the block (33, 7), several blocks along D (200 > 128).
IB_SHAPES = [(1, 1, 7), (1, 3, 33), (4, 20, 33), (5, 3, 7), (3, 20, 200)]


@pytest.mark.parametrize("shape", IB_SHAPES, ids=str)
@pytest.mark.parametrize("detach_target", [False, True])
def test_instance_blend_float32(shape, detach_target):
    inputs, grads_out = ib_inputs(*shape, torch.float32)
    ib_compare(inputs, grads_out, detach_target, torch.float32)


@pytest.mark.parametrize("partner", ["flip", "perm", "repeat"])
@pytest.mark.parametrize("detach_target", [False, True])
def test_instance_blend_partners(partner, detach_target):
    """A partner that is not the flip: a random permutation, and an index vector with repeated entries."""
    inputs, grads_out = ib_inputs(7, 20, 33, torch.float32, seed=3, partner=partner)
    if partner == "repeat":
        p = inputs[3]
        assert p.unique().numel() < p.numel()
    ib_compare(inputs, grads_out, detach_target, torch.float32)


@pytest.mark.parametrize("partner", ["perm", "repeat"])
@pytest.mark.parametrize("shape", [(4, 20, 33), (1, 3, 7)], ids=str)
def test_instance_blend_float64(shape, partner):
    inputs, grads_out = ib_inputs(*shape, torch.float64, seed=1, partner=partner)
    ib_compare(inputs, grads_out, False, torch.float64)
    ib_compare(inputs, grads_out, True, torch.float64)


def test_instance_blend_noncontiguous_and_alpha_shape():
    inputs, grads_out = ib_inputs(5, 20, 33, torch.float32, seed=4, partner="repeat", alpha_shape=(1,))
    inputs = [noncontiguous(t) for t in inputs]
    grads_out = [noncontiguous(t) for t in grads_out]
    assert not any(t.is_contiguous() for t in inputs + grads_out if t.numel() > 1)
    for detach_target in (False, True):
        ib_compare(inputs, grads_out, detach_target, torch.float32)


def test_instance_blend_every_entry_blended():
    """All of image 0's labels unknown, all of its partner's positive: the whole row is blended, both directions."""
    (S, T, alpha, p), grads_out = ib_inputs(2, 3, 7, torch.float32, seed=5)
    T[0] = 0
    T[1] = 1
    S1, T1 = IB.instance_blend_forward(S, T, alpha, p)
    assert_close(T1[0], torch.full_like(T1[0], 0.7), what="T1 of the blended row")
    ib_compare((S, T, alpha, p), grads_out, False, torch.float32)


def test_instance_blend_partner_out_of_range_blends_nothing():
    """Partners outside [0, B) (reachable only with validate=False) never reach memory: such an image blends nothing,
    exactly as if it were its own partner, forward and backward."""
    (S, T, alpha, _), (gS1, gT1) = ib_inputs(4, 20, 33, torch.float32, seed=6)
    bad = torch.tensor([-3, 4, 1, 100], device=DEVICE)
    own = torch.tensor([0, 1, 1, 3], device=DEVICE)
    for detach_target in (False, True):
        got = IB.instance_blend_forward(S, T, alpha, bad) + IB.instance_blend_backward(gS1, gT1, S, T, alpha, bad,
                                                                                      detach_target)
        want = IB.instance_blend_forward(S, T, alpha, own) + IB.instance_blend_backward(gS1, gT1, S, T, alpha, own,
                                                                                       detach_target)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_instance_blend_empty_batch(monkeypatch):
    monkeypatch.setattr(IB, "_instance_blend_fwd_kernel", _NoLaunch())
    monkeypatch.setattr(IB, "_instance_blend_bwd_kernel", _NoLaunch())
    (S, T, alpha, p), (gS1, gT1) = ib_inputs(0, 4, 5, torch.float32)
    S1, T1 = IB.instance_blend_forward(S, T, alpha, p)
    assert S1.shape == (0, 4, 5) and T1.shape == (0, 4)
    gS, ga = IB.instance_blend_backward(gS1, gT1, S, T, alpha, p, False)
    assert gS.shape == (0, 4, 5) and ga.shape == alpha.shape and ga.item() == 0


# ---------------------------------------------------------------------------------------------------------------
# prototype_blend


def pb_inputs(B, C, D, dtype, seed=0, beta_shape=()):
    g = _gen(seed)
    S = _randn((B, C, D), g, dtype)
    T = torch.randint(-1, 2, (B, C), generator=g).to(device=DEVICE, dtype=dtype)
    beta = torch.full(beta_shape, 0.35, dtype=dtype, device=DEVICE)
    bank = _randn((C, 4, D), g, dtype)
    quadrant = torch.randint(0, 4, (B, C), generator=g).to(DEVICE)
    shift = torch.randint(1, 4, (B, C), generator=g).to(DEVICE)
    select = (torch.rand((B, C), generator=g) < 0.6).to(DEVICE)
    gS2 = _randn((B, C, D), g, dtype)
    gT2 = _randn((B, C), g, dtype)
    return (S, T, beta, bank, quadrant, shift, select), (gS2, gT2)


def pb_compare(inputs, grads_out, detach_target, bank_grad, dtype):
    S, T, beta, bank, quadrant, shift, select = inputs
    gS2, gT2 = grads_out
    S2, T2 = PB.prototype_blend_forward(S, T, beta, bank, quadrant, shift, select)
    gS, gb, gbank = PB.prototype_blend_backward(gS2, gT2, S, beta, bank, quadrant, shift, select, detach_target,
                                                bank_grad)
    _check_out(S2, S.shape, S.dtype)
    _check_out(T2, T.shape, S.dtype)
    _check_out(gS, S.shape, S.dtype)
    _check_out(gbank, bank.shape, bank.dtype)
    assert gb.shape == beta.shape and gb.dtype == beta.dtype
    if not bank_grad:
        assert torch.equal(gbank, torch.zeros_like(gbank))

    b0 = beta.reshape(())
    tS2, tT2 = torch.ops.dsrb.prototype_blend_torch(S, T, b0, bank, quadrant, shift, select, detach_target)
    tgS, tgb, tgbank = torch.ops.dsrb.prototype_blend_torch_backward(gS2, gT2, S, b0, bank, quadrant, shift, select,
                                                                    detach_target, bank_grad)
    for name, got, want in (("S2", S2, tS2), ("T2", T2, tT2), ("grad S", gS, tgS), ("grad beta", gb, tgb),
                            ("grad bank", gbank, tgbank)):
        assert_close(got, want.reshape(got.shape), dtype=dtype, what=f"torch backend {name}")

    S64 = S.detach().double().requires_grad_()
    b64 = beta.detach().double().requires_grad_()
    bank64 = bank.detach().double().requires_grad_(bank_grad)
    rS2, rT2 = reference.prototype_blend(S64, T.double(), b64, bank64, quadrant, shift, select,
                                         detach_target=detach_target)
    wrt = (S64, b64, bank64) if bank_grad else (S64, b64)
    grads = torch.autograd.grad((rS2 * gS2.double()).sum() + (rT2 * gT2.double()).sum(), wrt,
                                allow_unused=True, materialize_grads=True)
    rgS, rgb = grads[:2]
    rgbank = grads[2] if bank_grad else torch.zeros_like(bank64)
    for name, got, want in (("S2", S2, rS2), ("T2", T2, rT2), ("grad S", gS, rgS), ("grad beta", gb, rgb),
                            ("grad bank", gbank, rgbank)):
        assert_close(got, want.detach(), dtype=dtype, what=f"oracle {name}")


PB_SHAPES = [(1, 1, 7), (1, 3, 33), (4, 20, 33), (6, 3, 7), (2, 20, 200)]


@pytest.mark.parametrize("shape", PB_SHAPES, ids=str)
@pytest.mark.parametrize("detach_target, bank_grad", [(False, False), (True, True), (False, True)])
def test_prototype_blend_float32(shape, detach_target, bank_grad):
    inputs, grads_out = pb_inputs(*shape, torch.float32)
    pb_compare(inputs, grads_out, detach_target, bank_grad, torch.float32)


@pytest.mark.parametrize("bank_grad", [False, True])
@pytest.mark.parametrize("shape", [(4, 20, 33), (1, 3, 7)], ids=str)
def test_prototype_blend_float64(shape, bank_grad):
    inputs, grads_out = pb_inputs(*shape, torch.float64, seed=1)
    pb_compare(inputs, grads_out, False, bank_grad, torch.float64)
    pb_compare(inputs, grads_out, True, bank_grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_blends_ignore_what_they_leave_alone(dtype):
    check_blends_ignore_what_they_leave_alone(
        IB.instance_blend_forward, lambda gS1, gT1, S, T, a, p: IB.instance_blend_backward(gS1, gT1, S, T, a, p, False),
        PB.prototype_blend_forward,
        lambda gS2, gT2, S, b, k, q, h, e: PB.prototype_blend_backward(gS2, gT2, S, b, k, q, h, e, False, True),
        dtype=dtype, device=DEVICE)


def test_prototype_blend_every_quadrant_and_shift():
    """Every (quadrant, shift) pair, including quadrant - shift < 0 (non-negative modulo), every entry selected."""
    C, D = 3, 7
    q, s = torch.meshgrid(torch.arange(4), torch.arange(1, 4), indexing="ij")
    B = q.numel()  # 12 images: image i has quadrant q[i] and shift s[i] for every class
    (S, T, beta, bank, _, _, _), grads_out = pb_inputs(B, C, D, torch.float32, seed=6)
    quadrant = q.reshape(B, 1).expand(B, C).contiguous().to(DEVICE)
    shift = s.reshape(B, 1).expand(B, C).contiguous().to(DEVICE)
    select = torch.ones(B, C, dtype=torch.bool, device=DEVICE)
    S2, _ = PB.prototype_blend_forward(S, T, beta, bank, quadrant, shift, select)
    k = torch.remainder(quadrant - shift, 4)
    p = bank[torch.arange(C, device=DEVICE)[None, :], k]
    assert_close(S2, 0.35 * S + 0.65 * p, dtype=torch.float32, what="S2")
    pb_compare((S, T, beta, bank, quadrant, shift, select), grads_out, False, True, torch.float32)


def test_prototype_blend_noncontiguous_and_beta_shape():
    inputs, grads_out = pb_inputs(5, 20, 33, torch.float32, seed=4, beta_shape=(1,))
    inputs = [noncontiguous(t) for t in inputs]
    grads_out = [noncontiguous(t) for t in grads_out]
    assert not any(t.is_contiguous() for t in inputs + grads_out if t.numel() > 1)
    pb_compare(inputs, grads_out, False, True, torch.float32)
    pb_compare(inputs, grads_out, True, False, torch.float32)


def test_prototype_blend_empty_batch(monkeypatch):
    monkeypatch.setattr(PB, "_prototype_blend_fwd_kernel", _NoLaunch())
    monkeypatch.setattr(PB, "_prototype_blend_bwd_kernel", _NoLaunch())
    (S, T, beta, bank, quadrant, shift, select), (gS2, gT2) = pb_inputs(0, 4, 5, torch.float32)
    S2, T2 = PB.prototype_blend_forward(S, T, beta, bank, quadrant, shift, select)
    assert S2.shape == (0, 4, 5) and T2.shape == (0, 4)
    for bank_grad in (False, True):
        gS, gb, gbank = PB.prototype_blend_backward(gS2, gT2, S, beta, bank, quadrant, shift, select, False,
                                                    bank_grad)
        assert gS.shape == (0, 4, 5) and gb.shape == beta.shape and gb.item() == 0
        assert torch.equal(gbank, torch.zeros_like(bank))


# ---------------------------------------------------------------------------------------------------------------
# quadrant_index


def qi_inputs(B, C, H, W, dtype, seed=0, ties=True):
    g = _gen(seed)
    if ties:  # few distinct small integers: exact products, many tied maxima along rows and columns
        a = torch.randint(0, 3, (B, C, H * W), generator=g).to(device=DEVICE, dtype=dtype)
        x = torch.randint(-2, 3, (B, H * W), generator=g).to(device=DEVICE, dtype=dtype)
    else:
        a = torch.rand((B, C, H * W), generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
        x = _randn((B, H * W), g, dtype)
    return a, x


def qi_compare(a, x, H, W):
    q = QI.quadrant_index(a, x, H, W)
    _check_out(q, a.shape[:2], torch.int64)
    want_torch = torch.ops.dsrb.quadrant_index_torch(a, x, H, W)
    want_oracle = reference.quadrant_index(a, x, H, W)
    assert torch.equal(q, want_torch), (q, want_torch)
    assert torch.equal(q, want_oracle), (q, want_oracle)
    return q


# (B, C, H, W): odd maps (7x7, 5x6 uneven halves), a single row or column, a single position, C odd, several
# class blocks (C = 200).
QI_SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (3, 20, 5, 6), (1, 3, 1, 9), (2, 5, 9, 1), (2, 20, 4, 4), (1, 200, 7, 7)]


@pytest.mark.parametrize("shape", QI_SHAPES, ids=str)
@pytest.mark.parametrize("ties", [True, False])
def test_quadrant_index_float32(shape, ties):
    qi_compare(*qi_inputs(*shape, torch.float32, ties=ties), *shape[2:])


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (3, 20, 5, 6)], ids=str)
def test_quadrant_index_float64(shape):
    qi_compare(*qi_inputs(*shape, torch.float64, ties=True), *shape[2:])
    qi_compare(*qi_inputs(*shape, torch.float64, ties=False), *shape[2:])


def test_quadrant_index_ties_take_the_first_index():
    """A constant map ties everywhere: row 0, column 0, quadrant 0; a peak tied across the halves stays first."""
    H, W = 4, 6
    a = torch.ones(1, 3, H * W, device=DEVICE)
    x = torch.zeros(1, H * W, device=DEVICE)
    G = x.view(H, W)
    G[1, 4] = 5.0  # class 0 of the view below: peak in the top-right quadrant ...
    G[3, 1] = 5.0  # ... tied with a bottom-left peak: row argmax = 1 (top), column argmax = 1 (left)
    q = qi_compare(a, x, H, W)
    assert q.tolist() == [[0, 0, 0]]
    x2 = torch.zeros(1, H * W, device=DEVICE)
    x2.view(H, W)[3, 5] = -1.0  # all maxima 0 except one row / column
    a2 = torch.ones(1, 2, H * W, device=DEVICE)
    assert qi_compare(a2, x2, H, W).tolist() == [[0, 0]]
    x3 = torch.full((1, H * W), -1.0, device=DEVICE)
    x3.view(H, W)[2:, 3:] = 0.0  # the maximum only in the bottom-right quadrant: q = 3
    assert qi_compare(a2, x3, H, W).tolist() == [[3, 3]]


def test_quadrant_index_noncontiguous():
    a, x = qi_inputs(2, 20, 7, 7, torch.float32)
    qi_compare(noncontiguous(a), noncontiguous(x), 7, 7)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # (B, C, N) view of a (B, N, C) buffer
    qi_compare(a_t, x, 7, 7)


@pytest.mark.parametrize("B, C, H, W", [(4, 50, 7, 7), (3, 40, 5, 6), (2, 30, 1, 9), (2, 30, 9, 1), (2, 20, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quadrant_index_special_values(B, C, H, W, dtype):
    """The torch.amax / torch.argmax rules on special scores, as the other backends (test_ext_backends): a NaN (either
    sign, any payload) is the maximum and the first NaN wins, -0 ties with +0, +-inf order as numbers. x_sum is an
    integer in [-2, 2], so every product is exact in bfloat16 too: the interpreter's truncating rounding (see
    test_prototype_bank_update_rounds_as_the_torch_backend) cannot show, and bfloat16 runs on the CPU as well."""
    from test_ext_backends import quadrant_special_inputs

    a, x = (t.to(DEVICE) for t in quadrant_special_inputs(B, C, H, W, dtype))
    qi_compare(a, x, H, W)


def test_quadrant_index_empty(monkeypatch):
    monkeypatch.setattr(QI, "_quadrant_index_kernel", _NoLaunch())
    a, x = qi_inputs(0, 4, 7, 7, torch.float32)
    q = QI.quadrant_index(a, x, 7, 7)
    assert q.shape == (0, 4) and q.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------------
# prototype_bank_update


def bu_batch(B, C, D, dtype, g, t_dtype=None):
    S = _randn((B, C, D), g, dtype)
    T = torch.randint(-1, 2, (B, C), generator=g).to(device=DEVICE, dtype=t_dtype or dtype)
    quadrant = torch.randint(0, 4, (B, C), generator=g).to(DEVICE)
    return S, T, quadrant


def bu_compare(sums, counts, S, T, quadrant, cap, dtype):
    before = (sums.clone(), counts.clone(), S.clone(), T.clone(), quadrant.clone())
    new_sums, new_counts = BU.prototype_bank_update(sums, counts, S, T, quadrant, cap)
    for x, y in zip(before, (sums, counts, S, T, quadrant)):
        assert torch.equal(x, y), "an input was modified"
    _check_out(new_sums, sums.shape, sums.dtype)
    _check_out(new_counts, counts.shape, torch.int64)
    t_sums, t_counts = torch.ops.dsrb.prototype_bank_update_torch(sums, counts, S, T, quadrant, cap)
    r_sums, r_counts = reference.prototype_bank_update(sums, counts, S, T, quadrant, cap)
    assert torch.equal(new_counts, t_counts) and torch.equal(new_counts, r_counts)
    assert_close(new_sums, t_sums, dtype=dtype, what="torch backend sums")
    assert_close(new_sums, r_sums, dtype=dtype, what="oracle sums")
    return new_sums, new_counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C, D, cap", [(1, 7, 2), (3, 33, 3), (20, 33, 2), (3, 200, 1)])
def test_prototype_bank_update_cap_across_batches(C, D, cap, dtype):
    """Chained over several batches: buckets fill, reach the cap mid-batch, then stay full."""
    g = _gen(7)
    sums = torch.zeros(C, 4, D, dtype=dtype, device=DEVICE)
    counts = torch.zeros(C, 4, dtype=torch.int64, device=DEVICE)
    for B in (5, 1, 6, 4):
        sums, counts = bu_compare(sums, counts, *bu_batch(B, C, D, dtype, g), cap, dtype)
    assert int(counts.max()) == cap  # the cap was reached and never passed


def test_prototype_bank_update_cap_zero_and_large():
    g = _gen(8)
    sums = _randn((3, 4, 7), g, torch.float32)
    counts = torch.randint(0, 3, (3, 4), generator=g).to(DEVICE)
    batch = bu_batch(6, 3, 7, torch.float32, g)
    new_sums, new_counts = bu_compare(sums, counts, *batch, 0, torch.float32)
    assert torch.equal(new_sums, sums) and torch.equal(new_counts, counts)
    bu_compare(sums, counts, *batch, 10**6, torch.float32)


@pytest.mark.parametrize("t_dtype", [torch.int64, torch.bool])
def test_prototype_bank_update_target_dtypes(t_dtype):
    g = _gen(9)
    sums = _randn((3, 4, 7), g, torch.float32)
    counts = torch.zeros(3, 4, dtype=torch.int64, device=DEVICE)
    S, T, quadrant = bu_batch(5, 3, 7, torch.float32, g, t_dtype=torch.int64)
    if t_dtype == torch.bool:
        T = T == 1
    bu_compare(sums, counts, S, T.to(t_dtype), quadrant, 2, torch.float32)


@pytest.mark.parametrize("sums_dtype, s_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                  (torch.float32, torch.float64), (torch.float16, torch.float16),
                                                  (torch.float16, torch.float64)])
def test_prototype_bank_update_rounds_as_the_torch_backend(sums_dtype, s_dtype):
    """A bank converted to half precision, or S wider than it: the kernel rounded once, (sums + sum of S).to(dtype),
    with S unrounded, where the contract rounds S to the bank's dtype and the batch sum before adding (1 ulp apart in
    81 of 192 bf16 entries): the bank then differed by backend. Now equal to the torch backend, bit for bit."""
    if INTERPRETED and sums_dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter rounds float32 to bfloat16 by truncation, a GPU to nearest: bit equality "
                    "with torch in bfloat16 is a GPU check")
    g = _gen(12)
    sums = _randn((3, 4, 16), g, torch.float32).to(sums_dtype) * 8
    counts = torch.zeros(3, 4, dtype=torch.int64, device=DEVICE)
    S, T, quadrant = bu_batch(6, 3, 16, torch.float32, g)
    S = (S * 3).to(s_dtype)
    T = torch.ones_like(T)
    if s_dtype == torch.float64:  # alone in its bucket, 1 + 2^-11 + 2^-40: float16 1 + 2^-10 directly, 1 through
        S[0, 0, 0], T[1:, 0], sums[0] = 1 + 2 ** -11 + 2 ** -40, 0, 0  # float32 (a tie, to even), as torch does
    new_sums, new_counts = BU.prototype_bank_update(sums, counts, S, T, quadrant, 100)
    t_sums, t_counts = torch.ops.dsrb.prototype_bank_update_torch(sums, counts, S, T, quadrant, 100)
    assert new_sums.dtype == sums_dtype and torch.equal(new_counts, t_counts)
    assert torch.equal(new_sums, t_sums), (new_sums - t_sums).abs().max()


def test_prototype_bank_update_noncontiguous():
    g = _gen(10)
    sums = _randn((20, 4, 33), g, torch.float32)
    counts = torch.randint(0, 2, (20, 4), generator=g).to(DEVICE)
    S, T, quadrant = bu_batch(6, 20, 33, torch.float32, g)
    args = [noncontiguous(t) for t in (sums, counts, S, T, quadrant)]
    assert not any(t.is_contiguous() for t in args)
    bu_compare(*args, 3, torch.float32)


def test_prototype_bank_update_empty_batch(monkeypatch):
    monkeypatch.setattr(BU, "_prototype_bank_update_kernel", _NoLaunch())
    g = _gen(11)
    sums = _randn((3, 4, 7), g, torch.float32)
    counts = torch.randint(0, 3, (3, 4), generator=g).to(DEVICE)
    S, T, quadrant = bu_batch(0, 3, 7, torch.float32, g)
    new_sums, new_counts = BU.prototype_bank_update(sums, counts, S, T, quadrant, 2)
    assert torch.equal(new_sums, sums) and torch.equal(new_counts, counts)
    assert new_sums.data_ptr() != sums.data_ptr() and new_counts.data_ptr() != counts.data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# determinism


def test_deterministic():
    """No atomics: two runs of every launcher give bitwise-equal results (repeated partners, bank gradient on)."""
    ib_in, ib_g = ib_inputs(7, 20, 33, torch.float32, seed=12, partner="repeat")
    pb_in, pb_g = pb_inputs(6, 20, 33, torch.float32, seed=12)
    a, x = qi_inputs(2, 20, 7, 7, torch.float32, seed=12)
    g = _gen(12)
    sums = _randn((20, 4, 33), g, torch.float32)
    counts = torch.zeros(20, 4, dtype=torch.int64, device=DEVICE)
    batch = bu_batch(6, 20, 33, torch.float32, g)

    def run_all():
        return (
            *IB.instance_blend_forward(*ib_in),
            *IB.instance_blend_backward(*ib_g, *ib_in, False),
            *PB.prototype_blend_forward(*pb_in),
            *PB.prototype_blend_backward(*pb_g, pb_in[0], *pb_in[2:], False, True),
            QI.quadrant_index(a, x, 7, 7),
            *BU.prototype_bank_update(sums, counts, *batch, 3),
        )

    for t1, t2 in zip(run_all(), run_all()):
        assert torch.equal(t1, t2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """fp16 / bf16 inputs, fp32 math: against the torch backend and the float64 oracles with the table's tolerance.
    COCO sizes on a GPU; a smaller problem under the interpreter, which skips bf16 quadrant_index: it rounds fp32 to
    bf16 otherwise than a GPU does, and the argmax over the rounded products is exactly what that changes."""
    B, C, D, H = (3, 20, 33, 5) if INTERPRETED else (8, 80, 1024, 7)
    for detach_target in (False, True):
        ib_compare(*ib_inputs(B, C, D, dtype, partner="perm"), detach_target, dtype)
        pb_compare(*pb_inputs(B, C, D, dtype), detach_target, not detach_target, dtype)
    if not (INTERPRETED and dtype == torch.bfloat16):
        qi_compare(*qi_inputs(B, C, H, H, dtype, ties=True), H, H)
        qi_compare(*qi_inputs(B, C, H, H, dtype, ties=False), H, H)
    g = _gen(13)
    sums = torch.zeros(C, 4, D, dtype=dtype, device=DEVICE)
    counts = torch.zeros(C, 4, dtype=torch.int64, device=DEVICE)
    for _ in range(3):
        sums, counts = bu_compare(sums, counts, *bu_batch(B, C, D, dtype, g), 5, dtype)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: a COCO-sized problem.


@gpu_only
def test_coco_shape_gpu():
    """COCO sizes (B 8, C 80, D 1024) in float32, repeated partners and the bank gradient on."""
    for detach_target in (False, True):
        ib_compare(*ib_inputs(8, 80, 1024, torch.float32, partner="repeat"), detach_target, torch.float32)
        pb_compare(*pb_inputs(8, 80, 1024, torch.float32), detach_target, True, torch.float32)
