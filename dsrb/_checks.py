"""Input validation shared by the public API.

Every error names the argument, what was expected and what was given, so a user can fix the call without reading
the source. The value checks of ``check_targets`` read the values back to the host (one synchronisation on a GPU);
while ``torch.compile`` traces they become asynchronous assertions on the device instead, which would otherwise break
the graph.
"""

from __future__ import annotations

import operator
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

# uint16/32/64 are left out of "int": torch has few kernels for them (no aminmax, which the range checks use).
_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KINDS = {
    # float8 is floating point too, but no op computes in it (torch itself has few kernels for it)
    "float": (lambda d: d in _FLOAT, "a floating-point tensor (float16, bfloat16, float32 or float64)"),
    "int": (lambda d: d in _INTEGER, "an integer tensor (int8, int16, int32, int64 or uint8)"),
    "bool": (lambda d: d == torch.bool, "a bool tensor"),
    "real": (lambda d: not d.is_complex, "a real (float, integer or bool) tensor"),
}


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    kind: Optional[str] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> None:
    """Raise a TypeError/ValueError naming ``name`` unless ``t`` is a tensor of the given rank, dtype kind and shape.

    ``shape`` entries that are ``None`` match any size; ``kind`` is one of "float", "int", "bool", "real".
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
    if ndim is None and shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"argument '{name}': expected a {ndim}-D tensor, got shape {tuple(t.shape)} ({t.dim()}-D)")
    if kind is not None:
        ok, what = _KINDS[kind]
        if not ok(t.dtype):
            raise TypeError(f"argument '{name}': expected {what}, got dtype {t.dtype}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                sizes = ["*" if s is None else str(s) for s in shape]
                expected = f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"  # as Python writes (4,)
                raise ValueError(
                    f"argument '{name}': expected shape {expected}, got {tuple(t.shape)} (dimension {i} differs)"
                )


def native_array(value: np.ndarray) -> np.ndarray:
    """``value``, or a C-order copy in the machine's byte order where torch cannot take it as it is: torch refuses a
    byte order other than the machine's and negative strides (a reversed view, np.flip), and warns on a read-only
    array (a memory map opened read-only)."""
    if value.dtype.isnative and value.flags.writeable and all(s >= 0 for s in value.strides):
        return value
    return np.array(value, dtype=value.dtype.newbyteorder("="), order="C")


def as_tensor(name: str, value) -> torch.Tensor:
    """A tensor argument unchanged, anything else through ``torch.as_tensor``; what it cannot read is a TypeError
    naming the argument."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        value = native_array(value)
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"argument '{name}': expected a tensor or an array, got {type(value).__name__}") from None


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """Raise a ValueError listing every argument's device unless all given tensors share one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"'{k}' on {v.device}" for k, v in present.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> None:
    """Raise a TypeError listing every argument's dtype unless all given tensors share one dtype."""
    present = {k: v for k, v in tensors.items() if v is not None}
    if len({v.dtype for v in present.values()}) > 1:
        listing = ", ".join(f"'{k}' {v.dtype}" for k, v in present.items())
        raise TypeError(f"expected one floating-point dtype for all features, got {listing}")


def check_scalar_param(name: str, t) -> None:
    """A blending coefficient: a floating-point tensor with exactly one element (shape () or (1,))."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"argument '{name}': expected a one-element torch.Tensor, got {type(t).__name__}")
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"argument '{name}': expected a one-element tensor of shape () or (1,), got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"argument '{name}': expected a floating-point tensor, got dtype {t.dtype}")


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool: a bool or a NumPy bool, not another truthy value ("no" would be True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"argument '{name}': expected True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_distributed(name: str, value) -> bool:
    """``value`` as a bool (:func:`check_bool`); True needs torch.distributed's default process group, without which
    the first collective stopped with torch's "Default process group has not been initialized", naming no argument
    (in the prototype pass after the backbone's work)."""
    value = check_bool(name, value)
    if value:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"argument '{name}': True needs torch.distributed's default process group, which is not "
                             "initialized (torchrun's ranks call torch.distributed.init_process_group); in a single "
                             f"process pass {name}=False")
    return value


