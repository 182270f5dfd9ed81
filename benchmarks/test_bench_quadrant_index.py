"""Benchmark of ``quadrant_index``: the official peak search on the map vs the op's backends.

Inputs of one shape: a (B, C, N) spatial-softmax attention and x (B, N, D) rows of the reduced map, drawn from a
seeded generator, every peak at least 1e-3 above its runner-up (``bench.clear_peaks``: the two formulations round
the score differently), and the official attention-weighted map F (B, H, W, C, D) = a[b, c, n] * x[b, n] built from
them outside the timing (what the official forward hands over). No gradient: the op is the prototype pass's and the
prototype blend's own-quadrant search, under torch.no_grad() in the model.

* official: :func:`dsrb.reference.quadrant_index_map` on F, the official rule (the score F summed over channels,
  row and column of the peak) for every (image, class) at once: leaner than the official per-map search.
* torch / triton / cuda / cpu: ``dsrb.ops.quadrant_index(a, x.sum(-1), H, W, backend=...)``, the channel sum
  included, as the model computes it from the map it already has.
* compile: ``torch.compile(fullgraph=True)`` of the same torch-backend call, its PyTorch code traced.

One pass, ``fwd`` (and on CUDA the ``graph`` pass: the call captured in a CUDA graph and replayed). Every provider's
quadrants equal the official ones, checked once per shape before timing.
"""

from __future__ import annotations

import pytest
import torch

import dsrb.ops
from dsrb.reference import quadrant_index_map

OP = "quadrant_index"
HOST_OVERHEAD_SHAPE = True  # also the conftest's "tiny" shape: the host cost of one call
PASSES = ("fwd", "graph") if torch.cuda.is_available() else ("fwd",)
_STATE = {"key": None, "value": None}  # the inputs of one shape at a time


def _quadrants(a, x, height, width, backend="torch"):
    return dsrb.ops.quadrant_index(a, x.sum(-1), height, width, backend=backend)


def _inputs(bench, shape, dims, device, dtype):
    key = (shape, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        B, N, C, D = (dims[k] for k in "BNCD")
        gen = torch.Generator().manual_seed(bench.seed_for(OP, shape))
        x = torch.randn(B, N, D, generator=gen, dtype=dtype)
        a = bench.clear_peaks(torch.softmax(2 * torch.randn(B, C, N, generator=gen, dtype=dtype), dim=-1), x)
        a, x = a.to(device), x.to(device)
        F = bench.official_map(a, x, dims)
        _STATE["value"] = dict(a=a, x=x, F=F, reference=quadrant_index_map(F), compiled=None, validated=set())
        _STATE["key"] = key
    return _STATE["value"]


def traffic_bytes(dims, dtype) -> int:
    """Bytes an ideal kernel moves, each tensor read or written once (the GB/s of the report): it reads a (B, C, N)
    and x (B, N, D), whose channel sum the timed call takes, and writes the (B, C) int64 quadrants."""
    B, N, C, D = (dims[k] for k in "BNCD")
    return dtype.itemsize * (B * C * N + B * N * D) + 8 * B * C


@pytest.mark.parametrize("pass_name", PASSES)
def test_quadrant_index(benchmark, bench, provider, shape, dims, device, dtype, rounds, pass_name):
    backend = bench.require_provider(OP, provider, device, dtype)
    H, W = dims["H"], dims["W"]
    if provider == "official":  # F and its channel sum
        bench.skip_if_too_big(int(4 * 1.1 * dims["B"] * dims["N"] * dims["C"] * dims["D"]), device,
                              f"official {OP} at {shape}")
    inp = _inputs(bench, shape, dims, device, dtype)
    a, x = inp["a"], inp["x"]
    if provider == "official":
        F = inp["F"]
        run = lambda: quadrant_index_map(F)  # noqa: E731
        formulation = "dsrb.reference.quadrant_index_map on the (B,H,W,C,D) map F: F.sum(-1), row and column argmax"
    elif provider == "compile":
        if inp["compiled"] is None:
            inp["compiled"] = bench.compile_torch(_quadrants, fullgraph=True, dynamic=False)
        compiled = inp["compiled"]
        run = lambda: compiled(a, x, H, W)  # noqa: E731
        formulation = ("dsrb.ops.quadrant_index(a, x.sum(-1), H, W, backend='torch') under "
                       "torch.compile(fullgraph=True), torch backend traced")
    else:
        run = lambda: _quadrants(a, x, H, W, backend)  # noqa: E731
        formulation = f"dsrb.ops.quadrant_index(a, x.sum(-1), H, W, backend='{backend}')"
    if provider not in inp["validated"]:  # once per shape and provider, outside the timing
        assert torch.equal(run(), inp["reference"]), f"{provider}: quadrants differ from the official ones"
        inp["validated"].add(provider)
    served = bench.check_served(provider, backend, run)  # ran ``backend``'s kernels only
    bench.run_case(benchmark, run, device=device, rounds=rounds,
                   info={"op": OP, "case": OP, "provider": provider, "pass": pass_name, "shape": shape, "dims": dims,
                         "dtype": dtype, "formulation": formulation, "served_by": served,
                         "traffic_bytes": traffic_bytes(dims, dtype)})
