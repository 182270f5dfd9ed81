"""``prototype_bank_update``: per-(class, quadrant) sums and counts for the prototypes (spec §5.1, §5.2 item 7).

Every known positive (T[b, c] == +1) adds S[b, c] to bucket (c, quadrant[b, c]) while that bucket holds fewer than
``cap`` samples; within a batch, samples are met in batch order (the official class-major loop), so the cap keeps
the first ``cap`` samples in loader order. Vectorised: a cumulative count over the batch ranks the candidates of
each bucket, and a candidate is kept when count + rank < cap. No gradient.

``prototype_bank_update_`` does the same update in place (what :class:`dsrb.models.prototype_bank.PrototypeBank`
runs per batch): the ``cpu`` backend writes only the buckets the batch reaches into contiguous ``sums`` and
``counts``, so a batch costs its samples rather than a new (C, 4, D) tensor and a copy; every other backend (or
non-contiguous buckets) copies the functional result back.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._checks import check_bool, check_int, check_same_device, check_targets, check_tensor
from ._common import plain, raw_tensor, refuse_transforms
from ._registry import define_op, extension_backends, register_impl, select


def _torch_update(sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor, cap: int):
    # (B, C, 4) candidates; a quadrant outside [0, 3] (validate=False) matches no bucket.
    candidate = (quadrant[..., None] == torch.arange(4, device=quadrant.device)) & (T == 1)[..., None]
    onehot = candidate.long()
    rank = torch.cumsum(onehot, dim=0) - onehot  # earlier candidates of the same bucket in this batch
    keep = candidate & (counts[None] < cap - rank)  # counts + rank < cap, whose sum overflowed near the int64 maximum
    # The kept samples are added one by one in batch order, in the accumulation dtype (fp32 for half precision), as in
    # the official loop and the fused kernels, bit for bit; selected, never multiplied by a 0/1 mask, so that a sample
    # left out adds nothing even when it is NaN or inf (0 * nan = nan would spread it over its class's buckets).
    acc_dtype = torch.promote_types(sums.dtype, torch.float32)
    S = S.to(sums.dtype).to(acc_dtype)
    acc = torch.zeros(sums.shape, dtype=acc_dtype, device=sums.device)
    for b in range(S.shape[0]):
        acc = acc + torch.where(keep[b, :, :, None], S[b, :, None, :], 0)
    return (sums + acc.to(sums.dtype)).contiguous(), (counts + keep.sum(0)).contiguous()


def _triton_update(sums, counts, S, T, quadrant, cap):
    from dsrb.kernels.prototype_bank_update import prototype_bank_update as kernel

    return kernel(sums, counts, S, T, quadrant, cap)


def _check_op(sums, counts, S, T, quadrant, cap):
    """The backend op's contract (csrc/checks.h): float sums, int64 counts and quadrant, T of any real dtype (the
    ``torch`` and ``triton`` kernels compare it with 1 in its own dtype; the C++ functional op takes S's)."""
    check_tensor("S", S, ndim=3, kind="float")
    B, C, D = S.shape
    check_tensor("sums", sums, kind="float")
    raw_tensor("sums", sums, (C, 4, D), S, "S", sums.dtype)  # any float dtype: shape and device
    raw_tensor("counts", counts, (C, 4), S, "S", torch.int64)
    check_tensor("T", T, kind="real")
    raw_tensor("T", T, (B, C), S, "S", T.dtype)
    raw_tensor("quadrant", quadrant, (B, C), S, "S", torch.int64)
    if cap < 0:
        raise ValueError(f"argument 'cap': expected a non-negative integer, got {cap}")


def _define(backend: str, impl=None):
    """Register one backend as the op ``dsrb::prototype_bank_update_<backend>`` (impl None: from the C++
    extension)."""
    op = define_op(
        f"prototype_bank_update_{backend}",
        "(Tensor sums, Tensor counts, Tensor S, Tensor T, Tensor quadrant, int cap) -> (Tensor, Tensor)",
        impl,
        _check_op,
    )

    @torch.library.register_fake(op)
    def _(sums, counts, S, T, quadrant, cap):
        return sums.new_empty(sums.shape), counts.new_empty(counts.shape)

    register_impl(backend, "prototype_bank_update", op)
    return op


# In-place kernels, by the functional implementation they stand for (the C++ extension's cpu backend).
_IN_PLACE = {}

_define("torch", _torch_update)
_define("triton", _triton_update)
for _backend in extension_backends():
    _functional = _define(_backend)
    if _backend == "cpu":
        _IN_PLACE[_functional] = torch.ops.dsrb.prototype_bank_update_cpu_.default

        @torch.library.register_fake("dsrb::prototype_bank_update_cpu_")
        def _(sums, counts, S, T, quadrant, cap):
            return None