def random_kwargs(name: str, generator) -> dict:
    """``{"generator": generator}`` for torch.rand & co., or ``{}`` for None: an explicit ``generator=None`` breaks
    torch.compile at a second batch size (dynamic shapes). Anything but a torch.Generator or None is a TypeError."""
    if generator is None:
        return {}
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"argument '{name}': expected a torch.Generator or None, got {type(generator).__name__}")
    return {"generator": generator}


def check_int(name: str, value, *, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int: an int or an integer scalar (NumPy, one-element integer tensor), not a bool nor a
    float (never truncated); at least ``minimum`` when given. A size traced by torch.compile (SymInt) is specialised.
    """
    if isinstance(value, torch.SymInt):
        index = int(value)
    else:
        # NumPy 2.0 still takes np.True_ as an index (1), with a DeprecationWarning; later ones refuse it
        is_bool = isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
        try:
            index = None if is_bool else operator.index(value)
        except TypeError:
            index = None
        if index is None:
            raise TypeError(f"argument '{name}': expected an int, got {type(value).__name__} {value!r}")
    if minimum is not None and index < minimum:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"argument '{name}': expected {kind}, got {index}")
    if not -2**63 <= index < 2**63:  # the ops' schemas take int64
        raise ValueError(f"argument '{name}': expected an int that fits in 64 bits, got {index}")
    return index


def check_count(name: str, value, minimum: int = 1) -> int:
    """A count or size (``minimum`` 1, or 0 for a count that may be zero) as a Python int: any integer
    (:func:`check_int`: a NumPy integer too, not a bool nor a float), every refusal a ValueError with this message."""
    try:
        return check_int(name, value, minimum=minimum)
    except (TypeError, ValueError):
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"argument '{name}': expected {kind}, got {value!r}") from None


def check_holds_values(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """A ValueError naming ``name`` where ``t`` is on meta (shapes only) and is to be copied into ``like``, which
    holds values: torch said "Cannot copy out of meta tensor", naming no argument."""
    if t.device.type == "meta" and like.device.type != "meta":
        raise ValueError(f"argument '{name}': expected a tensor holding values, got one on meta (shapes only)")


def as_finite(name: str, t: torch.Tensor, like: torch.Tensor, where: str = "") -> torch.Tensor:
    """``t`` in ``like``'s dtype and device, checked finite there (1e5 is inf in half precision: a NaN in every logit
    that reads it); a ValueError naming ``name`` otherwise. Nothing is checked on meta (a model built for shapes
    only), which holds no values; a meta ``t`` has none to give a ``like`` that holds some."""
    check_holds_values(name, t, like)
    t = t.to(like)
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"argument '{name}': expected finite values in {t.dtype}{where}, found NaN or inf")
    return t


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# Signed integer targets hold only -1, 0 and 1 exactly when they lie in [-1, 1]: one reduction checks them.
_SIGNED_INT = (torch.int8, torch.int16, torch.int32, torch.int64)


def _min_max(t: torch.Tensor) -> torch.Tensor:
    """(min, max) of an integer tensor, on its device, as an int64 pair (read with others in one copy)."""
    return torch.stack(torch.aminmax(t)).long()


def _read(pairs) -> list:
    """The int64 pairs as Python ints, in one device-to-host copy (one synchronisation on a GPU) for all."""
    return torch.stack(pairs).tolist() if pairs else []


def _unsigned(dtype: torch.dtype) -> bool:
    return not dtype.is_signed and dtype != torch.bool


def _bad_targets(t: torch.Tensor) -> torch.Tensor:
    """Where t holds a value other than -1, 0, 1 (0, 1 for an unsigned dtype, in which -1 compares equal to the
    largest value: 255 == -1 in uint8)."""
    bad = (t != 0) & (t != 1)
    return bad if _unsigned(t.dtype) else bad & (t != -1)


def _report_ranges(checks, values) -> None:
    for (name, _, low, high), (lo, hi) in zip(checks, values):
        if lo < low or hi > high:
            raise ValueError(f"argument '{name}': expected values in [{low}, {high}], found range [{lo}, {hi}]")


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """``t`` without torch.func's wrappers, whose values cannot be read back (torch.func.vmap's batched tensor: "Cannot
    access data pointer of Tensor that doesn't have storage"); below them, every sample's values are checked."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def check_targets(name: str, t: torch.Tensor, *ranges) -> None:
    """Partial targets must hold only -1 (known absent), 0 (unknown) and +1 (known present); an unsigned integer
    tensor, which cannot hold -1, only 0 and 1.

    ``ranges``: (name, tensor, low, high) checks on t's device: an integer tensor with every value in [low, high]
    (inclusive), read in the same device-to-host copy as the targets' own check (one synchronisation for all,
    whatever t's dtype). While compiling, asserted on the device instead (:func:`_assert_targets_on_device`).
    """
    check_tensor(name, t, kind="real")
    for r in ranges:
        check_tensor(r[0], r[1], kind="int")
    if t.device.type == "meta":  # no values to check (shapes only, e.g. a model built on meta)
        return
    if _compiling():
        _assert_targets_on_device(name, t, ranges)
        return
    t, ranges = _unwrapped(t), [(r[0], _unwrapped(r[1]), *r[2:]) for r in ranges]
    ranges = [r for r in ranges if r[1].numel()]
    own = None
    if t.numel() and t.dtype != torch.bool:
        if t.dtype in _SIGNED_INT:
            own, valid = _min_max(t), lambda lo, hi: lo >= -1 and hi <= 1
        else:  # the number of entries outside {-1, 0, 1}, as a pair
            n = _bad_targets(t).sum()
            own, valid = torch.stack([n, n]).long(), lambda lo, hi: hi == 0
    values = _read([_min_max(r[1]) for r in ranges] + ([own] if own is not None else []))
    if own is not None and not valid(*values[-1]):
        # The first offending value by position: boolean-mask indexing has no kernel for uint16/32/64 in torch 2.6.
        found = t.reshape(-1)[int(_bad_targets(t).reshape(-1).nonzero()[0])].item()
        if _unsigned(t.dtype):
            raise ValueError(
                f"argument '{name}': expected values in {{0, 1}} for unsigned dtype {t.dtype} (which cannot hold -1; "
                f"use a signed or float dtype for known negatives), found {found}"
            )
        raise ValueError(f"argument '{name}': expected values in {{-1, 0, 1}}, found {found}")
    _report_ranges(ranges, values)


