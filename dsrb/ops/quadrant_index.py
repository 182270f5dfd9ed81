"""``quadrant_index``: which quadrant of the map holds the peak of each (image, class) (spec §5.1, §10.2 item 4).

The score is G = a[b, c, n] * x_sum[b, n], the attention-weighted map summed over channels (the official score;
x is a BN output without ReLU, so this is not the attention peak). Official rule: row = arg-max over rows of the
row-wise maxima, column = arg-max over columns of the column-wise maxima, first index on ties; quadrant
q = 2 * [row >= H // 2] + [col >= W // 2] (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right; uneven halves
at odd H, W). No gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int, check_same_device, check_tensor
from ._common import plain, raw_tensor
from ._registry import define_op, extension_backends, register_impl, select


def _torch_quadrant_index(a: Tensor, x_sum: Tensor, height: int, width: int) -> Tensor:
    B, C, _ = a.shape
    G = (a * x_sum[:, None, :]).reshape(B, C, height, width)
    if B * C == 0:
        return torch.zeros((B, C), dtype=torch.int64, device=a.device)
    row = G.amax(dim=3).argmax(dim=2)
    col = G.amax(dim=2).argmax(dim=2)
    return 2 * (row >= height // 2).long() + (col >= width // 2).long()


def _triton_quadrant_index(a, x_sum, height, width):
    from dsrb.kernels.quadrant_index import quadrant_index as kernel

    return kernel(a, x_sum, height, width)


def _check_op(a, x_sum, height, width):
    """The backend op's contract (csrc/checks.h): x_sum in a's dtype, height * width == N."""
    check_tensor("a", a, ndim=3, kind="float")
    B, _, N = a.shape
    raw_tensor("x_sum", x_sum, (B, N), a, "a")
    # width <= N // height first: as in C++, no product of two huge ints is trusted.
    if not (height >= 1 and 1 <= width <= N // height and height * width == N):
        raise ValueError(f"arguments 'height', 'width': expected height * width == N = {N}, got {height} x {width}")


def _define(backend: str, impl=None):
    """Register one backend as the op ``dsrb::quadrant_index_<backend>`` (impl None: from the C++ extension)."""
    op = define_op(f"quadrant_index_{backend}", "(Tensor a, Tensor x_sum, int height, int width) -> Tensor", impl,
                   _check_op)

    @torch.library.register_fake(op)
    def _(a, x_sum, height, width):
        return a.new_empty(a.shape[:2], dtype=torch.int64)

    register_impl(backend, "quadrant_index", op)


_define("torch", _torch_quadrant_index)
_define("triton", _triton_quadrant_index)
for _backend in extension_backends():
    _define(_backend)


def quadrant_index(a: Tensor, x_sum: Tensor, height: int, width: int, *, backend: str = "auto") -> Tensor:
    """Quadrant of the official peak of a * x_sum for every (image, class).

    Args:
        a: (B, C, N) attention.  x_sum: (B, N) channel sum of the reduced map.  height * width == N.
            Computed in the wider of their dtypes, as ``a * x_sum`` is (an fp32 x_sum is not rounded to a's fp16).

    Returns:
        (B, C) int64 in [0, 3].
    """
    check_tensor("a", a, ndim=3, kind="float")
    B, C, N = a.shape
    check_tensor("x_sum", x_sum, shape=(B, N), kind="float")
    check_same_device(a=a, x_sum=x_sum)
    height, width = check_int("height", height), check_int("width", width)
    if height < 1 or width < 1:
        raise ValueError(f"arguments 'height', 'width': expected positive sizes, got {height} x {width}")
    if height * width != N:
        raise ValueError(f"arguments 'height', 'width': expected height * width == N = {N}, got {height} x {width}")
    dtype = torch.promote_types(a.dtype, x_sum.dtype)
    fn = select("quadrant_index", a.device, dtype, backend)
    return fn(plain(a, dtype), plain(x_sum, dtype), height, width)
