"""Scaling sweep of ``semantic_attention`` (the op alone, forward + backward): time and peak memory of every
provider as one of B, C, N grows while the others stay at a base shape.

Every point computes, from random x (B, N, D), u (B, N, I), e (C, I) and v (I,), S (B, C, D) = softmax over n of
v . tanh(u[b, n] * e[c]) applied to x, and the gradient of S (fixed random dL/dS) w.r.t. x, u, e and v.

* official: :func:`dsrb.reference.semantic_attention`, the op contract computed the plain way: the (B, N, C, I) tanh
  tensor and the (B, N, C, D) attention-weighted map of the official code, on the op's own inputs.
* torch / cpu / cuda / triton: ``dsrb.ops.semantic_attention(x, u, e, v, backend=...)``, skipped with the reason of
  :func:`dsrb.ops.reasons` where the backend cannot run here (triton is timed on CUDA only).
* compile: ``torch.compile(fullgraph=True, dynamic=False)`` of the torch-backend call, the torch backend's PyTorch
  code traced (``compile_torch``), one compilation per point; skipped unless ``DSRB_BENCH_SCALING_COMPILE=1`` (a
  compilation costs about 2-20 s per point on a CPU and more on a GPU host; the op suites already compare ``compile``
  at fixed shapes).

Sweep (one axis at a time, the others at the base): quick size, base B 8, 4x4 map (N 16), C 32, D 256, I 128 at
x1, x2, x4 of the axis; full size, the COCO base (B 8, 7x7 map, N 49, C 80, D 1024, I 512) at x1, x2, x4, x8. N grows
through the map width (W x k). Case ``scaling_<axis>``, shape label ``<axis>=<value>`` (zero-padded so the report
sorts the points in order), pass ``fwd+bwd``: the group ``scaling_B-B=16-fwd+bwd`` holds every provider at B = 16.

Recorded per point in ``extra_info``: ``axis``, ``value``, ``multiplier`` (value / base value), ``base`` (the base
value), ``median_s`` and ``peak_memory_bytes``; after the module has run, every point also gets ``time_vs_x1`` and
``peak_vs_x1`` (its median and peak divided by those of the same provider at the base), and ``time_linearity`` /
``peak_linearity`` = that ratio / multiplier, and a summary table is printed at the end of the module.

Reading linearity: growth is linear when time(xk) / time(x1) ~ k (``time_linearity`` ~ 1); below 1 means fixed costs
still dominate at the base (launch overhead, small shapes), above 1 superlinear growth. Expected: every backend at
most linear in each of B, C and N in both time and memory (linearity <= ~1.2 at the largest multiplier), the fused
backends' memory far below the official one at every point. Shown, not asserted (timings are no test): the report's
notes column gives both linearities of every point.
"""

from __future__ import annotations

import os
from typing import List

import pytest
import torch

OP = "semantic_attention"
BASE = {
    "quick": (dict(B=8, H=4, W=4, C=32, D=256, I=128), (1, 2, 4)),
    "full": (dict(B=8, H=7, W=7, C=80, D=1024, I=512), (1, 2, 4, 8)),
}
AXES = ("B", "C", "N")
_STATE = {"key": None, "value": None}  # the inputs of one point at a time
_POINTS: List[dict] = []  # the extra_info of every measured point, for the summary


def _points(size: str):
    base, mults = BASE[size]
    out = []
    for axis in AXES:
        base_value = base["H"] * base["W"] if axis == "N" else base[axis]
        width = len(str(base_value * mults[-1]))
        for k in mults:
            dims = dict(base)
            if axis == "N":
                dims["W"] = base["W"] * k
            else:
                dims[axis] = base[axis] * k
            dims["N"] = dims["H"] * dims["W"]
            value = dims[axis]
            out.append(dict(axis=axis, mult=k, value=value, base=base_value, dims=dims,
                            label=f"{axis}={value:0{width}d}"))
    return out


def pytest_generate_tests(metafunc):
    # The points depend on the bench size, so they are generated here rather than with a marker.
    if "point" in metafunc.fixturenames:
        size = (metafunc.config.getoption("--bench-size", default=None) or os.environ.get("DSRB_BENCH_SIZE")
                or "quick")
        points = _points(size if size in BASE else "quick")
        metafunc.parametrize("point", points, ids=[f"{p['axis']}-x{p['mult']}" for p in points])


