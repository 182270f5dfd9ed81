"""Edge cases of the C++ extension (csrc/) that the per-op suites do not reach: dtypes the kernels do not compute in
(float8) called through the raw ops, float8 targets of the in-place bank update, index sizes past the cpu quadrant
kernel's int32 lanes, and bit-identical results of the cpu kernels that claim them with 1 and 2 OpenMP threads."""

import pytest
import torch

import cuda_emulator
import dsrb.ops as ops
from dsrb import _ext

EXT = _ext.load()
pytestmark = pytest.mark.skipif(not EXT.loaded, reason=f"the C++ extension is not available: {EXT.reason}")
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]
FLOAT_MSG = r"expected a floating-point tensor \(float16, bfloat16, float32 or float64\)"


def _raw_calls(ns, suffix, dt):
    """(op name, call, argument the error must name) for each raw op given a float8 tensor where a float one goes."""
    g = torch.Generator().manual_seed(0)
    f8 = lambda *shape: torch.randn(shape, generator=g).to(dt)  # noqa: E731
    S, T, alpha = torch.randn(2, 3, 4), torch.zeros(2, 3), torch.tensor(0.5)
    q, shift, sel = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3).bool()
    op = lambda name: getattr(ns, f"{name}_{suffix}")  # noqa: E731
    return [
        ("semantic_attention", lambda: op("semantic_attention")(f8(2, 3, 4), f8(2, 3, 5), f8(6, 5), f8(5)), "x"),
        ("instance_blend", lambda: op("instance_blend")(f8(2, 3, 4), f8(2, 3), alpha, torch.tensor([1, 0]), False),
         "S"),
        ("prototype_blend", lambda: op("prototype_blend")(f8(2, 3, 4), f8(2, 3), alpha, f8(3, 4, 4), q, shift, sel,
                                                          False), "S"),
        ("quadrant_index", lambda: op("quadrant_index")(f8(2, 3, 6), f8(2, 6), 2, 3), "a"),
        ("prototype_bank_update", lambda: op("prototype_bank_update")(f8(3, 4, 4), torch.zeros(3, 4).long(), S, T, q,
                                                                      2), "sums"),
    ]


@pytest.mark.parametrize("dt", FLOAT8, ids=str)
def test_cpu_ops_refuse_float8_by_name(dt):
    """semantic_attention_cpu computed in float32 and returned float8 where the torch op refuses; the other cpu
    kernels failed in their dtype dispatch ("not implemented for 'Float8_e4m3fn'"), naming no argument."""
    for name, call, arg in _raw_calls(torch.ops.dsrb, "cpu", dt):
        with pytest.raises(TypeError, match=rf"argument '{arg}': {FLOAT_MSG}"):
            call()
    with pytest.raises(TypeError, match=rf"argument 'sums': {FLOAT_MSG}"):
        torch.ops.dsrb.prototype_bank_update_cpu_(torch.zeros(3, 4, 4, dtype=dt), torch.zeros(3, 4).long(),
                                                  torch.randn(2, 3, 4), torch.zeros(2, 3),
                                                  torch.zeros(2, 3, dtype=torch.long), 2)
    # the torch backend's op, the contract the extension's ops share, refuses the same dtypes with the same words
    for name, call, arg in _raw_calls(torch.ops.dsrb, "torch", dt):
        with pytest.raises(TypeError, match=rf"argument '{arg}': {FLOAT_MSG}"):
            call()


@pytest.mark.skipif(cuda_emulator.toolkit_include() is None, reason="no CUDA toolkit headers for the emulated glue")
def test_cuda_glue_refuses_float8_by_name():
    """The CUDA glue shares csrc/checks.h: the same error, before its own dtype switch."""
    emu = cuda_emulator.load()
    for name, call, arg in _raw_calls(emu, "cuda", torch.float8_e4m3fn):
        with pytest.raises(TypeError, match=rf"argument '{arg}': {FLOAT_MSG}"):
            call()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_float8_coefficient_is_still_taken(backend):
    """A blend coefficient may be of any floating dtype (rounded to S's): float8 alpha keeps working on the cpu
    backend, with the torch backend's values and a gradient in alpha's dtype."""
    g = torch.Generator().manual_seed(0)
    S = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    T = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    alpha = torch.tensor(0.5, dtype=torch.float8_e4m3fn, requires_grad=True)
    got = ops.instance_blend(S, T, alpha, backend=backend)
    want = ops.instance_blend(S.detach(), T, alpha.detach().float(), backend="torch")
    assert torch.equal(got[0].detach(), want[0]) and torch.equal(got[1].detach(), want[1])
    (grad,) = torch.autograd.grad(got[0].sum() + got[1].sum(), alpha)
    assert grad.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("dt", FLOAT8, ids=str)
