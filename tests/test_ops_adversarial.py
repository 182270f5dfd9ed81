"""The public ops against adversarial use, every backend that runs here (`torch`, `cpu`, `triton` under the
interpreter) giving the same answer or the same error: empty and one-element dimensions, values that overflow a
naive softmax, inf, NaN and subnormals, autograd with some inputs frozen, expanded (stride 0) and transposed views,
outputs used twice and backward run twice, inference tensors, deterministic algorithms, torch.func transforms and
forward-mode AD, and mixed devices, dtypes and ranks."""

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dsrb.ops as ops
from dsrb import reference
from helpers import NORM_TOLERANCES, TOLERANCES, assert_close, triton_interpreter_problem

F32 = torch.float32
CPU = torch.device("cpu")
# The Triton interpreter computes with NumPy, which warns of the infinities and NaN these cases are about.
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered in:RuntimeWarning")


def _runs(backend: str, dtype=F32) -> bool:
    if backend == "triton" and triton_interpreter_problem():
        return False
    return all(ops.reasons(op, CPU, dtype)[backend] is None for op in ops.OPS)


BACKENDS = [b for b in ("torch", "cpu", "triton") if _runs(b)]
F64_BACKENDS = [b for b in ("torch", "cpu") if _runs(b, torch.float64)]  # triton leaves float64 to the others
# the backends whose ops are defined in Python (torch.library.custom_op), as torch.ops.dsrb.<op>_<backend>
PYTHON_BACKENDS = [b for b in ("torch", "triton") if _runs(b)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _same(results, what):
    """Every backend's list of tensors equals the first's: the same shapes, NaN at the same places, the rest within
    float32 rounding of sums in another order."""
    (first, want), *others = results.items()
    for backend, got in others:
        assert len(got) == len(want), (what, backend)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and g.dtype == w.dtype, (what, backend, i, g.shape, w.shape)
            g, w = g.double(), w.double()
            scale = max(1.0, w[torch.isfinite(w)].abs().max().item()) if torch.isfinite(w).any() else 1.0
            # the table's rtol, and its normwise bound of the largest finite value as atol (values up to 3e38)
            torch.testing.assert_close(g, w, rtol=TOLERANCES[F32]["rtol"], atol=NORM_TOLERANCES[F32] * scale,
                                       equal_nan=True,
                                       msg=lambda m: f"{what}, {backend} against {first}, output {i}: {m}")


def _weights(t, seed=9):
    return torch.randn(t.shape, generator=_gen(seed), dtype=torch.float64).to(t.dtype)


# ---- the ops with gradients, as lists of outputs and gradients --------------------------------------------------

def _attention(x, u, e, v, backend, grad=(True, True, True, True)):
    leaves = [t.detach().clone().requires_grad_(g) for t, g in zip((x, u, e, v), grad)]
    if backend == "reference":
        S, a = reference.semantic_attention(*leaves)
    else:
        S, a = ops.semantic_attention(*leaves, backend=backend)
    wanted = [t for t in leaves if t.requires_grad]
    loss = (S * _weights(S)).sum() + (a * _weights(a, 8)).sum()
    return [S.detach(), a.detach(), *torch.autograd.grad(loss, wanted)]


def _instance(S, T, alpha, backend, partner=None):
    S, alpha = S.detach().clone().requires_grad_(), alpha.detach().clone().requires_grad_()
    if backend == "reference":
        S1, T1 = reference.instance_blend(S, T, alpha, partner)
    else:
        S1, T1 = ops.instance_blend(S, T, alpha, partner, backend=backend)
    loss = (S1 * _weights(S1)).sum() + (T1 * _weights(T1, 8)).sum()
    return [S1.detach(), T1.detach(), *torch.autograd.grad(loss, [S, alpha])]


def _prototype(S, T, beta, bank, quadrant, shift, select, backend):
    S, beta, bank = (t.detach().clone().requires_grad_() for t in (S, beta, bank))
    if backend == "reference":
        S2, T2 = reference.prototype_blend(S, T, beta, bank, quadrant, shift, select)
    else:
        S2, T2 = ops.prototype_blend(S, T, beta, bank, quadrant, shift, select, backend=backend)
    loss = (S2 * _weights(S2)).sum() + (T2 * _weights(T2, 8)).sum()
    return [S2.detach(), T2.detach(), *torch.autograd.grad(loss, [S, beta, bank])]


def _attention_inputs(B, N, C, D, I, dtype=F32, seed=0):
    g = _gen(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in ((B, N, D), (B, N, I), (C, I), (I,))]


def _blend_inputs(B, C, D, dtype=F32, seed=1):
    """S, T (every known value, blended entries for the batch flip), coefficient, bank, quadrant, shift, select."""
    g = _gen(seed)
    S = torch.randn(B, C, D, generator=g, dtype=torch.float64).to(dtype)
    T = torch.randint(-1, 2, (B, C), generator=g).to(dtype)
    if B >= 2 and C >= 1:
        T[0, 0], T[B - 1, 0] = 0, 1  # image 0 takes class 0 from its partner
    bank = torch.randn(C, 4, D, generator=g, dtype=torch.float64).to(dtype)
    quadrant, shift = torch.randint(0, 4, (B, C), generator=g), torch.randint(1, 4, (B, C), generator=g)
    select = torch.rand(B, C, generator=g) < 0.5
    return S, T, torch.tensor(0.3, dtype=dtype), bank, quadrant, shift, select


# ---- 1. empty and one-element dimensions ------------------------------------------------------------------------

@pytest.mark.usefixtures("uninitialized_memory_is_nan")
@pytest.mark.parametrize("B, N, C, D, I", [(0, 3, 2, 4, 5), (2, 3, 0, 4, 5), (2, 3, 2, 0, 5), (2, 3, 2, 4, 0),
                                           (2, 1, 2, 4, 5), (2, 3, 2, 1, 5), (1, 1, 1, 1, 1), (0, 1, 0, 0, 0)])
def test_attention_empty_and_single_dimensions_agree(B, N, C, D, I):
    """Empty outputs and zero gradients of the right shapes, N = 1 (a = 1), D = 1: the same on every backend and
    equal to the fp64 oracle."""
    inputs = _attention_inputs(B, N, C, D, I)
    results = {b: _attention(*inputs, b) for b in BACKENDS}
    _same(results, "semantic_attention")
    want = _attention(*(t.double() for t in inputs), "reference")
    for got, w in zip(results["torch"], want):
        assert_close(got.double(), w, dtype=F32)


def test_attention_without_positions_is_one_error_on_every_backend():
    x, u, e, v = _attention_inputs(2, 0, 3, 4, 5)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"^argument 'x': expected at least one spatial position, got N = 0$"):
            ops.semantic_attention(x, u, e, v, backend=backend)


