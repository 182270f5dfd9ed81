"""Edge cases of the ``triton`` backend found by audit: element offsets beyond int32 and maps larger than one
register tile. Each case compares the triton backend with the torch backend through the public ops.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which
computes int32 index arithmetic as the GPU does (it wraps round), so the int32 cases reproduce here; they build 8 GiB
CPU views and run there only. On a GPU the compiled kernels run the other cases: the int64-offset variants forced at
small shapes, and the tiled quadrant index.
"""

import pytest
import torch

import dsrb.ops as ops
from helpers import assert_close, triton_interpreter_problem

pytest.importorskip("triton", reason="the optional triton package is not installed")

if triton_interpreter_problem():
    pytest.skip(triton_interpreter_problem(), allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# A float16 storage of 2**32 + 2**20 elements (8 GiB of address space, of which the cases touch a few pages): a view
# starting at element 2**31 with a stride of 2**30 along one dimension puts its third entry at offset 2**31 from its
# start, which int32 arithmetic wraps to -2**31: back to the first elements of the storage, which hold SENTINEL.
STRIDE = 2**30
START = 2**31
SENTINEL = 100.0


@pytest.fixture(scope="module")
def storage():
    if DEVICE == "cuda":
        pytest.skip("the int32-wrap cases build CPU views for the interpreter; on a GPU the forced IDX64 case below "
                    "runs the int64 code")
    try:
        base = torch.empty(2**32 + 2**20, dtype=torch.float16)
    except RuntimeError as exc:  # an address space or overcommit limit
        pytest.skip(f"cannot reserve 8 GiB of address space: {exc}")
    base[:2**20] = SENTINEL
    return base


def spread(storage, values, dim, slot=0):
    """A view of ``storage`` equal to ``values`` (float16), whose dimension ``dim`` has stride 2**30 elements (the
    other dimensions dense); ``slot`` keeps the views of one case apart (64 elements each)."""
    shape = values.shape
    strides, step = [STRIDE] * len(shape), 1
    for d in reversed(range(len(shape))):
        if d != dim:
            strides[d], step = step, step * shape[d]
    assert step <= 64
    view = storage.as_strided(shape, strides, START + 64 * slot)
    view.copy_(values)
    return view


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).half()


def both(fn, inputs, differentiable):
    """Outputs and gradients (for the ``differentiable`` indices of ``inputs``) of fn under each backend; the torch
    backend gets dense copies."""
    results = []
    for backend in ("triton", "torch"):
        ins = [t.detach().clone() if backend == "torch" else t.detach() for t in inputs]
        for i in differentiable:
            ins[i].requires_grad_()
        out = fn(*ins, backend=backend)
        out = out if isinstance(out, tuple) else (out,)
        grads = ()
        if differentiable:
            g = torch.Generator().manual_seed(1)
            loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in out if o.is_floating_point())
            grads = torch.autograd.grad(loss, [ins[i] for i in differentiable])
        results.append(list(out) + list(grads))
    return results


def check(fn, inputs, differentiable=()):
    got, want = both(fn, inputs, differentiable)
    for o, r in zip(got, want):
        assert not (o == SENTINEL).any(), "read an element outside the view (int32 offset wrapped round)"
        if o.is_floating_point():
            assert_close(o, r)
        else:
            assert torch.equal(o, r)


def test_semantic_attention_offsets_beyond_int32(storage):
    """x and u strided by 2**30 along N (N = 3): the product kernel's x offsets and the score and backward kernels' u
    offsets pass 2**31."""
    x = spread(storage, randn(1, 3, 4, seed=0), 1, slot=0)
    u = spread(storage, randn(1, 3, 5, seed=1), 1, slot=1)
    check(ops.semantic_attention, [x, u, randn(3, 5, seed=2), randn(5, seed=3)], differentiable=(0, 1, 2, 3))


