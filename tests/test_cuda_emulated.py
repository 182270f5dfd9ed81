"""The CUDA backend's kernels and glue (csrc/cuda/), run on the CPU by the host emulation of tests/cuda_emulator.py,
against the oracle: the cases of the `cuda` backend in test_ext_backends.py, so every CUDA line runs in CI although
no GPU is there. The ops are called as ``torch.ops.dsrb_emu.<op>_cuda`` (the real glue, built for CPU tensors) with
the launch plans of an H200 (132 SMs); their autograd is a small Python wrapper in cuda_emulator (on a GPU it is
csrc/autograd.h, tested through the `cpu` backend). Skips only where no CUDA toolkit headers exist; a build failure
is an error.

Out-of-bounds accesses: the same tests with the kernels built with AddressSanitizer (exceptions cannot be thrown
under the preloaded runtime, so the tests that expect one skip there: ``THROWS``):

    cd tests && LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 DSRB_EMU_SANITIZE=address \
        python -m pytest -p no:cacheprovider test_cuda_emulated.py
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import cuda_emulator
from dsrb import ops, reference
from helpers import (assert_close, check_blends_ignore_what_they_leave_alone,
                     check_half_blends_take_a_wider_coefficient, noncontiguous, tanh_extreme_inputs)
from test_ext_backends import (BLEND_SHAPES, LOW, QUADRANT_SHAPES, QUADRANT_SPECIAL_SHAPES, SA_SHAPES, _leaf64,
                               blend_inputs, compare, grads, quadrant_inputs, quadrant_special_inputs, sa_inputs,
                               sa_oracle)

pytestmark = [
    pytest.mark.skipif(cuda_emulator.toolkit_include() is None,
                       reason="no CUDA toolkit headers (nvcc not found) to build the emulated kernels"),
    pytest.mark.usefixtures("uninitialized_memory_is_nan"),
]
# A C++ throw aborts the process under the sanitizer run's preloaded runtime ("real___cxa_throw ... CHECK failed").
THROWS = pytest.mark.skipif(os.environ.get("DSRB_EMU_SANITIZE") == "address",
                            reason="expects a C++ exception, which the sanitizer run's preloaded runtime cannot throw")


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.load()


def semantic_attention(x, u, e, v):
    return cuda_emulator.SemanticAttention.apply(x, u, e, v)


def instance_blend(S, T, alpha, partner, detach_target=False):
    return cuda_emulator.InstanceBlend.apply(S, T, alpha, partner, detach_target)


def prototype_blend(S, T, beta, bank, quadrant, shift, select, detach_target=False):
    return cuda_emulator.PrototypeBlend.apply(S, T, beta, bank, quadrant, shift, select, detach_target)


# ---- the emulator itself ---------------------------------------------------------------------------------------------

def test_emulator_shares_block_memory_and_catches_a_missing_barrier(emu):
    want = torch.tensor([sum(b * 1000 + t for t in range(64)) for b in range(8)], dtype=torch.int32)
    assert torch.equal(emu.selftest("shared_sum"), want)
    # Without the barrier thread 0 reads before the others have written (threads run in a new order each round).
    assert not torch.equal(emu.selftest("shared_sum_no_barrier"), want)


def test_emulator_leaves_shared_memory_undefined_at_block_start(emu):
    # Each block writes only the even entries and sums all: the odd ones read the emulator's NaN fill in every block.
    assert torch.isnan(emu.selftest("shared_uninitialized")).all()


@pytest.mark.parametrize("name, match", [
    ("partial_warp_shuffle", "with 16 of 32 lanes present"),
    ("divergent_barrier", "divergent __syncthreads"),
    ("barrier_deadlock", "deadlock"),
    ("over_launch_bounds", r"launch of 64 threads per block, over the __launch_bounds__\(32\)"),
    ("misaligned_load", "__ldg of a 16-byte type from the misaligned address"),
])
@THROWS
def test_emulator_reports_what_a_gpu_leaves_undefined(emu, name, match):
    with pytest.raises(RuntimeError, match=match):
        emu.selftest(name)


def _libasan():
    """gcc's AddressSanitizer runtime, or None."""
    if shutil.which("gcc") is None:
        return None
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None  # a bare name when gcc has none