@pytest.mark.usefixtures("uninitialized_memory_is_nan")
@pytest.mark.parametrize("B, C, D", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (1, 3, 4), (1, 1, 1)])
def test_blends_quadrants_and_bank_update_empty_and_single_dimensions_agree(B, C, D):
    """B = 1 (the batch flip is the identity, nothing blends), and empty batches, classes or features: the same
    results and gradients of the right shapes on every backend."""
    S, T, coef, bank, quadrant, shift, select = _blend_inputs(B, C, D)
    H, W = 2, 3
    a = torch.rand(B, C, H * W, generator=_gen(2))
    x_sum = torch.randn(B, H * W, generator=_gen(3))
    results = {}
    for b in BACKENDS:
        sums, counts = bank.clone(), torch.zeros(C, 4, dtype=torch.long)
        ops.prototype_bank_update_(sums, counts, S, T, quadrant, 1, backend=b)
        results[b] = (_instance(S, T, coef, b) + _prototype(S, T, coef, bank, quadrant, shift, select, b)
                      + [ops.quadrant_index(a, x_sum, H, W, backend=b), sums, counts,
                         *ops.prototype_bank_update(bank, torch.zeros(C, 4, dtype=torch.long), S, T, quadrant, 1,
                                                    backend=b)])
    _same(results, "blends, quadrant_index, bank update")
    if B == 1:  # a single image is its own partner: no entry is both unknown and a known positive
        assert torch.equal(results["torch"][0], S) and results["torch"][3] == 0


# ---- 2. extreme values -------------------------------------------------------------------------------------------

