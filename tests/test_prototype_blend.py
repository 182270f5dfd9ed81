"""prototype_blend (torch backend) against the oracle on vectors and on the official prototype maps."""

import importlib

import pytest
import torch

import dsrb.ops as ops
from dsrb import reference
from helpers import (TORCH_AND_AUTO, NoValueReads, assert_close, check_autograd_takes_a_wider_coefficient,
                     noncontiguous)

SHAPES = [(1, 1, 3), (2, 3, 7), (5, 20, 33), (8, 80, 9), (2, 200, 3), (0, 4, 5)]


def make(B, C, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, C, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    T = torch.randint(-1, 2, (B, C), generator=g).to(dtype)
    beta = torch.tensor([0.4], dtype=dtype, requires_grad=True)
    bank = torch.randn(C, 4, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    quadrant = torch.randint(0, 4, (B, C), generator=g)
    shift = torch.randint(1, 4, (B, C), generator=g)
    select = torch.rand(B, C, generator=g) < 0.5
    return S, T, beta, bank, quadrant, shift, select


def run(fn, S, T, beta, bank, quadrant, shift, select, seed=1, **kw):
    S2, T2 = fn(S, T, beta, bank, quadrant, shift, select, **kw)
    g = torch.Generator().manual_seed(seed)
    wS = torch.randn(S2.shape, generator=g, dtype=torch.float64).to(S2.dtype)
    wT = torch.randn(T2.shape, generator=g, dtype=torch.float64).to(T2.dtype)
    grads = torch.autograd.grad(
        (S2 * wS).sum() + (T2 * wT).sum(), (S, beta, bank), allow_unused=True, materialize_grads=True
    )
    return [S2, T2, *grads]


NAMES = ["S2", "T2", "grad S", "grad beta", "grad bank"]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("detach_target", [False, True])
def test_matches_oracle(shape, detach_target):
    args = make(*shape)
    got = run(lambda *a, **k: ops.prototype_blend(*a, **k, backend="torch"), *args, detach_target=detach_target)
    want = run(reference.prototype_blend, *args, detach_target=detach_target)
    for name, o, r in zip(NAMES, got, want):
        assert_close(o, r, what=name)


@pytest.mark.parametrize("B, H, W, C, D", [(1, 7, 7, 1, 4), (2, 5, 6, 3, 5), (5, 1, 1, 20, 3), (3, 2, 3, 4, 2)])
def test_map_formulation_equals_vectors(B, H, W, C, D):
    """Official blending with (C, 4, H, W, D) prototype maps equals the op with their spatial sums (spec §5.2)."""
    g = torch.Generator().manual_seed(3)
    F = torch.randn(B, H, W, C, D, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randint(-1, 2, (B, C), generator=g).double()
    beta = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    maps = torch.randn(C, 4, H, W, D, generator=g, dtype=torch.float64)
    shift = torch.randint(1, 4, (B, C), generator=g)
    select = torch.rand(B, C, generator=g) < 0.6
    S2_map, T2_map = reference.prototype_blend_map(F, T, beta, maps, shift, select)
    quadrant = reference.quadrant_index_map(F.detach())
    S2, T2 = ops.prototype_blend(F.sum((1, 2)), T, beta, maps.sum((2, 3)), quadrant, shift, select)
    assert_close(S2, S2_map)
    assert_close(T2, T2_map)
    for a, b in zip(torch.autograd.grad(S2.sum() + T2.sum(), (F, beta)),
                    torch.autograd.grad(S2_map.sum() + T2_map.sum(), (F, beta))):
        assert_close(a, b)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_float32_beta_with_fp16_features_gets_a_float32_gradient(backend):
    """As instance_blend's alpha: 0.5 * (1e3 + 1e3) * 128 = 128000, returned in S's dtype, was inf."""
    S = torch.full((1, 1, 128), 1e3, dtype=torch.float16)
    bank = torch.full((1, 4, 128), -1e3, dtype=torch.float16)
    beta = torch.tensor([0.5], requires_grad=True)
    q, shift, select = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1) > 0
    S2, T2 = ops.prototype_blend(S, torch.zeros(1, 1), beta, bank, q, shift, select, backend=backend)
    (grad,) = torch.autograd.grad(S2, beta, torch.full_like(S2, 0.5))
    assert S2.dtype == T2.dtype == torch.float16 and grad.dtype == torch.float32 and grad.item() == 128000


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_targets_with_gradient_are_refused(backend):
    S, T, beta, bank, quadrant, shift, select = make(3, 4, 2)
    with pytest.raises(ValueError, match="argument 'T': expected targets without gradient"):
        ops.prototype_blend(S, T.requires_grad_(), beta, bank, quadrant, shift, select, backend=backend)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_noncontiguous(backend):
    args = make(4, 5, 6)
    strided = (noncontiguous(args[0]),) + args[1:3] + (noncontiguous(args[3]),) + args[4:]
    got = run(lambda *a: ops.prototype_blend(*a, backend=backend), *strided)
    want = run(reference.prototype_blend, *args)
    for o, r in zip(got, want):
        assert_close(o, r)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lower_precision(dtype, backend):
    args = make(4, 20, 16, dtype=dtype)
    got = run(lambda *a: ops.prototype_blend(*a, backend=backend), *args)
    ref_args = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in args]
    want = run(reference.prototype_blend, *ref_args)
    for o, r in zip(got, want):
        assert o.dtype == dtype
        assert_close(o, r, dtype=dtype)


def test_beta_gradient_through_both_paths():
    S, T, beta, bank, q, shift, select = make(3, 4, 5)
    select[:] = True
    S2, T2 = ops.prototype_blend(S, T, beta, bank, q, shift, select)
    assert torch.autograd.grad(S2.sum(), beta, retain_graph=True)[0].abs() > 0
    assert torch.autograd.grad(T2.sum(), beta)[0] == -select.sum()


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_fp16_beta_gradient_whose_difference_exceeds_fp16(backend):
    """grad beta = sum grad_S2 * (S - p): here 0.1 * (6e4 + 6e4) = 1.2e4 fits fp16, S - p does not; computed in fp32,
    as the fused kernels do (the torch backend returned inf)."""
    h = torch.float16
    bank = torch.zeros(1, 4, 1, dtype=h)
    bank[0, 3, 0] = -6e4  # the bucket of quadrant 0 shifted by 1
    S, T = torch.tensor([[[6e4]]], dtype=h), torch.zeros(1, 1, dtype=h)
    quadrant, shift = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1, dtype=torch.int64)
    beta = torch.tensor(0.5, dtype=h, requires_grad=True)
    S2, T2 = ops.prototype_blend(S, T, beta, bank, quadrant, shift, torch.ones(1, 1, dtype=torch.bool),
                                 backend=backend)
    (grad,) = torch.autograd.grad((S2, T2), beta, (torch.full_like(S2, 0.1), torch.zeros_like(T2)))
    assert grad.dtype == h
    assert_close(grad, torch.tensor(0.1 * 1.2e5, dtype=torch.float64), dtype=h)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_gradcheck(backend):
    S, T, beta, bank, q, shift, select = make(3, 4, 2)
    assert torch.autograd.gradcheck(lambda s, b, k: ops.prototype_blend(s, T, b, k, q, shift, select, backend=backend),
                                    (S, beta, bank))