@pytest.fixture(autouse=True, scope="module")
def _summary(request):
    """After the sweep: the ratios to the base point of every provider and axis, into each point's extra_info, and
    a table on the terminal."""
    yield
    base = {(p["provider"], p["axis"]): p for p in _POINTS if p["multiplier"] == 1}
    lines = []
    for p in _POINTS:
        ref = base.get((p["provider"], p["axis"]))
        if ref is None or not ref.get("median_s") or p.get("median_s") is None:
            continue
        p["time_vs_x1"] = p["median_s"] / ref["median_s"]
        p["time_linearity"] = p["time_vs_x1"] / p["multiplier"]
        if ref.get("peak_memory_bytes") and p.get("peak_memory_bytes") is not None:
            p["peak_vs_x1"] = p["peak_memory_bytes"] / ref["peak_memory_bytes"]
            p["peak_linearity"] = p["peak_vs_x1"] / p["multiplier"]
        if p["multiplier"] != 1:
            lines.append(f"  {p['provider']:<9} {p['axis']} x{p['multiplier']:<2} ({p['axis']}={p['value']:<5}) "
                         f"time x{p['time_vs_x1']:6.2f}  memory x{p.get('peak_vs_x1', float('nan')):6.2f}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if lines and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("")
            reporter.write_line("scaling sweep (ratio to the same provider at the base point; linear = the "
                                "multiplier):")
            for line in lines:
                reporter.write_line(line)
    _POINTS.clear()


def _inputs(bench, point, device, dtype):
    key = (point["label"], str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        dims = point["dims"]
        B, N, C, D, I = (dims[k] for k in "BNCDI")
        gen = torch.Generator().manual_seed(bench.seed_for(OP, "scaling", point["label"]))
        x = torch.randn(B, N, D, generator=gen, dtype=dtype)
        u = torch.randn(B, N, I, generator=gen, dtype=dtype)
        e = torch.randn(C, I, generator=gen, dtype=dtype) / I ** 0.5
        v = torch.randn(I, generator=gen, dtype=dtype)
        grad_S = torch.randn(B, C, D, generator=gen, dtype=dtype)
        leaves = tuple(t.to(device).requires_grad_() for t in (x, u, e, v))
        _STATE["value"] = dict(leaves=leaves, grad_outputs=(grad_S.to(device),), reference=None, compiled=None,
                               reference_grads=None)
        _STATE["key"] = key
    return _STATE["value"]


def _official_estimate(dims) -> int:
    """Rough fp32 bytes of the official forward + backward: about 7 live (B, N, C, I) and 5 (B, N, C, D) tensors."""
    return 4 * dims["B"] * dims["N"] * dims["C"] * (7 * dims["I"] + 5 * dims["D"])


def test_scaling(benchmark, bench, provider, point, device, dtype, rounds):
    import dsrb.ops
    from dsrb.reference import semantic_attention as official_op

    if provider == "compile" and os.environ.get("DSRB_BENCH_SCALING_COMPILE") != "1":
        pytest.skip("compile: one compilation per point (about 2-20 s each on a CPU); set "
                    "DSRB_BENCH_SCALING_COMPILE=1 to sweep it (the op suites compare compile at fixed shapes)")
    backend = bench.require_provider(OP, provider, device, dtype)
    dims, label = point["dims"], point["label"]
    if provider == "official":
        bench.skip_if_too_big(_official_estimate(dims), device, f"official {OP} at {label}")
    inp = _inputs(bench, point, device, dtype)
    leaves = inp["leaves"]

    if provider == "official":
        def forward():
            return (official_op(*leaves)[0],)
    elif provider == "compile":
        if inp["compiled"] is None:
            inp["compiled"] = bench.compile_torch(lambda *t: dsrb.ops.semantic_attention(*t, backend="torch")[0],
                                            fullgraph=True, dynamic=False)
        compiled = inp["compiled"]

        def forward():
            return (compiled(*leaves),)
    else:
        def forward():
            return (dsrb.ops.semantic_attention(*leaves, backend=backend)[0],)

    if inp["reference"] is None:  # once per point, outside the timing: the provider computes the official S
        with torch.no_grad():
            inp["reference"] = official_op(*leaves)[0]
    if provider != "official":
        tol = 5e-3 if device.type == "cuda" else 1e-4
        outputs = forward()
        torch.testing.assert_close(outputs[0].detach(), inp["reference"], rtol=tol, atol=tol,
                                   msg=lambda m: f"{provider} disagrees with the official S at {label}: {m}")
        if inp["reference_grads"] is None:  # and the gradients the timed backward computes
            inp["reference_grads"] = torch.autograd.grad(official_op(*leaves)[0], leaves, inp["grad_outputs"])
        got = torch.autograd.grad(outputs, leaves, inp["grad_outputs"], allow_unused=True)
        bench.assert_grads_close(f"{provider} at {label}", ("x", "u", "e", "v"), got, inp["reference_grads"], tol)

    fn_check = bench.pass_callables("fwd+bwd", forward, leaves, inp["grad_outputs"])[0]
    served = bench.check_served(provider, backend, fn_check)

    fn, setup = bench.pass_callables("fwd+bwd", forward, leaves, inp["grad_outputs"])
    formulation = ("dsrb.reference.semantic_attention: (B,N,C,I) tanh tensor, (B,N,C,D) map" if provider == "official"
                   else f"dsrb.ops.semantic_attention(x, u, e, v, backend='{backend}')"
                   + (" under torch.compile(fullgraph=True), torch backend traced" if provider == "compile" else ""))
    # One compilation per point: dynamo's per-function recompile limit (8) must not send later points to eager.
    # (Named cache_size_limit in older torch, 2.6 among them.)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 64}):
        bench.run_case(benchmark, fn, setup=setup, device=device, rounds=rounds,
                       info={"op": OP, "case": f"scaling_{point['axis']}", "provider": provider, "pass": "fwd+bwd",
                             "shape": label, "dims": dims, "dtype": dtype, "formulation": formulation,
                             "axis": point["axis"], "value": point["value"], "multiplier": point["mult"],
                             "base": point["base"], "grad_wrt": "x, u, e and v, from a fixed dL/dS",
                             "served_by": served})
    extra = benchmark.extra_info
    stats = getattr(benchmark, "stats", None)
    if stats is not None and not benchmark.disabled:
        extra["median_s"] = (extra.get("cuda_event_median_ms") or stats.stats.median * 1e3) / 1e3
        _POINTS.append(extra)
