"""Shared test helpers: the one tolerance table and a comparator that reports the worst element."""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Optional, Tuple

import pytest
import torch
import torch.utils._python_dispatch

# Tolerances per dtype of the values compared, for every op and backend. fp64 comparisons are against the oracle in
# fp64 (rounding only); lower precisions are compared against the oracle run in fp64 on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
# Relative error norms |got - truth| / |truth| against the fp64 oracle, where the table's atol would hide the error of
# small values (sums of tanh at tiny arguments).
NORM_TOLERANCES = {torch.float32: 2e-6}


@functools.lru_cache(maxsize=None)
def cuda_backend_problem() -> Optional[str]:
    """Why the extension's ``cuda`` backend cannot run here (no GPU, no CUDA kernels, or kernels this GPU or driver
    cannot run), or None."""
    if not torch.cuda.is_available():
        return "no GPU"
    import dsrb.ops as ops

    return ops.reasons("semantic_attention", torch.device("cuda"), torch.float32)["cuda"]


def requires_cuda_backend():
    """Skip mark for a test (or a case) that runs the ``cuda`` backend, with the reason it cannot run here."""
    why = cuda_backend_problem()
    return pytest.mark.skipif(why is not None,
                              reason=f"needs a CUDA GPU the extension's CUDA kernels can run on: {why}")


def backend_param(name: str):
    """A ``backend`` parameter with a readable id; ``cuda`` skips where the cuda backend cannot run."""
    return pytest.param(name, id=name, marks=requires_cuda_backend() if name == "cuda" else ())


# The backends the op tests on CPU tensors run: ``torch`` named explicitly, and ``auto``, what users get (the ``cpu``
# backend where the C++ extension is loaded, else ``torch``; DSRB_BACKEND can force another).
TORCH_AND_AUTO = ["torch", "auto"]


def device_of(backend: str) -> str:
    """The device of the inputs a backend runs on in the tests: the GPU for ``cuda``, else the CPU."""
    return "cuda" if backend == "cuda" else "cpu"


class NoValueReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any host read of a tensor value (``.item()``, ``bool()``, ``int()``, ``float()``: one device
    synchronisation each on a GPU). ``.tolist()`` of a CPU tensor does not dispatch: patch ``dsrb._checks._read``
    too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a tensor value was read on the host")
        return func(*args, **(kwargs or {}))


def assert_close(actual, expected, *, dtype=None, what="", equal_nan=False):
    """assert_close with the table's tolerance for ``dtype`` (default: actual's dtype); ``equal_nan`` as torch's.

    torch.testing reports the greatest difference with its index and the fraction of mismatched elements.
    """
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, **tol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}" if what else m
    )


def assert_within_baseline(actual, expected, baseline, *, dtype, what=""):
    """``actual`` no further from the fp64 oracle ``expected`` than twice ``baseline``'s error (the ``torch`` backend
    in the same dtype, on the same inputs), plus the table's atol for ``dtype``: flash-attention's criterion, for
    results that no implementation gets within the table, such as half-precision gradients computed from the saved,
    rounded ``a``, or fp32 sums over thousands of terms.

    Or, whatever the baseline's error, within the table's rtol of the largest magnitude of ``expected`` (a normwise
    bound): a baseline can be luckier than twice another summation order's rounding (the torch backend's fp32 grad u
    at the COCO shape is 2.1e-4 off under torch 2.11 and about 5e-4 under 2.13, the emulated CUDA kernel's 5.3e-4,
    with values up to about 300), and that is no fault."""
    # the shapes first: the difference below broadcasts, and an empty ``expected`` returns at once
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    r = expected.detach().cpu().double()
    if not r.numel():
        return
    err = (actual.detach().cpu().double() - r).abs().max().item()
    base = (baseline.detach().cpu().double() - r).abs().max().item()
    bound = max(2 * base, TOLERANCES[dtype]["rtol"] * r.abs().max().item()) + TOLERANCES[dtype]["atol"]
    assert err <= bound, f"{what}: error {err:.3g} vs the baseline's {base:.3g} (bound {bound:.3g})"