def _with(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


INF, NAN = float("inf"), float("nan")
ATTENTION_EXTREMES = {
    # scores that a softmax without the max subtracted would overflow; tanh saturates at u * e = 1e30
    "u, e x 1e4": lambda x, u, e, v: (x, u * 1e4, e * 1e4, v),
    "u, e x 1e30": lambda x, u, e, v: (x, u * 1e30, e * 1e30, v),
    "v x 1e4": lambda x, u, e, v: (x, u, e, v * 1e4),
    "v x 1e30": lambda x, u, e, v: (x, u, e, v * 1e30),
    "x x 1e30": lambda x, u, e, v: (x * 1e30, u, e, v),
    "subnormal x": lambda x, u, e, v: (x * 1e-40, u, e, v),
    "subnormal v": lambda x, u, e, v: (x, u, e, v * 1e-40),
    **{f"{name}[1] = {value}": (lambda i, value: lambda *t: tuple(_with(s, 1, value) if j == i else s
                                                                   for j, s in enumerate(t)))(i, value)
       for (i, name), value in itertools.product(enumerate("xuev"), (NAN, INF, -INF))},
}


@pytest.mark.parametrize("case", list(ATTENTION_EXTREMES))
def test_attention_extreme_values_agree_with_the_oracle(case):
    """Every backend has NaN and infinities where the fp64 oracle has them, and nowhere else (a NaN in x never
    becomes a finite number on one backend), outputs and gradients alike; the finite values within 1e-3 of the
    largest (scores of 1e4 scale float32's rounding by 1e4: 2e-4 to 5e-4 in every backend's gradients)."""
    inputs = ATTENTION_EXTREMES[case](*_attention_inputs(2, 5, 3, 4, 6))
    want = _attention(*(t.double() for t in inputs), "reference")
    for backend in BACKENDS:
        for i, (got, w) in enumerate(zip(_attention(*inputs, backend), want)):
            got = got.double()
            assert torch.equal(got.isnan(), w.isnan()) and torch.equal(got.isinf(), w.isinf()), (case, backend, i)
            assert torch.equal(got[w.isinf()], w[w.isinf()]), (case, backend, i)
            finite = torch.isfinite(w)
            if finite.any():
                err, scale = (got - w)[finite].abs().max().item(), w[finite].abs().max().item()
                assert err <= 1e-3 * scale, f"{case}, {backend}, output {i}: error {err:.3g} for values to {scale:.3g}"


def test_attention_scores_near_the_float32_maximum_agree_with_the_oracle():
    """Scores of both signs up to 3e38 (one k carries all of v): the differences from the row's maximum overflow to
    -inf, whose exp is 0, and the attention is one-hot, on every backend as in the oracle. (Where the sum over k
    itself passes the float32 maximum, its value depends on the order of the sum: inf - inf in one order, NaN.)"""
    x, u, e, _ = _attention_inputs(2, 5, 3, 4, 6)
    v = torch.zeros(6)
    v[2] = 3e38
    want = _attention(*(t.double() for t in (x, u, e, v)), "reference")
    assert ((want[1] == 0) | (want[1] == 1)).all()
    for backend in BACKENDS:
        for got, w in zip(_attention(x, u, e, v, backend), want):  # the scores' gradients: 0 at a one-hot a
            assert_close(got.double(), w, dtype=F32)


BLEND_EXTREMES = [(where, value) for where in ("S", "partner", "coef", "bank")
                  for value in (NAN, INF, -INF, 1e30, 3e38, 1e-40)]


@pytest.mark.parametrize("where, value", BLEND_EXTREMES, ids=[f"{w}={v}" for w, v in BLEND_EXTREMES])
def test_blend_extreme_values_agree(where, value):
    """A non-finite, huge or subnormal value in a blended feature, its partner's, the coefficient or the bank: the
    same values, NaN and infinities on every backend, outputs and gradients."""
    S, T, coef, bank, quadrant, shift, select = _blend_inputs(4, 3, 5)
    select[0, 0] = True
    if where == "S":
        S = _with(S, 1, value)  # image 0, class 0: blended by both
    elif where == "partner":
        S = _with(S, 3 * 3 * 5 + 1, value)  # image 3, class 0: image 0's partner
    elif where == "coef":
        coef = torch.tensor(value)
    else:
        bank = bank.clone()
        bank[:, :, 2] = value
    results = {b: _instance(S, T, coef, b) + _prototype(S, T, coef, bank, quadrant, shift, select, b)
               for b in BACKENDS}
    _same(results, f"{where} = {value}")


# ---- 3. autograd shapes of use ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("grad", [g for g in itertools.product([False, True], repeat=4) if any(g)],
                         ids=lambda g: "".join(n for n, r in zip("xuev", g) if r))
