"""Argument checks shared by the ops; what the ops hand to their implementations.

Two layers of checks: the public functions check what a user passes (``check_blend_inputs``, ``check_tensor``), and
the backend ops ``dsrb::<op>_<backend>`` check their own stricter contract (``raw_*`` below, the Python mirror of
csrc/checks.h), since they can be called directly through ``torch.ops.dsrb``: a wrong shape there must be an error,
never a kernel reading past a tensor's end.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from .._checks import check_scalar_param, check_same_device, check_tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the torch backend computes in for inputs of ``dtype``: half precision in fp32, as the fused kernels do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_blend_inputs(S: Tensor, T: Tensor, coef_name: str, coef: Tensor):
    """S (B, C, D) float, T (B, C) real without gradient, a one-element coefficient, on one device; returns
    (B, C, D). T's values are checked by the op, with its indices, in one device read (``check_targets``)."""
    check_tensor("S", S, ndim=3, kind="float")
    B, C, D = S.shape
    check_tensor("T", T, shape=(B, C), kind="real")
    if T.requires_grad and torch.is_grad_enabled():  # no backend differentiates T: its gradient would be None
        raise ValueError("argument 'T': expected targets without gradient (the blends give T none); pass T.detach()")
    check_scalar_param(coef_name, coef)
    check_same_device(S=S, T=T, **{coef_name: coef})
    return B, C, D


def refuse_transforms(op: str, *tensors: Tensor,
                      instead: str = "call the op on the whole batch (it is batched already) and differentiate it with "
                                     "torch.autograd") -> None:
    """A RuntimeError naming the op under any torch.func transform (vmap, grad, jvp, functionalize, and jacrev,
    jacfwd, hessian, vjp, built on them), or with a forward-mode tangent (torch.autograd.forward_ad) on one of
    ``tensors``: no backend has their rules. Before, the torch and triton backends failed inside PyTorch, asking the
    user to give "an autograd.Function" (they wrote none) a setup_context method, and the cpu backend ran vmap and
    functionalize through PyTorch's fallbacks but refused grad with a message of its own."""
    if torch.compiler.is_compiling():  # traced: the compiler's own transforms are not the user's
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(f"dsrb.ops.{op}: torch.func transforms (vmap, grad, vjp, jvp, jacrev, jacfwd, hessian, "
                           f"functionalize) are not supported by any backend; {instead}")
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(f"dsrb.ops.{op}: forward-mode AD (torch.autograd.forward_ad) is not supported by any "
                           "backend; differentiate it with torch.autograd.grad or backward()")


def plain(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t.detach().to(dtype)`` for a no-gradient implementation, but ``t`` itself when it already is that (no call
    through the dispatcher: the per-batch ops are small, and each extra call costs microseconds)."""
    if t.requires_grad:
        t = t.detach()
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def raw_tensor(name: str, t: Tensor, shape, ref: Tensor, ref_name: str, dtype: Optional[torch.dtype] = None) -> None:
    """A backend op's argument (csrc/checks.h): a tensor of ``shape`` (None: any size) on ``ref``'s device, of
    ``dtype`` (default: ``ref``'s)."""
    check_tensor(name, t, shape=shape)
    if t.device != ref.device:
        raise ValueError(f"argument '{name}': expected it on {ref.device} (the device of '{ref_name}'), got {t.device}")
    want = ref.dtype if dtype is None else dtype
    if t.dtype != want:
        why = f"the dtype of '{ref_name}'" if dtype is None else ("a mask" if want == torch.bool else "an index")
        raise TypeError(f"argument '{name}': expected dtype {want} ({why}), got {t.dtype}")


def raw_blend(S: Tensor, T: Tensor, coef_name: str, coef: Tensor):
    """A blending backend op's S (B, C, D) float, T (B, C) in S's dtype and one-element floating coefficient (any
    floating dtype: it is rounded to S's for the arithmetic, and its gradient comes in its own); returns (B, C, D)."""
    check_tensor("S", S, ndim=3, kind="float")
    B, C, D = S.shape
    raw_tensor("T", T, (B, C), S, "S")
    if not isinstance(coef, Tensor) or coef.numel() != 1 or coef.dim() > 1:
        shape = tuple(coef.shape) if isinstance(coef, Tensor) else type(coef).__name__
        raise ValueError(f"argument '{coef_name}': expected a one-element tensor of shape () or (1,), got {shape}")
    check_tensor(coef_name, coef, kind="float")
    raw_tensor(coef_name, coef, None, S, "S", coef.dtype)  # on S's device, in its own dtype
    return B, C, D


def torch_blend(sel: Tensor, coef: Tensor, S: Tensor, Y: Tensor, T: Tensor, detach_target: bool):
    """The torch backend's blend of both ops: where ``sel`` (B, C), ``coef * S + (1 - coef) * Y`` and ``1 - coef``,
    else S and T; values in S's dtype (the coefficient rounded to it), bit for bit as that dtype's arithmetic.

    Written for autograd too (trace_torch_backend): the coefficient's gradient, a sum over every blended feature, is
    reduced in ``compute_dtype`` and returned in its own dtype, as the hand-written backwards do (in half precision
    it overflowed: inf beyond 65504 in fp16). So half S is then computed in fp32, rounded to S's dtype after every
    op: the same values, since fp32's 24 bits are at least 2 * 11 + 2 (an fp32 sum or product of fp16 or bf16
    numbers, rounded to their dtype, is the exact result rounded once). Without that gradient (the eager op, whose
    backward is hand-written) S's dtype gives them faster (fp16 on a CPU: 3x)."""
    wide = coef.requires_grad and torch.is_grad_enabled() and compute_dtype(S.dtype) != S.dtype
    cd = compute_dtype(S.dtype) if wide else S.dtype

    def rnd(x):  # x rounded to S's dtype, in cd; its gradient passes unrounded: it is grad S1's, in S's dtype
        return x.to(S.dtype).to(cd) if wide else x

    def rounded(x: Tensor) -> Tensor:  # x.to(S.dtype), in cd, differentiated as x: no half scalar sums a gradient
        if not wide:
            return x.to(S.dtype)
        w = x.to(cd)
        return w - (w - x.to(S.dtype).to(cd)).detach()  # exact for finite w: rounded, it is 0, inf or within 2x of w

    # Selected, never multiplied by a 0/1 mask: an inf or NaN at an entry left alone reaches no gradient (0 * inf):
    # m = coef where blended, else 1, and the where's backward gives the coefficient no part of the others.
    m = torch.where(sel, rounded(coef), 1)
    n = rounded(1 - m)  # per entry: the coefficient's gradient nets S's and Y's parts per entry, then sums them
    S_c = S.to(cd)
    S1 = torch.where(sel[..., None], rnd(m[..., None] * S_c) + rnd(n[..., None] * Y.to(cd)), S_c).to(S.dtype)
    T1 = torch.where(sel, n.detach() if detach_target else n, T.to(cd)).to(S.dtype)  # as the backward detaches
    return S1.contiguous(), T1.contiguous()
