"""The C++ extension's backends, `cpu` (here) and `cuda` (on a GPU host), against the oracle and the torch backend.

Every op: outputs and every gradient against dsrb.reference in float64 (rounding-level tolerance) and in lower
precision (the tolerance table), odd shapes, B = 0/1, non-contiguous inputs, float64 gradcheck, opcheck,
torch.compile(fullgraph=True) equality, determinism, and errors that name the argument. The module skips where the
extension is not available (DSRB_REQUIRE_EXT=1, as in CI, turns that into an import error instead).
"""

import pytest
import torch

import dsrb.ops as ops
from dsrb import _ext, reference
from helpers import (NORM_TOLERANCES, TOLERANCES, assert_close, assert_within_baseline, backend_param,
                     check_blends_ignore_what_they_leave_alone, device_of, dsrb_training_outputs, noncontiguous,
                     requires_cuda_backend, tanh_extreme_inputs)

EXT = _ext.load()
pytestmark = [
    pytest.mark.skipif(not EXT.loaded, reason=f"the C++ extension is not available: {EXT.reason}"),
    pytest.mark.usefixtures("uninitialized_memory_is_nan"),
]
# cuda skips, with the reason, where there is no GPU, no CUDA kernels, or kernels this GPU or driver cannot run.
BACKENDS = [backend_param("cpu"), backend_param("cuda")]
LOW = [torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)


_device = device_of


