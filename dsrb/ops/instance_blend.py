"""``instance_blend``: masked cross-image blending, the instance perspective (IPRB; architecture §3, spec §4).

m[b, c] = alpha where T[b, c] == 0 (unknown) and T[partner[b], c] == +1 (known present in the partner), else 1;
S1 = m * S + (1 - m) * S[partner];  T1 = m * T + (1 - m) * T[partner] (= 1 - alpha at blended entries).

Blending pooled (B, C, D) vectors equals the official blending of (B, H, W, C, D) maps followed by the spatial sum,
because m has no spatial index (spec §4); the oracle proves it in the tests.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import check_bool, check_same_device, check_targets, check_tensor
from ._common import check_blend_inputs, compute_dtype, raw_blend, raw_tensor, refuse_transforms, torch_blend
from ._registry import define_op, extension_backends, register_impl, register_python_op, select


def _blend_mask(T: Tensor, partner: Tensor) -> Tensor:
    return (T == 0) & (T[partner] == 1)


def _torch_forward(S: Tensor, T: Tensor, alpha: Tensor, partner: Tensor, detach_target: bool):
    # T1 = m * T + (1 - m) * T[partner] = alpha * 0 + (1 - alpha) * 1 at the blended entries
    return torch_blend(_blend_mask(T, partner), alpha, S, S[partner], T, detach_target)


def _torch_backward(grad_S1, grad_T1, S, T, alpha, partner, detach_target: bool):
    # Every term selects the blended entries (never a product with a 0/1 mask: 0 * inf is NaN), as the C++ kernels
    # branch on them.
    blend = _blend_mask(T, partner)
    b3 = blend[..., None]
    a = alpha.to(S.dtype)
    grad_S = torch.where(b3, grad_S1 * a, grad_S1)
    # Image b's blended entries pull (1 - alpha) of their gradient back to its partner's features.
    grad_S = grad_S.index_add(0, partner, torch.where(b3, grad_S1 * (1 - a), 0))
    # In fp32 for half-precision inputs, as the fused kernels: S - S[partner] alone may exceed the fp16 range.
    cd = compute_dtype(S.dtype)
    grad_alpha = torch.where(b3, grad_S1.to(cd) * (S.to(cd) - S[partner].to(cd)), 0).sum()
    if not detach_target:
        grad_alpha = grad_alpha - torch.where(blend, grad_T1, 0).sum(dtype=cd)  # dT1/dalpha = T - T[partner] = -1
    return grad_S.contiguous(), grad_alpha.to(alpha.dtype).reshape(alpha.shape)


def _triton_forward(S, T, alpha, partner, detach_target):
    from dsrb.kernels.instance_blend import instance_blend_forward

    return instance_blend_forward(S, T, alpha, partner)


def _triton_backward(grad_S1, grad_T1, S, T, alpha, partner, detach_target):
    from dsrb.kernels.instance_blend import instance_blend_backward

    return instance_blend_backward(grad_S1, grad_T1, S, T, alpha, partner, detach_target)


def _check_op(S, T, alpha, partner, detach_target):
    """The backend op's contract (csrc/checks.h): T in S's dtype, alpha floating, partner int64."""
    B, _, _ = raw_blend(S, T, "alpha", alpha)
    raw_tensor("partner", partner, (B,), S, "S", torch.int64)


def _check_backward_op(grad_S1, grad_T1, S, T, alpha, partner, detach_target):
    _check_op(S, T, alpha, partner, detach_target)
    raw_tensor("grad_S1", grad_S1, S.shape, S, "S")
    raw_tensor("grad_T1", grad_T1, T.shape, S, "S")


def _define(backend: str, forward=None, backward=None):
    """Register one backend as the ops ``dsrb::instance_blend_<backend>`` (+ ``_backward``), from Python
    implementations or (None) from the C++ extension."""
    name = f"instance_blend_{backend}"
    fwd = define_op(
        name, "(Tensor S, Tensor T, Tensor alpha, Tensor partner, bool detach_target) -> (Tensor, Tensor)", forward,
        _check_op, differentiable=True,
    )
    bwd = define_op(
        f"{name}_backward",
        "(Tensor grad_S1, Tensor grad_T1, Tensor S, Tensor T, Tensor alpha, Tensor partner, "
        "bool detach_target) -> (Tensor, Tensor)",
        backward,
        _check_backward_op,
        differentiable=True,
    )

    @torch.library.register_fake(fwd)
    def _(S, T, alpha, partner, detach_target):
        return S.new_empty(S.shape), T.new_empty(T.shape)

    @torch.library.register_fake(bwd)
    def _(grad_S1, grad_T1, S, T, alpha, partner, detach_target):
        return S.new_empty(S.shape), alpha.new_empty(alpha.shape)

    def setup_context(ctx, inputs, output):
        S, T, alpha, partner, detach_target = inputs
        ctx.save_for_backward(S, T, alpha, partner)
        ctx.detach_target = detach_target

    def backward_fn(bwd, ctx, grad_S1, grad_T1):
        S, T, alpha, partner = ctx.saved_tensors
        grad_S1 = torch.zeros_like(S) if grad_S1 is None else grad_S1
        grad_T1 = torch.zeros_like(T) if grad_T1 is None else grad_T1
        grad_S, grad_alpha = bwd(grad_S1, grad_T1, S, T, alpha, partner, ctx.detach_target)
        return grad_S, None, grad_alpha, None, None

    if forward is None:  # the extension's ops carry their autograd in C++ (csrc/autograd.h)
        register_impl(backend, "instance_blend", fwd)
    else:
        register_python_op(backend, "instance_blend", fwd, bwd, forward, backward, setup_context, backward_fn)
    return fwd


_define("torch", _torch_forward, _torch_backward)
_define("triton", _triton_forward, _triton_backward)
for _backend in extension_backends():
    _define(_backend)


def instance_blend(
    S: Tensor,
    T: Tensor,
    alpha: Tensor,
    partner: Optional[Tensor] = None,
    *,
    detach_target: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Blend each image's unknown labels with the known positives of its partner image.

    Args:
        S: (B, C, D) semantic features.
        T: (B, C) partial targets in {-1, 0, 1} (any real dtype, without gradient).
        alpha: one-element float tensor (the model clamps it to [0, 1] before calling), of any floating dtype:
            the blend rounds it to S's dtype, and its gradient is reduced in fp32 (fp64 for fp64 S) and returned
            in alpha's own dtype, so a float32 alpha with float16 S (autocast) gets no fp16 overflow.
        partner: (B,) int64 partner index of each image; default the batch flip b -> B - 1 - b.
        detach_target: if True, alpha gets no gradient through the soft target T1 (the official code keeps it).
        validate: check the values of T (in {-1, 0, 1}) and partner (in [0, B)) first, in one read of device
            memory (a synchronisation on a GPU). False trusts them (the model passes False for targets it has
            checked and indices it made): out-of-range values then give unspecified results (or an error from the
            torch backend's indexing), never an out-of-bounds access.
        backend: "auto" or a backend name (see :mod:`dsrb.ops`).

    Returns:
        S1: (B, C, D) blended features and T1: (B, C) soft targets, both in S's dtype. Gradients flow to S (both
        images of a pair) and to alpha.
    """
    B, C, D = check_blend_inputs(S, T, "alpha", alpha)
    ranges = []
    if partner is None:
        partner = torch.arange(B - 1, -1, -1, device=S.device)
    else:
        check_tensor("partner", partner, shape=(B,), kind="int")
        check_same_device(S=S, partner=partner)
        ranges.append(("partner", partner, 0, B - 1))
    detach_target = check_bool("detach_target", detach_target)
    refuse_transforms("instance_blend", S, T, alpha)
    if check_bool("validate", validate):
        check_targets("T", T, *ranges)  # one device read for both
    partner = partner.long()
    fn = select("instance_blend", S.device, S.dtype, backend)
    return fn(S, T.to(S.dtype), alpha.reshape(()), partner, detach_target)
