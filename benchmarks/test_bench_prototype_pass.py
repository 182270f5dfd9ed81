"""Benchmark of the prototype pass over a synthetic epoch: the vectorised bank vs the official per-sample loop.

The prototype pass (spec §5.1) runs before the blending epochs: the model, in eval mode, goes over the training set
and stores the known-positive (image, class) features per (class, quadrant) bucket, then averages them. Both
formulations start here from the same per-batch quantities, the attention a and the reduced map x the forward
computes, and each builds from them what its own forward hands to the pass (the official map F, the model's pooled
S, both timed); they compute the same prototypes (the official ones as (C, 4, H, W, D) maps, the model's as their
spatial sums, (C, 4, D)).

A synthetic epoch of one shape: ``BATCHES[size]`` batches (8 quick, 32 full; at most ``MAX_IMAGES[size]`` images,
so vg-b32 gets 8) of B images, each (a (B, C, N) spatial-softmax attention, x (B, N, D) rows of the reduced map X,
T (B, C) partial targets with 50 % of the labels known and 1/3 of the known ones positive), drawn from a seeded
generator; images_per_epoch = batches x B. Bucket cap 100 (official); ``compat="official"`` (a bucket's sum is
divided by n + 1, the official placeholder row averaged in) for both formulations.

Two scopes (``scope``, the last part of the group name), per provider (one call = one whole epoch, no gradient):

* ``epoch``: from a and x; each side also builds, per batch, what its own forward hands to the pass (below), so
  the official (B, H, W, C, D) map and the model's S = a @ x (a bmm that is most of the vectorised time on a CPU)
  are both timed;
* ``pass``: from what each forward has already handed over (official: F per batch; model: S, a and x per batch,
  built outside the timing): the prototype pass proper, the official quadrant search, per-sample loop and
  averaging against ``quadrant_index``, ``PrototypeBank.update`` and ``finalize``.

Timed in ``epoch``:

* official: for every batch, the official attention-weighted map F (B, H, W, C, D) = a[b, c, n] * x[b, n] (what
  the official forward hands to the prototype pass), then :func:`dsrb.reference.compute_prototype_maps` over the
  epoch: as officially, each F copied to the CPU, the official quadrant search on it and the class-major
  per-sample loop that stores copies of (H, W, D) maps in the buckets, then the per-bucket averaging. The buckets
  grow by appending, not by the official torch.cat of the whole bucket at every map: the official column is a lower
  bound on the official cost.
* torch / cpu / cuda / triton: for every batch, S = a @ x (B, C, D) (what the model's forward hands over),
  ``dsrb.ops.quadrant_index(a, x.sum(-1), H, W, backend=provider)`` and
  :meth:`dsrb.models.prototype_bank.PrototypeBank.update` (``dsrb.ops.prototype_bank_update``); then
  ``PrototypeBank.finalize("official")``: exactly what ``DSRB.update_prototypes`` / ``finalize_prototypes`` do
  after the model's forward.
* compile: not timed (the pass is a host-side loop over batches of no-grad custom ops; there is nothing for
  torch.compile to fuse).

Before timing, once per provider: the bank's prototypes equal the official maps summed over space, and both mark
the same classes valid. ``extra_info`` records images_per_epoch, batches, cap, compat and the time per image.

Rounds: the official provider's rounds are cut where its estimated epoch time (``OFFICIAL_SECONDS_PER_ENTRY`` per
(image, class) entry; the loop runs on the CPU, as officially, on a GPU machine too) would make a case exceed
``OFFICIAL_BUDGET_S`` (the full shapes; recorded in ``extra_info["rounds_note"]``), whatever ``DSRB_BENCH_ROUNDS``
asks.

Target: the vectorised pass >= 100x faster than the official loop (the ``pass`` groups; RESULTS.md shows both).
"""

from __future__ import annotations

import pytest
import torch

import dsrb.ops
from dsrb.models.prototype_bank import PrototypeBank
from dsrb.reference import compute_prototype_maps