def test_semantic_attention_class_offsets_beyond_int32(storage):
    """e strided by 2**30 along C: the score and backward kernels' class offsets pass 2**31."""
    e = spread(storage, randn(3, 5, seed=2), 0, slot=2)
    check(ops.semantic_attention, [randn(2, 3, 4), randn(2, 3, 5, seed=1), e, randn(5, seed=3)],
          differentiable=(0, 1, 2, 3))


def test_instance_blend_offsets_beyond_int32(storage):
    S = spread(storage, randn(2, 3, 4), 1, slot=3)
    T = torch.tensor([[0.0, 0, 0], [1, 1, 1]]).half()  # image 0 blends every class with image 1
    check(lambda s, a, backend: ops.instance_blend(s, T, a, backend=backend), [S, torch.tensor(0.25)],
          differentiable=(0, 1))


def test_prototype_blend_offsets_beyond_int32(storage):
    S = spread(storage, randn(2, 3, 4), 1, slot=4)
    bank = spread(storage, randn(3, 4, 4, seed=1), 0, slot=5)  # the bank's class offsets too
    T = torch.zeros(2, 3).half()
    q, shift = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    select = torch.ones(2, 3, dtype=torch.bool)
    check(lambda s, b, k, backend: ops.prototype_blend(s, T, b, k, q, shift, select, backend=backend),
          [S, torch.tensor(0.25), bank], differentiable=(0, 1, 2))


def test_prototype_bank_update_offsets_beyond_int32(storage):
    S = spread(storage, randn(2, 3, 4), 1, slot=6)
    T = torch.ones(2, 3).half()
    q = torch.tensor([[0, 1, 2], [3, 0, 1]])
    check(lambda s, backend: ops.prototype_bank_update(torch.zeros(3, 4, 4).half(), torch.zeros(3, 4, dtype=torch.long),
                                                       s, T, q, 5, backend=backend), [S])


def test_quadrant_index_offsets_beyond_int32(storage):
    a = randn(1, 3, 4)
    a[0, 2] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # class 2 peaks bottom right, unlike the sentinel's first entry
    a = spread(storage, a, 1, slot=7)
    check(lambda t, backend: ops.quadrant_index(t, torch.ones(1, 4).half(), 2, 2, backend=backend), [a])


def test_quadrant_index_map_beyond_one_tile():
    """A 1025 x 1025 map padded to one 2048 x 2048 register tile exceeded Triton's 2**20-element limit (an error
    from the compiler, where the torch backend answers): the tiled kernel serves it."""
    H = W = 1025
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, H * W, generator=g)
    x_sum = torch.rand(1, H * W, generator=g)
    a[0, 0, (H - 1) * W + 600] = 5.0  # the peak: bottom right (row 1024 >= 512, column 600 >= 512)
    a, x_sum = a.to(DEVICE), x_sum.to(DEVICE)
    q = ops.quadrant_index(a, x_sum, H, W, backend="triton")
    assert q.tolist() == [[3]]
    assert torch.equal(q, ops.quadrant_index(a, x_sum, H, W, backend="torch"))


