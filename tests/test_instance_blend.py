"""instance_blend (torch backend) against the oracle on vectors and on the official feature maps."""

import importlib

import pytest
import torch

import dsrb.ops as ops
from dsrb import reference
from helpers import (TORCH_AND_AUTO, NoValueReads, assert_close, backend_param,
                     check_autograd_takes_a_wider_coefficient, check_blends_ignore_what_they_leave_alone, device_of,
                     grads_of, noncontiguous)

SHAPES = [(1, 1, 3), (2, 3, 7), (5, 20, 33), (8, 80, 9), (2, 200, 3), (0, 4, 5), (3, 1, 1)]


def make(B, C, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, C, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    T = torch.randint(-1, 2, (B, C), generator=g).to(dtype)
    alpha = torch.tensor([0.3], dtype=dtype, requires_grad=True)
    return S, T, alpha


def run(fn, S, T, alpha, seed=1, **kw):
    S1, T1 = fn(S, T, alpha, **kw)
    g = torch.Generator().manual_seed(seed)
    wS = torch.randn(S1.shape, generator=g, dtype=torch.float64).to(S1.dtype)
    wT = torch.randn(T1.shape, generator=g, dtype=torch.float64).to(T1.dtype)
    gS, ga = torch.autograd.grad((S1 * wS).sum() + (T1 * wT).sum(), (S, alpha))
    return [S1, T1, gS, ga]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("detach_target", [False, True])
def test_matches_oracle(shape, detach_target):
    S, T, alpha = make(*shape)
    got = run(lambda *a, **k: ops.instance_blend(*a, **k, backend="torch"), S, T, alpha, detach_target=detach_target)
    want = run(reference.instance_blend, S, T, alpha, detach_target=detach_target)
    for name, o, r in zip(["S1", "T1", "grad S", "grad alpha"], got, want):
        assert_close(o, r, what=name)


def test_alpha_gets_gradient_through_both_paths():
    S, T, alpha = make(4, 6, 5)
    T[0] = 0
    T[3] = 1  # image 0 has unknowns, its partner 3 has positives: blended entries exist
    S1, T1 = ops.instance_blend(S, T, alpha)
    (g_feat,) = torch.autograd.grad(S1.sum(), alpha, retain_graph=True)
    (g_target,) = torch.autograd.grad(T1.sum(), alpha)
    assert g_feat.abs() > 0 and g_target.abs() > 0
    assert T1[0].eq(1 - alpha.detach()).all()
    (g_detached,) = torch.autograd.grad(ops.instance_blend(S, T, alpha, detach_target=True)[1].sum(), alpha,
                                        allow_unused=True, materialize_grads=True)
    assert g_detached == 0


@pytest.mark.parametrize("B, H, W, C, D", [(1, 7, 7, 1, 4), (2, 5, 6, 3, 5), (5, 1, 1, 20, 3)])
def test_map_formulation_equals_vectors(B, H, W, C, D):
    """The official blend of (B, H, W, C, D) maps, summed over space, equals the op on pooled vectors (spec §4)."""
    g = torch.Generator().manual_seed(2)
    F = torch.randn(B, H, W, C, D, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randint(-1, 2, (B, C), generator=g).double()
    alpha = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    S1_map, T1_map = reference.instance_blend_map(F, T, alpha)
    S1, T1 = ops.instance_blend(F.sum((1, 2)), T, alpha)
    assert_close(S1, S1_map)
    assert_close(T1, T1_map)
    g_map = torch.autograd.grad(S1_map.sum() + T1_map.sum(), (F, alpha))
    g_vec = torch.autograd.grad(S1.sum() + T1.sum(), (F, alpha))
    for a, b in zip(g_vec, g_map):
        assert_close(a, b)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_explicit_partner_and_noncontiguous(backend):
    S, T, alpha = make(5, 4, 6)
    partner = torch.tensor([2, 0, 1, 4, 3])
    Sn = noncontiguous(S)
    got = run(lambda *a, **k: ops.instance_blend(*a, **k, backend=backend), Sn, T, alpha, partner=partner)
    want = run(reference.instance_blend, S, T, alpha, partner=partner)
    for o, r in zip(got, want):
        assert_close(o, r)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lower_precision(dtype, backend):
    S, T, alpha = make(4, 20, 16, dtype=dtype)
    got = run(lambda *a: ops.instance_blend(*a, backend=backend), S, T, alpha)
    S64, T64, a64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (S, T, alpha))
    want = run(reference.instance_blend, S64, T64, a64)
    for o, r in zip(got, want):
        assert o.dtype == dtype
        assert_close(o, r, dtype=dtype)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_fp16_alpha_gradient_whose_difference_exceeds_fp16(backend):
    """grad alpha = sum grad_S1 * (S - S[partner]): here 0.1 * (6e4 + 6e4) = 1.2e4 fits fp16, S - S[partner] does not;
    computed in fp32, as the fused kernels do (the torch backend returned inf)."""
    h = torch.float16
    S = torch.tensor([[[6e4]], [[-6e4]]], dtype=h)
    T = torch.tensor([[0], [1]], dtype=h)  # image 0's unknown label takes image 1's known positive
    alpha = torch.tensor(0.5, dtype=h, requires_grad=True)
    S1, T1 = ops.instance_blend(S, T, alpha, torch.tensor([1, 0]), backend=backend)
    (grad,) = torch.autograd.grad((S1, T1), alpha, (torch.full_like(S1, 0.1), torch.zeros_like(T1)))
    assert grad.dtype == h
    assert_close(grad, torch.tensor(0.1 * 1.2e5, dtype=torch.float64), dtype=h)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_float32_alpha_with_fp16_features_gets_a_float32_gradient(backend):
    """Autocast's case: the model's float32 alpha with fp16 S. The gradient, 0.5 * (1e3 + 1e3) * 128 = 128000, was
    returned in S's dtype: inf."""
    S = torch.tensor([[[1e3] * 128], [[-1e3] * 128]], dtype=torch.float16)
    T = torch.tensor([[0.0], [1.0]])  # image 0's unknown label takes image 1's known positive
    alpha = torch.tensor([0.5], requires_grad=True)
    S1, T1 = ops.instance_blend(S, T, alpha, torch.tensor([1, 0]), backend=backend)
    (grad,) = torch.autograd.grad(S1, alpha, torch.full_like(S1, 0.5))
    assert S1.dtype == T1.dtype == torch.float16 and grad.dtype == torch.float32 and grad.item() == 128000


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_targets_with_gradient_are_refused(backend):
    """The soft targets depend on alpha only: T's gradient was None, silently, where a reading of the formula
    m * T + (1 - m) * T[partner] gives one."""
    S, T, alpha = make(3, 4, 2)
    with pytest.raises(ValueError, match="argument 'T': expected targets without gradient"):
        ops.instance_blend(S, T.requires_grad_(), alpha, backend=backend)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_gradcheck(backend):
    S, T, alpha = make(3, 4, 2)
    T[0] = 0
    T[2] = 1
    assert torch.autograd.gradcheck(lambda s, a: ops.instance_blend(s, T, a, backend=backend), (S, alpha))


def test_opcheck():
    """The torch backend's registered op (the extension's are opchecked in test_ext_backends.py)."""
    S, T, alpha = make(3, 4, 2)
    T[0] = 0
    T[2] = 1
    partner = torch.arange(2, -1, -1)
    for detach in (False, True):
        torch.library.opcheck(torch.ops.dsrb.instance_blend_torch.default, (S, T, alpha.reshape(()), partner, detach))
    torch.library.opcheck(torch.ops.dsrb.instance_blend_torch.default,
                          (noncontiguous(S), noncontiguous(T), alpha.reshape(()), partner, False))


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_compile_fullgraph_matches_eager(backend):
    S, T, alpha = make(4, 6, 5, dtype=torch.float32)
    compiled = torch.compile(lambda s, t, a: ops.instance_blend(s, t, a, backend=backend), fullgraph=True)
    eager = run(lambda *a: ops.instance_blend(*a, backend=backend), S, T, alpha)
    for o, r in zip(run(compiled, S, T, alpha), eager):
        assert_close(o, r)


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda S, T, a: (S[0], T, a), "'S'.*3-D"),
        (lambda S, T, a: (S, T[:, :-1], a), "'T'.*shape"),
        (lambda S, T, a: (S, T * 2, a), "'T'.*-1, 0, 1"),
        (lambda S, T, a: (S, T, torch.ones(2)), "'alpha'.*one-element"),
        (lambda S, T, a: (S.long(), T, a), "'S'.*floating"),
        (lambda S, T, a: (S, T.to("meta"), a), "'T' on meta"),
    ],
)
def test_bad_input(args, match):
    S, T, alpha = (t.detach() for t in make(3, 4, 5))
    with pytest.raises((TypeError, ValueError), match=match):
        ops.instance_blend(*args(S, T, alpha))