CASE = "prototype_pass"
SCOPES = ("epoch", "pass")  # what is timed: see the docstring
OPS = ("quadrant_index", "prototype_bank_update")
BATCHES = {"quick": 8, "full": 32}  # batches per synthetic epoch ...
MAX_IMAGES = {"quick": 128, "full": 256}  # ... but at most this many images (vg-b32: 8 batches)
CAP = 100  # samples per (class, quadrant) bucket, as officially
COMPAT = "official"
# The official loop costs roughly this much per (image, class) entry of the epoch on a CPU (quadrant search and
# per-sample loop); its rounds are cut so that one case stays near OFFICIAL_BUDGET_S.
OFFICIAL_SECONDS_PER_ENTRY = 100e-6  # 84 us measured for `-epoch` at coco-b8 on an AMD EPYC (2026-12-05)
OFFICIAL_BUDGET_S = 20.0
_STATE = {"key": None, "value": None}  # the epoch of one shape at a time


def _batches(size, dims) -> int:
    return min(BATCHES[size], max(1, MAX_IMAGES[size] // dims["B"]))


def _epoch(bench, size, shape, dims, device, dtype):
    key = (size, shape, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        B, N, C, D = dims["B"], dims["N"], dims["C"], dims["D"]
        gen = torch.Generator().manual_seed(bench.seed_for(CASE, shape))
        batches = []
        for _ in range(_batches(size, dims)):
            a = torch.softmax(2 * torch.randn(B, C, N, generator=gen, dtype=dtype), dim=-1)
            x = torch.randn(B, N, D, generator=gen, dtype=dtype)
            a = bench.clear_peaks(a, x)
            known = torch.rand(B, C, generator=gen) < 0.5
            positive = torch.rand(B, C, generator=gen) < 1 / 3
            T = torch.where(known, torch.where(positive, 1, -1), 0)
            batches.append(tuple(t.to(device) for t in (a, x, T)))
        _STATE["value"] = dict(batches=batches, banks={}, reference=None, validated=set())
        _STATE["key"] = key
    return _STATE["value"]


def _official_epoch(bench, batches, dims, maps=None):
    """F per batch (or the given maps), then the official prototype pass over the epoch: (maps (C, 4, H, W, D),
    valid (C,))."""
    if maps is None:
        maps = (bench.official_map(a, x, dims) for a, x, _ in batches)
    return compute_prototype_maps(zip(maps, (T for _, _, T in batches)), cap=CAP, compat=COMPAT)


def _vectorised_epoch(bank: PrototypeBank, batches, dims, backend: str, S_list=None):
    """S per batch (or the given S), the quadrants, the bank update, the finalization: (prototypes (C, 4, D),
    valid (C,))."""
    H, W = dims["H"], dims["W"]
    bank.reset()
    for i, (a, x, T) in enumerate(batches):
        S = torch.bmm(a, x) if S_list is None else S_list[i]
        quadrant = dsrb.ops.quadrant_index(a, x.sum(-1), H, W, backend=backend)
        bank.update(S, T, quadrant)
    bank.finalize(COMPAT)
    return bank.prototypes, bank.valid


def _official_estimate(dims, batches: int) -> int:
    """Bytes the official pass may hold: every batch's (B, H, W, C, D) map (the ``pass`` scope's inputs; ``epoch``
    holds one at a time and the stored copies), plus the stacks of one bucket."""
    return int(4 * 1.1 * batches * dims["B"] * dims["N"] * dims["C"] * dims["D"])


def _validate(bench, provider, scope, run, inp, dims, device):
    """Once per shape and provider, outside the timing: the provider's prototypes equal the official maps summed
    over space (the bank holds spatial sums), and the valid classes agree."""
    if (provider, scope) in inp["validated"]:
        return
    if inp["reference"] is None:
        maps, valid = _official_epoch(bench, inp["batches"], dims)
        inp["reference"] = (maps.sum(dim=(2, 3)), valid)
    if provider != "official":
        prototypes, valid = run()
        want, want_valid = inp["reference"]
        assert torch.equal(valid, want_valid), f"{provider}: valid classes differ from the official pass"
        tol = 1e-4 if device.type == "cuda" else 1e-5
        torch.testing.assert_close(prototypes, want, rtol=tol, atol=tol,
                                   msg=lambda m: f"{provider} disagrees with the official prototypes: {m}")
    inp["validated"].add((provider, scope))


@pytest.mark.parametrize("scope", SCOPES)
def test_prototype_pass(benchmark, bench, provider, shape, size, dims, device, dtype, rounds, scope):
    if provider == "compile":
        pytest.skip("compile: the prototype pass is a host-side loop over batches of no-grad custom ops; "
                    "torch.compile has nothing to fuse, so it is not timed")
    backend = None
    for op in OPS:
        backend = bench.require_provider(op, provider, device, dtype)
    n_batches = _batches(size, dims)
    images = n_batches * dims["B"]
    info = {"op": CASE, "case": CASE, "provider": provider, "pass": scope, "shape": shape, "dims": dims,
            "dtype": dtype, "batches": n_batches, "images_per_epoch": images, "cap": CAP, "compat": COMPAT}
    if provider == "official":
        bench.skip_if_too_big(_official_estimate(dims, n_batches), device, f"official prototype pass at {shape}")
    inp = _epoch(bench, size, shape, dims, device, dtype)
    batches = inp["batches"]
    given = scope == "pass"  # the forward's outputs built here, outside the timing
    if provider == "official":
        maps = [bench.official_map(a, x, dims) for a, x, _ in batches] if given else None
        run = lambda: _official_epoch(bench, batches, dims, maps)  # noqa: E731
        info["formulation"] = (("given F per batch; " if given else "per batch F (B,H,W,C,D) = a * x; ")
                               + "dsrb.reference.compute_prototype_maps over the epoch (official quadrant search on "
                               "F, per-sample loop storing maps, averaging)")
        estimate = images * dims["C"] * OFFICIAL_SECONDS_PER_ENTRY
        if estimate * rounds > OFFICIAL_BUDGET_S:  # DSRB_BENCH_ROUNDS too: it made the GPU session's part overrun
            info["rounds_note"] = (f"official rounds cut from {rounds}: about {estimate:.1f} s per round estimated "
                                   f"({OFFICIAL_SECONDS_PER_ENTRY * 1e6:.0f} us per (image, class) entry)")
            rounds = max(1, int(OFFICIAL_BUDGET_S / estimate))
    else:
        if backend not in inp["banks"]:
            inp["banks"][backend] = PrototypeBank(dims["C"], dims["D"], cap=CAP, backend=backend).to(device)
        bank = inp["banks"][backend]
        S_list = [torch.bmm(a, x) for a, x, _ in batches] if given else None
        run = lambda: _vectorised_epoch(bank, batches, dims, backend, S_list)  # noqa: E731
        info["formulation"] = (("given S per batch; " if given else "per batch S = a @ x; ")
                               + f"dsrb.ops.quadrant_index and PrototypeBank.update (dsrb.ops.prototype_bank_update_,"
                               f" backend='{backend}'); PrototypeBank.finalize")
    _validate(bench, provider, scope, run, inp, dims, device)
    with torch.no_grad():  # the epoch ran ``backend``'s kernels only (outside the timing)
        info["served_by"] = bench.check_served(provider, backend, run)
    with torch.no_grad():
        bench.run_case(benchmark, run, device=device, rounds=rounds, info=info)
    if not benchmark.disabled and benchmark.stats is not None:
        extra = benchmark.extra_info
        median_ms = extra.get("cuda_event_median_ms") or benchmark.stats.stats.median * 1e3
        extra["epoch_median_ms"] = median_ms
        extra["per_image_ms"] = median_ms / images