def _maps(B, C, H, W, dtype, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    if case == "ties":  # few distinct values: many tied maxima, across tiles too
        a = torch.randint(0, 3, (B, C, H * W), generator=g).to(dtype)
        x_sum = torch.ones(B, H * W, dtype=dtype)
    else:
        a = torch.rand(B, C, H * W, generator=g).to(dtype)
        x_sum = torch.randn(B, H * W, generator=g).to(dtype)
    if case == "special":
        a[0, 0, -1] = float("nan")  # the last row and column hold a NaN: they win
        a[1 % B, C - 1] = float("-inf")  # a map of -inf * x: -inf, inf or NaN
        x_sum[0, H * W // 2] = float("inf")
    return a, x_sum


@pytest.mark.parametrize("H, W", [(7, 9), (13, 5), (1, 37), (37, 1), (16, 16)])
@pytest.mark.parametrize("case", ["random", "ties", "special"])
def test_quadrant_index_tiled_kernel_matches_torch(monkeypatch, H, W, case):
    """The tiled kernel's rules (first index on ties, first NaN row or column wins, uneven halves) at small maps cut
    into many tiles of 16 elements (4 x 4, 1 x 16, 16 x 1: both tile budgets lowered to 16)."""
    from dsrb.kernels import quadrant_index as kernel

    monkeypatch.setattr(kernel, "_MAX_TILE", 16)
    monkeypatch.setattr(kernel, "_TILED_TILE", 16)
    for dtype in (torch.float32, torch.float16):
        a, x_sum = (t.to(DEVICE) for t in _maps(2, 3, H, W, dtype, case))
        got = ops.quadrant_index(a, x_sum, H, W, backend="triton")
        assert torch.equal(got, ops.quadrant_index(a, x_sum, H, W, backend="torch")), (dtype, got)


def test_forced_int64_offsets_match_torch(monkeypatch):
    """The IDX64 variants of every kernel, forced at small odd shapes (they run only past int32 otherwise): forward
    and every gradient equal the torch backend's, as the int32 code's do. On a GPU this is the compiled int64 code."""
    import importlib

    for name in ("semantic_attention", "instance_blend", "prototype_blend", "prototype_bank_update", "quadrant_index"):
        monkeypatch.setattr(importlib.import_module(f"dsrb.kernels.{name}"), "needs_int64", lambda *tensors: True)
    g = torch.Generator().manual_seed(5)
    B, N, C, D, I = 3, 5, 7, 6, 9

    def rand(*shape):
        return torch.randn(shape, generator=g).to(DEVICE)

    T = torch.randint(-1, 2, (B, C), generator=g).float().to(DEVICE)
    q = torch.randint(0, 4, (B, C), generator=g).to(DEVICE)
    shift = torch.randint(1, 4, (B, C), generator=g).to(DEVICE)
    select = (torch.rand(B, C, generator=g) < 0.5).to(DEVICE)
    x_sum = rand(B, 6).abs()
    cases = [
        (ops.semantic_attention, [rand(B, N, D), rand(B, N, I), rand(C, I), rand(I)], (0, 1, 2, 3)),
        (lambda S, a, backend: ops.instance_blend(S, T, a, backend=backend), [rand(B, C, D), torch.tensor(0.3)],
         (0, 1)),
        (lambda S, b, k, backend: ops.prototype_blend(S, T, b, k, q, shift, select, backend=backend),
         [rand(B, C, D), torch.tensor(0.3), rand(C, 4, D)], (0, 1, 2)),
        (lambda S, backend: ops.prototype_bank_update(torch.zeros(C, 4, D, device=DEVICE),
                                                      torch.zeros(C, 4, dtype=torch.long, device=DEVICE), S, T, q, 2,
                                                      backend=backend), [rand(B, C, D)], ()),
        (lambda a, backend: ops.quadrant_index(a, x_sum, 2, 3, backend=backend),
         [torch.rand(B, C, 6, generator=g).to(DEVICE)], ()),
    ]
    for fn, inputs, differentiable in cases:
        inputs = [t.to(DEVICE) for t in inputs]
        results = []
        for backend in ("triton", "torch"):
            ins = [t.detach().clone().requires_grad_(i in differentiable) for i, t in enumerate(inputs)]
            out = fn(*ins, backend=backend)
            out = out if isinstance(out, tuple) else (out,)
            grads = ()
            if differentiable:
                weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) for o in out]
                loss = sum((o * w).sum() for o, w in zip(out, weights) if o.is_floating_point())
                grads = torch.autograd.grad(loss, [ins[i] for i in differentiable])
            results.append(list(out) + list(grads))
        for got, want in zip(*results):
            if got.is_floating_point():
                assert_close(got, want)
            else:
                assert torch.equal(got, want)
