"""``python -m benchmarks.profile_ops [--shape coco --shape tiny] [--out profile.md]``: where one forward+backward of
each fused op goes on this device, per provider, as a markdown table.

The benchmark suites give the wall time of a call; this splits it. For each op (``semantic_attention``,
``instance_blend``, ``prototype_blend``), shape and provider (``reference``: the plain oracle of ``dsrb.reference``,
for semantic_attention the (B, N, C, I) formulation with v = W3^T w4 collapsed, leaner than the official fc3/fc4
chain on (B, N, C, I), so its device time understates the official one; for the blends the vector formula rather
than the official maps; ``torch``; then every fused backend that can run here), after two warm-up calls:

* wall: median over the rounds of one call, synchronised;
* host: median of the time the call takes to return without synchronising: on a GPU, the host's cost of queueing
  it (checks, dispatch, autograd, launches), plus any wait for the device inside it;
* between CUDA events: on CUDA, the median time of one call between two CUDA events, as the benchmarks time a
  round; then the same again after one CPU-only profiler session, such as the benchmarks' check of which backend
  served a case runs before timing it;
* device: on CUDA, the summed time of the device events of one call (kernels, copies, fills) and their number
  (torch.profiler over ``--profile-rounds`` calls), and below the table each row's events by name. When wall ~ host
  >> device, the call is bound by the host, not by its kernels.

The backward is that of a fixed dL/dS (as the ``semantic_attention_op`` and blend suites take it; for the blends also
dL/dT). The blends run with ``validate=False``, as the blend suites time them (see ``test_bench_instance_blend``).
Every row is timed first, with no profiler attached (CUPTI left attached after a profiling session slows
later calls), and profiled after; ``--out`` is rewritten after each row, so a run stopped at its time cap keeps the
rows it finished. ``--skip BACKEND`` leaves out a fused backend (``gpu_session.sh`` passes those whose preflight
failed). It is a diagnosis, not a benchmark (no pytest-benchmark, no targets): ``benchmarks/gpu_session.sh`` writes
it to ``$OUT/profile.md`` beside the benchmark report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.conftest import SHAPES, TINY
from dsrb._cli import check_output_file, positive_int

# Nothing here may import dsrb.ops at import time (dsrb.inference does): it loads the extension, so --help waited for
# a build in progress. dsrb.ops is imported where a row is timed.

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
        return lambda S, a, T: ops.instance_blend(S, T, a, backend=provider, validate=False)
    if provider == "reference":
        return lambda S, b, T, bank, q, h, sel: reference.prototype_blend(S, T, b, bank, q, h, sel)
    return lambda S, b, T, bank, q, h, sel: ops.prototype_blend(S, T, b, bank, q, h, sel, backend=provider,
                                                                validate=False)


def _providers(op: str, device: torch.device, dtype: torch.dtype, skip=()) -> List[str]:
    import dsrb.ops as ops

    reasons = ops.reasons(op, device, dtype)
    return ["reference", "torch"] + [b for b in FUSED if reasons.get(b) is None and b not in skip]


def _once(op: str, provider: str, dims: Dict[str, int], device: torch.device, dtype: torch.dtype) -> Callable:
    """One fwd+bwd of ``op`` by ``provider`` on fixed inputs, warmed up twice."""
    leaves, others, grad_shapes = _inputs(op, dims, device, dtype)
    if op == "semantic_attention":  # from dL/dS alone, as the semantic_attention_op suite (preflight: dL/da too)
        grad_shapes = grad_shapes[:1]
    leaves = [t.requires_grad_() for t in leaves]
    grads = [torch.ones(s, device=device, dtype=dtype) for s in grad_shapes]
    fn = _call(op, provider)

    def once():
        out = fn(*leaves, *others)
        return torch.autograd.grad(out[: len(grads)], leaves, grads)

    for _ in range(2):
        once()
    _sync(device)
    return once


def time_call(once: Callable, device: torch.device, rounds: int) -> Dict[str, float]:
    """Median wall (synchronised) and host (unsynchronised) microseconds of ``once()``."""
    wall, host = [], []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        once()
        t1 = time.perf_counter()
        _sync(device)
        host.append((t1 - t0) * 1e6)
        wall.append((time.perf_counter() - t0) * 1e6)
    return {"wall_us": statistics.median(wall), "host_us": statistics.median(host)}


def event_time(once: Callable, device: torch.device, rounds: int) -> Optional[float]:
    """Median microseconds of ``once()`` between CUDA events, as the benchmarks time a round on a GPU
    (``benchmarks.conftest.run_case``); None off CUDA."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def profile_call(once: Callable, device: torch.device, rounds: int) -> Dict[str, Optional[float]]:
    """Device microseconds and device events per call of ``once()`` (CUDA; None where none were recorded)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:  # the host's own events are not used
        for _ in range(rounds):
            once()
        _sync(device)
    # Kernels, copies and fills; not user annotations (spans over them), which none of these calls makes anyway.
    events = [e for e in prof.events()
              if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    if not events:  # CUPTI unavailable or failing: no figure rather than a 0 that reads as "host-bound"
        return {"device_us": None, "kernels": None, "names": []}
    by_name: Dict[str, List[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    names = sorted(((n, len(t) / rounds, sum(t) / rounds) for n, t in by_name.items()), key=lambda x: -x[2])
    return {"kernels": len(events) / rounds, "device_us": sum(e.time_range.elapsed_us() for e in events) / rounds,
            "names": names}


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:,.1f}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_ops", description=__doc__.split("\n\n")[0])
    shapes = {**SHAPES["full"], **SHAPES["quick"], **TINY}
    parser.add_argument("--shape", action="append", choices=sorted(shapes),
                        help="shape(s) from benchmarks/conftest.py (default: tiny and coco)")
    parser.add_argument("--rounds", type=positive_int, default=20, help="timed calls per row")
    parser.add_argument("--profile-rounds", type=positive_int, default=5, help="profiled calls per row (CUDA)")
    parser.add_argument("--skip", action="append", default=[], choices=FUSED, help="a fused backend to leave out")
    parser.add_argument("--out", help="also write the markdown here (rewritten after each row)")
    args = parser.parse_args(argv)
    if args.out is not None:  # checked before the first row: a bad path used to fail after it, with a traceback
        try:
            check_output_file(args.out, what="the markdown file to write")
        except ValueError as err:
            parser.error(str(err))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # a folder still to make
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    skipped = f"; left out: {', '.join(args.skip)}" if args.skip else ""
    header = [f"### where one fwd+bwd goes ({name}, {dtype}, median of {args.rounds} calls, device events over "
              f"{args.profile_rounds} profiled calls{skipped})", "",
              "| op | shape | provider | wall (us) | host, unsynchronised (us) | between CUDA events (us) | "
              "the same after a CPU profiler session (us) | device events (us) | events |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    rows: List[list] = []  # [op, shape, provider, timing or error text, profile]

    def write():
        lines = list(header)
        for op, shape, provider, timing, prof in rows:
            if isinstance(timing, str):
                lines.append(f"| {op} | {shape} | {provider} | {timing} | | | | | |")
                continue
            prof = prof or {}
            lines.append(f"| {op} | {shape} | {provider} | {_fmt(timing['wall_us'])} | {_fmt(timing['host_us'])} | "
                         f"{_fmt(timing.get('event_us'))} | {_fmt(timing.get('event_after_us'))} | "
                         f"{_fmt(prof.get('device_us'))} | {_fmt(prof.get('kernels'))} |")
        if device.type == "cuda" and any(isinstance(r[3], dict) and r[4] is None for r in rows):
            lines += ["", "–: not profiled (the run stopped first), or no device event recorded (CUPTI)."]
        named = [r for r in rows if r[4] and r[4].get("names")]
        if named:  # which kernels, copies and fills make up the events
            lines += ["", "Device events of one call, by name: count, microseconds.", ""]
            lines += [f"- {op} {shape} {provider}: " + "; ".join(f"`{n[:60]}` ×{c:g}, {t:,.1f}"
                                                                 for n, c, t in r4["names"])
                      for op, shape, provider, _, r4 in named]
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        return lines

    calls = {}
    try:
        for shape in args.shape or ["tiny", "coco"]:
            for op in OPS:
                for provider in _providers(op, device, dtype, args.skip):
                    try:
                        calls[len(rows)] = once = _once(op, provider, shapes[shape], device, dtype)
                        timing = time_call(once, device, args.rounds)
                        timing["event_us"] = event_time(once, device, args.rounds)
                        rows.append([op, shape, provider, timing, None])
                    except Exception as err:  # noqa: BLE001 - reported in the table; the other rows still run
                        # One table row: a CUDA error's text (a Triton compilation error's too) runs over several
                        # lines, which ended the table inside the row, and a '|' in it would split the cell.
                        text = " / ".join(line.strip() for line in str(err).splitlines() if line.strip())
                        rows.append([op, shape, provider, f"error: {type(err).__name__}: {text}".replace("|", "\\|"),
                                     None])
                    # This row by its place: on CUDA the table's last line is the footnote on rows not yet profiled.
                    print(write()[len(header) + len(rows) - 1], file=sys.stderr, flush=True)
        if device.type == "cuda":  # after every timing: a profiler session leaves CUPTI attached
            # The benchmarks run one CPU-only profiler session per case before timing it (check_served), and
            # their medians on the H200 were 0.14-0.76 ms above this table's wall time: timed again after one.
            from benchmarks.conftest import dsrb_ops_run

            try:
                if calls:
                    dsrb_ops_run(next(iter(calls.values())))
                for i, once in calls.items():
                    if isinstance(rows[i][3], dict):  # not an error row
                        rows[i][3]["event_after_us"] = event_time(once, device, args.rounds)
                        write()
            except Exception as err:  # noqa: BLE001 - the timings stand without it
                print(f"profile_ops: the timing after a CPU profiler session failed: {err}", file=sys.stderr)
            for i, once in calls.items():
                try:
                    rows[i][4] = profile_call(once, device, args.profile_rounds)
                except Exception as err:  # noqa: BLE001 - the timings stand without the profile
                    print(f"profile_ops: torch.profiler failed for {rows[i][0]}/{rows[i][2]}: {err}",
                          file=sys.stderr)
                write()
    finally:
        # flushed here, so that a reader gone (`| head`) fails the write inside main, where quiet_interrupt's hook
        # ends it
        print("\n".join(write()), flush=True)
    return 0


if __name__ == "__main__":
    from dsrb._cli import quiet_interrupt

    quiet_interrupt("python -m benchmarks.profile_ops")  # `| head` ends it silently, Ctrl-C in one line
    sys.exit(main())