def version_of(package: str) -> Tuple[int, int]:
    """(major, minor) of an installed package ("2.6.0+cu124" -> (2, 6)); (0, 0) when it is not installed."""
    try:
        return tuple(int(p) for p in metadata.version(package).split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def triton_interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter cannot run this project's kernels here, or None (also None on a CUDA host, where
    the kernels are compiled, not interpreted).

    Triton < 3.7's interpreter turns a tensor loop bound into an int with ``int(array)`` of a one-element 1-d array,
    which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); every kernel with a
    loop bound read from ``tl.program_id`` then fails. Triton 3.7 squeezes the array first.
    """
    if torch.cuda.is_available():
        return None
    if version_of("triton") < (3, 7) and version_of("numpy") >= (2, 4):
        return (f"the Triton interpreter of triton {metadata.version('triton')} cannot run under numpy "
                f"{metadata.version('numpy')} (int() of a one-element array, fixed in triton 3.7): install "
                "triton>=3.7 or numpy<2.4 to run the Triton kernels on the CPU")
    return None


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a twice-as-wide buffer)."""
    wide = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)
    wide[..., 0] = t.detach()
    out = wide[..., 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out.requires_grad_(t.requires_grad)


def tanh_extreme_inputs(dtype=torch.float32, device="cpu"):
    """semantic_attention inputs (x, u, e, v; u and e require grad) whose tanh arguments w = u e are tiny, moderate,
    saturated (to 1e30) and infinite, one per k, each k's gradients apart from the others': in the first half of k
    u[0, 0] = w with e = 1 (1 - tanh(w)^2 times a huge u in grad e), in the second u[0, 0] = 1 with e = w (the same
    in grad u; finite w only, as u[0, 1] = 0 multiplies e). v is small and of both signs, so that the score stays
    moderate and the softmax gives every position a gradient."""
    inf = float("inf")
    w = torch.tensor([0.0, 1e-8, -1e-3, 0.3, -0.7, 2.5, -8.9, 9.005, 9.5, -9.5, 12.0, 40.0, 1e30, -1e30],
                     dtype=dtype)
    u_side = torch.cat([w, torch.tensor([inf, -inf], dtype=dtype)])
    I = len(u_side) + len(w)
    u = torch.stack([torch.cat([u_side, torch.ones_like(w)]), torch.zeros(I, dtype=dtype)])[None]  # (1, 2, I)
    e = torch.cat([torch.ones_like(u_side), w])[None]  # (1, I)
    v = 0.05 * torch.tensor([(-1.0) ** k for k in range(I)], dtype=dtype)
    x = torch.tensor([[[1.0, 0.5], [-0.5, 2.0]]], dtype=dtype)  # (1, 2, 2)
    return tuple(t.to(device).requires_grad_(t is u or t is e) for t in (x, u, e, v))


def check_blends_ignore_what_they_leave_alone(ib_fwd, ib_bwd, pb_fwd, pb_bwd, *, dtype=torch.float32,
                                              device="cpu"):
    """inf and NaN in entries a blend leaves alone (S, the partner's S, the bank, upstream gradients) stay there: the
    results are those of finite values in their place, except the left-alone entries themselves, which pass through.
    A backward that multiplies by the 0/1 blend mask instead of selecting gives 0 * inf = NaN in grad alpha / beta
    and in the partner's or the bank's gradient.

    Raw ops, detach_target False and the bank's gradient on: ib_fwd(S, T, alpha, partner) -> (S1, T1),
    ib_bwd(gS1, gT1, S, T, alpha, partner) -> (gS, g_alpha), pb_fwd(S, T, beta, bank, quadrant, shift, select) ->
    (S2, T2), pb_bwd(gS2, gT2, S, beta, bank, quadrant, shift, select) -> (gS, g_beta, g_bank)."""
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    def poison(t, where):
        out = t.clone()
        for index, value in where:
            out[index] = value
        return out

    def same(got, want, what, poisoned=None):
        keep = torch.ones_like(want, dtype=torch.bool) if poisoned is None else poisoned.isfinite()
        assert torch.isfinite(got[keep]).all(), f"{what}: non-finite where the clean run is finite"
        assert_close(got[keep], want[keep], dtype=dtype, what=what)
        if poisoned is not None:  # a left-alone entry passes through, itself
            torch.testing.assert_close(got[~keep], poisoned[~keep], rtol=0, atol=0, equal_nan=True)

    # instance_blend, batch flip: image 0 blends classes 0 and 2 from image 2; nothing else is blended.
    T = torch.tensor([[0, 1, 0], [1, 0, -1], [1, 1, 1]], dtype=dtype, device=device)
    partner = torch.tensor([2, 1, 0], device=device)
    alpha = torch.tensor(0.3, dtype=dtype, device=device)
    S, gS1, gT1 = rand(3, 3, 4), rand(3, 3, 4), rand(3, 3)
    S_bad = poison(S, [((0, 1), inf), ((1, 1, 0), nan), ((2, 1, 1), -inf)])
    gS1_bad = poison(gS1, [((2, 1), inf), ((0, 1, 2), nan)])  # image 0 class 1 is image 2's class 1's partner
    gT1_bad = poison(gT1, [((1, 0), inf), ((2, 2), nan)])
    S1, T1 = ib_fwd(S, T, alpha, partner)
    gS, g_alpha = ib_bwd(gS1, gT1, S, T, alpha, partner)
    got = ib_fwd(S_bad, T, alpha, partner)
    same(got[0], S1, "instance_blend S1", S_bad)
    same(got[1], T1, "instance_blend T1")
    got = ib_bwd(gS1_bad, gT1_bad, S_bad, T, alpha, partner)
    same(got[0], gS, "instance_blend grad S", gS1_bad)
    same(got[1], g_alpha, "instance_blend grad alpha")

    # prototype_blend: (0, 0) and (1, 1) selected, from buckets (0, 3) and (1, 0); class 2 and the other buckets
    # are never read.
    T = torch.tensor([[0, 1, 0], [-1, 0, 0]], dtype=dtype, device=device)
    select = torch.tensor([[True, False, False], [False, True, False]], device=device)
    quadrant = torch.tensor([[0, 1, 2], [3, 2, 1]], device=device)
    shift = torch.tensor([[1, 2, 3], [1, 2, 3]], device=device)
    beta = torch.tensor(0.6, dtype=dtype, device=device)
    S, bank, gS2, gT2 = rand(2, 3, 4), rand(3, 4, 4), rand(2, 3, 4), rand(2, 3)
    S_bad = poison(S, [((0, 1), inf), ((1, 2, 0), nan), ((1, 0, 3), -inf)])
    bank_bad = poison(bank, [((2,), nan), ((0, 1), inf), ((1, 3, 2), -inf)])
    gS2_bad = poison(gS2, [((0, 2), inf), ((1, 0, 1), nan)])
    gT2_bad = poison(gT2, [((1, 0), nan), ((0, 1), inf)])
    S2, T2 = pb_fwd(S, T, beta, bank, quadrant, shift, select)
    gS, g_beta, g_bank = pb_bwd(gS2, gT2, S, beta, bank, quadrant, shift, select)
    got = pb_fwd(S_bad, T, beta, bank_bad, quadrant, shift, select)
    same(got[0], S2, "prototype_blend S2", S_bad)
    same(got[1], T2, "prototype_blend T2")
    got = pb_bwd(gS2_bad, gT2_bad, S_bad, beta, bank_bad, quadrant, shift, select)
    same(got[0], gS, "prototype_blend grad S", gS2_bad)
    same(got[1], g_beta, "prototype_blend grad beta")
    same(got[2], g_bank, "prototype_blend grad bank")


def grads_of(fn, inputs, grad_outputs):
    """The gradients of ``fn(*inputs)`` (a tuple of outputs) for ``grad_outputs``, by autograd, inputs as leaves."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, grad_outputs)


def dsrb_training_outputs(backend: str, device) -> list:
    """One training forward and backward of a tiny DSRB (both blends, the prototype pass) with every op on
    ``backend``: the outputs and gradients that backend-equality tests compare."""
    from dsrb.models import DSRB, draw_prototype_choices

    torch.manual_seed(0)
    model = DSRB(5, backbone="resnet18", backbone_width=4, feature_dim=16, word_dim=6, inter_dim=8,
                 backend=backend).to(device)
    images = torch.randn(4, 3, 128, 96, generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.tensor([[1, 0, -1, 0, 1], [1, 1, -1, -1, 1], [0, 1, 1, 0, 0], [1, 0, 0, 1, -1]], device=device)
    model.eval()
    model.update_prototypes(images, targets)
    model.finalize_prototypes()
    model.train()
    choices = draw_prototype_choices(targets, 1, torch.Generator(device).manual_seed(2),
                                     valid=model.prototype_bank.valid)
    out = model(images, targets, prototype_choices=choices)
    loss = out.logits.sum() + out.instance_logits.sum() + out.prototype_logits.sum() + out.instance_targets.sum()
    loss.backward()
    return [out.logits, out.features, out.attention, out.prototype_logits, model.prototype_bank.prototypes,
            model.alpha.grad, model.beta.grad, model.semantic.fc1.weight.grad]


# gloo's teardown can abort a rank that has finished its work ("terminate called without an active exception",
# SIGABRT): seen once in CI after the test's barrier and destroy_process_group, not in 40 local runs.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_gloo_script(script: str, tmp_path, name: str, attempts: int = 3):
    """Run ``script`` (it spawns gloo ranks and rank 0 saves its result to the path given as argv[1] before the
    teardown; argv[2] is a free port) and load that result. A run whose only failure is gloo's teardown abort, after
    the result was saved, is run again (at most ``attempts`` runs in all, with a warning); any other failure fails."""
    import os
    import socket
    import subprocess
    import sys
    import warnings

    import dsrb

    path = tmp_path / f"{name}.py"
    path.write_text(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(dsrb.__file__)))  # the dsrb in use, for the script
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    out = tmp_path / f"{name}.pt"
    for attempt in range(1, attempts + 1):
        out.unlink(missing_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        res = subprocess.run([sys.executable, str(path), str(out), str(port)], capture_output=True, text=True,
                             timeout=300, env=env)
        if res.returncode == 0:
            return torch.load(out)
        if not (GLOO_TEARDOWN_ABORT in res.stderr and out.exists()) or attempt == attempts:
            raise AssertionError(f"{name} failed (exit {res.returncode}, run {attempt}):\n{res.stderr[-3000:]}")
        warnings.warn(f"{name}: gloo aborted a rank at teardown, after the result was saved; running it again")


def wide_coefficient_cases(dtype, device="cpu"):
    """Half S (``dtype``) with a float32 coefficient whose gradient, a sum over every blended feature, here 79997 and
    159998 (integers, exact in float32; 80000 per blended entry), exceeds float16's range. For each blend: (name, S,
    T, coef, rest, (gS, gT), want), the blend being fwd(S, T, coef, *rest) in the raw ops' order and ``want`` the
    coefficient's gradient for the upstream gradients (gS, gT)."""
    def on(t):
        return t.to(device)

    S = on(torch.tensor([1000.0, -1000.0])[:, None, None].expand(2, 3, 40).to(dtype))
    T = on(torch.tensor([[0, 0, 1], [1, 1, 0]], dtype=dtype))  # blended: (0, 0), (0, 1) and (1, 2)
    select = on(torch.tensor([[True, True, False], [False, False, False]]))
    bank = on(torch.full((3, 4, 40), -1000.0, dtype=dtype))
    quadrant, shift = on(torch.zeros(2, 3, dtype=torch.long)), on(torch.ones(2, 3, dtype=torch.long))
    grads, coef = (torch.ones_like(S), torch.ones_like(T)), on(torch.tensor(0.3))
    return [("instance_blend", S, T, coef, (on(torch.tensor([1, 0])),), grads, 80000 - 3),  # minus the targets' sum
            ("prototype_blend", S, T, coef, (bank, quadrant, shift, select), grads, 160000 - 2)]


