"""``prototype_bank_update``: per-(class, quadrant) sums and counts for the prototypes (spec §5.1, §5.2 item 7).

Every known positive (T[b, c] == +1) adds S[b, c] to bucket (c, quadrant[b, c]) while that bucket holds fewer than
``cap`` samples; within a batch, samples are met in batch order (the official class-major loop), so the cap keeps
the first ``cap`` samples in loader order. Vectorised: a cumulative count over the batch ranks the candidates of
each bucket, and a candidate is kept when count + rank < cap. No gradient.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._checks import check_index_range, check_same_device, check_targets, check_tensor
from ._registry import define_op, extension_backends, register_impl, select


def _torch_update(sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor, cap: int):
    onehot = torch.nn.functional.one_hot(quadrant, 4) * (T == 1)[..., None].long()  # (B, C, 4) candidates
    rank = torch.cumsum(onehot, dim=0) - onehot  # earlier candidates of the same bucket in this batch
    keep = (onehot > 0) & (counts[None] + rank < cap)
    new_sums = sums + torch.einsum("bcq,bcd->cqd", keep.to(sums.dtype), S.to(sums.dtype))
    return new_sums.contiguous(), (counts + keep.sum(0)).contiguous()


def _triton_update(sums, counts, S, T, quadrant, cap):
    from dsrb.kernels.prototype_bank_update import prototype_bank_update as kernel

    return kernel(sums, counts, S, T, quadrant, cap)


def _define(backend: str, impl=None):
    """Register one backend as the op ``dsrb::prototype_bank_update_<backend>`` (impl None: from the C++
    extension)."""
    op = define_op(
        f"prototype_bank_update_{backend}",
        "(Tensor sums, Tensor counts, Tensor S, Tensor T, Tensor quadrant, int cap) -> (Tensor, Tensor)",
        impl,
    )

    @torch.library.register_fake(op)
    def _(sums, counts, S, T, quadrant, cap):
        return sums.new_empty(sums.shape), counts.new_empty(counts.shape)

    register_impl(backend, "prototype_bank_update", op)


_define("torch", _torch_update)
_define("triton", _triton_update)
for _backend in extension_backends():
    _define(_backend)


def prototype_bank_update(
    sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor, cap: int = 100, *, backend: str = "auto"
) -> Tuple[Tensor, Tensor]:
    """Accumulate one batch into the prototype buckets.

    Args:
        sums: (C, 4, D) float running sums.  counts: (C, 4) int64 running counts.
        S: (B, C, D) semantic features.  T: (B, C) partial targets.  quadrant: (B, C) int64 in [0, 3].
        cap: samples kept per bucket (100 officially).

    Returns:
        (new_sums, new_counts); the inputs are not modified.
    """
    check_tensor("S", S, ndim=3, kind="float")
    B, C, D = S.shape
    check_tensor("sums", sums, shape=(C, 4, D), kind="float")
    check_tensor("counts", counts, shape=(C, 4), kind="int")
    check_tensor("T", T, shape=(B, C), kind="real")
    check_tensor("quadrant", quadrant, shape=(B, C), kind="int")
    check_same_device(sums=sums, counts=counts, S=S, T=T, quadrant=quadrant)
    check_targets("T", T)
    check_index_range("quadrant", quadrant, 0, 3)
    if int(cap) < 0:
        raise ValueError(f"argument 'cap': expected a non-negative integer, got {cap}")
    fn = select("prototype_bank_update", S.device, S.dtype, backend)
    return fn(sums.detach(), counts.long(), S.detach(), T.detach().to(S.dtype), quadrant.long(), int(cap))