def _check_layout(sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor, cap: int) -> int:
    """Ranks, shapes, dtypes, devices and cap (returned as an int): read from the tensors' metadata, no tensor op."""
    check_tensor("S", S, ndim=3, kind="float")
    B, C, D = S.shape
    check_tensor("sums", sums, shape=(C, 4, D), kind="float")
    check_tensor("counts", counts, shape=(C, 4), kind="int")
    check_tensor("T", T, shape=(B, C), kind="real")
    check_tensor("quadrant", quadrant, shape=(B, C), kind="int")
    check_same_device(sums=sums, counts=counts, S=S, T=T, quadrant=quadrant)
    return check_int("cap", cap, minimum=0)


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the bytes a and b span (first to last element, strides included) intersect. Meta tensors have no
    memory (every storage address reads 0)."""
    if a.numel() == 0 or b.numel() == 0 or a.device.type == "meta" or (
            a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):
        return False

    def span(t: Tensor):
        last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _distinct(t: Tensor) -> bool:
    """Whether no two elements of ``t`` share memory: with the dimensions sorted by stride, each steps past the
    extent of those below it (every dense, sliced or permuted layout), else an exact count of the elements' offsets
    (an expanded or interleaved ``as_strided`` layout; refused while torch.compile traces, where it cannot count)."""
    if t.is_contiguous():
        return True
    extent = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride < extent:
            break
        extent = stride * size
    else:
        return True
    if torch.compiler.is_compiling():
        return False
    offsets = torch.zeros((), dtype=torch.int64)
    for n, s in zip(t.shape, t.stride()):
        offsets = offsets[..., None] + torch.arange(n) * s
    return offsets.unique().numel() == offsets.numel()


def _check_written(name: str, t: Tensor) -> None:
    """What would refuse the in-place write of ``t`` (``copy_``, the version counter) or make it wrong (elements
    that share memory: ``copy_`` writes one over another, silently), checked before either buffer is written: a
    refusal after ``sums`` was written would leave samples in it that ``counts`` does not hold."""
    if not _distinct(t):
        raise ValueError(f"argument '{name}': expected a tensor whose elements are distinct (it is updated in place), "
                         f"got one whose elements share memory: shape {tuple(t.shape)}, strides {tuple(t.stride())}")
    if not torch.compiler.is_compiling() and t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"argument '{name}': it was made under torch.inference_mode(), so it cannot be updated in "
                         "place outside it (update it there, or pass a clone made outside it)")


def _check_values(T: Tensor, quadrant: Tensor) -> None:
    """T in {-1, 0, 1}, quadrant in [0, 3]: reductions over the values, one device-to-host read for both."""
    check_targets("T", T, ("quadrant", quadrant, 0, 3))


def prototype_bank_update(
    sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor, cap: int = 100, *, validate: bool = True,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Accumulate one batch into the prototype buckets.

    Args:
        sums: (C, 4, D) float running sums.  counts: (C, 4) int64 running counts, each in [0, cap] (as the bank's
            own updates leave them; not read by ``validate``: a negative count admits samples past the cap).
        S: (B, C, D) semantic features.  T: (B, C) partial targets.  quadrant: (B, C) int64 in [0, 3].
        cap: samples kept per bucket (100 officially; 0 keeps none).
        validate: check the values of T (in {-1, 0, 1}) and quadrant first (one read of device memory, a
            synchronisation on a GPU); False trusts them: other values are then never stored, nor used as an index.

    Returns:
        (new_sums, new_counts); the inputs are not modified.
    """
    cap = _check_layout(sums, counts, S, T, quadrant, cap)
    validate = check_bool("validate", validate)
    if validate:
        _check_values(T, quadrant)
    fn = select("prototype_bank_update", S.device, S.dtype, backend)
    return fn(plain(sums), plain(counts, torch.int64), plain(S), plain(T, S.dtype), plain(quadrant, torch.int64), cap)


