"""Argument checks shared by the blending ops; what the ops hand to their implementations."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_scalar_param, check_same_device, check_tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the torch backend computes in for inputs of ``dtype``: half precision in fp32, as the fused kernels do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_blend_inputs(S: Tensor, T: Tensor, coef_name: str, coef: Tensor):
    """S (B, C, D) float, T (B, C) real, a one-element coefficient, on one device; returns (B, C, D). T's values are
    checked by the op, with its indices, in one device read (``check_targets``)."""
    check_tensor("S", S, ndim=3, kind="float")
    B, C, D = S.shape
    check_tensor("T", T, shape=(B, C), kind="real")
    check_scalar_param(coef_name, coef)
    check_same_device(S=S, T=T, **{coef_name: coef})
    return B, C, D


def plain(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t.detach().to(dtype)`` for a no-gradient implementation, but ``t`` itself when it already is that (no call
    through the dispatcher: the per-batch ops are small, and each extra call costs microseconds)."""
    if t.requires_grad:
        t = t.detach()
    return t if dtype is None or t.dtype == dtype else t.to(dtype)
