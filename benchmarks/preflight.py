"""``python -m benchmarks.preflight BACKEND [--device cuda]``: each fused op of BACKEND once at the GPU target shapes (coco, vg-b32),
forward and backward, synchronised, every output and gradient finite; exit status 1 if anything fails.

``benchmarks/gpu_session.sh`` runs it for each fused backend in a process of its own before the benchmarks: a kernel
that faults (an illegal address, say) leaves the CUDA context unusable for the rest of its process, so every later
case of that pytest run would fail, other providers' included. A backend whose preflight fails is left out of the
benchmark parts instead, and the others' figures still come back. Without a GPU, or where BACKEND cannot serve
CUDA tensors (the benchmarks skip it then), there is nothing to check: exit status 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from benchmarks.conftest import SHAPES
from benchmarks.profile_ops import OPS, _call, _inputs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preflight", description=__doc__.split("\n\n")[0])
    # A typo used to pass as "nothing to check" without a GPU, and fail with a traceback with one.
    parser.add_argument("backend", choices=("cuda", "triton", "cpu", "torch"),
                        help="a fused backend: cuda, triton (or cpu, with --device cpu; torch checks the harness)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    args = parser.parse_args(argv)
    backend, device, dtype = args.backend, torch.device(args.device), torch.float32
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"preflight {backend}: no GPU, nothing to check")
        return 0
    import dsrb.ops as ops

    why = ops.reasons("semantic_attention", device, dtype).get(backend)
    if why is not None:
        print(f"preflight {backend}: not available here ({why}), nothing to check")
        return 0
    for shape in ("coco", "vg-b32"):
        dims = SHAPES["full"][shape]
        for op in OPS:
            leaves, others, grad_shapes = _inputs(op, dims, device, dtype)
            leaves = [t.requires_grad_() for t in leaves]
            out = _call(op, backend)(*leaves, *others)
            grads = torch.autograd.grad(out, leaves, [torch.ones(s, device=device, dtype=dtype) for s in grad_shapes])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            bad = [i for i, t in enumerate(list(out) + list(grads)) if not bool(torch.isfinite(t).all())]
            if bad:
                print(f"preflight {backend}: {op} at {shape}: non-finite values in outputs/gradients {bad}")
                return 1
            print(f"preflight {backend}: {op} at {shape}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