def randn(*shape, gen, dtype=torch.float64, device="cpu"):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def grads(outputs, inputs, seed=1, rounding=None):
    """Gradients of a random weighting of the float outputs. The weights are the same for every backend: rounded to
    ``rounding`` (the dtype under test) when the outputs are the fp64 oracle's."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * randn(*o.shape, gen=g, device=o.device).to(rounding or o.dtype).to(o.dtype)).sum()
               for o in outputs if o.is_floating_point())
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))


def compare(got, want, dtype, names, baseline=None, baseline_dtypes=HALF):
    """Each of ``got`` against the fp64 oracle ``want``: within the table's tolerance, or, for ``baseline_dtypes``
    (default half precision) with a ``baseline`` (the torch backend in the same dtype), no further from the oracle
    than twice the baseline's error (flash-attention's criterion: rounding of saved half-precision outputs such as
    ``a``, or fp32 sums over hundreds of terms, make large reductions inexact for every backend)."""
    for i, (name, o, r) in enumerate(zip(names, got, want)):
        o, r = o.detach().cpu(), r.detach().cpu()
        if baseline is None or dtype not in baseline_dtypes:
            assert_close(o, r, dtype=dtype, what=name)
            continue
        assert_within_baseline(o, r, baseline[i], dtype=dtype, what=name)


# ---- semantic_attention ------------------------------------------------------------------------------------------

# (B, N, C, D, I); (2, 49, 20, 1, 200): the cuda kernel's backward splits its rows into more than one group on a
# 132-SM GPU, and at N = 49 its attention is flat enough in bf16/fp16 that a kernel dropping the last position fails
# (it passes at (1, 49, 3, ...), whose attention is sharply peaked); the last three: an empty batch, D = 0 (a still
# written) and I = 0 (uniform attention).
SA_SHAPES = [(1, 49, 3, 33, 17), (2, 49, 20, 1, 200), (2, 13, 20, 16, 8), (3, 7, 1, 5, 40), (2, 4, 80, 9, 130),
             (2, 9, 200, 7, 12), (0, 5, 4, 3, 2), (2, 5, 3, 0, 4), (2, 5, 3, 4, 0)]  # C = 200: VG-200


def sa_inputs(B, N, C, D, I, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [randn(*s, gen=g, dtype=dtype, device=device).requires_grad_() for s in ((B, N, D), (B, N, I), (C, I), (I,))]


def sa_oracle(inputs):
    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    out = reference.semantic_attention(*leaves)
    return list(out) + grads(out, leaves, rounding=inputs[0].dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64] + LOW, ids=str)
def test_semantic_attention_matches_oracle(backend, shape, dtype):
    inputs = sa_inputs(*shape, dtype, _device(backend))
    out = ops.semantic_attention(*inputs, backend=backend)
    assert all(o.dtype == dtype and o.is_contiguous() for o in out)
    base = ops.semantic_attention(*inputs, backend="torch")
    compare(list(out) + grads(out, inputs), sa_oracle(inputs), dtype, ["S", "a", "grad x", "grad u", "grad e", "grad v"],
            baseline=list(base) + grads(base, inputs))


@pytest.mark.parametrize("backend", [backend_param("cpu")])
@pytest.mark.parametrize("threads", [1, 2])
def test_semantic_attention_cpu_at_one_and_two_threads(backend, threads):
    """The CPU backward gives each thread a chunk of rows, whose grad_v sums over the chunk's rows and classes: at one
    thread that was one float32 sum of B N C terms, 3.7e-5 off the oracle at the VG shape (the table allows 1e-5)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = sa_inputs(2, 9, 200, 7, 12, torch.float32, "cpu")
        out = ops.semantic_attention(*inputs, backend=backend)
        got = list(out) + grads(out, inputs)
    finally:
        torch.set_num_threads(before)
    compare(got, sa_oracle(inputs), torch.float32, ["S", "a", "grad x", "grad u", "grad e", "grad v"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_semantic_attention_noncontiguous_and_deterministic(backend):
    inputs = [noncontiguous(t) for t in sa_inputs(2, 49, 20, 33, 17, torch.float32, _device(backend))]
    first = list(ops.semantic_attention(*inputs, backend=backend))
    first += grads(first, inputs)
    second = list(ops.semantic_attention(*inputs, backend=backend))
    second += grads(second, inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    compare(first, sa_oracle(inputs), torch.float32, ["S", "a", "grad x", "grad u", "grad e", "grad v"])


def test_semantic_attention_cpu_tanh_at_extremes():
    """The CPU kernel's own tanh (tiny, saturated, infinite, NaN arguments) against torch.tanh, through the op: at
    position 0 the score is tanh(w), at position 1 it is 0, and x is one-hot per position, so S = a."""
    inf, nan = float("inf"), float("nan")
    w = torch.tensor([0.0, 1e-8, -1e-3, 0.3, -0.7, 2.5, -8.9, 9.5, 40.0, -1e30, inf, -inf, nan])
    u = torch.stack([w, torch.zeros_like(w)], 1)[..., None].requires_grad_()  # (B, 2, 1)
    x = torch.eye(2).expand(w.numel(), 2, 2).contiguous()
    e, v = torch.ones(1, 1), torch.ones(1)
    results = []
    for backend in ("cpu", "torch"):
        S, a = ops.semantic_attention(x, u, e, v, backend=backend)
        results.append([S, a] + grads([S], [u]))
    for got, want in zip(*results):
        assert_close(got, want, equal_nan=True)
    assert results[0][1][:-1].isfinite().all() and results[0][1][-1].isnan().all()


@pytest.mark.parametrize("scale", [1e-5, 1e-3, 0.1])
def test_semantic_attention_cpu_tanh_sums_are_accurate_for_small_arguments(scale):
    """grad v sums tanh(u e) over rows and classes: with the CPU kernel's tanh accurate to a few ulp relative (not
    1e-7 absolute, which is 1e-2 relative at |u e| = 1e-5), it stays within fp32 rounding of the fp64 oracle."""
    g = torch.Generator().manual_seed(0)
    x, u, e, v = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((2, 6, 4), (2, 6, 16), (3, 16),
                                                                                      (16,)))
    u = u * scale
    weights = torch.arange(6.0, dtype=torch.float64)

    def grad_v(fn, dtype):
        vv = v.to(dtype).requires_grad_()
        S, a = fn(x.to(dtype), u.to(dtype), e.to(dtype), vv)
        return torch.autograd.grad(S.sum() + (a * weights.to(dtype)).sum(), vv)[0].double()

    truth = grad_v(reference.semantic_attention, torch.float64)
    got = grad_v(lambda *t: ops.semantic_attention(*t, backend="cpu"), torch.float32)
    assert float((got - truth).norm() / truth.norm()) < NORM_TOLERANCES[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_semantic_attention_saturated_tanh_gradients(backend):
    """Where tanh(u e) rounds to +-1, 1 - tanh^2 is 0, as torch computes it, so a huge u or e adds no gradient: the
    cpu kernel's tanh once stopped at tanh(9) = 1 - 2^-24, and u = 1e30 gave grad e = 1e23 instead of 0."""
    inputs = tanh_extreme_inputs(device=_device(backend))
    got, want = (ops.semantic_attention(*inputs, backend=b) for b in (backend, "torch"))
    for g, w in zip(list(got) + grads(got, inputs[1:3]), list(want) + grads(want, inputs[1:3])):
        assert_close(g, w, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_semantic_attention_gradcheck(backend):
    inputs = sa_inputs(2, 5, 3, 4, 6, torch.float64, _device(backend))
    assert torch.autograd.gradcheck(lambda *t: ops.semantic_attention(*t, backend=backend), inputs)


@requires_cuda_backend()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_semantic_attention_cuda_at_the_coco_shape(dtype):
    """The cuda kernels on the GPU at the benchmarks' COCO shape (B 8, N 49, C 80, D 1024, I 512), whose launch plans
    (k split forward, one backward row group per row tile) test_cuda_emulated.py otherwise checks only under the host
    emulator: outputs and every gradient against the fp64 oracle. The gradients reach 300 and sum hundreds of terms,
    so in fp32 too the criterion is twice the torch backend's error in the same dtype (or the table's rtol of the
    largest magnitude), as in the emulated test."""
    inputs = sa_inputs(8, 49, 80, 1024, 512, dtype, "cuda")
    out = ops.semantic_attention(*inputs, backend="cuda")
    assert all(o.dtype == dtype and o.is_contiguous() and o.is_cuda for o in out)
    base = ops.semantic_attention(*inputs, backend="torch")
    compare(list(out) + grads(out, inputs), sa_oracle(inputs), dtype,
            ["S", "a", "grad x", "grad u", "grad e", "grad v"],
            baseline=list(base) + grads(base, inputs), baseline_dtypes=(torch.float32, torch.bfloat16))


# ---- blends --------------------------------------------------------------------------------------------------------

BLEND_SHAPES = [(1, 1, 3), (5, 20, 33), (8, 80, 9), (3, 200, 5), (3, 7, 1), (0, 4, 5), (2, 3, 0)]  # (B, C, D)


def blend_inputs(B, C, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = randn(B, C, D, gen=g, dtype=dtype, device=device).requires_grad_()
    T = torch.randint(-1, 2, (B, C), generator=g).to(device=device, dtype=dtype)
    coef = torch.tensor(0.3, dtype=dtype, device=device, requires_grad=True)
    bank = randn(C, 4, D, gen=g, dtype=dtype, device=device).requires_grad_()
    quadrant = torch.randint(0, 4, (B, C), generator=g).to(device)
    shift = torch.randint(1, 4, (B, C), generator=g).to(device)
    select = (torch.rand(B, C, generator=g) < 0.5).to(device)
    partner = torch.randint(0, max(B, 1), (B,), generator=g).to(device)  # repeats and self-pairs
    return S, T, coef, bank, quadrant, shift, select, partner


def _leaf64(t):
    return t.detach().cpu().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", BLEND_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("detach_target", [False, True])
def test_instance_blend_matches_oracle(backend, shape, dtype, detach_target):
    S, T, alpha, _, _, _, _, partner = blend_inputs(*shape, dtype, _device(backend))
    for p in (partner, None):
        out = ops.instance_blend(S, T, alpha, p, detach_target=detach_target, backend=backend)
        got = list(out) + grads(out, [S, alpha])
        S64, a64 = _leaf64(S), _leaf64(alpha)
        ref = reference.instance_blend(S64, T.cpu().double(), a64, None if p is None else p.cpu(),
                                       detach_target=detach_target)
        compare(got, list(ref) + grads(ref, [S64, a64], rounding=dtype), dtype, ["S1", "T1", "grad S", "grad alpha"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", BLEND_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("detach_target", [False, True])
def test_prototype_blend_matches_oracle(backend, shape, dtype, detach_target):
    S, T, beta, bank, quadrant, shift, select, _ = blend_inputs(*shape, dtype, _device(backend))
    out = ops.prototype_blend(S, T, beta, bank, quadrant, shift, select, detach_target=detach_target, backend=backend)
    got = list(out) + grads(out, [S, beta, bank])
    S64, b64, k64 = _leaf64(S), _leaf64(beta), _leaf64(bank)
    ref = reference.prototype_blend(S64, T.cpu().double(), b64, k64, quadrant.cpu(), shift.cpu(), select.cpu(),
                                    detach_target=detach_target)
    compare(got, list(ref) + grads(ref, [S64, b64, k64], rounding=dtype), dtype,
            ["S2", "T2", "grad S", "grad beta", "grad bank"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_blends_noncontiguous_deterministic_and_bank_grad_flag(backend):
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(6, 20, 33, torch.float32, _device(backend))
    S_nc, bank_nc = noncontiguous(S), noncontiguous(bank)
    for _ in range(2):  # the same bits twice
        runs = []
        for _ in range(2):
            out = list(ops.instance_blend(S_nc, T, coef, partner, backend=backend))
            out += list(ops.prototype_blend(S_nc, T, coef, bank_nc, quadrant, shift, select, backend=backend))
            runs.append(out + grads(out, [S_nc, coef, bank_nc]))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    want = list(ops.instance_blend(S, T, coef, partner, backend="torch"))
    want += list(ops.prototype_blend(S, T, coef, bank, quadrant, shift, select, backend="torch"))
    compare(runs[0], want + grads(want, [S, coef, bank]), torch.float32, ["S1", "T1", "S2", "T2", "gS", "gc", "gk"])
    # bank_grad=False (the model's bank is a buffer): zeros, the other gradients unchanged.
    fn = getattr(torch.ops.dsrb, f"prototype_blend_{backend}_backward")
    args = (torch.ones_like(S), torch.ones_like(T), S.detach(), coef.detach(), bank.detach(), quadrant, shift, select,
            False)
    with_bank, without = fn(*args, True), fn(*args, False)
    assert torch.equal(without[2], torch.zeros_like(bank)) and with_bank[2].abs().sum() > 0
    assert torch.equal(with_bank[0], without[0]) and torch.equal(with_bank[1], without[1])


def test_every_built_backend_has_cpp_autograd():
    """The Autograd kernels of csrc/autograd.h are registered for every backend the extension was built with (on a
    CPU machine with nvcc, the cuda ops too: registered, not run)."""
    for backend in EXT.backends:
        for op in ("semantic_attention", "instance_blend", "prototype_blend"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsrb::{op}_{backend}", "Autograd"), (op, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpp_autograd_one_output_and_frozen_inputs(backend):
    """The extension's autograd (C++, csrc/autograd.h): a loss on one output only (the other's gradient arrives as
    zeros) and inputs that do not require grad (the model's bank is a buffer) give the torch backend's gradients."""
    dev = _device(backend)
    x, u, e, v = sa_inputs(2, 13, 5, 16, 8, torch.float64, dev)
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(4, 5, 6, torch.float64, dev)
    bank.requires_grad_(False)
    cases = [
        (lambda b: ops.semantic_attention(x, u, e, v, backend=b), [x, u, e, v]),
        (lambda b: ops.instance_blend(S, T, coef, partner, backend=b), [S, coef]),
        (lambda b: ops.prototype_blend(S, T, coef, bank, quadrant, shift, select, backend=b), [S, coef]),
    ]
    for run, leaves in cases:
        for which in (0, 1):
            got, want = run(backend)[which], run("torch")[which]
            assert_close(got, want, dtype=torch.float64, what=f"output {which}")
            for i, (gg, gw) in enumerate(zip(grads([got], leaves), grads([want], leaves))):
                assert_close(gg, gw, dtype=torch.float64, what=f"gradient {i} from output {which}")
    out = ops.prototype_blend(S, T, coef, bank, quadrant, shift, select, backend=backend)
    out[0].sum().backward()
    assert bank.grad is None and S.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpp_autograd_double_backward_is_an_error(backend):
    """Gradients taken with create_graph=True are right (a gradient penalty elsewhere may need the graph), but
    differentiating them through the extension's backward raises: before, its kernels, invisible to autograd, gave a
    silent zero (d2/dalpha2 of instance_blend) or a partial second derivative (semantic_attention)."""
    dev = _device(backend)
    x, u, e, v = sa_inputs(2, 13, 5, 16, 8, torch.float64, dev)
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(4, 5, 6, torch.float64, dev)
    T[0], T[3] = 0, 1  # blended entries for the batch flip
    cases = [
        (lambda b: ops.semantic_attention(x, u, e, v, backend=b), [x, u, e, v]),
        (lambda b: ops.instance_blend(S, T, coef, partner, backend=b), [S, coef]),
        (lambda b: ops.prototype_blend(S, T, coef, bank, quadrant, shift, select, backend=b), [S, coef, bank]),
    ]
    for run, leaves in cases:
        loss = lambda b: sum((o * o).sum() for o in run(b))  # noqa: E731
        got = torch.autograd.grad(loss(backend), leaves, create_graph=True)
        want = torch.autograd.grad(loss("torch"), leaves)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, dtype=torch.float64, what=f"gradient {i}")
        with pytest.raises(RuntimeError, match="the extension's backward cannot be differentiated"):
            torch.autograd.grad(sum(g.sum() for g in got), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blends_ignore_what_they_leave_alone(backend, dtype):
    ib, pb = getattr(torch.ops.dsrb, f"instance_blend_{backend}"), getattr(torch.ops.dsrb, f"prototype_blend_{backend}")
    ib_bwd = getattr(torch.ops.dsrb, f"instance_blend_{backend}_backward")
    pb_bwd = getattr(torch.ops.dsrb, f"prototype_blend_{backend}_backward")
    check_blends_ignore_what_they_leave_alone(
        lambda S, T, a, p: ib(S, T, a, p, False), lambda gS1, gT1, S, T, a, p: ib_bwd(gS1, gT1, S, T, a, p, False),
        lambda S, T, b, k, q, h, e: pb(S, T, b, k, q, h, e, False),
        lambda gS2, gT2, S, b, k, q, h, e: pb_bwd(gS2, gT2, S, b, k, q, h, e, False, True),
        dtype=dtype, device=_device(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_blend_gradcheck(backend):
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(3, 5, 4, torch.float64, _device(backend))
    T[0], T[2] = 0, 1  # some blended entries for the batch flip
    assert torch.autograd.gradcheck(lambda s, a: ops.instance_blend(s, T, a, partner, backend=backend), (S, coef))
    assert torch.autograd.gradcheck(
        lambda s, b, k: ops.prototype_blend(s, T, b, k, quadrant, shift, select, backend=backend), (S, coef, bank))


# ---- quadrant index and bank update -------------------------------------------------------------------------------

# The cpu kernel takes 4 maps at a time (csrc/cpu/quadrant_index.cpp): one map, a partial last block, blocks that
# straddle two images (C not a multiple of 4) and whole blocks.
QUADRANT_SHAPES = [(2, 3, 7, 7), (1, 20, 5, 6), (3, 2, 1, 1), (2, 4, 3, 1), (1, 80, 14, 14), (2, 200, 3, 4),
                   (1, 1, 2, 3), (3, 7, 4, 5)]


def quadrant_inputs(B, C, H, W, dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(B, C, H * W, generator=g), -1).to(dtype)
    x_sum = torch.randn(B, H * W, generator=g).to(dtype)
    a[0, 0] = 1.0 / (H * W)  # ties: a constant row, then the first maximum wins
    x_sum[0] = x_sum[0].abs().max()
    return a, x_sum


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, C, H, W", QUADRANT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_quadrant_index_equals_oracle(backend, B, C, H, W, dtype):
    a, x_sum = quadrant_inputs(B, C, H, W, dtype)
    dev = _device(backend)
    got = ops.quadrant_index(a.to(dev), x_sum.to(dev), H, W, backend=backend)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), reference.quadrant_index(a, x_sum, H, W))


QUADRANT_SPECIAL_SHAPES = [(4, 50, 7, 7), (3, 40, 5, 6), (2, 30, 1, 9), (2, 30, 9, 1), (2, 20, 1, 1)]


def quadrant_special_inputs(B, C, H, W, dtype):
    """(a, x_sum) with special scores: each (b, c) map is of one kind, plain with dense ties, signed zeros only,
    with NaNs (either sign, any payload), or with infinities of both signs."""
    g = torch.Generator().manual_seed(1)
    N = H * W
    a = torch.softmax(torch.randn(B, C, N, generator=g), -1)
    x_sum = torch.randint(-2, 3, (B, N), generator=g).float()  # few distinct values: ties everywhere
    kind = torch.randint(0, 4, (B, C, 1), generator=g).expand(B, C, N)
    pick = torch.rand(B, C, N, generator=g)
    # signed zeros only: -0 * x (x > 0), +0 * x (x < 0) and -0 * 0 give -0; a few a > 0 at x == 0 give +0
    x = x_sum[:, None, :].expand(B, C, N)
    zeros = torch.where(x > 0, -0.0, torch.where(x < 0, 0.0, torch.where(pick < 0.3, a, -0.0)))
    a = torch.where(kind == 1, zeros, a)
    a = torch.where((kind == 2) & (pick < 0.04), float("nan"), a)
    a = torch.where((kind == 2) & (pick >= 0.04) & (pick < 0.08), -float("nan"), a)
    a = torch.where((kind == 3) & (pick < 0.05), float("inf"), a)
    a = torch.where((kind == 3) & (pick >= 0.05) & (pick < 0.1), -float("inf"), a)
    a, x_sum = a.to(dtype), x_sum.to(dtype)
    if dtype in (torch.float32, torch.float64):  # NaNs with other payloads
        bits = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
        payload = a.view(bits) | torch.randint(1, 4, (B, C, N), generator=g).to(bits)
        a = torch.where(a.isnan(), payload.view(dtype), a)
    return a, x_sum


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, C, H, W", QUADRANT_SPECIAL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quadrant_index_special_values(backend, B, C, H, W, dtype):
    """The torch.amax / torch.argmax rules on special scores: a NaN (either sign, any payload) is the maximum and the
    first NaN wins, -0 ties with +0, +-inf order as numbers, first index on ties."""
    a, x_sum = quadrant_special_inputs(B, C, H, W, dtype)
    dev = _device(backend)
    got = ops.quadrant_index(a.to(dev), x_sum.to(dev), H, W, backend=backend).cpu()
    assert torch.equal(got, ops.quadrant_index(a, x_sum, H, W, backend="torch"))
    assert torch.equal(got, reference.quadrant_index(a, x_sum, H, W))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap", [0, 1, 2, 100])
def test_prototype_bank_update_equals_oracle(backend, cap):
    g = torch.Generator().manual_seed(0)
    B, C, D, dev = 9, 5, 7, _device(backend)
    S = torch.randn(B, C, D, generator=g)
    T = torch.randint(-1, 2, (B, C), generator=g).float()
    quadrant = torch.randint(0, 4, (B, C), generator=g)
    sums = torch.randn(C, 4, D, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 2, (C, 4), generator=g)
    before = sums.clone(), counts.clone()
    got = ops.prototype_bank_update(sums.to(dev), counts.to(dev), S.to(dev), T.to(dev), quadrant.to(dev), cap,
                                    backend=backend)
    want = reference.prototype_bank_update(sums, counts, S, T, quadrant, cap)
    assert torch.equal(got[1].cpu(), want[1]) and got[0].dtype == torch.float64
    assert_close(got[0].cpu(), want[0], dtype=torch.float64)  # float32 S added in float64
    assert torch.equal(sums, before[0]) and torch.equal(counts, before[1])  # inputs untouched


# The in-place bank update: the cpu backend's own kernel, and the copy of the functional result back (torch; cuda,
# which has no in-place kernel: see dsrb/ops/prototype_bank_update.py).
BANK_BACKENDS = [backend_param("cpu"), backend_param("torch"), backend_param("cuda")]


@pytest.mark.parametrize("backend", BANK_BACKENDS)
@pytest.mark.parametrize("sums_dtype, S_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float32),
                                                 (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("cap", [0, 2, 100])
def test_prototype_bank_update_in_place_equals_functional(backend, sums_dtype, S_dtype, cap):
    """prototype_bank_update_ writes what prototype_bank_update returns, bit for bit, batch after batch (the cap
    carried over); non-contiguous buckets take the copying path."""
    g = torch.Generator().manual_seed(4)
    C, D, dev = 7, 19, _device(backend)
    sums = torch.zeros(C, 4, D, dtype=sums_dtype, device=dev)
    counts = torch.zeros(C, 4, dtype=torch.int64, device=dev)
    strided_sums = torch.zeros(C, 4, 2 * D, dtype=sums_dtype, device=dev)[..., ::2]
    strided_counts = torch.zeros(4, C, dtype=torch.int64, device=dev).t()
    ref_sums, ref_counts = sums.clone(), counts.clone()
    for B in (5, 0, 9, 1):
        S = torch.randn(B, C, D, generator=g).to(device=dev, dtype=S_dtype)
        T = torch.randint(-1, 2, (B, C), generator=g).to(dev)
        quadrant = torch.randint(0, 4, (B, C), generator=g).to(dev)
        ref_sums, ref_counts = ops.prototype_bank_update(ref_sums, ref_counts, S, T, quadrant, cap, backend=backend)
        assert ops.prototype_bank_update_(sums, counts, S, T, quadrant, cap, backend=backend) is None
        ops.prototype_bank_update_(strided_sums, strided_counts, S, T, quadrant, cap, backend=backend)
        for got_sums, got_counts in ((sums, counts), (strided_sums, strided_counts)):
            assert torch.equal(got_counts, ref_counts)
            assert torch.equal(got_sums, ref_sums)


def test_prototype_bank_update_in_place_cpu_kernel():
    """The cpu in-place kernel: only the reached buckets are written; a bad quadrant or target anywhere raises before
    anything is written; non-contiguous buckets are refused; opcheck; torch.compile(fullgraph=True) of the op."""
    g = torch.Generator().manual_seed(5)
    B, C, D = 6, 5, 8
    S = torch.randn(B, C, D, generator=g)
    T = torch.randint(-1, 2, (B, C), generator=g).float()
    T[:, 1] = 0  # class 1 is never reached
    quadrant = torch.randint(0, 4, (B, C), generator=g)
    sums = torch.randn(C, 4, D, generator=g)
    sums[1] = -0.0
    counts = torch.randint(0, 3, (C, 4), generator=g)
    want_sums, want_counts = ops.prototype_bank_update(sums, counts, S, T, quadrant, 100, backend="cpu")
    got_sums, got_counts = sums.clone(), counts.clone()
    torch.ops.dsrb.prototype_bank_update_cpu_(got_sums, got_counts, S, T, quadrant, 100)
    assert torch.equal(got_sums, want_sums) and torch.equal(got_counts, want_counts)
    assert torch.equal(got_sums[1].view(torch.int32), sums[1].view(torch.int32))  # untouched: -0 stays -0
    bad = quadrant.clone()
    bad[-1, -1] = 4
    before = got_sums.clone(), got_counts.clone()
    bad_T = T.clone()
    bad_T[-1, -1] = 0.5
    for args, match in [((S, T, bad, 100), "argument 'quadrant'"), ((S, bad_T, quadrant, 100), "argument 'T'")]:
        with pytest.raises(ValueError, match=match):
            torch.ops.dsrb.prototype_bank_update_cpu_(got_sums, got_counts, *args)
        assert torch.equal(got_sums, before[0]) and torch.equal(got_counts, before[1])  # nothing written
    with pytest.raises(ValueError, match="argument 'sums': expected a contiguous"):
        torch.ops.dsrb.prototype_bank_update_cpu_(torch.zeros(C, 4, 2 * D)[..., ::2], got_counts, S, T, quadrant, 1)
    torch.library.opcheck(torch.ops.dsrb.prototype_bank_update_cpu_.default,
                          (got_sums, got_counts, S, T, quadrant, 2))
    compiled = torch.compile(lambda *args: ops.prototype_bank_update_(*args, 2, backend="cpu"), fullgraph=True)
    sums, counts = torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.int64)
    compiled(sums, counts, S, T, quadrant)
    want_sums, want_counts = ops.prototype_bank_update(torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.int64), S,
                                                       T, quadrant, 2, backend="cpu")
    assert torch.equal(sums, want_sums) and torch.equal(counts, want_counts)


def test_prototype_bank_update_in_place_cpu_kernel_is_safe_for_autograd():
    """Called directly through torch.ops, the cpu in-place kernel bumps the versions of sums and counts (a graph
    that saved them fails in backward; in inference mode too) and refuses a sums or counts that requires grad while
    grad mode is on."""
    B, C, D = 3, 2, 4
    S, T, quadrant = torch.randn(B, C, D), torch.ones(B, C), torch.zeros(B, C, dtype=torch.int64)
    sums, counts = torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.int64)
    versions = sums._version, counts._version
    w = torch.randn(C, 4, D, requires_grad=True)
    loss = (w * sums).sum()  # saves sums
    torch.ops.dsrb.prototype_bank_update_cpu_(sums, counts, S, T, quadrant, 100)
    assert (sums._version, counts._version) == (versions[0] + 1, versions[1] + 1)
    once = sums.clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.inference_mode():  # as torch's own in-place ops do on a normal tensor there
        torch.ops.dsrb.prototype_bank_update_cpu_(sums, counts, S, T, quadrant, 100)
    assert (sums._version, counts._version) == (versions[0] + 2, versions[1] + 2)
    leaf = torch.zeros(C, 4, D, requires_grad=True)
    with pytest.raises(ValueError, match="argument 'sums': expected a tensor that does not require grad"):
        torch.ops.dsrb.prototype_bank_update_cpu_(leaf, counts, S, T, quadrant, 100)
    assert not leaf.any()  # nothing written
    with torch.no_grad():  # as an optimizer updates a parameter
        torch.ops.dsrb.prototype_bank_update_cpu_(leaf, torch.zeros_like(counts), S, T, quadrant, 100)
    assert torch.equal(leaf.detach(), once)


@pytest.mark.parametrize("backend", BANK_BACKENDS)
def test_prototype_bank_update_in_place_targets_and_errors(backend):
    """T in any real dtype (the cpu kernel reads it as given, compared in its dtype as torch compares it); the errors
    of the functional op, worded the same, and nothing written."""
    g = torch.Generator().manual_seed(6)
    B, C, D, dev = 7, 4, 6, _device(backend)
    S = torch.randn(B, C, D, generator=g).to(dev)
    T = torch.randint(-1, 2, (B, C), generator=g).to(dev)
    quadrant = torch.randint(0, 4, (B, C), generator=g).to(dev)

    def bank():
        return torch.zeros(C, 4, D, device=dev), torch.zeros(C, 4, dtype=torch.int64, device=dev)

    want = ops.prototype_bank_update(*bank(), S, T, quadrant, 3, backend=backend)
    for dtype in [torch.int64, torch.int8, torch.int32, torch.float16, torch.float32, torch.float64]:
        sums, counts = bank()
        ops.prototype_bank_update_(sums, counts, S, T.to(dtype), quadrant, 3, backend=backend)
        assert torch.equal(sums, want[0]) and torch.equal(counts, want[1]), dtype
    positive = T == 1
    for mask in [positive, positive.to(torch.uint8)]:  # bool / uint8 targets: only 0 and 1
        sums, counts = bank()
        ops.prototype_bank_update_(sums, counts, S, mask, quadrant, 3, backend=backend)
        ref = ops.prototype_bank_update(*bank(), S, mask.long(), quadrant, 3, backend=backend)
        assert torch.equal(sums, ref[0]) and torch.equal(counts, ref[1])
    sums, counts = bank()
    cases = [((S, T * 3, quadrant), ValueError, "argument 'T': expected values in \\{-1, 0, 1\\}, found 3$"),
             ((S, T.float() * 0.5, quadrant), ValueError, "argument 'T'.*found 0.5$"),
             ((S, T.float().masked_fill(T == 0, float("nan")), quadrant), ValueError, "argument 'T'.*found nan$"),
             ((S, T, quadrant + 4), ValueError, "argument 'quadrant': expected values in \\[0, 3\\], found range"),
             ((S[:, :2], T, quadrant), ValueError, "argument 'sums'.*shape"),
             ((S, T, quadrant.float()), TypeError, "argument 'quadrant'.*integer")]
    for args, error, match in cases:
        for fn in (ops.prototype_bank_update, ops.prototype_bank_update_):
            with pytest.raises(error, match=match):
                fn(sums, counts, *args, 3, backend=backend)
    assert not sums.any() and not counts.any()


@pytest.mark.parametrize("backend", BANK_BACKENDS)
def test_prototype_bank_update_in_place_is_an_in_place_op(backend):
    """What autograd expects of an in-place op: version counters bumped (a graph that saved sums fails loudly
    instead of using the new values), no update of a tensor that requires grad, and (the cpu kernel reads S, T and
    quadrant while it writes) no inputs sharing memory with sums or counts: refused by every backend, though the
    others write a copy back (they accepted an S aliasing sums, which the cpu backend refused)."""
    g = torch.Generator().manual_seed(8)
    B, C, D, dev = 4, 3, 5, _device(backend)
    S, T = torch.randn(B, C, D, generator=g).to(dev), torch.randint(-1, 2, (B, C), generator=g).to(dev)
    quadrant = torch.randint(0, 4, (B, C), generator=g).to(dev)
    w = torch.ones(C, 4, D, device=dev, requires_grad=True)
    sums = torch.rand(C, 4, D, generator=g).to(dev)
    counts = torch.zeros(C, 4, dtype=torch.int64, device=dev)
    loss = (w * sums).sum()  # saves sums for w's gradient
    ops.prototype_bank_update_(sums, counts, S, T, quadrant, 3, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="argument 'sums': expected a tensor that does not require grad"):
        ops.prototype_bank_update_(w, counts, S, T, quadrant, 3, backend=backend)
    bank = torch.zeros(B * C * D + C * 4 * D, device=dev)
    views = bank[:C * 4 * D].view(C, 4, D), bank[-B * C * D:].view(B, C, D)  # disjoint: allowed
    ops.prototype_bank_update_(views[0], counts.clone(), views[1], T, quadrant, 3, backend=backend)
    shared = torch.zeros(C * 4 * D, device=dev).view(C, 4, D)
    with pytest.raises(ValueError, match="argument 'sums': it shares memory with 'S', which the in-place update"):
        ops.prototype_bank_update_(shared, counts, shared.view(4, C, D)[:B], T, quadrant, 3, backend=backend)
    with pytest.raises(ValueError, match="argument 'sums': it shares memory with 'S'"):  # a strided view too
        ops.prototype_bank_update_(shared, counts, shared[:, 0].unsqueeze(0), T[:1], quadrant[:1], 3, backend=backend)
    with pytest.raises(ValueError, match="argument 'counts': it shares memory with 'quadrant'"):
        ops.prototype_bank_update_(sums, counts, S, T, counts.view(4, C)[:B], 3, backend=backend)
    fresh = torch.zeros(C, 4, dtype=torch.int64, device=dev)  # T of valid values (0), read from counts
    with pytest.raises(ValueError, match="argument 'counts': it shares memory with 'T'"):
        ops.prototype_bank_update_(sums, fresh, S, fresh.view(4, C)[:B], quadrant, 3, backend=backend)
    if backend == "cpu":
        raw = torch.zeros(C * 4 * D)  # called directly, past the Python check below
        with pytest.raises(ValueError, match="argument 'counts': it shares memory with 'sums'"):
            torch.ops.dsrb.prototype_bank_update_cpu_(raw.view(C, 4, D), raw.view(torch.int64)[:C * 4].view(C, 4),
                                                      S, T, quadrant, 3)
    # sums and counts in one buffer: each write corrupted the other (the cpu kernel's from several threads)
    buffer = torch.zeros(C * 4 * D, device=dev)
    before = buffer.clone()
    with pytest.raises(ValueError, match="argument 'counts': it shares memory with 'sums'"):
        ops.prototype_bank_update_(buffer.view(C, 4, D), buffer.view(torch.int64)[:C * 4].view(C, 4), S, T, quadrant,
                                   3, backend=backend)
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("sums_dtype, S_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float32),
                                                 (torch.float32, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=str)
def test_prototype_bank_update_cpu_rounding_order(sums_dtype, S_dtype):
    """The cpu kernel's exact arithmetic: a bucket's kept samples of the batch are summed from +0 in batch order in
    the opmath type of sums (S first rounded to sums' dtype), that sum rounded to sums' dtype and added to sums (two
    roundings in half precision, as the other backends); an untouched bucket is sums + 0. Signed zeros included
    (+0 + -0 == +0)."""
    g = torch.Generator().manual_seed(3)
    B, C, D, cap = 12, 6, 37, 5
    S = torch.randn(B, C, D, generator=g).to(S_dtype)
    S[:, :, :5] = -0.0
    T = torch.randint(-1, 2, (B, C), generator=g)
    T[:, 0] = 1  # class 0: more candidates than the cap allows
    quadrant = torch.randint(0, 4, (B, C), generator=g)
    sums = torch.randn(C, 4, D, generator=g).to(sums_dtype)
    sums[:, :, 3:9] = -0.0
    counts = torch.randint(0, 3, (C, 4), generator=g)
    got_sums, got_counts = ops.prototype_bank_update(sums, counts, S, T, quadrant, cap, backend="cpu")
    acc_dtype = torch.float64 if sums_dtype == torch.float64 else torch.float32
    want_sums, want_counts = sums.clone(), counts.clone()
    for c in range(C):
        acc = torch.zeros(4, D, dtype=acc_dtype)
        for b in range(B):
            q = int(quadrant[b, c])
            if T[b, c] == 1 and want_counts[c, q] < cap:
                acc[q] = acc[q] + S[b, c].to(sums_dtype).to(acc_dtype)
                want_counts[c, q] += 1
        want_sums[c] = (sums[c].to(acc_dtype) + acc.to(sums_dtype).to(acc_dtype)).to(sums_dtype)
    bits = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[sums_dtype]
    assert torch.equal(got_counts, want_counts)
    assert torch.equal(got_sums.view(bits), want_sums.view(bits))  # bitwise: the signs of zeros too


# ---- registration: schemas, opcheck, compile, errors --------------------------------------------------------------

OP_NAMES = ["semantic_attention", "semantic_attention_backward", "instance_blend", "instance_blend_backward",
            "prototype_blend", "prototype_blend_backward", "quadrant_index", "prototype_bank_update"]


def _op(name, backend):
    base, _, tail = name.partition("_backward")
    return getattr(torch.ops.dsrb, f"{base}_{backend}{'_backward' if _ else ''}").default


@pytest.mark.parametrize("name", OP_NAMES)
def test_schemas_equal_the_python_backends(name):
    for backend in EXT.backends:
        ours = _op(name, backend)._schema
        theirs = _op(name, "torch")._schema
        assert [(a.name, str(a.type)) for a in ours.arguments] == [(a.name, str(a.type)) for a in theirs.arguments]
        assert [str(r.type) for r in ours.returns] == [str(r.type) for r in theirs.returns]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = _device(backend)
    x, u, e, v = sa_inputs(2, 5, 3, 4, 6, torch.float32, dev)
    torch.library.opcheck(_op("semantic_attention", backend), (x, u, e, v))
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(3, 4, 5, torch.float32, dev)
    for detach in (False, True):
        torch.library.opcheck(_op("instance_blend", backend), (S, T, coef, partner, detach))
        torch.library.opcheck(_op("prototype_blend", backend), (S, T, coef, bank, quadrant, shift, select, detach))
    a = torch.softmax(torch.randn(3, 4, 6), -1).to(dev)
    torch.library.opcheck(_op("quadrant_index", backend), (a, torch.randn(3, 6, device=dev), 2, 3))
    torch.library.opcheck(_op("prototype_bank_update", backend),
                          (bank.detach(), torch.zeros(4, 4, dtype=torch.int64, device=dev), S.detach(), T, quadrant, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    dev = _device(backend)
    x, u, e, v = sa_inputs(2, 7, 5, 16, 8, torch.float32, dev)
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(2, 5, 16, torch.float32, dev)

    def head(x, u, e, v, coef, bank):
        S, a = ops.semantic_attention(x, u, e, v, backend=backend)
        S1, T1 = ops.instance_blend(S, T, coef, partner, backend=backend)
        # T1 detached: no backend differentiates T (T1's gradient to coef at the rows left alone was dropped)
        S2, T2 = ops.prototype_blend(S1, T1.detach(), coef, bank, quadrant, shift, select, backend=backend)
        return S2, T2, a

    inputs = [x, u, e, v, coef, bank]
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    got, want = compiled(*inputs), head(*inputs)
    compare(list(got) + grads(got, inputs), list(want) + grads(want, inputs), torch.float32,
            ["S2", "T2", "a", "gx", "gu", "ge", "gv", "gcoef", "gbank"])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: torch.ops.dsrb.semantic_attention_cpu(torch.ones(2, 3, 4), torch.ones(2, 4, 5), torch.ones(6, 5),
                                                       torch.ones(5)), "argument 'u': expected shape \\(2, 3, \\*\\)"),
        (lambda: torch.ops.dsrb.semantic_attention_cpu(torch.ones(2, 3, 4), torch.ones(2, 3, 5), torch.ones(6, 5),
                                                       torch.ones(5, dtype=torch.float64)), "argument 'v': expected dtype"),
        (lambda: torch.ops.dsrb.semantic_attention_cpu(torch.ones(2, 0, 4), torch.ones(2, 0, 5), torch.ones(6, 5),
                                                       torch.ones(5)), "argument 'x': expected at least one"),
        (lambda: torch.ops.dsrb.instance_blend_cpu(torch.ones(3, 2, 4), torch.zeros(3, 2), torch.tensor(0.5),
                                                   torch.tensor([0, 1, 3]), False), "argument 'partner'"),
        (lambda: torch.ops.dsrb.instance_blend_cpu(torch.ones(3, 2, 4), torch.zeros(3, 2), torch.ones(2),
                                                   torch.tensor([0, 1, 2]), False), "argument 'alpha'"),
        (lambda: torch.ops.dsrb.prototype_blend_cpu(torch.ones(1, 2, 4), torch.zeros(1, 2), torch.tensor(0.5),
                                                    torch.ones(2, 4, 4), torch.tensor([[0, 4]]), torch.ones(1, 2).long(),
                                                    torch.ones(1, 2, dtype=torch.bool), False), "argument 'quadrant'"),
        (lambda: torch.ops.dsrb.prototype_blend_cpu(torch.ones(1, 2, 4), torch.zeros(1, 2), torch.tensor(0.5),
                                                    torch.ones(2, 4, 4), torch.zeros(1, 2).long(), torch.zeros(1, 2).long(),
                                                    torch.ones(1, 2, dtype=torch.bool), False), "argument 'shift'"),
        (lambda: torch.ops.dsrb.prototype_blend_cpu(torch.ones(1, 2, 4), torch.zeros(1, 2), torch.tensor(0.5),
                                                    torch.ones(2, 3, 4), torch.zeros(1, 2).long(), torch.ones(1, 2).long(),
                                                    torch.ones(1, 2, dtype=torch.bool), False), "argument 'bank'"),
        (lambda: torch.ops.dsrb.quadrant_index_cpu(torch.ones(1, 2, 6), torch.ones(1, 6), 4, 2),
         "arguments 'height', 'width'"),
        (lambda: torch.ops.dsrb.quadrant_index_cpu(torch.ones(1, 2, 0), torch.ones(1, 0), 2**32, 2**32),
         "arguments 'height', 'width'"),  # 2**64 wraps around to N = 0 in int64
        (lambda: torch.ops.dsrb.prototype_bank_update_cpu(torch.zeros(2, 4, 3), torch.zeros(2, 4).long(),
                                                          torch.ones(1, 2, 3), torch.ones(1, 2), torch.tensor([[0, 9]]),
                                                          5), "argument 'quadrant'"),
        (lambda: torch.ops.dsrb.prototype_bank_update_cpu(torch.zeros(2, 4, 3), torch.zeros(2, 4).long(),
                                                          torch.ones(1, 2, 3), torch.ones(1, 2), torch.zeros(1, 2).long(),
                                                          -1), "argument 'cap'"),
    ],
)
def test_cpu_errors_name_the_argument(call, match):
    with pytest.raises(TypeError if "expected dtype" in match else ValueError, match=match):  # as in Python
        call()


# ---- the whole model on the extension's backend -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_dsrb_model_matches_torch_backend(backend):
    """Training forward and backward (both blends, prototype pass) with every op on the extension's backend."""
    dev = _device(backend)
    for o, r in zip(dsrb_training_outputs(backend, dev), dsrb_training_outputs("torch", dev)):
        assert_close(o, r)


def test_auto_picks_the_cpu_backend_on_cpu():
    impl = ops.select("semantic_attention", torch.device("cpu"), torch.float32)
    assert impl is ops.select("semantic_attention", torch.device("cpu"), torch.float32, "cpu")
    assert ops.reasons("instance_blend", torch.device("cpu"), torch.bfloat16)["cpu"] is None


def test_tolerance_table_covers_every_dtype_tested():
    assert set([torch.float64] + LOW) <= set(TOLERANCES)
