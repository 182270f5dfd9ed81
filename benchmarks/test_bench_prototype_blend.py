"""Benchmark of ``prototype_blend`` (PPRB): the official map formulation vs the op's backends.

Inputs of one shape: an attention-weighted map F (B, H, W, C, D) built as the official semantic decoupling builds it,
S = F.sum over space, prototype maps (C, 4, H, W, D) and their spatial sums, the bank (C, 4, D); the own quadrant
of every (image, class) computed once by the official rule (:func:`dsrb.reference.quadrant_index_map`), random
shifts in {1, 2, 3}, the official top-1 selection of an unknown label per image (:func:`dsrb.reference.select_labels`),
beta = 0.5. The backward takes fixed gradients of S2 and T2 (beta gets gradient through the features and the soft
target, as in the official code; the prototypes are not trained, as there).

* official: the blending step of :func:`dsrb.reference.prototype_blend_map` (gather each entry's (H, W, D)
  prototype map, blend the (B, H, W, C, D) maps, sum over space) with the gradient w.r.t. F and beta. The quadrant
  is an input here, as it is for the op (its computation is the separate ``quadrant_index`` op), so the official
  column leaves out the official code's quadrant search on the maps: its cost is understated, not inflated.
* torch / triton / cuda / cpu: ``dsrb.ops.prototype_blend(S, T, beta, bank, quadrant, shift, select,
  backend=..., validate=False)`` on (B, C, D), gradient w.r.t. S and beta.
* compile: ``torch.compile(fullgraph=True)`` of the torch-backend call, the torch backend's PyTorch code traced
  (``compile_torch``), compiled once outside the timing.

Every provider times the blend without the check of the values of T, quadrant and shift (``validate=False``), as
the ``instance_blend`` suite does and for the same reasons (see its docstring).
"""

from __future__ import annotations

import torch

import dsrb.ops
from dsrb.reference import prototype_blend_map, quadrant_index_map, select_labels

OP = "prototype_blend"
HOST_OVERHEAD_SHAPE = True  # also the conftest's "tiny" shape: the host cost of one call
_STATE = {"key": None, "value": None}  # the inputs of one shape at a time


def official_prototype_blend_map(F, T, beta, prototype_maps, quadrant, shift, select):
    """:func:`dsrb.reference.prototype_blend_map` with the own quadrant given instead of searched on F."""
    return prototype_blend_map(F, T, beta, prototype_maps, shift, select, quadrant=quadrant)


def _blend(S, T, beta, bank, quadrant, shift, select, backend="torch"):
    return dsrb.ops.prototype_blend(S, T, beta, bank, quadrant, shift, select, backend=backend, validate=False)


