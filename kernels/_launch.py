"""Host-side helpers shared by the Triton launchers of ``kernels/<op>.py``.

Plain integer arithmetic, not ``triton.cdiv`` / ``triton.next_power_of_2``: from Python those are
``ConstexprFunction`` objects in recent Triton (about 2-3 us a call on a 2-core host, against 0.05 us), and a
launcher computes a dozen of them per call, on the host-bound path of every op at training sizes.
"""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl
from torch import Tensor


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
