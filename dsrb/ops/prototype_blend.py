"""``prototype_blend``: location-sensitive prototype blending, the prototype perspective (PPRB; spec §5.2).

p[b, c] = bank[c, (quadrant[b, c] - shift[b, c]) mod 4]: the prototype of the same class from one of the three
other quadrants. S2 = select * (beta * S + (1 - beta) * p) + (1 - select) * S;
T2 = (1 - select) * T + select * (1 - beta).

The bank holds spatial sums of the official (C, 4, H, W, D) prototype maps; since the blended map is summed over
space straight away, blending pooled vectors is exact (spec §5.2 item 7).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._checks import check_bool, check_same_device, check_targets, check_tensor
from ._common import check_blend_inputs, compute_dtype, raw_blend, raw_tensor, refuse_transforms, torch_blend
from ._registry import define_op, extension_backends, register_impl, register_python_op, select as select_backend


def _bucket(quadrant: Tensor, shift: Tensor) -> Tensor:
    """(B, C) flat index c * 4 + (quadrant - shift) mod 4 into the (C * 4) rows of the bank."""
    C = quadrant.shape[1]
    classes = torch.arange(C, device=quadrant.device)[None, :]
    return classes * 4 + torch.remainder(quadrant - shift, 4)


def _torch_forward(S, T, beta, bank, quadrant, shift, select, detach_target: bool):
    C, _, D = bank.shape
    p = bank.reshape(C * 4, D)[_bucket(quadrant, shift)]  # (B, C, D)
    return torch_blend(select, beta, S, p, T, detach_target)


def _torch_backward(grad_S2, grad_T2, S, beta, bank, quadrant, shift, select, detach_target: bool, bank_grad: bool):
    C, _, D = bank.shape
    s3 = select[..., None]  # selected, never a 0/1 product (0 * inf is NaN), as the C++ kernels branch
    idx = _bucket(quadrant, shift)
    p = bank.reshape(C * 4, D)[idx]
    b = beta.to(S.dtype)
    grad_S = torch.where(s3, grad_S2 * b, grad_S2)
    cd = compute_dtype(S.dtype)  # fp32 for half precision, as the fused kernels: S - p may exceed the fp16 range
    grad_beta = torch.where(s3, grad_S2.to(cd) * (S.to(cd) - p.to(cd)), 0).sum()
    if not detach_target:
        grad_beta = grad_beta - torch.where(select, grad_T2, 0).sum(dtype=cd)  # dT2/dbeta = -1 where selected
    grad_bank = torch.zeros((C * 4, D), dtype=bank.dtype, device=bank.device)
    if bank_grad:  # the model's bank is a buffer: skip the scatter when nobody asks for it
        grad_bank.index_add_(0, idx.reshape(-1), torch.where(s3, grad_S2 * (1 - b), 0).reshape(idx.numel(), D))
    return grad_S.contiguous(), grad_beta.to(beta.dtype).reshape(beta.shape), grad_bank.reshape(C, 4, D)


def _triton_forward(S, T, beta, bank, quadrant, shift, select, detach_target):
    from dsrb.kernels.prototype_blend import prototype_blend_forward

    return prototype_blend_forward(S, T, beta, bank, quadrant, shift, select)


def _triton_backward(grad_S2, grad_T2, S, beta, bank, quadrant, shift, select, detach_target, bank_grad):
    from dsrb.kernels.prototype_blend import prototype_blend_backward

    return prototype_blend_backward(grad_S2, grad_T2, S, beta, bank, quadrant, shift, select, detach_target,
                                    bank_grad)


def _check_op(S, T, beta, bank, quadrant, shift, select, detach_target):
    """The backend op's contract (csrc/checks.h): T and bank in S's dtype, beta floating, int64 indices, a bool
    mask."""
    B, C, D = raw_blend(S, T, "beta", beta)
    raw_tensor("bank", bank, (C, 4, D), S, "S")
    raw_tensor("quadrant", quadrant, (B, C), S, "S", torch.int64)
    raw_tensor("shift", shift, (B, C), S, "S", torch.int64)
    raw_tensor("select", select, (B, C), S, "S", torch.bool)


def _check_backward_op(grad_S2, grad_T2, S, beta, bank, quadrant, shift, select, detach_target, bank_grad):
    check_tensor("S", S, ndim=3, kind="float")
    raw_tensor("grad_S2", grad_S2, S.shape, S, "S")
    raw_tensor("grad_T2", grad_T2, S.shape[:2], S, "S")
    _check_op(S, grad_T2, beta, bank, quadrant, shift, select, detach_target)


def _define(backend: str, forward=None, backward=None):
    """Register one backend as the ops ``dsrb::prototype_blend_<backend>`` (+ ``_backward``), from Python
    implementations or (None) from the C++ extension."""
    name = f"prototype_blend_{backend}"
    fwd = define_op(
        name,
        "(Tensor S, Tensor T, Tensor beta, Tensor bank, Tensor quadrant, Tensor shift, Tensor select, "
        "bool detach_target) -> (Tensor, Tensor)",
        forward,
        _check_op,
        differentiable=True,
    )
    bwd = define_op(
        f"{name}_backward",
        "(Tensor grad_S2, Tensor grad_T2, Tensor S, Tensor beta, Tensor bank, Tensor quadrant, "
        "Tensor shift, Tensor select, bool detach_target, bool bank_grad) -> (Tensor, Tensor, Tensor)",
        backward,
        _check_backward_op,
        differentiable=True,
    )

    @torch.library.register_fake(fwd)
    def _(S, T, beta, bank, quadrant, shift, select, detach_target):
        return S.new_empty(S.shape), T.new_empty(T.shape)

    @torch.library.register_fake(bwd)
    def _(grad_S2, grad_T2, S, beta, bank, quadrant, shift, select, detach_target, bank_grad):
        return S.new_empty(S.shape), beta.new_empty(beta.shape), bank.new_empty(bank.shape)

    def setup_context(ctx, inputs, output):
        S, T, beta, bank, quadrant, shift, select, detach_target = inputs
        ctx.save_for_backward(S, beta, bank, quadrant, shift, select)
        ctx.detach_target = detach_target

    def backward_fn(bwd, ctx, grad_S2, grad_T2):
        S, beta, bank, quadrant, shift, select = ctx.saved_tensors
        grad_S2 = torch.zeros_like(S) if grad_S2 is None else grad_S2
        grad_T2 = S.new_zeros(S.shape[:2]) if grad_T2 is None else grad_T2
        bank_grad = ctx.needs_input_grad[3]
        grad_S, grad_beta, grad_bank = bwd(
            grad_S2, grad_T2, S, beta, bank, quadrant, shift, select, ctx.detach_target, bank_grad
        )
        return grad_S, None, grad_beta, grad_bank if bank_grad else None, None, None, None, None

    if forward is None:  # the extension's ops carry their autograd in C++ (csrc/autograd.h)
        register_impl(backend, "prototype_blend", fwd)
    else:
        register_python_op(backend, "prototype_blend", fwd, bwd, forward, backward, setup_context, backward_fn)
    return fwd


_define("torch", _torch_forward, _torch_backward)
_define("triton", _triton_forward, _triton_backward)
for _backend in extension_backends():
    _define(_backend)


def prototype_blend(
    S: Tensor,
    T: Tensor,
    beta: Tensor,
    bank: Tensor,
    quadrant: Tensor,
    shift: Tensor,
    select: Tensor,
    *,
    detach_target: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Blend the selected (image, class) features with a prototype from another quadrant of the same class.

    Args:
        S: (B, C, D) semantic features.
        T: (B, C) partial targets in {-1, 0, 1}, without gradient.
        beta: one-element float tensor (clamped to [0, 1] by the model), of any floating dtype (see
            :func:`instance_blend`'s alpha).
        bank: (C, 4, D) pooled prototypes, S's dtype.
        quadrant: (B, C) int64 own quadrant in [0, 3] (see :func:`quadrant_index`).
        shift: (B, C) int64 in {1, 2, 3}; the prototype comes from quadrant (quadrant - shift) mod 4.
        select: (B, C) bool, the entries to blend (drawn by the caller from its own generator).
        detach_target: if True, beta gets no gradient through the soft target T2 (the official code keeps it).
        validate: check the values of T (in {-1, 0, 1}), quadrant (in [0, 3]) and shift (in {1, 2, 3}) first,
            in one read of device memory (a synchronisation on a GPU). False trusts them (the model passes False
            for targets it has checked and indices it made): out-of-range values then give unspecified results,
            never an out-of-bounds access.
        backend: "auto" or a backend name (see :mod:`dsrb.ops`).

    Returns:
        S2: (B, C, D) and T2: (B, C) in S's dtype. Gradients flow to S, beta and bank.
    """
    B, C, D = check_blend_inputs(S, T, "beta", beta)
    check_tensor("bank", bank, shape=(C, 4, D), kind="float")
    if bank.dtype != S.dtype:
        raise TypeError(f"argument 'bank': expected dtype {S.dtype} (the dtype of 'S'), got {bank.dtype}")
    check_tensor("quadrant", quadrant, shape=(B, C), kind="int")
    check_tensor("shift", shift, shape=(B, C), kind="int")
    check_tensor("select", select, shape=(B, C), kind="bool")
    check_same_device(S=S, bank=bank, quadrant=quadrant, shift=shift, select=select)
    detach_target = check_bool("detach_target", detach_target)
    refuse_transforms("prototype_blend", S, T, beta, bank)
    if check_bool("validate", validate):  # one device read for the three
        check_targets("T", T, ("quadrant", quadrant, 0, 3), ("shift", shift, 1, 3))
    fn = select_backend("prototype_blend", S.device, S.dtype, backend)
    return fn(
        S, T.to(S.dtype), beta.reshape(()), bank, quadrant.long(), shift.long(), select, detach_target
    )
