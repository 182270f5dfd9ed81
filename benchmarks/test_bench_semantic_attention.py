"""Benchmark of ``semantic_attention``: the semantic-decoupling stage, official formulation vs the op's backends.

Every provider computes the same thing from the same inputs: the reduced map X (B, N, D), the word vectors (C, E)
and the four linears fc1..fc4 of the official module, giving S (B, C, D) (and a); the backward takes a fixed
gradient of S and differentiates w.r.t. X and the linears' parameters.

* official: :func:`dsrb.reference.semantic_decoupling_official`, the official code path: u = fc1(x), e = fc2(w),
  z = tanh(u * e) on (B, N, C, I), the two chained linears fc4(fc3(z)) and the (B, H, W, C, D) attention-weighted
  map F, S = F.sum over space.
* torch / triton / cuda / cpu: u = fc1(x), e = fc2(w), v = W3ᵀ w4 (the exact collapse of fc3/fc4, spec §3.3), then
  ``dsrb.ops.semantic_attention(x, u, e, v, backend=...)``.
* compile: ``torch.compile(fullgraph=True)`` of that torch-backend stage, the torch backend's PyTorch code traced
  (``compile_torch``), compiled once outside the timing.
"""

from __future__ import annotations


import pytest
import torch

import dsrb.ops
from dsrb.reference import semantic_attention as semantic_attention_oracle
from dsrb.reference import semantic_decoupling_official

OP = "semantic_attention"
HOST_OVERHEAD_SHAPE = True  # also the conftest's "tiny" shape: the host cost of one call
_STATE = {"key": None, "value": None}  # the inputs of one shape at a time


def _stage(x, word, fc1, fc2, fc3, fc4, backend):
    u = fc1(x)
    e = fc2(word)
    v = fc3.weight.t() @ fc4.weight[0]
    S, _ = dsrb.ops.semantic_attention(x, u, e, v, backend=backend)
    return S


def _stage_torch(x, word, fc1, fc2, fc3, fc4):
    return _stage(x, word, fc1, fc2, fc3, fc4, "torch")