def check_half_blends_take_a_wider_coefficient(ib_fwd, ib_bwd, pb_fwd, pb_bwd, *, dtype, device="cpu"):
    """Under autocast the model passes half S with its float32 alpha / beta: the raw ops round the coefficient to
    S's dtype for the arithmetic (results equal to those of the rounded coefficient, bit for bit) and return its
    gradient in float32. That gradient (:func:`wide_coefficient_cases`) overflowed float16 (inf) when it was
    returned in S's dtype. Raw ops as in :func:`check_blends_ignore_what_they_leave_alone`."""
    for name, S, T, coef, rest, (gS, gT), want in wide_coefficient_cases(dtype, device):
        fwd, bwd, grads_and_inputs = ((ib_fwd, ib_bwd, (gS, gT, S, T)) if name == "instance_blend" else
                                      (pb_fwd, pb_bwd, (gS, gT, S)))
        for got, ref in zip(fwd(S, T, coef, *rest), fwd(S, T, coef.to(dtype), *rest)):
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m: f"{name} forward: {m}")
        g_wide, g_rounded = bwd(*grads_and_inputs, coef, *rest), bwd(*grads_and_inputs, coef.to(dtype), *rest)
        torch.testing.assert_close(g_wide[0], g_rounded[0], rtol=0, atol=0, msg=lambda m: f"{name} grad S: {m}")
        assert g_wide[1].dtype == torch.float32 and g_wide[1].shape == coef.shape, (name, g_wide[1])
        assert float(g_wide[1]) == want, (name, float(g_wide[1]))