def test_attention_gradients_of_every_subset_of_inputs(backend, grad):
    inputs = _attention_inputs(2, 5, 3, 4, 6, torch.float64)
    got, want = _attention(*inputs, backend, grad), _attention(*inputs, "reference", grad)
    for g, w in zip(got, want):
        assert_close(g, w)


def _views(x, u, e, v):
    """Leaves and the views of them the op takes: x expanded over the batch (stride 0), u as a permuted copy, e
    transposed, v expanded from one element and, separately, a strided column."""
    x1 = x[:1].clone().requires_grad_()
    uT = u.permute(2, 0, 1).contiguous().requires_grad_()
    eT = e.t().contiguous().requires_grad_()
    v1 = v[:1].clone().requires_grad_()
    return [x1, uT, eT, v1], (x1.expand_as(x), uT.permute(1, 2, 0), eT.t(), v1.expand_as(v))


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_attention_takes_expanded_and_transposed_views(backend):
    inputs = _attention_inputs(2, 5, 3, 4, 6, torch.float64)
    results = []
    for run in (backend, "reference"):
        leaves, views = _views(*inputs)
        S, a = (reference.semantic_attention(*views) if run == "reference"
                else ops.semantic_attention(*views, backend=run))
        results.append([S, a, *torch.autograd.grad((S * _weights(S)).sum() + (a ** 2).sum(), leaves)])
    for g, w in zip(*results):
        assert_close(g, w)


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_outputs_used_twice_and_backward_run_twice(backend):
    """Each output feeds the loss twice; backward with retain_graph, then again: gradients accumulate to twice the
    oracle's."""
    inputs = _attention_inputs(2, 5, 3, 4, 6, torch.float64)
    S0, T, coef, bank, quadrant, shift, select = _blend_inputs(4, 3, 4, torch.float64)
    grads = []
    for run in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (*inputs, S0, coef, bank)]
        x, u, e, v, S, alpha, bk = leaves
        f = reference if run == "reference" else ops
        kw = {} if run == "reference" else {"backend": run}
        A, a = f.semantic_attention(x, u, e, v, **kw)
        S1, T1 = f.instance_blend(S, T, alpha, **kw)
        S2, T2 = f.prototype_blend(S1, T, alpha, bk, quadrant, shift, select, **kw)
        loss = ((A * A).sum() + A.sum() * a.sum() + (S1 * S2).sum() + S1.sum() * T1.sum() + (S2 ** 2).sum()
                + T2.sum() * alpha)
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append([t.grad for t in leaves])
    for g, w in zip(*grads):
        assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [g for g in itertools.product([False, True], repeat=3) if any(g)],
                         ids=lambda g: "+".join(n for n, r in zip(("S", "coef", "bank"), g) if r))