def test_bad_partner():
    S, T, alpha = (t.detach() for t in make(3, 4, 5))
    with pytest.raises(ValueError, match="'partner'.*range"):
        ops.instance_blend(S, T, alpha, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="'partner'.*shape"):
        ops.instance_blend(S, T, alpha, torch.tensor([0, 1]))


@pytest.mark.parametrize("backend", ["torch", "cpu", backend_param("cuda")])
def test_validate_false_reads_no_values(backend, monkeypatch):
    """validate=False (what the model passes for targets it has checked) reads no tensor value; the shape checks
    stay. On a GPU (cuda) each read would be a device synchronisation, which is what validate=False saves. The cpu
    kernels still reject bad values, as they read them anyway."""
    from dsrb import _checks

    if backend == "cpu" and ops.reasons("instance_blend", torch.device("cpu"), torch.float64)["cpu"]:
        pytest.skip("the C++ extension is not available")
    dev = device_of(backend)
    S, T, alpha = (t.detach().to(dev) for t in make(3, 4, 5))
    partner = torch.tensor([2, 0, 1], device=dev)
    want = ops.instance_blend(S, T, alpha, partner, backend=backend)

    def no_reads(tensors):
        raise AssertionError("a value check ran")

    monkeypatch.setattr(_checks, "_read", no_reads)
    with NoValueReads():
        got = ops.instance_blend(S, T, alpha, partner, validate=False, backend=backend)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="'partner'.*shape"):
        ops.instance_blend(S, T, alpha, partner[:2], validate=False, backend=backend)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="'partner'.*range"):
        ops.instance_blend(S, T, alpha, torch.tensor([0, 1, 3], device=dev), validate=True, backend=backend)
    if backend == "cpu":  # the C++ kernel checks what it reads (a cuda kernel cannot raise: it blends nothing)
        with pytest.raises(ValueError, match="'partner': expected values in \\[0, 2\\], got 3"):
            ops.instance_blend(S, T, alpha, torch.tensor([0, 1, 3]), validate=False, backend=backend)



