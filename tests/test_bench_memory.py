"""The benchmarks' CPU peak memory (benchmarks/conftest.py::cpu_peak_bytes): the growth during one call over what is
live when it starts, with the frees of what setup allocated credited, as CUDA's max_memory_allocated - before."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # `benchmarks` is not an installed package

from benchmarks.conftest import cpu_peak_bytes  # noqa: E402

MB = 2 ** 20


def _floats(mb):
    return torch.ones(mb * MB // 4)


def near(peak, mb):  # the sums' scalar results are a few bytes
    return peak is not None and abs(peak - mb * MB) < 4096


def test_peak_of_a_call_that_allocates_and_frees():
    def fn():
        a = _floats(30)
        b = _floats(20)
        del a
        return b.sum() + _floats(5).sum()

    peak = cpu_peak_bytes(fn)
    if peak is None:
        pytest.skip("this torch's profiler records no allocation events")
    assert near(peak, 50)


def test_a_free_of_what_setup_allocated_is_credited():
    """A bwd pass frees the saved forward graph that its setup built: 100 MB freed, then 100 MB allocated, is no
    growth (the profiler used to start after setup, so the free was not seen and the peak read 100 MB)."""
    def setup():
        return ([_floats(100)],), {}

    def fn(held):
        held.pop()
        return _floats(100).sum()

    peak = cpu_peak_bytes(fn, setup)
    if peak is None:
        pytest.skip("this torch's profiler records no allocation events")
    assert near(peak, 0)
    assert near(cpu_peak_bytes(lambda held: _floats(10).sum() + len(held), setup), 10)


def test_prime_credits_what_the_previous_step_left():
    """A training step frees the previous step's gradients (set to None) before making new ones: with ``prime`` the
    previous step runs inside the profile, so the step's growth is what it adds, not its gross allocations."""
    state = {}
    if cpu_peak_bytes(lambda: _floats(1)) is None:
        pytest.skip("this torch's profiler records no allocation events")

    def step():
        state.pop("grad", None)
        state["grad"] = _floats(40)

    assert near(cpu_peak_bytes(step, prime=True), 0)
    state.clear()
    assert near(cpu_peak_bytes(step), 40)
