"""Host-side helpers shared by the Triton launchers of ``kernels/<op>.py``.

Plain integer arithmetic, not ``triton.cdiv`` / ``triton.next_power_of_2``: from Python those are
``ConstexprFunction`` objects in recent Triton (about 2-3 us a call on a 2-core host, against 0.05 us), and a
launcher computes a dozen of them per call, on the host-bound path of every op at training sizes.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

# Largest element offset a kernel computes in int32 (program ids, tl.arange and int arguments below 2**31 are int32).
_INT32_MAX = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def device_guard(t: Tensor):
    """Triton launches on the current CUDA device, whatever the arguments' device: make it ``t``'s."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for every other float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """:func:`acc_dtype` as a Triton type (a constexpr kernel argument)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def needs_int64(*tensors: Tensor) -> bool:
    """Whether an element offset into one of ``tensors`` (sizes times strides, the largest over its elements) can
    exceed int32. The kernels index a (C, D) or (N, D) tile as ``offs * stride`` in int32, which wraps round silently
    (a wrong element read, or one outside the tensor) where a stride times its extent reaches 2**31: a view whose
    batch dimension is not outermost in memory, or one image of 2**31 elements. The launchers then pass IDX64=True,
    which computes those offsets in int64 (:func:`idx`); every other launch keeps the int32 code tuned for the GPU."""
    for t in tensors:
        if t.numel() > 0 and sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) > _INT32_MAX:
            return True
    return False


@triton.jit
def idx(offs, IDX64: tl.constexpr):
    """``offs`` (a tensor or a scalar argument) in int64 under IDX64 (:func:`needs_int64`), else unchanged."""
    if IDX64:
        return tl.cast(offs, tl.int64)
    else:
        return offs
