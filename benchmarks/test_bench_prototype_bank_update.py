"""Benchmark of ``prototype_bank_update_``: one batch into the prototype buckets, per backend.

Inputs of one shape: S (B, C, D) features, partial targets T (B, C) with 50 % of the labels known and 1/3 of the known
ones positive, quadrants (B, C) in [0, 3], drawn from a seeded generator; an empty bank (sums (C, 4, D) float32,
counts (C, 4) int64), cap 100. Each round starts from a fresh empty bank (copied in the untimed setup), so every
round stores every known positive.

* torch / triton / cuda / cpu: ``dsrb.ops.prototype_bank_update_(sums, counts, S, T, quadrant, 100,
  validate=False, backend=...)``, the in-place update ``PrototypeBank.update`` calls, without the check of T's and
  quadrant's values, as the model calls it once its targets have been checked.
* compile: ``torch.compile(fullgraph=True)`` of the same torch-backend call, its PyTorch code traced.

No official column: the official code has no per-batch bank of vectors. Its pass stores copies of the (H, W, D)
maps per sample and averages them at the end; ``test_bench_prototype_pass.py`` times that loop against this update
over a whole epoch. Every provider's bank equals the oracle's (:func:`dsrb.reference.prototype_bank_update`, the
per-sample loop on the vectors), checked once per shape before timing. One pass, ``fwd`` (no gradient).
"""

from __future__ import annotations

import functools

import pytest
import torch

import dsrb.ops
from dsrb.reference import prototype_bank_update as oracle

OP = "prototype_bank_update"
HOST_OVERHEAD_SHAPE = True  # also the conftest's "tiny" shape: the host cost of one call
CAP = 100
_STATE = {"key": None, "value": None}  # the inputs of one shape at a time


def _update(sums, counts, S, T, quadrant, backend="torch"):
    dsrb.ops.prototype_bank_update_(sums, counts, S, T, quadrant, CAP, validate=False, backend=backend)


def _inputs(bench, shape, dims, device, dtype):
    key = (shape, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        B, C, D = dims["B"], dims["C"], dims["D"]
        gen = torch.Generator().manual_seed(bench.seed_for(OP, shape))
        S = torch.randn(B, C, D, generator=gen, dtype=dtype)
        known = torch.rand(B, C, generator=gen) < 0.5
        positive = torch.rand(B, C, generator=gen) < 1 / 3
        T = torch.where(known, torch.where(positive, 1, -1), 0).to(dtype)
        quadrant = torch.randint(0, 4, (B, C), generator=gen)
        sums, counts = torch.zeros(C, 4, D, dtype=torch.float32), torch.zeros(C, 4, dtype=torch.int64)
        reference = oracle(sums, counts, S, T, quadrant, CAP)  # on the CPU: the loop reads values one at a time
        _STATE["value"] = dict(S=S.to(device), T=T.to(device), quadrant=quadrant.to(device), sums=sums.to(device),
                               counts=counts.to(device), reference=reference, compiled=None, validated=set())
        _STATE["key"] = key
    return _STATE["value"]


def traffic_bytes(dims, dtype) -> int:
    """Bytes an ideal kernel moves, each tensor read or written once (the GB/s of the report): it reads S, T, the int64
    quadrants and the bank (float32 sums (C, 4, D), int64 counts (C, 4)) and writes the bank. An upper bound of what
    the update needs: it reads only the rows of S it stores and writes only the buckets they go to."""
    B, C, D = dims["B"], dims["C"], dims["D"]
    return dtype.itemsize * (B * C * D + B * C) + 8 * B * C + 2 * (4 * 4 * C * D + 8 * 4 * C)


def test_prototype_bank_update(benchmark, bench, provider, shape, dims, device, dtype, rounds):
    if provider == "official":
        pytest.skip("official: the official code has no per-batch bank of vectors (its per-sample loop over maps "
                    "is timed by test_bench_prototype_pass.py)")
    backend = bench.require_provider(OP, provider, device, dtype)
    inp = _inputs(bench, shape, dims, device, dtype)
    S, T, quadrant = inp["S"], inp["T"], inp["quadrant"]
    if provider == "compile":
        if inp["compiled"] is None:
            inp["compiled"] = bench.compile_torch(_update, fullgraph=True, dynamic=False)
        update = inp["compiled"]
        formulation = (f"dsrb.ops.prototype_bank_update_(..., cap={CAP}, validate=False, backend='torch') under "
                       "torch.compile(fullgraph=True), torch backend traced")
    else:
        update = functools.partial(_update, backend=backend)
        formulation = f"dsrb.ops.prototype_bank_update_(..., cap={CAP}, validate=False, backend='{backend}')"
    run = lambda sums, counts: update(sums, counts, S, T, quadrant)  # noqa: E731

    def fresh_bank():  # the untimed setup of every round
        return (inp["sums"].clone(), inp["counts"].clone()), {}

    if provider not in inp["validated"]:  # once per shape and provider, outside the timing
        (sums, counts), _ = fresh_bank()
        run(sums, counts)
        want_sums, want_counts = inp["reference"]
        assert torch.equal(counts.cpu(), want_counts), f"{provider}: counts differ from the oracle's"
        torch.testing.assert_close(sums.cpu(), want_sums, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{provider}: sums differ from the oracle's: {m}")
        inp["validated"].add(provider)
    served = bench.check_served(provider, backend, lambda: run(*fresh_bank()[0]))  # ran ``backend``'s kernels only
    bench.run_case(benchmark, run, setup=fresh_bank, device=device, rounds=rounds,
                   info={"op": OP, "case": OP, "provider": provider, "pass": "fwd", "shape": shape, "dims": dims,
                         "dtype": dtype, "formulation": formulation, "served_by": served, "cap": CAP,
                         "traffic_bytes": traffic_bytes(dims, dtype)})