def prototype_bank_update_(
    sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor, cap: int = 100, *, validate: bool = True,
    backend: str = "auto",
) -> None:
    """:func:`prototype_bank_update` in place: ``sums`` and ``counts`` take the new sums and counts.

    Same arguments, errors and backend choice (the backend serving :func:`prototype_bank_update` for these tensors);
    nothing is written when an argument is rejected. ``sums`` must not require grad; neither ``sums`` nor ``counts`` may
    share memory with S, T or quadrant (the kernel reads them while it writes), nor ``counts`` with ``sums`` (refused by
    every backend; under ``torch.compile`` only the ``cpu`` kernel can check these: a traced call cannot read storage
    addresses); neither may have elements that share memory (an expanded tensor), nor be an inference tensor outside
    ``torch.inference_mode()``, and a ``counts`` narrower than int64 must hold ``cap``. Like any in-place op, it bumps
    the version counters of ``sums`` and ``counts``. The buckets the batch reaches get the values the functional op
    returns, bit for bit; with the ``cpu`` kernel the others are left untouched (the functional op returns sums + 0
    there, which differs only in the sign of a -0 entry, a value the bank's own updates never produce). The ``cpu``
    kernel checks the values of T and quadrant itself, as it reads them, and takes T in its own dtype, so a batch is one
    call through the dispatcher.
    """
    cap = _check_layout(sums, counts, S, T, quadrant, cap)
    update_in_place(sums, counts, S, T, quadrant, cap, validate=validate, backend=backend)


def update_in_place(sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor, cap: int, *,
                    validate: bool, backend: str) -> None:
    """:func:`prototype_bank_update_` past its layout checks (``_check_layout``), which the caller has made: for
    :class:`dsrb.models.prototype_bank.PrototypeBank`, which checks S, T and quadrant against its own buffers and calls
    this once per batch of a prototype pass, where each microsecond of host time counts."""
    validate = check_bool("validate", validate)
    # Under vmap its storage checks failed inside PyTorch ("Cannot access storage of BatchedTensorImpl"), and the cpu
    # kernel has no batching rule
    refuse_transforms("prototype_bank_update_", instead="under vmap call prototype_bank_update, which returns the "
                      "new sums and counts")
    if sums.requires_grad and torch.is_grad_enabled():
        raise ValueError("argument 'sums': expected a tensor that does not require grad (the bank update is not "
                         "differentiable; update it under torch.no_grad(), or pass sums.detach())")
    if counts.dtype != torch.int64 and cap > torch.iinfo(counts.dtype).max:  # copied back, a count would wrap around
        raise ValueError(f"argument 'cap': expected at most {torch.iinfo(counts.dtype).max}, the largest count that "
                         f"'counts' of dtype {counts.dtype} holds, got {cap}")
    fn = select("prototype_bank_update", S.device, S.dtype, backend)
    in_place = _IN_PLACE.get(fn)
    if in_place is None or counts.dtype != torch.int64 or not (sums.is_contiguous() and counts.is_contiguous()):
        in_place = None
        _check_aliasing(sums, counts, S, T, quadrant)
    # else the cpu kernel checks the same pairs itself, with the same messages (csrc/checks.h), and contiguous
    # buffers have distinct elements: only the inference-tensor check is left
    _check_written("sums", sums)
    _check_written("counts", counts)
    if in_place is not None:
        if validate and not T.dtype.is_signed and T.dtype != torch.bool:
            _check_values(T, quadrant)  # the kernel compares in T's dtype, where 255 == -1 in uint8
        try:
            in_place(sums, counts, plain(S), plain(T), plain(quadrant, torch.int64), cap)  # bumps their versions
            return
        except ValueError as error:  # a value the kernel rejects (nothing written) ...
            rejected = error
        _check_values(T, quadrant)  # ... is reported as by every backend
        raise rejected
    if validate:
        _check_values(T, quadrant)
    new_sums, new_counts = fn(plain(sums), plain(counts, torch.int64), plain(S), plain(T, S.dtype),
                              plain(quadrant, torch.int64), cap)
    sums.copy_(new_sums)
    counts.copy_(new_counts)


def _check_aliasing(sums: Tensor, counts: Tensor, S: Tensor, T: Tensor, quadrant: Tensor) -> None:
    """No written buffer shares memory with the other or with a read input (every backend writes both, the cpu kernel
    from several threads). Not traced: storage pointers break a torch.compile graph."""
    if torch.compiler.is_compiling():
        return
    if _overlap(sums, counts):
        raise ValueError("argument 'counts': it shares memory with 'sums'; the bank update writes both")
    # As the cpu kernel refuses it (csrc/checks.h): the other backends, and the cpu one on buckets it copies back,
    # accepted a read input that aliases a written one, so the same call failed or not by backend.
    for w_name, w in (("sums", sums), ("counts", counts)):
        for r_name, r in (("S", S), ("T", T), ("quadrant", quadrant)):
            if _overlap(w, r):
                raise ValueError(f"argument '{w_name}': it shares memory with '{r_name}', which the in-place "
                                 f"update reads while it writes '{w_name}'")