def test_blend_gradients_of_every_subset_of_inputs(backend, grad):
    """Both blends with any of S, the coefficient and the bank frozen: the torch backend's gradients, None for an
    input that takes no part (the bank in instance_blend)."""
    S, T, coef, bank, quadrant, shift, select = _blend_inputs(4, 3, 5)
    results = []
    for run in (backend, "torch"):
        leaves = [t.clone().requires_grad_(g) for t, g in zip((S, coef, bank), grad)]
        S1, T1 = ops.instance_blend(leaves[0], T, leaves[1], backend=run)
        S2, T2 = ops.prototype_blend(leaves[0], T, leaves[1], leaves[2], quadrant, shift, select, backend=run)
        loss = (S1 ** 2).sum() + T1.sum() + (S2 * S1).sum() + T2.sum()
        results.append(torch.autograd.grad(loss, [t for t in leaves if t.requires_grad]))
    for g, w in zip(*results):
        assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_input_changed_in_place_before_backward_is_refused(backend):
    """Every saved input is checked against its version at the forward, the C++ autograd's too: changed in place
    before the backward (a prototype bank updated between forward and backward), it is torch's error, never a
    gradient computed from the new values."""
    x, u, e, v = _attention_inputs(2, 5, 3, 4, 6)
    S, T, coef, bank, quadrant, shift, select = _blend_inputs(4, 3, 5)
    S.requires_grad_()
    cases = [
        (x, lambda t: ops.semantic_attention(t, u, e, v, backend=backend)[0]),
        (u, lambda t: ops.semantic_attention(x, t, e, v, backend=backend)[0]),
        (e, lambda t: ops.semantic_attention(x, u, t, v, backend=backend)[0]),
        (v, lambda t: ops.semantic_attention(x, u, e, t, backend=backend)[0]),
        (S, lambda t: ops.instance_blend(t, T, coef, backend=backend)[0]),
        (bank, lambda t: ops.prototype_blend(S, T, coef, t, quadrant, shift, select, backend=backend)[0]),
    ]
    for i, (t, call) in enumerate(cases):
        arg = t.detach().clone().requires_grad_() * 1 if t is not bank else t.clone()  # the bank: a frozen buffer
        out = call(arg)
        arg.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_inference_mode_and_inference_tensors(backend):
    """Under no_grad and inference_mode the outputs need no grad (inference tensors in the latter) and equal the
    eager ones; an inference tensor where autograd must save it is torch's own error, on every backend."""
    x, u, e, v = (t.requires_grad_() for t in _attention_inputs(2, 5, 3, 4, 6))
    want = ops.semantic_attention(x, u, e, v, backend=backend)
    with torch.no_grad():
        S, a = ops.semantic_attention(x, u, e, v, backend=backend)
    assert not S.requires_grad and torch.equal(S, want[0].detach()) and torch.equal(a, want[1].detach())
    with torch.inference_mode():
        S, a = ops.semantic_attention(x, u, e, v, backend=backend)
    assert S.is_inference() and torch.equal(S, want[0].detach())
    with torch.inference_mode():
        frozen = x.detach().clone()
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        ops.semantic_attention(frozen, u, e, v, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_algorithms_run_every_op(backend):
    """torch.use_deterministic_algorithms(True) (errors, not warnings) refuses no op nor gradient, and changes no
    value."""
    inputs = _attention_inputs(2, 5, 3, 4, 6)
    S, T, coef, bank, quadrant, shift, select = _blend_inputs(4, 3, 5)
    partner = torch.tensor([1, 1, 0, 1])  # rows sharing a partner: summed gradients

    def run():
        return (_attention(*inputs, backend) + _instance(S, T, coef, backend, partner)
                + _prototype(S, T, coef, bank, quadrant, shift, select, backend)
                + list(ops.prototype_bank_update(bank, torch.zeros(3, 4, dtype=torch.long), S, T, quadrant, 1,
                                                 backend=backend)))

    want = run()
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = run()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---- torch.func transforms and forward-mode AD ------------------------------------------------------------------

def _differentiable_calls(backend):
    """(op, function of one tensor) for each op with a gradient: the tensor is x, S or the coefficient."""
    x, u, e, v = _attention_inputs(2, 5, 3, 4, 6)
    S, T, coef, bank, quadrant, shift, select = _blend_inputs(4, 3, 5)
    return [
        ("semantic_attention", x, lambda t: ops.semantic_attention(t, u, e, v, backend=backend)[0]),
        ("instance_blend", S, lambda t: ops.instance_blend(t, T, coef, backend=backend)[0]),
        ("instance_blend", coef, lambda t: ops.instance_blend(S, T, t, backend=backend)[0]),
        ("prototype_blend", S, lambda t: ops.prototype_blend(t, T, coef, bank, quadrant, shift, select,
                                                            backend=backend)[0]),
    ]


TRANSFORMS = {
    "vmap": lambda f, t: torch.func.vmap(f)(t[None].expand(2, *t.shape)),
    "grad": lambda f, t: torch.func.grad(lambda s: f(s).sum())(t),
    "jacrev": lambda f, t: torch.func.jacrev(f)(t),
    "jvp": lambda f, t: torch.func.jvp(f, (t,), (torch.ones_like(t),)),
    "vjp": lambda f, t: torch.func.vjp(f, t),
    "functionalize": lambda f, t: torch.func.functionalize(f)(t),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_are_one_error_naming_the_op(backend, transform):
    """No backend has vmap or forward-mode rules, and the torch and triton backends' autograd cannot run under
    torch.func: every backend refuses with the same error. Before, torch and triton failed inside PyTorch asking to
    give "an autograd.Function" a setup_context method, while cpu ran vmap and refused grad in PyTorch's words."""
    for op, t, f in _differentiable_calls(backend):
        with pytest.raises(RuntimeError, match=rf"^dsrb\.ops\.{op}: torch\.func transforms \(vmap, grad, vjp, jvp, "
                                               r"jacrev, jacfwd, hessian, functionalize\) are not supported by any "
                                               r"backend; call the op on the whole batch"):
            TRANSFORMS[transform](f, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_of_a_public_op_is_one_error_naming_the_op(backend):
    for op, t, f in _differentiable_calls(backend):
        with fwAD.dual_level():
            dual = fwAD.make_dual(t, torch.ones_like(t))
            with pytest.raises(RuntimeError, match=rf"^dsrb\.ops\.{op}: forward-mode AD \(torch\.autograd\.forward_ad"
                                                   r"\) is not supported by any backend"):
                f(dual)
            f(t)  # no tangent on any input: runs


@pytest.mark.parametrize("backend", PYTHON_BACKENDS)
def test_backend_ops_refuse_forward_mode_ad_instead_of_a_zero_tangent(backend):
    """The torch and triton backend ops (torch.ops.dsrb.*), defined with torch.library.custom_op, whose autograd has
    no forward-mode rule: torch.func.jvp gave a zero tangent and a forward_ad dual no tangent, silently (the C++ ops
    of the extension raise). Now an error naming the op."""
    d = torch.ops.dsrb
    x, u, e, v = _attention_inputs(2, 5, 3, 4, 6)
    S, T, coef, bank, quadrant, shift, select = _blend_inputs(4, 3, 5)
    partner = torch.arange(3, -1, -1)
    calls = [
        (f"semantic_attention_{backend}", v, lambda t: getattr(d, f"semantic_attention_{backend}")(x, u, e, t)[0]),
        (f"instance_blend_{backend}", coef,
         lambda t: getattr(d, f"instance_blend_{backend}")(S, T, t, partner, False)[0]),
        (f"prototype_blend_{backend}", coef,
         lambda t: getattr(d, f"prototype_blend_{backend}")(S, T, t, bank, quadrant, shift, select, False)[0]),
    ]
    for name, t, f in calls:
        with pytest.raises(RuntimeError, match=rf"^dsrb::{name}: forward-mode AD \(torch\.func\.jvp, jacfwd, "
                                               r"torch\.autograd\.forward_ad\) is not supported"):
            torch.func.jvp(f, (t,), (torch.ones_like(t),))
        with fwAD.dual_level():
            with pytest.raises(RuntimeError, match=rf"^dsrb::{name}: forward-mode AD"):
                f(fwAD.make_dual(t, torch.ones_like(t)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quadrant_index_and_the_functional_bank_update_run_under_vmap(backend):
    """The ops without a gradient run under torch.func.vmap (PyTorch's per-sample fallback) with the per-sample
    results, the bank update with validate=True too: its value check read the batched tensor's values and failed
    inside PyTorch ("Cannot access data pointer of Tensor that doesn't have storage"). A bad value in any sample is
    still reported."""
    K, B, C, D, H, W = 3, 4, 3, 5, 2, 3
    g = _gen(4)
    a, x_sum = torch.rand(K, B, C, H * W, generator=g), torch.randn(K, B, H * W, generator=g)
    S, T = torch.randn(K, B, C, D, generator=g), torch.randint(-1, 2, (K, B, C), generator=g).float()
    quadrant = torch.randint(0, 4, (K, B, C), generator=g)
    sums, counts = torch.randn(K, C, 4, D, generator=g), torch.randint(0, 2, (K, C, 4), generator=g)
    got = torch.func.vmap(lambda a, x: ops.quadrant_index(a, x, H, W, backend=backend))(a, x_sum)
    assert torch.equal(got, torch.stack([ops.quadrant_index(a[k], x_sum[k], H, W, backend=backend) for k in range(K)]))
    update = torch.func.vmap(lambda *t: ops.prototype_bank_update(*t, 2, backend=backend))
    got = update(sums, counts, S, T, quadrant)
    want = [ops.prototype_bank_update(sums[k], counts[k], S[k], T[k], quadrant[k], 2, backend=backend)
            for k in range(K)]
    for i in range(2):
        assert torch.equal(got[i], torch.stack([w[i] for w in want]))
    with pytest.raises(ValueError, match=r"^argument 'T': expected values in \{-1, 0, 1\}, found 2\.0$"):
        update(sums, counts, S, _with(T, 2 * B * C + 1, 2.0), quadrant)
    with pytest.raises(ValueError, match=r"^argument 'quadrant': expected values in \[0, 3\], found range \[0, 4\]$"):
        update(sums, counts, S, T, _with(quadrant, B * C, 4))


@pytest.mark.parametrize("transform", ["vmap", "functionalize"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_bank_update_under_vmap_is_one_error_naming_it(backend, transform):
    """Before, under vmap: "Cannot access storage of BatchedTensorImpl" (torch, triton: the aliasing checks) or
    PyTorch's "Batching rule not implemented for dsrb::prototype_bank_update_cpu_" (cpu); under functionalize, on
    cpu, PyTorch's "Found a custom (non-ATen) operator whose output has alias annotations"."""
    K, B, C, D = 2, 4, 3, 5
    sums, counts = torch.zeros(K, C, 4, D), torch.zeros(K, C, 4, dtype=torch.long)
    S, T = torch.randn(K, B, C, D, generator=_gen(5)), torch.ones(K, B, C)
    quadrant = torch.zeros(K, B, C, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"^dsrb\.ops\.prototype_bank_update_: torch\.func transforms .* not "
                                           r"supported by any backend; under vmap call prototype_bank_update"):
        args = (sums, counts, S, T, quadrant) if transform == "vmap" else (sums[0], counts[0], S[0], T[0], quadrant[0])
        getattr(torch.func, transform)(lambda *t: ops.prototype_bank_update_(*t, 2, backend=backend))(*args)
    assert not sums.any() and not counts.any()


# ---- 4. mixed devices, dtypes and ranks ----------------------------------------------------------------------------

def _mixed_cases():
    x, u, e, v = _attention_inputs(2, 4, 3, 4, 6)
    S, T, coef, bank, quadrant, shift, select = _blend_inputs(4, 3, 5)
    a, x_sum = torch.rand(2, 3, 4), torch.randn(2, 4)
    sums, counts = torch.zeros(3, 4, 5), torch.zeros(3, 4, dtype=torch.long)
    m = lambda t: t.to("meta")  # noqa: E731
    sa, ib, pb = ops.semantic_attention, ops.instance_blend, ops.prototype_blend
    qi, bu, bu_ = ops.quadrant_index, ops.prototype_bank_update, ops.prototype_bank_update_
    one_device = r"^expected all tensors on one device, got "
    float_kind = r"expected a floating-point tensor \(float16, bfloat16, float32 or float64\), got dtype torch.int64$"
    return [
        (lambda **k: sa(m(x), u, e, v, **k), ValueError, one_device + "'x' on meta, 'u' on cpu"),
        (lambda **k: sa(x, u, e, m(v), **k), ValueError, one_device + ".*'v' on meta$"),
        (lambda **k: sa(x, u, e, v.double(), **k), TypeError, r"^expected one floating-point dtype for all features, "
                                                              r"got .*'v' torch.float64$"),
        (lambda **k: sa(x, u.long(), e, v, **k), TypeError, "^argument 'u': " + float_kind),
        (lambda **k: sa(x, u, e, v[None], **k), ValueError, r"^argument 'v': expected a 1-D tensor, got shape "
                                                            r"\(1, 6\) \(2-D\)$"),
        (lambda **k: sa(x[0], u, e, v, **k), ValueError, r"^argument 'x': expected a 3-D tensor"),
        (lambda **k: ib(S, m(T), coef, **k), ValueError, one_device + "'S' on cpu, 'T' on meta"),
        (lambda **k: ib(S, T, m(coef), **k), ValueError, one_device + ".*'alpha' on meta$"),
        (lambda **k: ib(S.long(), T, coef, **k), TypeError, "^argument 'S': " + float_kind),
        (lambda **k: ib(S, T, torch.tensor(1), **k), TypeError, r"^argument 'alpha': expected a floating-point "
                                                                r"tensor, got dtype torch.int64$"),
        (lambda **k: ib(S, T[None], coef, **k), ValueError, r"^argument 'T': expected a 2-D tensor"),
        (lambda **k: ib(S, T, coef, torch.arange(4.0), **k), TypeError, r"^argument 'partner': expected an integer "
                                                                        r"tensor"),
        (lambda **k: pb(S, T, coef, m(bank), quadrant, shift, select, **k), ValueError, one_device + ".*'bank' on "
                                                                                         "meta"),
        (lambda **k: pb(S, T, coef, bank.double(), quadrant, shift, select, **k), TypeError,
         r"^argument 'bank': expected dtype torch.float32 \(the dtype of 'S'\), got torch.float64$"),
        (lambda **k: pb(S, T, coef, bank, quadrant.float(), shift, select, **k), TypeError,
         r"^argument 'quadrant': expected an integer tensor"),
        (lambda **k: pb(S, T, coef, bank, quadrant, shift, select.long(), **k), TypeError,
         r"^argument 'select': expected a bool tensor, got dtype torch.int64$"),
        (lambda **k: pb(S, T, coef, bank[0], quadrant, shift, select, **k), ValueError,
         r"^argument 'bank': expected a 3-D tensor"),
        (lambda **k: qi(m(a), x_sum, 2, 2, **k), ValueError, one_device + "'a' on meta, 'x_sum' on cpu$"),
        (lambda **k: qi(a.long(), x_sum, 2, 2, **k), TypeError, "^argument 'a': " + float_kind),
        (lambda **k: qi(a, x_sum[..., None], 2, 2, **k), ValueError, r"^argument 'x_sum': expected a 2-D tensor"),
        (lambda **k: qi(a, x_sum, 2.0, 2, **k), TypeError, r"^argument 'height': expected an int, got float 2.0$"),
        (lambda **k: bu(sums, counts, m(S), T, quadrant, 2, **k), ValueError, one_device + ".*'S' on meta"),
        (lambda **k: bu_(m(sums), counts, S, T, quadrant, 2, **k), ValueError, one_device + "'sums' on meta"),
        (lambda **k: bu(sums, counts.float(), S, T, quadrant, 2, **k), TypeError,
         r"^argument 'counts': expected an integer tensor"),
        (lambda **k: bu(sums, counts, S, T, quadrant, 2.0, **k), TypeError,
         r"^argument 'cap': expected an int, got float 2.0$"),
        (lambda **k: bu(sums[0], counts, S, T, quadrant, 2, **k), ValueError, r"^argument 'sums': expected a 3-D "
                                                                              r"tensor"),
    ]


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_mixed_devices_dtypes_and_ranks_are_one_error_naming_the_argument(backend):
    """A meta tensor beside CPU ones, a dtype that differs from its partners', an integer dtype where a float one
    goes and a wrong rank: the same one-line error on every backend, before any backend is chosen."""
    for i, (call, kind, match) in enumerate(_mixed_cases()):
        with pytest.raises(kind, match=match) as info:
            call(backend=backend)
        assert "\n" not in str(info.value), (i, str(info.value))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_meta_inputs_name_the_backend_that_cannot_take_them(backend):
    """All on meta: the torch backend (and auto) computes shapes; a backend forced on meta says it cannot serve
    them."""
    x, u, e, v = (t.to("meta") for t in _attention_inputs(2, 4, 3, 4, 6))
    S, a = ops.semantic_attention(x, u, e, v)
    assert S.shape == (2, 3, 4) and a.shape == (2, 3, 4) and S.device.type == "meta"
    with pytest.raises(RuntimeError, match=rf"backend '{backend}' was requested for device=meta"):
        ops.semantic_attention(x, u, e, v, backend=backend)