@pytest.mark.skipif(_libasan() is None, reason="no AddressSanitizer runtime (gcc -print-file-name=libasan.so)")
def test_address_sanitizer_catches_an_out_of_bounds_read(emu):
    """The sanitizer run is only worth its pass if it would abort on a bad access (in a child process: it aborts).
    The child sets up that run itself (an AddressSanitizer build of the emulator, cached), so every run checks it,
    not only the sanitizer pass of the module docstring."""
    code = "import cuda_emulator; cuda_emulator.load().selftest('read_past_end')"
    env = dict(os.environ, LD_PRELOAD=_libasan(), ASAN_OPTIONS="detect_leaks=0", DSRB_EMU_SANITIZE="address")
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), capture_output=True, text=True,
                         env=env, timeout=1200)
    assert run.returncode != 0 and "heap-buffer-overflow" in run.stderr, run.stderr[-2000:]


# ---- semantic_attention ------------------------------------------------------------------------------------------

SA_NAMES = ["S", "a", "grad x", "grad u", "grad e", "grad v"]
# SA_SHAPES, and one whose plans split k four ways forward and give each backward row group several row tiles.
EMU_SA_SHAPES = SA_SHAPES + [(2, 49, 20, 1, 200)]


@pytest.mark.parametrize("shape", EMU_SA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64] + LOW, ids=str)
def test_semantic_attention_matches_oracle(emu, shape, dtype):
    inputs = sa_inputs(*shape, dtype, "cpu")
    out = semantic_attention(*inputs)
    assert all(o.dtype == dtype and o.is_contiguous() for o in out)
    base = ops.semantic_attention(*inputs, backend="torch")
    compare(list(out) + grads(out, inputs), sa_oracle(inputs), dtype, SA_NAMES,
            baseline=list(base) + grads(base, inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_semantic_attention_at_the_coco_shape(emu, dtype):
    """The benchmarks' COCO shape (B 8, N 49, C 80, D 1024, I 512), so the launch plans of the GPU benchmark run
    (k split forward, one backward row group per row tile) are the ones tested. The gradients reach 300 and sum
    hundreds of terms, so in fp32 too the criterion is twice the torch backend's error (about 5e-4 for grad u, e
    and v; the `cpu` backend's is the same)."""
    inputs = sa_inputs(8, 49, 80, 1024, 512, dtype, "cpu")
    out = semantic_attention(*inputs)
    base = ops.semantic_attention(*inputs, backend="torch")
    compare(list(out) + grads(out, inputs), sa_oracle(inputs), dtype, SA_NAMES,
            baseline=list(base) + grads(base, inputs), baseline_dtypes=(torch.float32, torch.bfloat16))


def test_semantic_attention_noncontiguous_and_deterministic(emu):
    inputs = [noncontiguous(t) for t in sa_inputs(2, 49, 20, 33, 17, torch.float32, "cpu")]
    runs = []
    for _ in range(2):  # threads in another order each launch: the same bits
        out = list(semantic_attention(*inputs))
        runs.append(out + grads(out, inputs))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    compare(runs[0], sa_oracle(inputs), torch.float32, SA_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_semantic_attention_tanh_at_extremes(emu, dtype):
    """The kernels' tanh (exp2 / reciprocal form in fp32) on tiny, saturated, infinite and NaN arguments, through the
    op, against the torch backend: at position 0 the score is tanh(w), at position 1 it is 0, and x is one-hot per
    position, so S = a."""
    inf, nan = float("inf"), float("nan")
    w = torch.tensor([0.0, 1e-8, -1e-3, 0.3, -0.7, 2.5, -8.9, 9.5, 40.0, -1e30, inf, -inf, nan], dtype=dtype)
    u = torch.stack([w, torch.zeros_like(w)], 1)[..., None].requires_grad_()  # (B, 2, 1)
    x = torch.eye(2, dtype=dtype).expand(w.numel(), 2, 2).contiguous()
    e, v = torch.ones(1, 1, dtype=dtype), torch.ones(1, dtype=dtype)
    got = list(semantic_attention(x, u, e, v))
    want = list(ops.semantic_attention(x, u, e, v, backend="torch"))
    for g, r in zip(got + grads(got[:1], [u]), want + grads(want[:1], [u])):
        assert_close(g, r, equal_nan=True)
    assert got[1][:-1].isfinite().all() and got[1][-1].isnan().all()


def test_semantic_attention_saturated_tanh_gradients(emu):
    """Where tanh(u e) rounds to +-1, a huge u or e adds no gradient (1 - tanh^2 is 0, as in the torch backend)."""
    inputs = tanh_extreme_inputs()
    got, want = semantic_attention(*inputs), ops.semantic_attention(*inputs, backend="torch")
    for g, r in zip(list(got) + grads(got, inputs[1:3]), list(want) + grads(want, inputs[1:3])):
        assert_close(g, r, equal_nan=True)


@pytest.mark.parametrize("B, N", [(1, 3), (3, 5)], ids=str)
def test_semantic_attention_infinite_e_with_padding_rows(emu, B, N):
    """An infinite e[c, k] with B N not a multiple of the backward's 8-row tile: the padding rows add nothing (they
    gave 0 * tanh(0 * inf) = NaN in grad e and grad v), as in the torch backend."""
    g = torch.Generator().manual_seed(0)
    x, u, e, v = (torch.randn(shape, generator=g) for shape in ((B, N, 4), (B, N, 40), (3, 40), (40,)))
    e[1, 5] = float("inf")
    inputs = [x, u.requires_grad_(), e.requires_grad_(), v.requires_grad_()]
    got, want = semantic_attention(*inputs), ops.semantic_attention(*inputs, backend="torch")
    got_grads, want_grads = grads(got, inputs[1:]), grads(want, inputs[1:])
    assert want_grads[1].isfinite().all() and want_grads[2].isfinite().all()
    for a, b in zip(list(got) + got_grads, list(want) + want_grads):
        assert_close(a, b, equal_nan=True)


def test_semantic_attention_infinite_x(emu):
    """An infinite x makes the softmax backward's gs infinite: grad u is then +-inf where the torch backend's is (the
    backward formed g (1 - z^2) as g - g z z, inf - inf = NaN)."""
    x, u, e, v = (torch.tensor(t) for t in ([[[1.0], [float("inf")]]], [[[0.5], [-0.3]]], [[0.7]], [1.2]))
    inputs = [x, u.requires_grad_(), e.requires_grad_(), v.requires_grad_()]
    got, want = semantic_attention(*inputs), ops.semantic_attention(*inputs, backend="torch")
    got_grads, want_grads = grads(got, inputs[1:]), grads(want, inputs[1:])
    assert want_grads[0].isinf().any()  # the case itself: an infinite grad u
    for a, b in zip(list(got) + got_grads, list(want) + want_grads):
        assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_semantic_attention_finite_operands_beyond_the_tanh_prescale(emu, dtype):
    """e (forward) and u (backward) were pre-scaled by 2 / ln 2 for the exp2 tanh: a finite value beyond 1.2e38
    became inf, so tanh(0 * e) was NaN (a, S and every gradient NaN) and a saturated tanh's zero derivative times
    u gave NaN in grad e, where the torch backend and the oracle are finite; the product u e is scaled now. The
    last two: unsaturated tanh terms with such a u or e (a clamped pre-scale would give finite, wrong values)."""
    x = torch.tensor([[[1.0], [2.0], [-1.0]]], dtype=dtype)
    for u, e in (([[0.0], [0.5], [-1.0]], [[2e38]]), ([[3e38], [0.5], [-1.0]], [[1.5]]),
                 ([[3e38], [0.5], [-1.0]], [[0.0]]), ([[1e-38], [0.5], [-1.0]], [[2e38]])):
        u, e = torch.tensor([u], dtype=dtype), torch.tensor(e, dtype=dtype)
        inputs = [x.requires_grad_(), u.requires_grad_(), e.requires_grad_(), torch.ones(1, dtype=dtype,
                                                                                       requires_grad=True)]
        got, want = semantic_attention(*inputs), ops.semantic_attention(*inputs, backend="torch")
        got, want = list(got) + grads(got, inputs), list(want) + grads(want, inputs)
        assert all(w.isfinite().all() for w in want)  # the case itself
        for a, b in zip(got, want):
            assert_close(a, b)


def test_semantic_attention_gradcheck(emu):
    inputs = sa_inputs(2, 5, 3, 4, 6, torch.float64, "cpu")
    assert torch.autograd.gradcheck(semantic_attention, inputs)


# ---- blends --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", BLEND_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("detach_target", [False, True])
def test_instance_blend_matches_oracle(emu, shape, dtype, detach_target):
    S, T, alpha, _, _, _, _, partner = blend_inputs(*shape, dtype, "cpu")
    out = instance_blend(S, T, alpha, partner, detach_target)
    got = list(out) + grads(out, [S, alpha])
    S64, a64 = _leaf64(S), _leaf64(alpha)
    ref = reference.instance_blend(S64, T.double(), a64, partner, detach_target=detach_target)
    compare(got, list(ref) + grads(ref, [S64, a64], rounding=dtype), dtype, ["S1", "T1", "grad S", "grad alpha"])


@pytest.mark.parametrize("shape", BLEND_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("detach_target", [False, True])
def test_prototype_blend_matches_oracle(emu, shape, dtype, detach_target):
    S, T, beta, bank, quadrant, shift, select, _ = blend_inputs(*shape, dtype, "cpu")
    out = prototype_blend(S, T, beta, bank, quadrant, shift, select, detach_target)
    got = list(out) + grads(out, [S, beta, bank])
    S64, b64, k64 = _leaf64(S), _leaf64(beta), _leaf64(bank)
    ref = reference.prototype_blend(S64, T.double(), b64, k64, quadrant, shift, select, detach_target=detach_target)
    compare(got, list(ref) + grads(ref, [S64, b64, k64], rounding=dtype), dtype,
            ["S2", "T2", "grad S", "grad beta", "grad bank"])


@pytest.mark.parametrize("shape", [(8, 80, 1024), (32, 200, 1024)], ids=["coco", "vg-b32"])
def test_blends_at_the_benchmark_shapes(emu, shape):
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(*shape, torch.float32, "cpu")
    got = list(instance_blend(S, T, coef, partner)) + list(prototype_blend(S, T, coef, bank, quadrant, shift, select))
    leaves = [_leaf64(t) for t in (S, coef, bank)]
    T64 = T.double()
    want = list(reference.instance_blend(leaves[0], T64, leaves[1], partner))
    want += list(reference.prototype_blend(leaves[0], T64, leaves[1], leaves[2], quadrant, shift, select))
    compare(got + grads(got, [S, coef, bank]), want + grads(want, leaves, rounding=torch.float32), torch.float32,
            ["S1", "T1", "S2", "T2", "grad S", "grad coef", "grad bank"])


def test_blends_noncontiguous_deterministic_and_bank_grad_flag(emu):
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(6, 20, 33, torch.float32, "cpu")
    S_nc, bank_nc = noncontiguous(S), noncontiguous(bank)
    runs = []
    for _ in range(2):
        out = list(instance_blend(S_nc, T, coef, partner)) + list(
            prototype_blend(S_nc, T, coef, bank_nc, quadrant, shift, select))
        runs.append(out + grads(out, [S_nc, coef, bank_nc]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    want = list(ops.instance_blend(S, T, coef, partner, backend="torch"))
    want += list(ops.prototype_blend(S, T, coef, bank, quadrant, shift, select, backend="torch"))
    compare(runs[0], want + grads(want, [S, coef, bank]), torch.float32, ["S1", "T1", "S2", "T2", "gS", "gc", "gk"])
    args = (torch.ones_like(S), torch.ones_like(T), S.detach(), coef.detach(), bank.detach(), quadrant, shift, select,
            False)
    with_bank, without = emu.prototype_blend_cuda_backward(*args, True), emu.prototype_blend_cuda_backward(*args, False)
    assert torch.equal(without[2], torch.zeros_like(bank)) and with_bank[2].abs().sum() > 0
    assert torch.equal(with_bank[0], without[0]) and torch.equal(with_bank[1], without[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blends_ignore_what_they_leave_alone(emu, dtype):
    check_blends_ignore_what_they_leave_alone(
        lambda S, T, a, p: emu.instance_blend_cuda(S, T, a, p, False),
        lambda gS1, gT1, S, T, a, p: emu.instance_blend_cuda_backward(gS1, gT1, S, T, a, p, False),
        lambda S, T, b, k, q, h, e: emu.prototype_blend_cuda(S, T, b, k, q, h, e, False),
        lambda gS2, gT2, S, b, k, q, h, e: emu.prototype_blend_cuda_backward(gS2, gT2, S, b, k, q, h, e, False, True),
        dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_blends_take_a_float32_coefficient(emu, dtype):
    check_half_blends_take_a_wider_coefficient(
        lambda *a: emu.instance_blend_cuda(*a, False), lambda *a: emu.instance_blend_cuda_backward(*a, False),
        lambda *a: emu.prototype_blend_cuda(*a, False), lambda *a: emu.prototype_blend_cuda_backward(*a, False, True),
        dtype=dtype)


def test_half_coefficient_gradients_whose_terms_exceed_fp16(emu):
    """grad alpha (beta) sums grad_S1 * (S - S[partner]) (S - p) in fp32, as the other backends do: each difference
    and product was rounded to fp16, so 6e4 - -6e4 gave inf, and two terms of +-1.2e5 that cancel gave inf - inf =
    NaN, where the torch, cpu and triton backends return 0.1 * 1.2e5 and 0."""
    h = torch.float16
    S = torch.tensor([[[6e4, 6e4]], [[-6e4, -6e4]]], dtype=h)
    T = torch.tensor([[0], [1]], dtype=h)  # image 0's unknown label takes image 1's known positive
    coef, partner = torch.tensor(0.5, dtype=h), torch.tensor([1, 0])
    for g, want in (([0.1, 0.0], 0.1 * 1.2e5), ([1.0, -1.0], 0.0)):
        gS = torch.tensor([[g], [[0.0, 0.0]]], dtype=h)
        args = (gS, torch.zeros_like(T), S, T, coef, partner, False)
        for grad in (emu.instance_blend_cuda_backward(*args)[1],
                     torch.ops.dsrb.instance_blend_torch_backward(*args)[1]):
            assert_close(grad, torch.tensor(want, dtype=torch.float64), dtype=h)
        bank, q = torch.zeros(1, 4, 2, dtype=h), torch.zeros(2, 1, dtype=torch.int64)
        sel = torch.tensor([[True], [False]])
        args = (gS, torch.zeros_like(T), S, coef, bank - 6e4, q, q + 1, sel, False, True)
        for grad in (emu.prototype_blend_cuda_backward(*args)[1],
                     torch.ops.dsrb.prototype_blend_torch_backward(*args)[1]):
            assert_close(grad, torch.tensor(want, dtype=torch.float64), dtype=h)


def test_blends_gradcheck(emu):
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(3, 5, 4, torch.float64, "cpu")
    T[0], T[2] = 0, 1  # some blended entries for the batch flip
    assert torch.autograd.gradcheck(lambda s, a: instance_blend(s, T, a, partner), (S, coef))
    assert torch.autograd.gradcheck(lambda s, b, k: prototype_blend(s, T, b, k, quadrant, shift, select),
                                    (S, coef, bank))


def test_blends_never_read_out_of_bounds_with_bad_indices(emu):
    """The glue does not read index values (a device synchronisation); the kernels must stay in bounds whatever
    they are: an out-of-range partner blends nothing (as a partner equal to the image itself), and the prototype
    bucket is (quadrant - shift) mod 4 for any values. Outputs and gradients equal those of the equivalent valid
    indices."""
    S, T, coef, bank, quadrant, shift, select, partner = blend_inputs(5, 6, 7, torch.float64, "cpu")
    S, coef, bank = S.detach(), coef.detach(), bank.detach()
    T[:] = 0
    T[1] = 1
    bad_partner = torch.tensor([1, -3, 99, 1, 2**40])
    as_self = torch.tensor([1, 1, 2, 1, 4])  # each out-of-range partner replaced by the image itself
    S1, T1 = emu.instance_blend_cuda(S, T, coef, bad_partner, False)
    ref1 = reference.instance_blend(S, T, coef, as_self)
    assert_close(S1, ref1[0], dtype=torch.float64)
    assert_close(T1, ref1[1], dtype=torch.float64)
    g = emu.instance_blend_cuda_backward(torch.ones_like(S), torch.ones_like(T), S, T, coef, bad_partner, False)
    g_valid = emu.instance_blend_cuda_backward(torch.ones_like(S), torch.ones_like(T), S, T, coef, as_self, False)
    for got, want in zip(g, g_valid):
        assert torch.equal(got, want)
    select = select.clone()
    select[[0, 2, 3], :3] = True  # every bad index is used: rows 0, 2, 3 are unknown (T = 0) and selected
    bad_q, bad_s = quadrant.clone(), shift.clone()
    bad_q[0, :3] = torch.tensor([-7, 4, 2**50])
    bad_s[2, :3] = torch.tensor([0, -5, 2**45])
    bad_q[3, :3], bad_s[3, :3] = torch.tensor([2**61, -9, 6]), torch.tensor([-2**61, 7, 2**40])
    same_q, same_s = (bad_q - bad_s).remainder(4).add(1).remainder(4), torch.ones_like(bad_s)  # same bucket, valid
    assert ((same_q - same_s).remainder(4) == (bad_q - bad_s).remainder(4)).all()
    out = emu.prototype_blend_cuda(S, T, coef, bank, bad_q, bad_s, select, False)
    want = emu.prototype_blend_cuda(S, T, coef, bank, same_q, same_s, select, False)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    upstream = (torch.ones_like(S), torch.ones_like(T))
    g = emu.prototype_blend_cuda_backward(*upstream, S, coef, bank, bad_q, bad_s, select, False, True)
    g_valid = emu.prototype_blend_cuda_backward(*upstream, S, coef, bank, same_q, same_s, select, False, True)
    for got, want in zip(g, g_valid):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op, args, match", [
    ("semantic_attention_cuda", (torch.ones(2, 3, 4), torch.ones(2, 4, 5), torch.ones(6, 5), torch.ones(5)),
     r"argument 'u': expected shape \(2, 3, \*\)"),
    ("semantic_attention_cuda_backward", (torch.ones(2, 6, 5), torch.ones(2, 6, 3), torch.ones(2, 3, 4),
                                          torch.ones(2, 3, 5), torch.ones(6, 5), torch.ones(5), torch.ones(2, 6, 3)),
     "argument 'grad_S'"),
    ("instance_blend_cuda_backward", (torch.ones(3, 2, 4), torch.ones(3, 2, dtype=torch.float64), torch.ones(3, 2, 4),
                                      torch.zeros(3, 2), torch.tensor(0.5), torch.tensor([0, 1, 2]), False),
     "argument 'grad_T1': expected dtype"),
    ("prototype_blend_cuda", (torch.ones(1, 2, 4), torch.zeros(1, 2), torch.tensor(0.5), torch.ones(2, 3, 4),
                              torch.zeros(1, 2).long(), torch.ones(1, 2).long(), torch.ones(1, 2, dtype=torch.bool),
                              False), "argument 'bank'"),
    ("quadrant_index_cuda", (torch.ones(1, 2, 6), torch.ones(1, 6), 4, 2), "arguments 'height', 'width'"),
    ("prototype_bank_update_cuda", (torch.zeros(2, 4, 3, dtype=torch.int32), torch.zeros(2, 4).long(),
                                    torch.ones(1, 2, 3), torch.ones(1, 2), torch.zeros(1, 2).long(), 5),
     "argument 'sums'"),
], ids=["sa-u-shape", "sa-bwd-grad_S", "ib-bwd-grad_T1-dtype", "pb-bank", "quadrant-size", "bank-int-sums"])
@THROWS
def test_cuda_glue_errors_name_the_argument(emu, op, args, match):
    """The glue's own checks (csrc/cuda/glue.cpp, csrc/checks.h), which otherwise run only on a GPU host: a TypeError
    for a dtype, a ValueError otherwise, as the Python ops raise."""
    wrong_dtype = "expected dtype" in match or op == "prototype_bank_update_cuda"  # int32 sums
    with pytest.raises(TypeError if wrong_dtype else ValueError, match=match):
        getattr(emu, op)(*args)


# ---- quadrant index and bank update -------------------------------------------------------------------------------

@pytest.mark.parametrize("B, C, H, W", QUADRANT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quadrant_index_equals_oracle(emu, B, C, H, W, dtype):
    a, x_sum = quadrant_inputs(B, C, H, W, dtype)
    assert torch.equal(emu.quadrant_index_cuda(a, x_sum, H, W), reference.quadrant_index(a, x_sum, H, W))


@pytest.mark.parametrize("B, C, H, W", QUADRANT_SPECIAL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quadrant_index_special_values(emu, B, C, H, W, dtype):
    """NaN, +-inf, signed zeros and ties: the torch.amax / torch.argmax rules, as on the other backends."""
    a, x_sum = quadrant_special_inputs(B, C, H, W, dtype)
    assert torch.equal(emu.quadrant_index_cuda(a, x_sum, H, W), ops.quadrant_index(a, x_sum, H, W, backend="torch"))


@pytest.mark.parametrize("cap", [0, 1, 2, 100])
@pytest.mark.parametrize("sums_dtype, S_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float16)], ids=str)
def test_prototype_bank_update_equals_oracle(emu, cap, sums_dtype, S_dtype):
    g = torch.Generator().manual_seed(0)
    B, C, D = 9, 5, 37
    S = torch.randn(B, C, D, generator=g).to(S_dtype)
    T = torch.randint(-1, 2, (B, C), generator=g).to(S_dtype)
    quadrant = torch.randint(0, 4, (B, C), generator=g)
    sums = torch.randn(C, 4, D, generator=g).to(sums_dtype)
    counts = torch.randint(0, 2, (C, 4), generator=g)
    got = emu.prototype_bank_update_cuda(sums, counts, S, T, quadrant, cap)
    want = ops.prototype_bank_update(sums, counts, S, T, quadrant, cap, backend="torch")
    assert torch.equal(got[1], want[1]) and got[0].dtype == sums_dtype
    assert torch.equal(got[0], want[0])  # the same additions in the same order, in the sums' dtype


def test_prototype_bank_update_counts_near_the_int64_maximum(emu):
    """The running count advanced with every candidate, so a bucket one sample short of a cap of 2**63 - 1
    overflowed (undefined in C++; it wrapped round here, keeping every candidate): it now counts kept samples only."""
    from test_prototype_bank_update import counts_near_the_int64_maximum

    (sums, counts, S, T, quadrant, cap), want = counts_near_the_int64_maximum()
    got = emu.prototype_bank_update_cuda(sums, counts, S, T.to(S.dtype), quadrant, cap)
    assert torch.equal(got[1], want[1])
    assert_close(got[0], want[0])
