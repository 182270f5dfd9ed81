"""``python -m benchmarks.profile_ops [--shape coco --shape tiny] [--out profile.md]``: where one forward+backward of
each fused op goes on this device, per provider, as a markdown table.

The benchmark suites give the wall time of a call; this splits it. For each op (``semantic_attention``,
``instance_blend``, ``prototype_blend``), shape and provider (``reference``: the plain oracle of ``dsrb.reference``,
for semantic_attention the official (B, N, C, I) formulation, for the blends the vector formula rather than the
official maps; ``torch``; then every fused backend that can run here), after two warm-up calls:

* wall: median over the rounds of one call, synchronised (what the suites time);
* host: median of the time the call takes to return without synchronising: on a GPU, the host's cost of queueing
  it (checks, dispatch, autograd, launches), plus any wait for the device inside it;
* device: on CUDA, the summed time of the device events of one call (kernels, copies, fills) and their number
  (torch.profiler over the rounds). When wall ~ host >> device, the call is bound by the host, not by its kernels.

It is a diagnosis, not a benchmark (no pytest-benchmark, no targets): ``benchmarks/gpu_session.sh`` writes it to
``$OUT/profile.md`` beside the benchmark report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.conftest import SHAPES, TINY

OPS = ("semantic_attention", "instance_blend", "prototype_blend")
FUSED = ("cuda", "triton", "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(op: str, dims: Dict[str, int], device: torch.device, dtype: torch.dtype):
    """(leaves that get gradients, the other arguments, upstream-gradient shapes) of one fwd+bwd of ``op``."""
    g = torch.Generator().manual_seed(0)
    B, N, C, D, I = (dims[k] for k in "BNCDI")

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    if op == "semantic_attention":
        return [rand(B, N, D), rand(B, N, I), rand(C, I), rand(I)], [], [(B, C, D), (B, C, N)]
    S, T = rand(B, C, D), torch.randint(-1, 2, (B, C), generator=g).to(device=device, dtype=dtype)
    coef = torch.full((), 0.4, device=device, dtype=dtype)
    if op == "instance_blend":
        return [S, coef], [T], [(B, C, D), (B, C)]
    bank = rand(C, 4, D)
    quadrant = torch.randint(0, 4, (B, C), generator=g).to(device)
    shift = torch.randint(1, 4, (B, C), generator=g).to(device)
    select = (torch.rand(B, C, generator=g) < 0.5).to(device)
    return [S, coef], [T, bank, quadrant, shift, select], [(B, C, D), (B, C)]


def _call(op: str, provider: str) -> Callable:
    """The op of ``provider`` with the argument order (leaves..., others...)."""
    import dsrb.ops as ops
    from dsrb import reference

    if op == "semantic_attention":
        if provider == "reference":
            return reference.semantic_attention
        return lambda x, u, e, v: ops.semantic_attention(x, u, e, v, backend=provider)
    if op == "instance_blend":
        if provider == "reference":
            return lambda S, a, T: reference.instance_blend(S, T, a)
        return lambda S, a, T: ops.instance_blend(S, T, a, backend=provider)
    if provider == "reference":
        return lambda S, b, T, bank, q, h, sel: reference.prototype_blend(S, T, b, bank, q, h, sel)
    return lambda S, b, T, bank, q, h, sel: ops.prototype_blend(S, T, b, bank, q, h, sel, backend=provider)


def _providers(op: str, device: torch.device, dtype: torch.dtype) -> List[str]:
    import dsrb.ops as ops

    reasons = ops.reasons(op, device, dtype)
    return ["reference", "torch"] + [b for b in FUSED if reasons.get(b) is None]


def profile(op: str, provider: str, dims: Dict[str, int], device: torch.device, dtype: torch.dtype,
            rounds: int) -> Dict[str, Optional[float]]:
    leaves, others, grad_shapes = _inputs(op, dims, device, dtype)
    leaves = [t.requires_grad_() for t in leaves]
    grads = [torch.ones(s, device=device, dtype=dtype) for s in grad_shapes]
    fn = _call(op, provider)

    def once():
        out = fn(*leaves, *others)
        return torch.autograd.grad(out, leaves, grads)

    for _ in range(2):
        once()
    _sync(device)
    wall, host = [], []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        once()
        t1 = time.perf_counter()
        _sync(device)
        host.append((t1 - t0) * 1e6)
        wall.append((time.perf_counter() - t0) * 1e6)
    row = {"wall_us": statistics.median(wall), "host_us": statistics.median(host), "device_us": None,
           "kernels": None}
    if device.type == "cuda":
        try:
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(rounds):
                    once()
                _sync(device)
            events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            row["kernels"] = len(events) / rounds
            row["device_us"] = sum(e.time_range.elapsed_us() for e in events) / rounds
        except Exception as err:  # noqa: BLE001 - the timings above stand without the profile
            print(f"profile_ops: torch.profiler failed for {op}/{provider}: {err}", file=sys.stderr)
    return row


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:,.1f}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shapes = {**SHAPES["full"], **SHAPES["quick"], **TINY}
    parser.add_argument("--shape", action="append", choices=sorted(shapes),
                        help="shape(s) from benchmarks/conftest.py (default: coco and tiny)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"### where one fwd+bwd goes ({name}, {dtype}, median of {args.rounds} calls)", "",
             "| op | shape | provider | wall (us) | host, unsynchronised (us) | device events (us) | events |",
             "|---|---|---|---:|---:|---:|---:|"]
    for shape in args.shape or ["coco", "tiny"]:
        for op in OPS:
            for provider in _providers(op, device, dtype):
                try:
                    r = profile(op, provider, shapes[shape], device, dtype, args.rounds)
                except Exception as err:  # noqa: BLE001 - reported in the table; the other rows still run
                    lines.append(f"| {op} | {shape} | {provider} | error: {type(err).__name__}: {err} | | | |")
                    continue
                lines.append(f"| {op} | {shape} | {provider} | {_fmt(r['wall_us'])} | {_fmt(r['host_us'])} | "
                             f"{_fmt(r['device_us'])} | {_fmt(r['kernels'])} |")
                print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
