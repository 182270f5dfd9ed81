"""``semantic_attention``: category-wise attention of semantic decoupling (architecture §3, spec §3.3).

s[b, c, n] = sum_k v[k] * tanh(u[b, n, k] * e[c, k]);  a = softmax over n;  S[b, c, :] = sum_n a[b, c, n] * x[b, n, :]

The ``torch`` backend uses the exact identities of the spec (the collapsed score vector v, S = a @ x) and walks over
classes in chunks, in the forward and again in the backward, where it recomputes the tanh terms instead of saving
them: its extra memory is one chunk of (B, N, C_chunk, I) plus O(B*C*N + B*C*D), never the official (B, N, C, D)
map or a full (B, N, C, I) tensor.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._checks import check_same_device, check_same_dtype, check_tensor
from ._common import compute_dtype, raw_tensor, refuse_transforms
from ._registry import define_op, extension_backends, register_impl, register_python_op, select

# Elements of one (B, N, C_chunk, I) temporary: 8 Mi elements = 32 MiB in fp32.
_CHUNK_ELEMENTS = 8 * 1024 * 1024


def _class_chunks(B: int, N: int, C: int, I: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, B * N * I))
    return [(c0, min(C, c0 + step)) for c0 in range(0, C, step)]


def _tanh_terms(u: Tensor, e: Tensor) -> Tensor:
    """(B, N, I) x (Cc, I) -> z (B, N, Cc, I) = tanh(u[b, n, k] * e[c, k])."""
    return torch.tanh(u[:, :, None, :] * e[None, None, :, :])


def _torch_forward(x: Tensor, u: Tensor, e: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    xc, uc, ec, vc = x.to(cd), u.to(cd), e.to(cd), v.to(cd)
    B, N, _ = x.shape
    C, I = e.shape
    s = torch.empty((B, C, N), dtype=cd, device=x.device)
    for c0, c1 in _class_chunks(B, N, C, I):
        s[:, c0:c1, :] = (_tanh_terms(uc, ec[c0:c1]) @ vc).transpose(1, 2)
    a = torch.softmax(s, dim=-1)
    S = torch.bmm(a, xc)
    return S.to(x.dtype).contiguous(), a.to(x.dtype).contiguous()


def _torch_backward(
    grad_S: Tensor, grad_a: Tensor, x: Tensor, u: Tensor, e: Tensor, v: Tensor, a: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    xc, uc, ec, vc, ac = x.to(cd), u.to(cd), e.to(cd), v.to(cd), a.to(cd)
    gS, ga = grad_S.to(cd), grad_a.to(cd)
    B, N, _ = x.shape
    C, I = e.shape
    grad_x = torch.bmm(ac.transpose(1, 2), gS)  # through S = a @ x
    ga_total = ga + torch.bmm(gS, xc.transpose(1, 2))  # (B, C, N)
    gs = ac * (ga_total - (ac * ga_total).sum(-1, keepdim=True))  # softmax backward, (B, C, N)
    grad_u = torch.zeros_like(uc)
    grad_e = torch.empty_like(ec)
    grad_v = torch.zeros_like(vc)
    for c0, c1 in _class_chunks(B, N, C, I):
        z = _tanh_terms(uc, ec[c0:c1])  # recomputed, (B, N, Cc, I)
        g = gs[:, c0:c1, :].transpose(1, 2).contiguous()  # (B, N, Cc)
        grad_v += g.reshape(-1) @ z.flatten(0, 2)
        t = z.square_().neg_().add_(1).mul_(g[..., None])  # g * (1 - z^2), in z's buffer; v is applied below
        grad_e[c0:c1] = (t * uc[:, :, None, :]).sum((0, 1))
        grad_u += t.mul_(ec[c0:c1]).sum(2)
    # v is factored out of the sums over classes (grad u) and rows (grad e): an empty one (C = 0, B = 0) is 0 whatever
    # v holds, where 0 * inf or 0 * nan is NaN.
    if C:
        grad_u *= vc
    if B:
        grad_e *= vc
    return tuple(g.to(t.dtype).contiguous() for g, t in ((grad_x, x), (grad_u, u), (grad_e, e), (grad_v, v)))


def _triton_forward(x, u, e, v):
    from dsrb.kernels.semantic_attention import semantic_attention_forward

    return semantic_attention_forward(x, u, e, v)


def _triton_backward(grad_S, grad_a, x, u, e, v, a):
    from dsrb.kernels.semantic_attention import semantic_attention_backward

    return semantic_attention_backward(grad_S, grad_a, x, u, e, v, a)


def _check_op(x, u, e, v):
    """The backend op's contract (csrc/checks.h): u, e and v in x's dtype and on its device, N > 0."""
    check_tensor("x", x, ndim=3, kind="float")
    B, N, _ = x.shape
    if N == 0:
        raise ValueError("argument 'x': expected at least one spatial position, got N = 0")
    check_tensor("u", u, ndim=3)
    I = u.shape[2]
    for name, t, shape in (("u", u, (B, N, I)), ("e", e, (None, I)), ("v", v, (I,))):
        raw_tensor(name, t, shape, x, "x")


def _check_backward_op(grad_S, grad_a, x, u, e, v, a):
    _check_op(x, u, e, v)
    B, N, D = x.shape
    C = e.shape[0]
    for name, t, shape in (("grad_S", grad_S, (B, C, D)), ("grad_a", grad_a, (B, C, N)), ("a", a, (B, C, N))):
        raw_tensor(name, t, shape, x, "x")


def _define(backend: str, forward=None, backward=None):
    """Register one backend as the ops ``dsrb::semantic_attention_<backend>`` (+ ``_backward``), from Python
    implementations or (None) from the C++ extension, with fake implementations and (Python-defined ones) autograd,
    and add it to the registry."""
    name = f"semantic_attention_{backend}"
    fwd = define_op(name, "(Tensor x, Tensor u, Tensor e, Tensor v) -> (Tensor, Tensor)", forward, _check_op,
                    differentiable=True)
    bwd = define_op(
        f"{name}_backward",
        "(Tensor grad_S, Tensor grad_a, Tensor x, Tensor u, Tensor e, Tensor v, Tensor a) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        backward,
        _check_backward_op,
        differentiable=True,
    )

    @torch.library.register_fake(fwd)
    def _(x, u, e, v):
        B, N, D = x.shape
        C = e.shape[0]
        return x.new_empty((B, C, D)), x.new_empty((B, C, N))

    @torch.library.register_fake(bwd)
    def _(grad_S, grad_a, x, u, e, v, a):
        return tuple(t.new_empty(t.shape) for t in (x, u, e, v))

    def setup_context(ctx, inputs, output):
        x, u, e, v = inputs
        ctx.save_for_backward(x, u, e, v, output[1])

    def backward_fn(bwd, ctx, grad_S, grad_a):
        x, u, e, v, a = ctx.saved_tensors
        if grad_S is None:
            grad_S = x.new_zeros((x.shape[0], e.shape[0], x.shape[2]))
        if grad_a is None:
            grad_a = torch.zeros_like(a)
        return bwd(grad_S, grad_a, x, u, e, v, a)

    if forward is None:  # the extension's ops carry their autograd in C++ (csrc/autograd.h)
        register_impl(backend, "semantic_attention", fwd)
    else:
        register_python_op(backend, "semantic_attention", fwd, bwd, forward, backward, setup_context, backward_fn)
    return fwd


_define("torch", _torch_forward, _torch_backward)
_define("triton", _triton_forward, _triton_backward)
for _backend in extension_backends():
    _define(_backend)


def semantic_attention(x: Tensor, u: Tensor, e: Tensor, v: Tensor, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Category-wise spatial attention and attention-pooled semantic features.

    Args:
        x: (B, N, D) features at N = H*W positions.
        u: (B, N, I) = fc1(x).
        e: (C, I) = fc2(word vectors).
        v: (I,) = fc3.weight.T @ fc4.weight[0], the exact collapse of the two chained linears.
        backend: "auto", or one of "torch", "cpu", "cuda", "triton" (see :mod:`dsrb.ops`).

    Returns:
        S: (B, C, D) semantic features and a: (B, C, N) attention (softmax over n), in x's dtype.

    Equivalent PyTorch (materialises (B, N, C, I))::

        a = torch.softmax((torch.tanh(u[:, :, None] * e) @ v).transpose(1, 2), -1); S = a @ x
    """
    check_tensor("x", x, ndim=3, kind="float")
    B, N, D = x.shape
    check_tensor("u", u, shape=(B, N, None), kind="float")
    I = u.shape[2]
    check_tensor("e", e, shape=(None, I), kind="float")
    check_tensor("v", v, shape=(I,), kind="float")
    check_same_device(x=x, u=u, e=e, v=v)
    check_same_dtype(x=x, u=u, e=e, v=v)
    if N == 0:
        raise ValueError("argument 'x': expected at least one spatial position, got N = 0")
    refuse_transforms("semantic_attention", x, u, e, v)
    return select("semantic_attention", x.device, x.dtype, backend)(x, u, e, v)