def _autograd_raw_ops(ib, pb):
    """Raw forward/backward pairs (helpers.check_blends_ignore_what_they_leave_alone) from differentiable blends
    ib(S, T, alpha, partner) and pb(S, T, beta, bank, quadrant, shift, select); pb's gradients do not depend on T."""
    def ib_bwd(gS1, gT1, S, T, alpha, partner):
        return grads_of(lambda s, a: ib(s, T, a, partner), (S, alpha), (gS1, gT1))

    def pb_bwd(gS2, gT2, S, beta, bank, quadrant, shift, select):
        T = torch.zeros(select.shape, dtype=S.dtype)
        return grads_of(lambda s, b, k: pb(s, T, b, k, quadrant, shift, select), (S, beta, bank), (gS2, gT2))

    return ib, ib_bwd, pb, pb_bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_blends_ignore_what_they_leave_alone_torch_backend_and_reference(dtype):
    """inf/NaN in entries left alone reach no other result (0 * inf = NaN in a product with the 0/1 mask): the
    torch backend's ops, its code as autograd differentiates it (trace_torch_backend), and the oracle."""
    import importlib

    ib_mod, pb_mod = (importlib.import_module(f"dsrb.ops.{name}") for name in ("instance_blend", "prototype_blend"))

    torch_ops = torch.ops.dsrb
    check_blends_ignore_what_they_leave_alone(
        lambda S, T, a, p: torch_ops.instance_blend_torch(S, T, a, p, False),
        lambda gS1, gT1, S, T, a, p: torch_ops.instance_blend_torch_backward(gS1, gT1, S, T, a, p, False),
        lambda S, T, b, k, q, h, e: torch_ops.prototype_blend_torch(S, T, b, k, q, h, e, False),
        lambda gS2, gT2, S, b, k, q, h, e: torch_ops.prototype_blend_torch_backward(gS2, gT2, S, b, k, q, h, e, False,
                                                                                      True),
        dtype=dtype)
    check_blends_ignore_what_they_leave_alone(*_autograd_raw_ops(
        lambda S, T, a, p: ib_mod._torch_forward(S, T, a, p, False),
        lambda S, T, b, k, q, h, e: pb_mod._torch_forward(S, T, b, k, q, h, e, False)), dtype=dtype)
    check_blends_ignore_what_they_leave_alone(*_autograd_raw_ops(reference.instance_blend, reference.prototype_blend),
                                              dtype=dtype)


def _eager_torch_instance_blend(*args):
    return ops.instance_blend(*args, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autograd_of_the_torch_code_reduces_a_float32_alpha_gradient_in_float32(dtype):
    """Inside ops.trace_torch_backend() autograd differentiates the torch backend's _torch_forward. With half S and
    the model's float32 alpha (autocast) it reduced alpha's gradient in S's dtype: inf (NaN) in float16 where the
    hand-written backward's is finite, a bf16-rounded sum in bfloat16."""
    module = importlib.import_module("dsrb.ops.instance_blend")
    check_autograd_takes_a_wider_coefficient("instance_blend", lambda *a: module._torch_forward(*a, False),
                                             _eager_torch_instance_blend, dtype=dtype)


def test_compiled_torch_code_reduces_a_float32_alpha_gradient_in_float32():
    """The same through torch.compile(fullgraph=True) inside ops.trace_torch_backend(). Inductor told to round where
    the graph casts (emulate_precision_casts), as eager float16 arithmetic rounds after every op: by default
    it fuses the roundings away, and the values differ in their last bits, as they did before the fix."""
    import torch._inductor.config

    compiled = torch.compile(_eager_torch_instance_blend, fullgraph=True)
    with ops.trace_torch_backend(), torch._inductor.config.patch(emulate_precision_casts=True):
        check_autograd_takes_a_wider_coefficient("instance_blend", compiled, _eager_torch_instance_blend,
                                                 dtype=torch.float16)