def check_signed_targets(name: str, t: torch.Tensor) -> None:
    """Targets given by a user (model, losses) must be able to say "known absent": a bool or unsigned tensor cannot
    hold -1, so full labels passed as ``labels.bool()`` would train on their positives only, every False read as
    unknown. Refused by dtype (the ops, fed by the model, still take {0, 1} in these dtypes)."""
    if t.dtype == torch.bool or _unsigned(t.dtype):
        raise TypeError(
            f"argument '{name}': expected a signed integer or floating-point tensor holding -1 (known absent), "
            f"0 (unknown) and +1 (known present), got {t.dtype}, which cannot hold -1; for full 0/1 labels pass "
            f"{name}.float() * 2 - 1, for positives with everything else unknown {name}.to(torch.int8)"
        )


def _assert_targets_on_device(name: str, t: torch.Tensor, ranges) -> None:
    """:func:`check_targets` inside a graph torch.compile traces: no value is read back (that would break the
    graph), each check is an asynchronous assertion on the device (``torch._assert_async``), so a bad value still
    stops the call, when the graph runs, instead of giving a silent wrong answer. On the CPU it raises a RuntimeError
    with the message below; on CUDA it is a device-side assert, after which the process's CUDA context is unusable
    (as after an index out of range in torch's own kernels)."""
    for r_name, r, low, high in ranges:
        torch._assert_async(((r >= low) & (r <= high)).all(),
                            f"argument '{r_name}': expected values in [{low}, {high}] (asserted under torch.compile)")
    if t.dtype != torch.bool:
        allowed = "{0, 1}" if _unsigned(t.dtype) else "{-1, 0, 1}"
        torch._assert_async(torch.logical_not(_bad_targets(t).any()),
                            f"argument '{name}': expected values in {allowed} (asserted under torch.compile)")


def brief(items: Iterable[str], shown: int = 5) -> str:
    """The first ``shown`` items and how many more: a whole model's keys would make a message of 30,000 characters."""
    items = list(items)
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
