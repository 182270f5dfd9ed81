"""The benchmarks' CUDA-graph pass (benchmarks/conftest.py, ``GRAPH_PASS``), with torch.cuda faked: this machine has
no GPU, so these tests check what run_case does around the capture (warm-up, one capture, rounds that replay it, the
skip of a call that cannot be captured, what extra_info records), not CUDA graphs themselves."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types

import pytest
import torch

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # `benchmarks` is not an installed package


@pytest.fixture
def bench():
    """benchmarks/conftest.py as a module, imported when a test runs (it sets the inductor cache folder)."""
    from benchmarks import conftest

    return conftest


class _FakeCuda:
    """What run_case and capture_cuda_graph use of torch.cuda; ``log`` records the order of calls and replays."""

    def __init__(self, monkeypatch):
        self.log, self.capturing = [], False
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                pass

            def record(self):
                pass

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return 0.25

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                fake.log.append("replay")

            def reset(self):
                fake.log.append("reset")

        @contextlib.contextmanager
        def graph(g):
            fake.capturing = True
            try:
                yield
            finally:
                fake.capturing = False

        for name, value in dict(Event=Event, Stream=Stream, CUDAGraph=CUDAGraph, graph=graph,
                                stream=lambda s: contextlib.nullcontext(), current_stream=lambda device=None: Stream(),
                                synchronize=lambda device=None: None, get_device_name=lambda device=None: "Fake GPU",
                                reset_peak_memory_stats=lambda device=None: None,
                                memory_allocated=lambda device=None: 0,
                                max_memory_allocated=lambda device=None: 0).items():
            monkeypatch.setattr(torch.cuda, name, value)

    def call(self):
        self.log.append("capture" if self.capturing else "eager")


INFO = {"op": "op", "provider": "cuda", "shape": "tiny", "pass": "graph", "formulation": "the op"}  # GRAPH_PASS


def _unused_benchmark():
    """What run_case touches of pytest-benchmark's fixture before its timing (the cases below skip before it)."""
    return types.SimpleNamespace(group=None, extra_info={}, disabled=False)


def test_graph_pass_times_replays_of_one_capture(bench, benchmark, monkeypatch):
    # Timed even where pytest-benchmark disables its fixture (under pytest-xdist, or --benchmark-disable).
    monkeypatch.setattr(benchmark, "disabled", False)
    cuda = _FakeCuda(monkeypatch)
    bench.run_case(benchmark, cuda.call, device="cuda", info=dict(INFO), rounds=4)
    log = cuda.log
    assert log.count("capture") == 1
    first_replay = log.index("replay")
    assert log.index("capture") < first_replay and "eager" not in log[first_replay:]  # eager warm-up, then replays
    assert log.count("replay") == 4 and log.count("eager") >= 4  # the warm-up and the side-stream calls
    extra = benchmark.extra_info
    assert extra["pass"] == bench.GRAPH_PASS and extra["rounds"] == 4
    assert extra["cuda_event_median_ms"] == 0.25
    assert extra["peak_memory_bytes"] is None and "graph" in extra["peak_memory_note"]
    assert extra["formulation"].startswith("the op (fwd+bwd captured once in a CUDA graph")


def test_a_call_that_cannot_be_captured_skips_the_case(bench, monkeypatch):
    cuda = _FakeCuda(monkeypatch)

    def syncs():
        if cuda.capturing:  # as a device-to-host read inside a capture fails
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    with pytest.raises(pytest.skip.Exception, match=r"not capturable in a CUDA graph \(RuntimeError: CUDA error: "
                                                     r"operation not permitted when stream is capturing\)$"):
        bench.run_case(_unused_benchmark(), syncs, device="cuda", info=dict(INFO), rounds=2)
    assert cuda.log == ["reset"]


def test_graph_pass_is_cuda_only(bench):
    with pytest.raises(pytest.skip.Exception, match="CUDA only"):
        bench.run_case(_unused_benchmark(), lambda: None, device="cpu", info=dict(INFO), rounds=2)


def test_graph_pass_is_the_fwd_bwd_callable(bench):
    assert bench.GRAPH_PASS == INFO["pass"]
    x = torch.ones(3, requires_grad=True)
    fn, setup = bench.pass_callables(bench.GRAPH_PASS, lambda: ((x * 2).sum(),), [x], (torch.ones(()),))
    assert setup is None
    torch.testing.assert_close(fn()[0], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match=re.escape("unknown pass 'fwd+bwd+'")):
        bench.pass_callables("fwd+bwd+", lambda: (), [x], ())
