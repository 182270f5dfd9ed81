"""Benchmark of ``instance_blend`` (IPRB): the official map formulation vs the op's backends.

Inputs of one shape: an attention-weighted map F (B, H, W, C, D) built as the official semantic decoupling builds it
(F[b, h, w, c] = a[b, c, n] * x[b, n]), S = F.sum over space (so both formulations see the same features), partial
targets T in {-1, 0, 1}, alpha = 0.5 and the batch-flip pairing. The backward takes fixed gradients of S1 and T1
(alpha gets gradient through the features and the soft target, as in the official code).

* official: :func:`dsrb.reference.instance_blend_map`, blending the (B, H, W, C, D) maps and summing over space,
  with the gradient w.r.t. F and alpha: what the official code costs.
* torch / triton / cuda / cpu: ``dsrb.ops.instance_blend(S, T, alpha, backend=..., validate=False)`` on (B, C, D),
  gradient w.r.t. S and alpha.
* compile: ``torch.compile(fullgraph=True)`` of the torch-backend call, the torch backend's PyTorch code traced
  (``compile_torch``), compiled once outside the timing.

Every provider times the blend without the check of T's and partner's values (``validate=False``): the official
formulation checks none, and the model's forward calls the op so once its targets have been checked, once per step
(that check is timed in the ``head`` and ``train_step`` cases). With ``validate=True``, the op's default, a call adds
that check: a few reductions and one device-to-host read, on a GPU a synchronisation (compiled: an assertion on the
device).
"""

from __future__ import annotations

import torch

import dsrb.ops
from dsrb.reference import instance_blend_map

OP = "instance_blend"
HOST_OVERHEAD_SHAPE = True  # also the conftest's "tiny" shape: the host cost of one call
_STATE = {"key": None, "value": None}  # the inputs of one shape at a time


def _blend(S, T, alpha, backend="torch"):
    return dsrb.ops.instance_blend(S, T, alpha, backend=backend, validate=False)


def _inputs(bench, shape, dims, device, dtype):
    key = (shape, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        B, C, D = dims["B"], dims["C"], dims["D"]
        gen = torch.Generator().manual_seed(bench.seed_for(OP, shape))
        F = bench.attention_weighted_map(gen, dims, device, dtype)
        S = F.sum(dim=(1, 2)).detach().requires_grad_()
        F.requires_grad_()
        T = torch.randint(-1, 2, (B, C), generator=gen).to(dtype).to(device)
        alpha = torch.full((1,), 0.5, dtype=dtype, device=device, requires_grad=True)
        grads = (torch.randn(B, C, D, generator=gen, dtype=dtype).to(device),
                 torch.randn(B, C, generator=gen, dtype=dtype).to(device))
        _STATE["value"] = dict(F=F, S=S, T=T, alpha=alpha, grad_outputs=grads, compiled=None, reference=None,
                               reference_grads=None, validated=set(), check_grads=bench.assert_grads_close)
        _STATE["key"] = key
    return _STATE["value"]


def traffic_bytes(dims, pass_, dtype) -> int:
    """Bytes an ideal kernel moves in the pass, each tensor read or written once (the GB/s of the report): fwd reads S,
    T, alpha and writes S1, T1; bwd reads grad_S1, grad_T1, S, T, alpha and writes grad_S, grad_alpha; fwd+bwd (and
    the graph pass) both. No partner tensor: the batch flip."""
    e, BCD, BC = dtype.itemsize, dims["B"] * dims["C"] * dims["D"], dims["B"] * dims["C"]
    fwd, bwd = e * (2 * BCD + 2 * BC + 1), e * (3 * BCD + 2 * BC + 2)
    return {"fwd": fwd, "bwd": bwd}.get(pass_, fwd + bwd)


def _official_estimate(dims) -> int:
    """Rough fp32 bytes of the official forward + backward: about 9 live (B, H, W, C, D) tensors (spec §11.1)."""
    return 4 * 9 * dims["B"] * dims["N"] * dims["C"] * dims["D"]


def _forward(provider, backend, inp, bench):
    T, alpha = inp["T"], inp["alpha"]
    if provider == "official":
        F = inp["F"]
        return (lambda: instance_blend_map(F, T, alpha)), (F, alpha)
    S = inp["S"]
    if provider == "compile":
        if inp["compiled"] is None:
            inp["compiled"] = bench.compile_torch(_blend, fullgraph=True, dynamic=False)
        compiled = inp["compiled"]
        return (lambda: compiled(S, T, alpha)), (S, alpha)
    return (lambda: _blend(S, T, alpha, backend)), (S, alpha)


def _validate(provider, forward, inp, device):
    """Once per shape and provider, outside the timing: the provider computes the official (S1, T1) and, from the
    fixed output gradients, the official gradients (w.r.t. S, the official one w.r.t. F at any position: F enters
    only through its spatial sum; and alpha). The provider runs with grad enabled, as timed (so torch.compile
    compiles the graph it will run, once)."""
    if provider in inp["validated"]:
        return
    if inp["reference"] is None:
        with torch.no_grad():
            inp["reference"] = instance_blend_map(inp["F"], inp["T"], inp["alpha"])
    if provider != "official":
        tol = 1e-3 if device.type == "cuda" else 1e-4
        outputs = forward()
        for name, got, want in zip(("S1", "T1"), outputs, inp["reference"]):
            torch.testing.assert_close(got.detach(), want, rtol=tol, atol=tol,
                                       msg=lambda m: f"{provider} disagrees with the official {name}: {m}")
        if inp["reference_grads"] is None:
            F, alpha = inp["F"], inp["alpha"]
            gF, ga = torch.autograd.grad(instance_blend_map(F, inp["T"], alpha), (F, alpha), inp["grad_outputs"])
            inp["reference_grads"] = (gF[:, 0, 0], ga)
        got = torch.autograd.grad(outputs, (inp["S"], inp["alpha"]), inp["grad_outputs"], allow_unused=True)
        inp["check_grads"](provider, ("S", "alpha"), got, inp["reference_grads"], tol)
    inp["validated"].add(provider)


def test_instance_blend(benchmark, bench, provider, pass_, shape, dims, device, dtype, rounds):
    bench.measure(
        benchmark, bench, OP, provider, pass_, shape, dims, device, dtype, rounds,
        estimate=_official_estimate, inputs=_inputs, forward=_forward, validate=_validate,
        official="dsrb.reference.instance_blend_map on the (B,H,W,C,D) map, summed over space; grad w.r.t. F and alpha",
        fused="dsrb.ops.instance_blend(backend='{backend}', validate=False) on (B,C,D); grad w.r.t. S and alpha",
        traffic_bytes=traffic_bytes(dims, pass_, dtype),
    )
