"""Largest batch that fits a memory budget at C = 200 (VG-200): official formulation vs fused, semantic decoupling
plus both blends, forward and backward.

The path (no backbone, no head): from the reduced map X (B, N, D), the VG-200 class count and word vectors (C, E) and
the four linears fc1..fc4, the semantic features S (B, C, D); IPRB on S (partial targets T in {-1, 0, 1}, alpha =
0.5, batch-flip partners) and PPRB on S (beta = 0.5, prototypes of C classes x 4 quadrants, random shifts, about 10 %
of the entries selected); then the gradient of L = sum(S * w) + sum(S1 * w) + sum(S2 * w) + sum(T1 * t) + sum(T2 * t)
(fixed w (C, D) and t (C,), broadcast over the batch) w.r.t. x, fc1..fc4, alpha and beta (``torch.autograd.grad``:
the gradients are fresh tensors, counted in the peak).

* official: :func:`dsrb.reference.semantic_decoupling_official` (fc4(fc3(tanh(u*e))) on (B, N, C, I), the
  (B, H, W, C, D) map F), :func:`dsrb.reference.instance_blend_map` and :func:`dsrb.reference.prototype_blend_map` on
  F with (C, 4, H, W, D) prototype maps. The own quadrant of PPRB is computed from the official coefficients by
  ``dsrb.ops.quadrant_index(backend="torch")`` without gradient (the official per-(b, c) Python peak search would
  dominate the time, not the memory).
* torch / cpu / cuda / triton: fc1, fc2, v = W3ᵀw4, ``dsrb.ops.semantic_attention``, ``dsrb.ops.quadrant_index``,
  ``dsrb.ops.instance_blend`` and ``dsrb.ops.prototype_blend`` (bank (C, 4, D): the maps' spatial sums), all with
  ``backend=...``; skipped with the reason of :func:`dsrb.ops.reasons` where the backend cannot run here.
* compile: skipped (it would recompile for every probed batch size; the question is the memory of a formulation).

Memory at batch B = the resident fixed state (linears, word vectors, alpha, beta and the official prototype maps or
the fused bank) + the peak of what one call allocates, batch inputs included: on CUDA ``max_memory_allocated`` after
``reset_peak_memory_stats`` minus what was allocated before; on CPU the profiler's allocation events
(:func:`benchmarks.conftest.cpu_peak_bytes`). Budget: ``DSRB_BENCH_MEMORY_BUDGET`` (bytes) or by default 128 MiB on
CPU (512 MiB made the quick search and timing take about 2 minutes on 2 cores) and on CUDA 16 GiB, at most 45 % of
the free device memory, so that a probe at twice the largest batch still fits: nothing is driven out of memory on
purpose (a CUDA out-of-memory error, or a cuBLAS/cuDNN allocation failure, counts as "does not fit"). Search:
B = 1, 2, 4, ... until the budget is exceeded, then a bisection of the last interval whose probes cycle through the
linear interpolation of the measured peaks (memory is close to affine in B, so this usually lands on B* or B* + 1),
its neighbour on the other side and the midpoint. The result is exact, peak(B*) <= budget < peak(B* + 1), typically
1-2 probes after the doubling (``tests/test_largest_batch_search.py``).

Shapes: full size ``vg200`` = the VG-200 head (7x7 map, N 49, C 200, D 1024, I 512, E 300), meant for a GPU; quick
size ``vg200-small`` = C 200 with the demo preset's map and head (2x2, N 4, D 256, I 128, E 300), so that the search
runs in seconds on a CPU (at the VG-200 dims the official path alone needs about 470 MiB at B = 1 and the torch
backend's search takes minutes on 2 cores). The official memory per image grows with N while the fused one does
not, so the quick shape understates the full-size ratio.

Reading the results: ``extra_info`` holds ``largest_batch``, ``budget_bytes``, ``peak_at_largest_bytes`` (= the
report's peak memory column, fixed state included), ``fixed_state_bytes``, ``peak_next_batch_bytes``, every probe
(``probes``: {B: bytes}), ``largest_batch_vs_official`` and ``images_per_s``. The timed part (what the report's
median shows) is one forward + backward at the provider's own largest batch (at most 10 rounds; its inputs drawn
before, the blends without their per-call value check, as in training), so the report's time columns compare calls
on different batch sizes: compare ``images_per_s`` (largest batch / median) instead. The group is
``largest_batch-<shape>-<budget in MiB>MiB-fwd+bwd``.

Target (GPU, ``--bench-size full``): the fused backends' largest batch >= 4x the official one
(``largest_batch_vs_official`` >= 4).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

OPS_USED = ("semantic_attention", "quadrant_index", "instance_blend", "prototype_blend")
SHAPES = {
    "quick": ("vg200-small", dict(H=2, W=2, C=200, D=256, I=128, E=300)),
    "full": ("vg200", dict(H=7, W=7, C=200, D=1024, I=512, E=300)),
}
DEFAULT_BUDGET = {"cpu": 128 * 2**20, "cuda": 16 * 2**30}
FREE_FRACTION = 0.45  # a probe at twice the largest batch must still fit in the device's free memory
MAX_BATCH = 1 << 20  # stop doubling there (a peak that never grows)
SELECT_FRACTION = 0.1
_STATE = {"key": None, "value": None}  # the fixed state of one shape at a time
_RESULTS: Dict[tuple, Dict[str, int]] = {}  # (shape, device, budget) -> {provider: largest batch}


def _budget(device: torch.device, bench_available) -> Tuple[int, str]:
    env = os.environ.get("DSRB_BENCH_MEMORY_BUDGET")
    if env:
        return int(float(env)), "DSRB_BENCH_MEMORY_BUDGET"
    budget = DEFAULT_BUDGET["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda":
        free = bench_available(device)
        if free is not None and budget > FREE_FRACTION * free:
            return int(FREE_FRACTION * free), f"{FREE_FRACTION:.0%} of the free device memory"
    return budget, f"default for {device.type}"


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state(bench, shape, dims, device, dtype):
    key = (shape, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        H, W, C, D, I, E = (dims[k] for k in "HWCDIE")
        gen = torch.Generator().manual_seed(bench.seed_for("largest_batch", shape))
        fc = tuple(bench.seeded_linear(gen, fan_in, fan_out, bias, device, dtype)
                   for fan_in, fan_out, bias in ((D, I, False), (E, I, False), (I, I, True), (I, 1, True)))
        word = torch.randn(C, E, generator=gen, dtype=dtype).to(device)
        maps = (0.1 * torch.randn(C, 4, H, W, D, generator=gen, dtype=dtype)).to(device)
        bank = maps.sum((2, 3))
        alpha = torch.full((1,), 0.5, dtype=dtype, device=device, requires_grad=True)
        beta = torch.full((1,), 0.5, dtype=dtype, device=device, requires_grad=True)
        w_S = torch.randn(C, D, generator=gen, dtype=dtype).to(device)
        w_T = torch.randn(C, generator=gen, dtype=dtype).to(device)
        params = tuple(p for layer in fc for p in layer.parameters())
        common = _nbytes(*params, word, alpha, beta)
        _STATE["value"] = dict(
            fc=fc, word=word, maps=maps, bank=bank, alpha=alpha, beta=beta, w_S=w_S, w_T=w_T, params=params,
            fixed={"official": common + _nbytes(maps), "fused": common + _nbytes(bank)},
            reference=None, reference_grads=None,
        )
        _STATE["key"] = key
    return _STATE["value"]


def _batch(B: int, dims, device, dtype, seed: int):
    """The per-batch inputs (drawn on the device, inside the measured peak): x (B, N, D), T, shift, select."""
    C, D, N = dims["C"], dims["D"], dims["H"] * dims["W"]
    gen = torch.Generator(device=device).manual_seed(seed + B)
    x = torch.randn(B, N, D, generator=gen, dtype=dtype, device=device)
    T = torch.randint(-1, 2, (B, C), generator=gen, device=device).to(dtype)
    shift = torch.randint(1, 4, (B, C), generator=gen, device=device)
    select = torch.rand(B, C, generator=gen, device=device) < SELECT_FRACTION
    return x, T, shift, select


def _path(provider: str, backend: Optional[str], st, dims) -> Callable:
    """forward(x, T, shift, select) -> (S, S1, T1, S2, T2) for one provider, and the leaves of its gradient."""
    import dsrb.ops as ops
    from dsrb.reference import instance_blend_map, prototype_blend_map, semantic_decoupling_official

    fc1, fc2, fc3, fc4 = st["fc"]
    word, alpha, beta = st["word"], st["alpha"], st["beta"]
    H, W = dims["H"], dims["W"]

    if provider == "official":
        maps = st["maps"]

        def forward(x, T, shift, select):
            B, N, D = x.shape
            X = x.transpose(1, 2).reshape(B, D, H, W)  # the (B, D, H, W) map (a view of the same numbers)
            S, F, coef = semantic_decoupling_official(X, word, fc1, fc2, fc3, fc4)
            with torch.no_grad():  # the own quadrant (see the module docstring), no gradient as officially
                a = coef.detach().reshape(B, N, -1).transpose(1, 2)
                q = ops.quadrant_index(a.contiguous(), x.detach().sum(-1), H, W, backend="torch")
            S1, T1 = instance_blend_map(F, T, alpha)
            S2, T2 = prototype_blend_map(F, T, beta, maps, shift, select, quadrant=q)
            return S, S1, T1, S2, T2

        return forward

    bank = st["bank"]

    def forward(x, T, shift, select):
        u = fc1(x)
        e = fc2(word)
        v = fc3.weight.t() @ fc4.weight[0]
        S, a = ops.semantic_attention(x, u, e, v, backend=backend)
        q = ops.quadrant_index(a.detach(), x.detach().sum(-1), H, W, backend=backend)
        # No value check of T, shift and select per call, as the model's training step and the blend suites.
        S1, T1 = ops.instance_blend(S, T, alpha, backend=backend, validate=False)
        S2, T2 = ops.prototype_blend(S, T, beta, bank, q, shift, select, backend=backend, validate=False)
        return S, S1, T1, S2, T2

    return forward


def _fwd_bwd(forward, st, dims, device, dtype, seed):
    """(call, step): step(batch) is the forward and the gradient of the fixed linear loss w.r.t. x and the
    parameters; call(B) draws the batch of B first (the peak of a batch size counts its inputs)."""
    w_S, w_T = st["w_S"], st["w_T"]
    leaves_fixed = st["params"] + (st["alpha"], st["beta"])

    def step(batch):
        x, T, shift, select = batch
        x.requires_grad_()
        S, S1, T1, S2, T2 = forward(x, T, shift, select)
        loss = (S * w_S).sum() + (S1 * w_S).sum() + (S2 * w_S).sum() + (T1 * w_T).sum() + (T2 * w_T).sum()
        return torch.autograd.grad(loss, (x,) + leaves_fixed, allow_unused=True)

    return (lambda B: step(_batch(B, dims, device, dtype, seed))), step


def out_of_memory(err: BaseException) -> bool:
    """A failed CUDA allocation: the caching allocator's OutOfMemoryError, or a library's own workspace allocation
    (cuBLAS, cuDNN: a RuntimeError naming ``*_STATUS_ALLOC_FAILED``). Neither leaves the CUDA context broken."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                              and "STATUS_ALLOC_FAILED" in str(err))