def _inputs(bench, shape, dims, device, dtype):
    key = (shape, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        B, H, W, N, C, D = (dims[k] for k in "BHWNCD")
        gen = torch.Generator().manual_seed(bench.seed_for(OP, shape))
        F = bench.attention_weighted_map(gen, dims, device, dtype)
        S = F.sum(dim=(1, 2)).detach().requires_grad_()
        T = torch.randint(-1, 2, (B, C), generator=gen).to(dtype)
        # Prototype maps: means of attention-weighted maps, so of the scale of F (a ~ 1/N).
        maps = (torch.randn(C, 4, H, W, D, generator=gen, dtype=dtype) / N).to(device)
        bank = maps.sum(dim=(2, 3))
        quadrant = quadrant_index_map(F)  # the official peak rule, once, untimed
        shift = torch.randint(1, 4, (B, C), generator=gen).to(device)
        select = select_labels(T, torch.rand(B, C, generator=gen, dtype=dtype), top_k=1).to(device)
        T = T.to(device)
        F.requires_grad_()
        beta = torch.full((1,), 0.5, dtype=dtype, device=device, requires_grad=True)
        grads = (torch.randn(B, C, D, generator=gen, dtype=dtype).to(device),
                 torch.randn(B, C, generator=gen, dtype=dtype).to(device))
        _STATE["value"] = dict(F=F, S=S, T=T, beta=beta, maps=maps, bank=bank, quadrant=quadrant, shift=shift,
                               select=select, grad_outputs=grads, compiled=None, reference=None,
                               reference_grads=None, validated=set(), check_grads=bench.assert_grads_close)
        _STATE["key"] = key
    return _STATE["value"]


def traffic_bytes(dims, pass_, dtype) -> int:
    """Bytes an ideal kernel moves in the pass, each tensor read or written once (the GB/s of the report): fwd reads S,
    T, beta, the (C, 4, D) bank, quadrant and shift (int64) and select (bool) and writes S2, T2; bwd reads grad_S2,
    grad_T2, S, the bank, beta, quadrant, shift and select and writes grad_S, grad_beta; fwd+bwd (and the graph pass)
    both."""
    B, C, D = dims["B"], dims["C"], dims["D"]
    e, BCD, BC, bank = dtype.itemsize, B * C * D, B * C, 4 * C * D
    indices = (8 + 8 + 1) * BC  # quadrant, shift, select
    fwd = e * (2 * BCD + 2 * BC + bank + 1) + indices
    bwd = e * (3 * BCD + BC + bank + 2) + indices
    return {"fwd": fwd, "bwd": bwd}.get(pass_, fwd + bwd)


def _official_estimate(dims) -> int:
    """Rough fp32 bytes of the official forward + backward: about 10 live (B, H, W, C, D) tensors plus the
    (C, 4, H, W, D) prototype maps (spec §11.1)."""
    U = dims["B"] * dims["N"] * dims["C"] * dims["D"]
    return 4 * (10 * U + 4 * dims["C"] * dims["N"] * dims["D"])


def _forward(provider, backend, inp, bench):
    T, beta, quadrant, shift, select = (inp[k] for k in ("T", "beta", "quadrant", "shift", "select"))
    if provider == "official":
        F, maps = inp["F"], inp["maps"]
        return (lambda: official_prototype_blend_map(F, T, beta, maps, quadrant, shift, select)), (F, beta)
    S, bank = inp["S"], inp["bank"]
    if provider == "compile":
        if inp["compiled"] is None:
            inp["compiled"] = bench.compile_torch(_blend, fullgraph=True, dynamic=False)
        compiled = inp["compiled"]
        return (lambda: compiled(S, T, beta, bank, quadrant, shift, select)), (S, beta)
    return (lambda: _blend(S, T, beta, bank, quadrant, shift, select, backend)), (S, beta)


def _validate(provider, forward, inp, device):
    """Once per shape and provider, outside the timing: the provider computes the official (S2, T2); the official
    provider itself is checked against :func:`dsrb.reference.prototype_blend_map`, which searches the quadrant. The
    provider runs with grad enabled, as timed (so torch.compile compiles the graph it will run, once)."""
    if provider in inp["validated"]:
        return
    if inp["reference"] is None:
        with torch.no_grad():
            inp["reference"] = prototype_blend_map(inp["F"], inp["T"], inp["beta"], inp["maps"], inp["shift"],
                                                   inp["select"])
    tol = 1e-3 if device.type == "cuda" else 1e-4
    outputs = forward()
    for name, got, want in zip(("S2", "T2"), outputs, inp["reference"]):
        torch.testing.assert_close(got.detach(), want, rtol=tol, atol=tol,
                                   msg=lambda m: f"{provider} disagrees with the official {name}: {m}")
    # The gradients too, from the fixed output gradients: w.r.t. S (the official one w.r.t. F at any position, F
    # entering only through its spatial sum) and beta.
    if inp["reference_grads"] is None:
        F, beta = inp["F"], inp["beta"]
        out = prototype_blend_map(F, inp["T"], beta, inp["maps"], inp["shift"], inp["select"])
        gF, gb = torch.autograd.grad(out, (F, beta), inp["grad_outputs"])
        inp["reference_grads"] = (gF[:, 0, 0], gb)
    leaves = (inp["F"], inp["beta"]) if provider == "official" else (inp["S"], inp["beta"])
    got = torch.autograd.grad(outputs, leaves, inp["grad_outputs"], allow_unused=True)
    if provider == "official":
        got = (got[0][:, 0, 0], got[1])
    inp["check_grads"](provider, ("S", "beta"), got, inp["reference_grads"], tol)
    inp["validated"].add(provider)


def test_prototype_blend(benchmark, bench, provider, pass_, shape, dims, device, dtype, rounds):
    bench.measure(
        benchmark, bench, OP, provider, pass_, shape, dims, device, dtype, rounds,
        estimate=_official_estimate, inputs=_inputs, forward=_forward, validate=_validate,
        official="prototype maps (C,4,H,W,D) gathered per entry and blended on the (B,H,W,C,D) map, summed over "
                 "space (dsrb.reference.prototype_blend_map with the quadrant given); grad w.r.t. F and beta",
        fused="dsrb.ops.prototype_blend(backend='{backend}', validate=False) on (B,C,D) with the (C,4,D) bank; "
              "grad w.r.t. S and beta",
        traffic_bytes=traffic_bytes(dims, pass_, dtype),
    )
