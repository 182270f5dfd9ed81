"""The backend ops themselves (``torch.ops.dsrb.<op>_<backend>``, which a user can call directly, bypassing the
checks of ``dsrb.ops``) refuse arguments outside their contract with an error naming the argument, in every backend:
the C++ ones through csrc/checks.h, the Python ones (``torch``, ``triton``) through the same contract in
``dsrb/ops`` (``_check_op``). Before, the ``triton`` launchers read past a too-short tensor (a segfault on an empty
alpha, garbage from a short T) and the ``torch`` backend broadcast a short one into a silent wrong answer. The
error is the one the ``torch`` backend raises (TypeError for a dtype, ValueError otherwise): the C++ checks raised a
RuntimeError for every breach until 2026-12-07.

Every case is checked before any kernel runs, so the ``triton`` backend needs neither a GPU nor its interpreter here.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dsrb.ops._registry import extension_backends  # importing dsrb.ops registers the backend ops
from helpers import backend_param, check_half_blends_take_a_wider_coefficient, triton_interpreter_problem

B, C, D, N, I = 3, 2, 4, 4, 5
BACKENDS = ["torch", "triton", *extension_backends()]


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _runs(backend: str) -> bool:
    """Whether a valid call can run here (the triton kernels need triton, and on a CPU its interpreter)."""
    if backend != "triton":
        return True
    return importlib.util.find_spec("triton") is not None and triton_interpreter_problem() is None


def _args(op: str, device: str) -> dict:
    """Valid arguments of the backend op ``op``, by name, in schema order."""
    f = dict(device=device)
    i64 = dict(device=device, dtype=torch.int64)
    S, T = torch.randn(B, C, D, **f), torch.zeros(B, C, **f)
    quadrant = torch.zeros(B, C, **i64)
    if op == "semantic_attention":
        return dict(x=torch.randn(B, N, D, **f), u=torch.randn(B, N, I, **f), e=torch.randn(C, I, **f),
                    v=torch.randn(I, **f))
    if op == "semantic_attention_backward":
        return dict(grad_S=torch.randn(B, C, D, **f), grad_a=torch.randn(B, C, N, **f),
                    **_args("semantic_attention", device), a=torch.rand(B, C, N, **f))
    if op == "instance_blend":
        return dict(S=S, T=T, alpha=torch.tensor(0.3, **f), partner=torch.arange(B, **i64), detach_target=False)
    if op == "instance_blend_backward":
        return dict(grad_S1=torch.randn(B, C, D, **f), grad_T1=torch.randn(B, C, **f),
                    **_args("instance_blend", device))
    if op == "prototype_blend":
        return dict(S=S, T=T, beta=torch.tensor(0.3, **f), bank=torch.randn(C, 4, D, **f), quadrant=quadrant,
                    shift=quadrant + 1, select=torch.ones(B, C, device=device, dtype=torch.bool), detach_target=False)
    if op == "prototype_blend_backward":
        forward = _args("prototype_blend", device)
        del forward["T"]
        return dict(grad_S2=torch.randn(B, C, D, **f), grad_T2=torch.randn(B, C, **f), **forward, bank_grad=True)
    if op == "quadrant_index":
        return dict(a=torch.rand(B, C, N, **f), x_sum=torch.randn(B, N, **f), height=2, width=2)
    if op == "prototype_bank_update":
        return dict(sums=torch.zeros(C, 4, D, **f), counts=torch.zeros(C, 4, **i64), S=S, T=torch.ones(B, C, **f),
                    quadrant=quadrant, cap=100)
    raise AssertionError(op)


# (backend op, argument, what replaces it): each a contract breach a kernel would otherwise read past or broadcast.
CASES = [
    ("semantic_attention", "u", lambda a: a[:, :1]),
    ("semantic_attention", "e", lambda a: a[:, :-1]),
    ("semantic_attention", "v", lambda a: a[:2]),
    ("semantic_attention", "u", lambda a: a.double()),
    ("semantic_attention", "x", lambda a: a[:, :0]),
    ("semantic_attention_backward", "grad_S", lambda a: a[:1]),
    ("semantic_attention_backward", "grad_a", lambda a: a[..., :1]),
    ("semantic_attention_backward", "a", lambda a: a[:, :1]),
    ("instance_blend", "T", lambda a: a[:1]),
    ("instance_blend", "alpha", lambda a: a.reshape(1)[:0]),
    ("instance_blend", "alpha", lambda a: a.int()),
    ("instance_blend", "partner", lambda a: a[:0]),
    ("instance_blend", "partner", lambda a: a.int()),
    ("instance_blend_backward", "grad_S1", lambda a: a[:1]),
    ("instance_blend_backward", "grad_T1", lambda a: a[:, :1]),
    ("prototype_blend", "beta", lambda a: a.reshape(1)[:0]),
    ("prototype_blend", "beta", lambda a: a.bool()),
    ("prototype_blend", "bank", lambda a: a[:1, :, :1]),
    ("prototype_blend", "quadrant", lambda a: a[:1]),
    ("prototype_blend", "shift", lambda a: a.int()),
    ("prototype_blend", "select", lambda a: a.long()),
    ("prototype_blend_backward", "grad_S2", lambda a: a[:1]),
    ("prototype_blend_backward", "grad_T2", lambda a: a.reshape(-1)[:0]),
    ("quadrant_index", "x_sum", lambda a: a[:1]),
    ("quadrant_index", "x_sum", lambda a: a.double()),
    ("quadrant_index", "height", lambda a: 0),
    ("quadrant_index", "width", lambda a: 3),
    ("prototype_bank_update", "sums", lambda a: a[:1, :, :1]),
    ("prototype_bank_update", "counts", lambda a: a[:0]),
    ("prototype_bank_update", "counts", lambda a: a.int()),
    ("prototype_bank_update", "T", lambda a: a[:1]),
    ("prototype_bank_update", "quadrant", lambda a: a[:, :1]),
    ("prototype_bank_update", "cap", lambda a: -1),
]


@pytest.mark.parametrize("backend", [backend_param(b) for b in BACKENDS])
@pytest.mark.parametrize("op, name, breach", CASES, ids=[f"{op}-{name}-{i}" for i, (op, name, _) in enumerate(CASES)])
def test_backend_op_refuses_a_breach_naming_the_argument(backend, op, name, breach):
    args = _args(op, _device(backend))
    base, _, rest = op.partition("_backward")
    name_of = lambda b: f"{base}_{b}{'_backward' if op.endswith('_backward') else ''}"  # noqa: E731
    fn = getattr(torch.ops.dsrb, name_of(backend))
    assert not rest
    if _runs(backend):
        fn(*args.values())  # the valid call runs
    args[name] = breach(args[name])
    # The C++ checks name height and width together ("arguments 'height', 'width'"), as does the Python mirror.
    named = "'height', 'width'" if name in ("height", "width") else f"'{name}'"
    with pytest.raises((ValueError, TypeError), match=f"argument.*{named}") as err:
        fn(*args.values())
    # the same kind of error in every backend: TypeError for a dtype, ValueError for any other breach
    twin = _args(op, "cpu")
    twin[name] = breach(twin[name])
    with pytest.raises((ValueError, TypeError)) as twin_err:
        getattr(torch.ops.dsrb, name_of("torch"))(*twin.values())
    assert type(err.value) is type(twin_err.value), (err.value, twin_err.value)


@pytest.mark.parametrize("backend", [backend_param(b) for b in BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_blend_takes_a_float32_coefficient_and_returns_its_gradient_in_float32(backend, dtype):
    if not _runs(backend):
        pytest.skip("the triton kernels need triton and, on a CPU, its interpreter")
    ops = torch.ops.dsrb
    ib, pb = getattr(ops, f"instance_blend_{backend}"), getattr(ops, f"prototype_blend_{backend}")
    ib_b, pb_b = getattr(ops, f"instance_blend_{backend}_backward"), getattr(ops, f"prototype_blend_{backend}_backward")
    check_half_blends_take_a_wider_coefficient(
        lambda *a: ib(*a, False), lambda *a: ib_b(*a, False), lambda *a: pb(*a, False),
        lambda *a: pb_b(*a, False, True), dtype=dtype, device=_device(backend))