def test_in_place_bank_update_takes_float8_targets(dt):
    """T of any real dtype: the torch backend and the functional ops take float8 targets; the cpu in-place kernel
    raised NotImplementedError (its dispatch has no float8) from prototype_bank_update_ with backend "cpu" or "auto"."""
    g = torch.Generator().manual_seed(0)
    B, C, D = 6, 3, 5
    S = torch.randn(B, C, D, generator=g)
    T = torch.randint(-1, 2, (B, C), generator=g).to(dt)
    quadrant = torch.randint(0, 4, (B, C), generator=g)
    want_sums, want_counts = torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.long)
    ops.prototype_bank_update_(want_sums, want_counts, S, T, quadrant, 2, backend="torch")
    assert want_counts.sum() > 0
    for backend in ("cpu", "auto"):
        sums, counts = torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.long)
        ops.prototype_bank_update_(sums, counts, S, T, quadrant, 2, backend=backend)
        assert torch.equal(sums, want_sums) and torch.equal(counts, want_counts)
    sums, counts = torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.long)
    torch.ops.dsrb.prototype_bank_update_cpu_(sums, counts, S, T, quadrant, 2)
    assert torch.equal(sums, want_sums) and torch.equal(counts, want_counts)
    bad = T.clone()
    bad[1, 2] = 0.5  # a value outside {-1, 0, 1} is still an error naming T, and nothing is written
    with pytest.raises(ValueError, match=r"argument 'T': expected values in \{-1, 0, 1\}, found 0.5 at index \(1, 2\)"):
        torch.ops.dsrb.prototype_bank_update_cpu_(sums, counts, S, bad, quadrant, 2)
    assert torch.equal(sums, want_sums) and torch.equal(counts, want_counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("height, width", [(2**31, 1), (1, 2**31)])
def test_cpu_quadrant_index_refuses_sizes_past_its_int32_lanes(dtype, height, width):
    """The cpu kernel keeps row and column indices in its int32 key lanes below fp64: a height or width of 2^31
    would wrap around into a wrong quadrant (after copying a 2^31-element a). Expanded inputs cost nothing here."""
    N = height * width
    a = torch.ones(1, 1, 1, dtype=dtype).expand(1, 1, N)
    x_sum = torch.ones(1, 1, dtype=dtype).expand(1, N)
    with pytest.raises(ValueError, match=r"arguments 'height', 'width': the cpu kernel takes each at most "
                                           rf"2147483647 for a of dtype \w+ \(float64: any\), got {height} x {width}"):
        torch.ops.dsrb.quadrant_index_cpu(a, x_sum, height, width)


def _cpu_results():
    """Every cpu kernel that claims a result independent of the thread count, at sizes split over threads."""
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    B, C, D = 16, 200, 64  # B * C rows, more than one chunk of cpu::grain_for(D)
    S, T = torch.randn(B, C, D, generator=gen(1)), torch.randint(-1, 2, (B, C), generator=gen(2)).float()
    alpha, bank = torch.tensor(0.3), torch.randn(C, 4, D, generator=gen(3))
    q, shift = torch.randint(0, 4, (B, C), generator=gen(4)), torch.randint(1, 4, (B, C), generator=gen(5))
    sel, partner = torch.rand(B, C, generator=gen(6)) < 0.5, torch.randint(0, B, (B,), generator=gen(7))
    gS, gT = torch.randn(B, C, D, generator=gen(8)), torch.randn(B, C, generator=gen(9))
    sums, counts = torch.randn(C, 4, D, generator=gen(10)), torch.randint(0, 3, (C, 4), generator=gen(11))
    a, x_sum = torch.rand(B, C, 49, generator=gen(12)), torch.rand(B, 49, generator=gen(13))
    d = torch.ops.dsrb
    out = [*d.instance_blend_cpu(S, T, alpha, partner, False),
           *d.instance_blend_cpu_backward(gS, gT, S, T, alpha, partner, False),
           *d.prototype_blend_cpu(S, T, alpha, bank, q, shift, sel, False),
           *d.prototype_blend_cpu_backward(gS, gT, S, alpha, bank, q, shift, sel, False, True),
           *d.prototype_bank_update_cpu(sums, counts, S, T, q, 3), d.quadrant_index_cpu(a, x_sum, 7, 7)]
    d.prototype_bank_update_cpu_(sums, counts, S, T, q, 3)
    x, u, e, v = (torch.randn(s, generator=gen(20 + i)) for i, s in enumerate(((4, 49, 64), (4, 49, 128), (80, 128),
                                                                              (128,))))
    return out + [sums, counts, *d.semantic_attention_cpu(x, u, e, v)]  # the forward: no cross-row reduction


def test_cpu_kernels_are_bit_identical_with_one_and_two_threads():
    """README (Determinism): blends, quadrants and the bank update reduce in a fixed order whatever the thread
    count (semantic_attention's backward sums its per-thread partials, so only its forward is checked)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpu_results()
        torch.set_num_threads(2)
        two = _cpu_results()
    finally:
        torch.set_num_threads(before)
    assert len(one) == len(two) == 16
    for i, (x, y) in enumerate(zip(one, two)):
        assert torch.equal(x, y), f"result {i} differs between 1 and 2 threads"
