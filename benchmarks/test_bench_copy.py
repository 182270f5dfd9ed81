"""Benchmark of a plain copy of S-sized data: the bandwidth the memory-bound ops' GB/s is read against.

At each shape, ``out.copy_(S)`` with S and out (B, C, D) in the suite's dtype: one read and one write of what the
blends read and write most, by PyTorch's own copy kernel on the same device. The report's GB/s of this case is what
the device reaches on data of that size (on a CPU, from whichever cache it fits in); a blend, the quadrant index or
the bank update near it moves its bytes about as fast as a copy could. One provider, ``torch``, in the group
``copy-<shape>-fwd`` (and on CUDA ``copy-<shape>-graph``: the copy captured in a CUDA graph and replayed, the
device's time without the launch).
"""

from __future__ import annotations

import pytest
import torch

HOST_OVERHEAD_SHAPE = True  # also the conftest's "tiny" shape: what one launch costs
PASSES = ("fwd", "graph") if torch.cuda.is_available() else ("fwd",)


@pytest.mark.parametrize("pass_name", PASSES)
def test_copy(benchmark, bench, shape, dims, device, dtype, rounds, pass_name):
    B, C, D = dims["B"], dims["C"], dims["D"]
    gen = torch.Generator().manual_seed(bench.seed_for("copy", shape))
    S = torch.randn(B, C, D, generator=gen, dtype=dtype).to(device)
    out = torch.empty_like(S)
    run = lambda: out.copy_(S)  # noqa: E731
    run()
    assert torch.equal(out, S)
    bench.run_case(benchmark, run, device=device, rounds=rounds,
                   info={"op": "copy", "case": "copy", "provider": "torch", "pass": pass_name, "shape": shape,
                         "dims": dims, "dtype": dtype, "formulation": "out.copy_(S), S and out (B, C, D)",
                         "traffic_bytes": 2 * S.numel() * S.element_size()})
