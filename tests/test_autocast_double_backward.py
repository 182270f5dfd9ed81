"""Every backend of every op under torch.autocast, and under a second derivative.

- Autocast does not reach inside an op: forward and backward (the backward also run under autocast) give, bit for
  bit, what they give without it, in the inputs' dtype, as the fake implementations declare. Before, the ``cpu``
  kernels' backward failed ("expected scalar type Float but found BFloat16": their ATen products were autocast),
  and the ``torch`` backend's products and bank sums were rounded to bf16.
- A second derivative through an op is an error, never a silent zero: the ``torch`` and ``triton`` backends once
  left the op's part out of ``torch.autograd.grad(g, alpha)`` (torch's once_differentiable links its error to
  detached copies of the inputs).

Runs on CUDA tensors on a GPU host, else on CPU tensors (``triton`` under its interpreter).
"""

import pytest
import torch

import dsrb.ops as ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "cuda" if DEVICE == "cuda" else "cpu", "triton"]


def _skip_unavailable(op: str, backend: str) -> None:
    why = ops.reasons(op, torch.device(DEVICE), torch.float32)[backend]
    if why:
        pytest.skip(f"{backend}: {why}")


def _inputs():
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(shape, generator=g).to(DEVICE).requires_grad_(grad)

    B, N, C, D, I = 3, 6, 5, 7, 9
    T = torch.tensor([[1, 0, -1, 1, 0], [0, 1, 0, -1, 1], [1, 1, 0, 0, -1]], dtype=torch.float32, device=DEVICE)
    index = dict(dtype=torch.int64, device=DEVICE)
    q = torch.randint(0, 4, (B, C), generator=g).to(**index)
    shift = torch.randint(1, 4, (B, C), generator=g).to(**index)
    select = (torch.rand(B, C, generator=g) < 0.5).to(DEVICE)
    S, alpha, bank = randn(B, C, D), torch.tensor(0.3, device=DEVICE, requires_grad=True), randn(C, 4, D)
    # Sums that bf16 cannot hold: 1000 + 1 is 1000 in bf16.
    big = torch.where(torch.arange(B, device=DEVICE)[:, None, None] == 0, 1000.0, 1.0).expand(B, C, D)
    sums, counts = torch.zeros(C, 4, D, device=DEVICE), torch.zeros(C, 4, **index)
    xuev = (randn(B, N, D), randn(B, N, I), randn(C, I), randn(I))
    a, x_sum = torch.softmax(randn(B, C, 4, grad=False), -1), randn(B, 4, grad=False)
    return {
        "semantic_attention": (lambda b: ops.semantic_attention(*xuev, backend=b), xuev),
        "instance_blend": (lambda b: ops.instance_blend(S, T, alpha, backend=b), (S, alpha)),
        "prototype_blend": (lambda b: ops.prototype_blend(S, T, alpha, bank, q, shift, select, backend=b),
                            (S, alpha, bank)),
        "quadrant_index": (lambda b: (ops.quadrant_index(a, x_sum, 2, 2, backend=b),), ()),
        "prototype_bank_update": (lambda b: ops.prototype_bank_update(sums, counts, big.contiguous(), T.abs(),
                                                                      torch.zeros_like(q), backend=b), ()),
    }


def _run(fn, leaves, backend):
    out = fn(backend)
    floats = [o for o in out if o.is_floating_point() and o.requires_grad]
    grads = torch.autograd.grad(sum((o * o).sum() for o in floats), leaves) if leaves else ()
    return list(out) + list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(_inputs()))
def test_autocast_does_not_reach_inside_the_ops(op, backend):
    _skip_unavailable(op, backend)
    fn, leaves = _inputs()[op]
    want = _run(fn, leaves, backend)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _run(fn, leaves, backend)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, (i, g.dtype, w.dtype)
        assert torch.equal(g, w), (i, (g - w).abs().max() if g.is_floating_point() else (g != w).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_through_an_op_is_an_error(backend):
    """d/dalpha of dL/dalpha with L = |blend(S; alpha)|^2 + alpha^3 (both blends), and d/dx of dL/dx with
    L = |S|^2 + sum x^3: the op's part cannot be computed, so each raises instead of returning the x^3 (alpha^3) part
    alone."""
    _skip_unavailable("instance_blend", backend)
    inputs = _inputs()
    x = inputs["semantic_attention"][1][0]
    S, alpha = inputs["instance_blend"][1]
    cases = [
        (lambda: (ops.instance_blend(S.detach(), S.new_tensor([[0.0] * 5, [1.0] * 5, [1.0] * 5]), alpha,
                                     backend=backend)[0] ** 2).sum() + alpha ** 3, alpha),
        (lambda: (inputs["semantic_attention"][0](backend)[0] ** 2).sum() + (x ** 3).sum(), x),
        (lambda: (ops.prototype_blend(S.detach(), S.new_zeros(3, 5), alpha, S.new_ones(5, 4, 7),
                                      *(S.new_zeros(3, 5, dtype=torch.int64) + k for k in (0, 1)),
                                      S.new_ones(3, 5, dtype=torch.bool), backend=backend)[0] ** 2).sum()
         + alpha ** 3, alpha),
    ]
    for loss, leaf in cases:
        g, = torch.autograd.grad(loss(), leaf, create_graph=True)
        with pytest.raises(RuntimeError, match="backward cannot be differentiated"):
            torch.autograd.grad(g.sum(), leaf)
