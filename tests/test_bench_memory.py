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


KNOWN_SUITE = '''
import torch
from benchmarks.conftest import run_case

MB = 2 ** 20


def test_fwd(benchmark):
    def fn():  # 3 MiB returned, 5 MiB freed inside: a peak of 8
        out, tmp = torch.ones(3 * MB // 4), torch.ones(5 * MB // 4)
        del tmp
        return out
    run_case(benchmark, fn, device="cpu", rounds=2,
             info={"op": "op", "provider": "torch", "pass": "fwd", "shape": "tiny", "dims": {"B": 2},
                   "dtype": torch.float32})


def test_bwd(benchmark):
    def fn(held):  # frees setup's 4 MiB, then allocates 6: a growth of 2
        held.pop()
        return torch.ones(6 * MB // 4)
    run_case(benchmark, fn, setup=lambda: (([torch.ones(4 * MB // 4)],), {}), device="cpu", rounds=2,
             info={"op": "op", "provider": "cpu", "pass": "bwd", "shape": "tiny", "dims": {"B": 2},
                   "dtype": torch.float32})
'''


def test_the_json_holds_each_case_s_peak_and_environment(tmp_path):
    """End to end, as a user's run writes it: --benchmark-json holds, per case, the peak of a known allocation pattern
    (setup's frees credited) with the shape, provider, device and versions the report's header and tables read."""
    import json
    import subprocess

    if cpu_peak_bytes(lambda: _floats(1)) is None:
        pytest.skip("this torch's profiler records no allocation events")
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    (tmp_path / "test_known.py").write_text(KNOWN_SUITE)
    out = tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}  # pytest-benchmark times nothing
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_known.py"), "--benchmark-only", "--benchmark-json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = {b["name"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert near(cases["test_fwd"]["peak_memory_bytes"], 8) and near(cases["test_bwd"]["peak_memory_bytes"], 2), cases
    for info in cases.values():
        assert info["device"] == "cpu" and info["shape"] == "tiny" and info["dims"] == {"B": 2}, info
        assert info["dtype"] == "torch.float32" and info["rounds"] == 2 and info["provider"] in ("torch", "cpu")
        assert info["torch"] == torch.__version__ and info["dsrb"] and "triton" in info and info["device_name"]