def _peak(call, B: int, device, cpu_peak_bytes) -> Optional[int]:
    """Peak bytes one call(B) allocates (None: out of memory on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            call(B)
            torch.cuda.synchronize(device)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            torch.cuda.empty_cache()
            return None
        return torch.cuda.max_memory_allocated(device) - before
    peak = cpu_peak_bytes(lambda: call(B))
    if peak is None:
        pytest.skip("this torch's profiler records no allocation events: no CPU peak memory to compare")
    return peak


def largest_batch(peak_of: Callable[[int], Optional[int]], budget: int, limit: int = MAX_BATCH):
    """(B*, probes): the largest B <= limit with peak_of(B) <= budget (0 when B = 1 does not fit), by doubling then
    a safeguarded interpolation bisection; probes maps every probed B to its peak (None: out of memory)."""
    probes: Dict[int, Optional[int]] = {}

    def fits(B: int) -> bool:
        if B not in probes:
            probes[B] = peak_of(B)
        return probes[B] is not None and probes[B] <= budget

    if not fits(1):
        return 0, probes
    lo, hi = 1, None
    while hi is None:
        probe = min(2 * lo, limit)
        if probe == lo:  # the limit itself fits
            return lo, probes
        if fits(probe):
            lo = probe
        else:
            hi = probe
    # Bisection of (lo, hi] with probes in a cycle: the linear interpolation of the measured peaks (memory is close
    # to affine in B, so this is usually B* or B* + 1), then its neighbour on the other side (lo + 1 after a fit,
    # hi - 1 after a miss: usually closes the interval), then the midpoint (at least one halving every three probes).
    step, last_fit = 0, True
    while hi - lo > 1:
        kind = ("interpolate", "neighbour", "midpoint")[step % 3]
        mid = (lo + hi) // 2
        p_lo, p_hi = probes[lo], probes[hi]
        if kind == "interpolate" and p_hi is not None and p_hi > p_lo:
            mid = lo + int((budget - p_lo) * (hi - lo) / (p_hi - p_lo))
        elif kind == "neighbour":
            mid = lo + 1 if last_fit else hi - 1
        mid = min(max(mid, lo + 1), hi - 1)
        last_fit = fits(mid)
        if last_fit:
            lo = mid
        else:
            hi = mid
        step += 1
    return lo, probes


def _check(provider, backend, forward, st, dims, device, dtype, seed, bench):
    """Once per provider, outside the search: the provider computes the official outputs at B = 2, and the official
    gradients of the fixed loss (what every probe and timed call computes); its calls run ``backend``'s kernels
    only. Returns the dsrb ops seen (None for the official provider)."""
    names = ("S", "S1", "T1", "S2", "T2")
    grad_names = ("x",) + tuple(f"param{i}" for i in range(len(st["params"]))) + ("alpha", "beta")
    if st["reference"] is None:
        official = _path("official", None, st, dims)
        with torch.no_grad():
            st["reference"] = official(*_batch(2, dims, device, dtype, seed))
        st["reference_grads"] = _fwd_bwd(official, st, dims, device, dtype, seed)[0](2)
    if provider == "official":
        return None
    with torch.no_grad():
        got = forward(*_batch(2, dims, device, dtype, seed))
    tol = 5e-3 if device.type == "cuda" else 1e-4
    for name, g, want in zip(names, got, st["reference"]):
        torch.testing.assert_close(g, want, rtol=tol, atol=tol,
                                   msg=lambda m: f"{provider} disagrees with the official {name}: {m}")
    call = _fwd_bwd(forward, st, dims, device, dtype, seed)[0]
    bench.assert_grads_close(provider, grad_names, call(2), st["reference_grads"], tol)
    return bench.check_served(provider, backend, lambda: call(2))


def _mib(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def test_largest_batch(benchmark, bench, provider, size, device, dtype, rounds):
    if provider == "compile":
        pytest.skip("compile: not part of this comparison (torch.compile of the torch backend would recompile for "
                    "every probed batch size; the question is the memory of a formulation)")
    backend = None
    for op in OPS_USED:
        backend = bench.require_provider(op, provider, device, dtype)
    shape, dims = SHAPES[size]
    dims = dict(dims, N=dims["H"] * dims["W"])
    budget, budget_source = _budget(device, bench.available_memory)
    free = bench.available_memory(device)
    if free is not None and budget > FREE_FRACTION * free:
        pytest.skip(f"budget {_mib(budget)} ({budget_source}) is more than {FREE_FRACTION:.0%} of the "
                    f"{_mib(free)} free on {device.type}: the doubling search could exhaust the memory")
    label = f"{shape}-{budget / 2**20:.0f}MiB"
    seed = bench.seed_for("largest_batch", shape, "batch")

    st = _state(bench, shape, dims, device, dtype)
    forward = _path(provider, backend, st, dims)
    served = _check(provider, backend, forward, st, dims, device, dtype, seed, bench)
    call, step = _fwd_bwd(forward, st, dims, device, dtype, seed)
    fixed = st["fixed"]["official" if provider == "official" else "fused"]

    # Smoke run (--benchmark-disable): the search is exercised up to B = 2 only.
    limit = 2 if benchmark.disabled else MAX_BATCH

    def total(B: int) -> Optional[int]:
        peak = _peak(call, B, device, bench.cpu_peak_bytes)
        return None if peak is None else fixed + peak

    best, probes = largest_batch(total, budget, limit)
    if best == 0:
        pytest.skip(f"{provider}: B = 1 already needs {_mib(probes[1])} (fixed state {_mib(fixed)} included), "
                    f"over the {_mib(budget)} budget: largest batch 0")
    key = (shape, str(device), budget)
    _RESULTS.setdefault(key, {})[provider] = best
    official_best = _RESULTS[key].get("official")

    if provider == "official":
        formulation = ("semantic_decoupling_official + instance_blend_map + prototype_blend_map on the (B,H,W,C,D) "
                       "map with (C,4,H,W,D) prototype maps")
    else:
        formulation = ("dsrb.ops semantic_attention, quadrant_index, instance_blend, prototype_blend "
                       f"(backend='{backend}')")
    # At most 10 timed rounds: the timed call is secondary here, and it runs at the largest batch, drawn untimed.
    batch = _batch(best, dims, device, dtype, seed)
    bench.run_case(benchmark, lambda: step(batch), device=device, rounds=min(rounds, 10),
                   info={"op": "largest_batch", "case": "largest_batch", "provider": provider, "pass": "fwd+bwd",
                         "shape": label, "dims": dims, "dtype": dtype, "formulation": formulation,
                         "grad_wrt": "x, fc1..fc4, alpha and beta, from a fixed linear loss of S, S1, T1, S2, T2",
                         "served_by": served})
    extra = benchmark.extra_info
    extra["peak_memory_call_bytes"] = extra.get("peak_memory_bytes")  # run_case's own measure: the call only
    extra.update({
        "largest_batch": best,
        "largest_batch_capped": best >= limit,
        "budget_bytes": budget,
        "budget_source": budget_source,
        "peak_at_largest_bytes": probes[best],
        "peak_next_batch_bytes": probes.get(best + 1),
        "fixed_state_bytes": fixed,
        "probes": {str(B): p for B, p in sorted(probes.items())},
        "official_largest_batch": official_best,
        "largest_batch_vs_official": (best / official_best) if official_best else None,
        "peak_memory_bytes": probes[best],
        "peak_memory_note": ("fixed state (linears, word vectors, alpha, beta, prototype maps or bank) + the peak one "
                             "fwd+bwd call allocates at the largest batch, batch inputs included"),
    })
    stats = getattr(benchmark, "stats", None)
    if stats is not None and not benchmark.disabled:
        median_s = (extra.get("cuda_event_median_ms") or stats.stats.median * 1e3) / 1e3
        extra["images_per_s"] = best / median_s