def check_autograd_takes_a_wider_coefficient(op, traced, eager, *, dtype):
    """``traced(S, T, coef, *rest)``, the torch backend's code differentiated by autograd (as trace_torch_backend has
    the compiler do it), with half S and a float32 coefficient: values and grad S those of ``eager`` (the torch
    backend's op and hand-written backward) bit for bit, and the coefficient's gradient (:func:`wide_coefficient_cases`)
    reduced and returned in float32 as the hand-written one. Reduced in S's dtype, it was inf or NaN in float16, a
    bf16-rounded sum in bfloat16."""
    (_, S, T, coef, rest, grads, want), = (case for case in wide_coefficient_cases(dtype) if case[0] == op)

    def run(fn):
        s, c = S.clone().requires_grad_(), coef.clone().requires_grad_()
        out = fn(s, T, c, *rest)
        return [*out, *torch.autograd.grad(out, (s, c), grads)]

    got, ref = run(traced), run(eager)
    assert float(ref[3]) == want, (op, float(ref[3]))  # the hand-written backward's, exact
    for what, g, r in zip(("values", "soft targets", "grad S"), got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0, msg=lambda m: f"{op} {what}: {m}")
    assert got[3].dtype == torch.float32 and got[3].shape == coef.shape, (op, got[3])
    assert_close(got[3], ref[3], what=f"{op} grad coefficient")
