"""semantic_attention (torch backend) against the oracle: outputs, all gradients, shapes, dtypes, registration."""

import importlib
import random

import pytest
import torch

import dsrb.ops as ops
from dsrb import reference
from helpers import TORCH_AND_AUTO, assert_close, assert_within_baseline, noncontiguous

# The package re-exports the function under the module's name, so fetch the module itself.
sa_module = importlib.import_module("dsrb.ops.semantic_attention")

# (B, N, C, D, I): odd N (49, 13, 30), C in {1, 20, 80, 200}, D and I not multiples of 16, B = 1, and a random draw.
_rng = random.Random(0)
SHAPES = [(1, 49, 1, 7, 5), (2, 13, 20, 33, 17), (3, 30, 80, 9, 12), (1, 13, 200, 5, 4), (1, 1, 3, 4, 4),
          (0, 49, 5, 8, 6), (2, 5, 3, 0, 4), (2, 5, 3, 4, 0)] + [
    (_rng.randint(1, 4), _rng.choice([1, 13, 49]), _rng.choice([1, 7, 20]), _rng.randint(1, 40), _rng.randint(1, 20))
    for _ in range(3)
]


def make_inputs(B, N, C, D, I, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    u = torch.randn(B, N, I, generator=g, dtype=torch.float64)
    e = torch.randn(C, I, generator=g, dtype=torch.float64)
    v = torch.randn(I, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (x, u, e, v)]


def run(fn, inputs, seed=1):
    """Outputs and gradients of all inputs for a random linear loss on both outputs."""
    S, a = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    wS = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    wa = torch.randn(a.shape, generator=g, dtype=torch.float64).to(a.dtype)
    grads = torch.autograd.grad((S * wS).sum() + (a * wa).sum(), inputs, allow_unused=True)
    return (S, a), grads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_oracle_float64(shape):
    inputs = make_inputs(*shape)
    (S, a), grads = run(lambda *t: ops.semantic_attention(*t, backend="torch"), inputs)
    (S_ref, a_ref), grads_ref = run(reference.semantic_attention, inputs)
    assert S.shape == (shape[0], shape[2], shape[3]) and a.shape == (shape[0], shape[2], shape[1])
    assert_close(S, S_ref, what="S")
    assert_close(a, a_ref, what="a")
    for name, g, g_ref in zip("xuev", grads, grads_ref):
        if g_ref is None:  # B = 0: nothing reaches the inputs
            assert g is None or g.abs().sum() == 0
        else:
            assert_close(g, g_ref, what=f"grad {name}")


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
@pytest.mark.parametrize("shape", [(2, 3, 0, 4, 2), (0, 3, 2, 4, 2)], ids=["C=0", "B=0"])
def test_empty_sums_give_zero_gradients_whatever_v(shape, backend):
    """grad u sums over classes and grad e over rows: with none, they are 0 even where v is inf or NaN (as the
    oracle); the torch backend multiplied the empty sums by v afterwards, NaN."""
    inputs = make_inputs(*shape)
    with torch.no_grad():
        inputs[3][:] = torch.tensor([float("inf"), float("nan")])
    _, grads = run(lambda *t: ops.semantic_attention(*t, backend=backend), inputs)
    for name, g in zip("xuev", grads):
        assert g is None or torch.equal(g, torch.zeros_like(g)), f"grad {name}: {g}"


def test_official_decoupling_collapses_to_op():
    """The two chained linears fc3 -> fc4 of the official module equal scoring with v = W3^T w4 (spec §3.3)."""
    torch.manual_seed(0)
    B, D, H, W, C, E, I = 2, 6, 5, 3, 4, 5, 7
    fc1, fc2 = torch.nn.Linear(D, I, bias=False).double(), torch.nn.Linear(E, I, bias=False).double()
    fc3, fc4 = torch.nn.Linear(I, I).double(), torch.nn.Linear(I, 1).double()
    X = torch.randn(B, D, H, W, dtype=torch.float64)
    words = torch.randn(C, E, dtype=torch.float64)
    S_off, F, a_off = reference.semantic_decoupling_official(X, words, fc1, fc2, fc3, fc4)
    x = X.flatten(2).transpose(1, 2)
    v = fc3.weight.t() @ fc4.weight[0]
    S, a = ops.semantic_attention(x, fc1(x), fc2(words), v, backend="torch")
    assert F.shape == (B, H, W, C, D)
    assert_close(S, S_off, what="S")
    assert_close(a, a_off.reshape(B, H * W, C).transpose(1, 2), what="a")


def test_chunked_over_classes(monkeypatch):
    """Force many class chunks (forward and backward) and compare with the oracle."""
    monkeypatch.setattr(sa_module, "_CHUNK_ELEMENTS", 50)
    inputs = make_inputs(2, 13, 20, 9, 6)
    out, grads = run(lambda *t: ops.semantic_attention(*t, backend="torch"), inputs)
    out_ref, grads_ref = run(reference.semantic_attention, inputs)
    for o, r in zip(out + grads, out_ref + grads_ref):
        assert_close(o, r)


def test_noncontiguous_inputs():
    inputs = make_inputs(2, 13, 5, 9, 6)
    strided = [noncontiguous(t) for t in inputs]
    assert not any(t.is_contiguous() for t in strided)
    out, grads = run(lambda *t: ops.semantic_attention(*t, backend="torch"), strided)
    out_ref, grads_ref = run(reference.semantic_attention, inputs)
    for o, r in zip(out + grads, out_ref + grads_ref):
        assert_close(o, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision(dtype):
    """Low-precision inputs against the oracle in fp64 on the same rounded values."""
    inputs = make_inputs(2, 49, 7, 16, 8, dtype=dtype)
    out, grads = run(lambda *t: ops.semantic_attention(*t, backend="torch"), inputs)
    assert all(t.dtype == dtype for t in out + grads)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    out_ref, grads_ref = run(reference.semantic_attention, ref_inputs)
    for o, r in zip(out + grads, out_ref + grads_ref):
        assert_close(o, r, dtype=dtype)


def test_gradcheck():
    inputs = make_inputs(2, 5, 3, 4, 3)
    assert torch.autograd.gradcheck(lambda *t: ops.semantic_attention(*t, backend="torch"), inputs)


def test_opcheck():
    inputs = make_inputs(2, 7, 3, 5, 4)
    torch.library.opcheck(torch.ops.dsrb.semantic_attention_torch.default, tuple(inputs))
    torch.library.opcheck(torch.ops.dsrb.semantic_attention_torch.default, tuple(t.detach() for t in inputs))
    # Strided inputs: the outputs and gradients must have the layout the fake implementations declare.
    torch.library.opcheck(torch.ops.dsrb.semantic_attention_torch.default, tuple(noncontiguous(t) for t in inputs))
    x = inputs[0].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # channels-last-like view
    torch.library.opcheck(torch.ops.dsrb.semantic_attention_torch.default, (x, *inputs[1:]))


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_compile_fullgraph_matches_eager(strided, backend):
    """Strided x as the model passes it (a transposed view): inductor checks the declared output strides."""
    inputs = make_inputs(2, 13, 5, 9, 6, dtype=torch.float32)
    if strided:
        inputs[0] = inputs[0].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    compiled = torch.compile(lambda *t: ops.semantic_attention(*t, backend=backend), fullgraph=True)
    out, grads = run(compiled, inputs)
    out_ref, grads_ref = run(lambda *t: ops.semantic_attention(*t, backend=backend), inputs)
    for o, r in zip(out + grads, out_ref + grads_ref):
        assert_close(o, r)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, u, e, v: (x[0], u, e, v), "'x'.*3-D"),
        (lambda x, u, e, v: (x, u[:, :-1], e, v), "'u'.*shape"),
        (lambda x, u, e, v: (x, u, e[:, :-1], v), "'e'.*shape"),
        (lambda x, u, e, v: (x, u, e, v[:-1]), "'v'.*shape"),
        (lambda x, u, e, v: (x.long(), u, e, v), "'x'.*floating"),
        (lambda x, u, e, v: (x, u.float(), e, v), "dtype.*'u' torch.float32"),
        (lambda x, u, e, v: (x, u, e, v.to("meta")), "'v' on meta"),
        (lambda x, u, e, v: (x[:, :0], u[:, :0], e, v), "N = 0"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    x, u, e, v = (t.detach() for t in make_inputs(2, 5, 3, 4, 3))
    with pytest.raises((TypeError, ValueError), match=match):
        ops.semantic_attention(*change(x, u, e, v))


def test_within_baseline_compares_shapes():
    """assert_within_baseline (the half-precision criterion of the extension's and the Triton kernels' tests) passed
    an output of another shape: any output when the expected one is empty (an empty batch), and one that broadcasts
    against it (a kernel writing one row of B)."""
    want = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"S: shape \(2, 4\), expected \(0, 4\)"):
        assert_within_baseline(torch.zeros(2, 4, dtype=torch.half), want[:0], want[:0], dtype=torch.half, what="S")
    with pytest.raises(AssertionError, match=r"a: shape \(1, 4\), expected \(3, 4\)"):
        assert_within_baseline(want[:1].half(), want[:1].expand(3, 4), want[:1].expand(3, 4), dtype=torch.half,
                               what="a")
    assert_within_baseline(want.half(), want, want.half(), dtype=torch.half)