def test_opcheck():
    """The torch backend's registered op (the extension's are opchecked in test_ext_backends.py)."""
    S, T, beta, bank, q, shift, select = make(3, 4, 2)
    for detach in (False, True):
        torch.library.opcheck(
            torch.ops.dsrb.prototype_blend_torch.default, (S, T, beta.reshape(()), bank, q, shift, select, detach)
        )
    torch.library.opcheck(
        torch.ops.dsrb.prototype_blend_torch.default,
        (noncontiguous(S), noncontiguous(T), beta.reshape(()), noncontiguous(bank), q, shift, select, False),
    )


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_compile_fullgraph_matches_eager(backend):
    args = make(4, 6, 5, dtype=torch.float32)
    compiled = torch.compile(lambda *a: ops.prototype_blend(*a, backend=backend), fullgraph=True)
    for o, r in zip(run(compiled, *args), run(lambda *a: ops.prototype_blend(*a, backend=backend), *args)):
        assert_close(o, r)


@pytest.mark.parametrize(
    "index, value, match",
    [
        (3, torch.zeros(4, 3, 5), "'bank'.*shape"),
        (3, torch.zeros(4, 4, 5, dtype=torch.float32), "'bank'.*dtype"),
        (4, torch.full((3, 4), 4), "'quadrant'.*range"),
        (5, torch.zeros(3, 4, dtype=torch.long), "'shift'.*range"),
        (6, torch.zeros(3, 4), "'select'.*bool"),
        (4, torch.zeros(3, 4), "'quadrant'.*integer"),
        (2, torch.tensor(1), "'beta'.*floating"),
    ],
)
def test_bad_input(index, value, match):
    args = [t.detach() for t in make(3, 4, 5)]
    args[index] = value
    with pytest.raises((TypeError, ValueError), match=match):
        ops.prototype_blend(*args)