def _inputs(bench, shape, dims, device, dtype):
    key = (shape, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        B, H, W, N, C, D, I, E = (dims[k] for k in "BHWNCDIE")
        gen = torch.Generator().manual_seed(bench.seed_for(OP, shape))
        X = torch.randn(B, D, H, W, generator=gen, dtype=dtype)
        word = torch.randn(C, E, generator=gen, dtype=dtype).to(device)
        fc1 = bench.seeded_linear(gen, D, I, False, device, dtype)
        fc2 = bench.seeded_linear(gen, E, I, False, device, dtype)
        fc3 = bench.seeded_linear(gen, I, I, True, device, dtype)
        fc4 = bench.seeded_linear(gen, I, 1, True, device, dtype)
        x = X.permute(0, 2, 3, 1).reshape(B, N, D).contiguous().to(device).requires_grad_()
        X = X.to(device).requires_grad_()
        params = (fc1.weight, fc2.weight, fc3.weight, fc3.bias, fc4.weight, fc4.bias)
        grad_S = torch.randn(B, C, D, generator=gen, dtype=dtype).to(device)
        _STATE["value"] = dict(
            X=X, x=x, word=word, fc=(fc1, fc2, fc3, fc4), params=params, grad_outputs=(grad_S,),
            compiled=None, reference=None, validated=set(), op_leaves=None, compiled_op=None,
            reference_grads=None, op_reference_grads=None, check_grads=bench.assert_grads_close,
        )
        _STATE["key"] = key
    return _STATE["value"]


def _official_estimate(dims) -> int:
    """Rough fp32 bytes of the official forward + backward: about 7 live (B, N, C, I) and 5 (B, N, C, D) tensors
    (spec §10.3, §11.1)."""
    V = dims["B"] * dims["N"] * dims["C"] * dims["I"]
    U = dims["B"] * dims["N"] * dims["C"] * dims["D"]
    return 4 * (7 * V + 5 * U)


def _forward(provider, backend, inp, bench):
    fc = inp["fc"]
    if provider == "official":
        X, word = inp["X"], inp["word"]
        return (lambda: (semantic_decoupling_official(X, word, *fc)[0],)), (X,) + inp["params"]
    x, word = inp["x"], inp["word"]
    if provider == "compile":
        if inp["compiled"] is None:
            inp["compiled"] = bench.compile_torch(_stage_torch, fullgraph=True, dynamic=False)
        compiled = inp["compiled"]
        return (lambda: (compiled(x, word, *fc),)), (x,) + inp["params"]
    return (lambda: (_stage(x, word, *fc, backend),)), (x,) + inp["params"]


def _validate(provider, forward, inp, device):
    """Once per shape and provider, outside the timing: the provider computes the official S. The provider runs
    with grad enabled, as timed (so torch.compile compiles the graph it will run, once)."""
    if provider in inp["validated"]:
        return
    if inp["reference"] is None:
        with torch.no_grad():
            inp["reference"] = semantic_decoupling_official(inp["X"], inp["word"], *inp["fc"])[0]
    if not provider.endswith("official"):
        outputs = forward()
        tol = 5e-3 if device.type == "cuda" else 1e-4
        torch.testing.assert_close(outputs[0].detach(), inp["reference"], rtol=tol, atol=tol,
                                   msg=lambda m: f"{provider} disagrees with the official S: {m}")
        # The gradients too, from the fixed dL/dS, against the official formulation's.
        if provider.startswith("op:"):
            names, leaves = ("x", "u", "e", "v"), inp["op_leaves"]
            if inp["op_reference_grads"] is None:
                inp["op_reference_grads"] = torch.autograd.grad(
                    semantic_attention_oracle(*leaves)[0], leaves, inp["grad_outputs"])
            want = inp["op_reference_grads"]
        else:
            names = ("x", "fc1.weight", "fc2.weight", "fc3.weight", "fc3.bias", "fc4.weight", "fc4.bias")
            leaves = (inp["x"],) + inp["params"]
            if inp["reference_grads"] is None:
                X = inp["X"]
                g = torch.autograd.grad(semantic_decoupling_official(X, inp["word"], *inp["fc"])[0],
                                        (X,) + inp["params"], inp["grad_outputs"])
                B, D, H, W = X.shape  # the official gradient w.r.t. X (B, D, H, W) in x's (B, N, D) layout
                inp["reference_grads"] = (g[0].permute(0, 2, 3, 1).reshape(B, H * W, D),) + tuple(g[1:])
            want = inp["reference_grads"]
        got = torch.autograd.grad(outputs, leaves, inp["grad_outputs"], allow_unused=True)
        inp["check_grads"](provider, names, got, want, tol)
    inp["validated"].add(provider)


def _op_forward(provider, backend, inp, bench):
    """The op alone on fixed x, u, e, v (u, e, v computed once from the same linears): what the fused backends
    replace, without the linears every provider shares."""
    if inp["op_leaves"] is None:
        fc1, fc2, fc3, fc4 = inp["fc"]
        with torch.no_grad():
            leaves = (inp["x"], fc1(inp["x"]), fc2(inp["word"]), fc3.weight.t() @ fc4.weight[0])
        inp["op_leaves"] = tuple(t.detach().clone().requires_grad_() for t in leaves)
    leaves = inp["op_leaves"]
    if provider == "compile":
        if inp["compiled_op"] is None:
            inp["compiled_op"] = bench.compile_torch(lambda *t: dsrb.ops.semantic_attention(*t, backend="torch")[0],
                                               fullgraph=True, dynamic=False)
        compiled = inp["compiled_op"]
        return (lambda: (compiled(*leaves),)), leaves
    return (lambda: (dsrb.ops.semantic_attention(*leaves, backend=backend)[0],)), leaves


def _validate_op(provider, forward, inp, device):
    _validate(f"op:{provider}", forward, inp, device)


def test_semantic_attention_op(benchmark, bench, provider, pass_, shape, dims, device, dtype, rounds):
    if provider == "official":
        pytest.skip("the op alone has no official counterpart (the official code chains fc3/fc4 inside it); "
                    "test_semantic_attention compares the whole stage with the official formulation")
    bench.measure(
        benchmark, bench, OP, provider, pass_, shape, dims, device, dtype, rounds,
        estimate=_official_estimate, inputs=_inputs, forward=_op_forward, validate=_validate_op,
        official="", fused="dsrb.ops.semantic_attention(x, u, e, v, backend='{backend}')",
        grad_wrt="x, u, e and v, from a fixed dL/dS", case="semantic_attention_op",
    )


def test_semantic_attention(benchmark, bench, provider, pass_, shape, dims, device, dtype, rounds):
    bench.measure(
        benchmark, bench, OP, provider, pass_, shape, dims, device, dtype, rounds,
        estimate=_official_estimate, inputs=_inputs, forward=_forward, validate=_validate,
        official="dsrb.reference.semantic_decoupling_official: fc1, fc2, fc4(fc3(tanh(u*e))) on (B,N,C,I), "
                 "(B,H,W,C,D) map summed over space",
        fused="fc1, fc2, v = W3^T w4, dsrb.ops.semantic_attention(backend='{backend}')",
        grad_wrt="X and the fc1..fc4 parameters, from a fixed dL/dS",
    )
