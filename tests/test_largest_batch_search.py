"""The largest-batch search of benchmarks/test_bench_largest_batch.py, on synthetic memory curves: its answer is exact
(peak(B*) <= budget < peak(B* + 1)), and a failed CUDA allocation counts as "does not fit"."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # `benchmarks` is not an installed package

from benchmarks.test_bench_largest_batch import largest_batch, out_of_memory  # noqa: E402

CURVES = {
    "affine": lambda B: 1000 + 37 * B,
    "affine with jitter": lambda B: 1000 + 37 * B + (B * 7919) % 13,  # monotone: the jitter is below the slope
    "quadratic": lambda B: 500 + B * B,
    "steps of 8": lambda B: 4096 * ((B + 7) // 8),  # an allocator that rounds up to blocks
}


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize("budget", [1037, 1100, 4096, 50_000, 123_457])
def test_search_is_exact(curve, budget):
    peak = CURVES[curve]
    expected = max((B for B in range(1, 5000) if peak(B) <= budget), default=0)
    found, probes = largest_batch(peak, budget)
    assert found == expected
    assert all(probes[B] == peak(B) for B in probes)
    if expected:
        assert expected in probes and expected + 1 in probes  # both sides of the answer were measured
    doubling = expected.bit_length() + 1 if expected else 1
    assert len(probes) <= doubling + 2 * max(expected.bit_length(), 1)  # at least one halving every three probes


def test_search_for_an_affine_curve_ends_within_two_probes_of_the_doubling():
    found, probes = largest_batch(lambda B: 1000 + 37 * B, 50_000)
    assert found == 1324
    assert len(probes) - (found.bit_length() + 1) <= 2


def test_nothing_fits_and_everything_fits():
    assert largest_batch(lambda B: 10 * B, 5) == (0, {1: 10})
    found, probes = largest_batch(lambda B: 100, 100, limit=64)  # a peak that never grows stops at the limit
    assert found == 64 and max(probes) == 64


def test_out_of_memory_probes_do_not_fit():
    """A probe that ran out of memory (None) counts as too large, whatever the budget."""
    found, probes = largest_batch(lambda B: None if B > 300 else 10 * B, 10**9)
    assert found == 300 and probes[301] is None


@pytest.mark.parametrize("err, oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),  # a fault is not "too large"
    (ValueError("STATUS_ALLOC_FAILED"), False),
])
def test_which_errors_mean_out_of_memory(err, oom):
    assert out_of_memory(err) is oom