def test_validate_false_reads_no_values(monkeypatch):
    """validate=False reads no value of T, quadrant or shift; the torch backend then takes any quadrant and shift
    modulo 4 (memory-safe; the values are the caller's promise)."""
    from dsrb import _checks

    args = [t.detach() for t in make(3, 4, 5)]
    want = ops.prototype_blend(*args, backend="torch")

    def no_reads(*_):
        raise AssertionError("a value check ran")

    monkeypatch.setattr(_checks, "_read", no_reads)
    with NoValueReads():
        got = ops.prototype_blend(*args, validate=False, backend="torch")
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    args[4] = args[4] + 4  # quadrant out of range: the same bucket modulo 4
    with NoValueReads():
        got = ops.prototype_blend(*args, validate=False, backend="torch")
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_validate_reads_targets_and_indices_once(monkeypatch):
    """validate=True checks T, quadrant and shift in one read of device memory (one synchronisation on a GPU)."""
    from dsrb import _checks

    args = [t.detach() for t in make(3, 4, 5)]
    reads, real = [], _checks._read
    monkeypatch.setattr(_checks, "_read", lambda pairs: (reads.append(len(pairs)), real(pairs))[1])
    ops.prototype_blend(*args, backend="torch")
    ops.instance_blend(args[0], args[1], args[2], torch.tensor([2, 0, 1]), backend="torch")
    assert reads == [3, 2]


def _eager_torch_prototype_blend(*args):
    return ops.prototype_blend(*args, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autograd_of_the_torch_code_reduces_a_float32_beta_gradient_in_float32(dtype):
    """Inside ops.trace_torch_backend() autograd differentiates the torch backend's _torch_forward. With half S and
    the model's float32 beta (autocast) it reduced beta's gradient in S's dtype: inf (NaN) in float16 where the
    hand-written backward's is finite, a bf16-rounded sum in bfloat16."""
    module = importlib.import_module("dsrb.ops.prototype_blend")
    check_autograd_takes_a_wider_coefficient("prototype_blend", lambda *a: module._torch_forward(*a, False),
                                             _eager_torch_prototype_blend, dtype=dtype)


def test_compiled_torch_code_reduces_a_float32_beta_gradient_in_float32():
    """The same through torch.compile(fullgraph=True) inside ops.trace_torch_backend(). Inductor told to round where
    the graph casts (emulate_precision_casts), as eager bfloat16 arithmetic rounds after every op: by default
    it fuses the roundings away, and the values differ in their last bits, as they did before the fix."""
    import torch._inductor.config

    compiled = torch.compile(_eager_torch_prototype_blend, fullgraph=True)
    with ops.trace_torch_backend(), torch._inductor.config.patch(emulate_precision_casts=True):
        check_autograd_takes_a_wider_coefficient("prototype_blend", compiled, _eager_torch_prototype_blend,
                                                 dtype=torch.bfloat16)
