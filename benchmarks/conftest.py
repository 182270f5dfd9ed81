"""Shared machinery of the pytest-benchmark suites (architecture §8).

Users:  ``pytest benchmarks/ --benchmark-only [--bench-size full] [--benchmark-json out.json]``
CI:     ``pytest benchmarks/ --benchmark-disable`` (every case runs once, untimed: a smoke test)

Each suite parametrizes provider x pass x shape and calls :func:`run_case`, which times one callable with
``benchmark.pedantic`` and records what was measured in ``benchmark.extra_info``. The benchmark ``group`` is
``f"{case}-{shape}-{pass}"`` (case: the op, or e.g. ``semantic_attention_op`` for the op without its linears), so
each table of the report compares the providers of one case side by side. ``python -m benchmarks.report`` renders
a run's JSON as those tables.

Providers:
    official  the official formulation from :mod:`dsrb.reference` (5-D maps, chained fc3/fc4)
    torch     the op with ``backend="torch"``
    compile   ``torch.compile`` of the same ``backend="torch"`` call with the torch backend's PyTorch code traced
              (:func:`compile_torch`; compiled once, outside the timed region)
    triton, cuda, cpu   the fused backends, each skipped with the reason from :func:`dsrb.ops.reasons` where it
              cannot run (Triton is timed on CUDA only: the CPU interpreter's timings mean nothing)

The memory-bound ops' suites (the blends, the quadrant index, the bank update) also record ``traffic_bytes``, what
an ideal kernel of the pass moves (each tensor it reads or writes, once), from which the report gives GB/s;
``test_bench_copy.py`` times a plain copy of S-sized data, the bandwidth to read those figures against.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import statistics
import tempfile
import time
import zlib
from typing import Callable, Dict, List, Optional

import pytest
import torch

# Inductor's on-disk graph cache does not notice a change to a custom op's schema or fake implementation: key the
# cache folder on the package sources, so that an edited op is never served a stale compiled graph.
_digest = hashlib.sha1()
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
for _part in ("dsrb", "kernels"):
    for _folder, _, _files in sorted(os.walk(os.path.join(_ROOT, _part))):
        for _name in sorted(_files):
            if _name.endswith(".py"):
                with open(os.path.join(_folder, _name), "rb") as _f:
                    _digest.update(_f.read())
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"dsrb-inductor-{_digest.hexdigest()[:12]}")
)

import dsrb  # noqa: E402  (the version only: dsrb.ops is imported lazily, after any TRITON_INTERPRET setting)

PROVIDERS = ("official", "torch", "compile", "triton", "cuda", "cpu")
PASSES = ("fwd", "bwd", "fwd+bwd")
# fwd+bwd captured once in a CUDA graph and timed by replay, for every provider alike (on CUDA only; see run_case):
# the device's own time without the host's cost of queueing the call, which bounds these ops at the issues' shapes.
GRAPH_PASS = "graph"
DTYPE = torch.float32

# N = H * W. E is the word-vector size (300 in the paper), used by semantic decoupling only.
SHAPES: Dict[str, Dict[str, Dict[str, int]]] = {
    # The demo preset and the COCO shape at batch 8: the whole suite runs in a few minutes on 2 CPU cores.
    "quick": {
        "demo": dict(B=16, H=2, W=2, C=16, D=256, I=128, E=300),
        "coco-b8": dict(B=8, H=7, W=7, C=80, D=1024, I=512, E=300),
    },
    # The paper's shapes (spec §2, §11): meant for a GPU.
    "full": {
        "coco": dict(B=8, H=7, W=7, C=80, D=1024, I=512, E=300),
        "vg": dict(B=8, H=7, W=7, C=200, D=1024, I=512, E=300),
        "vg-b32": dict(B=32, H=7, W=7, C=200, D=1024, I=512, E=300),
    },
}
# The op suites (modules that set HOST_OVERHEAD_SHAPE = True) also run at this shape in every size: the kernels'
# work is negligible there, so the time is what one call costs the host (checks, dispatch, autograd, launches); on a
# GPU it is the floor of every small-batch step.
TINY = {"tiny": dict(B=2, H=2, W=2, C=4, D=16, I=16, E=8)}
for _size in list(SHAPES.values()) + [TINY]:
    for _dims in _size.values():
        _dims["N"] = _dims["H"] * _dims["W"]

# Timed rounds per case (one iteration each); DSRB_BENCH_ROUNDS overrides.
ROUNDS = {"quick": 10, "full": 50}


def pytest_addoption(parser):
    group = parser.getgroup("dsrb benchmarks")
    group.addoption(
        "--bench-size",
        choices=tuple(SHAPES),
        default=None,
        help="shape set of the dsrb benchmarks: quick (CPU-friendly, default; env DSRB_BENCH_SIZE) or full (the "
        "paper's COCO and VG-200 shapes, meant for a GPU)",
    )


def bench_size(config) -> str:
    size = config.getoption("--bench-size", default=None) or os.environ.get("DSRB_BENCH_SIZE") or "quick"
    if size not in SHAPES:
        raise pytest.UsageError(f"DSRB_BENCH_SIZE: expected one of {tuple(SHAPES)}, got {size!r}")
    return size


def env_rounds() -> Optional[int]:
    """DSRB_BENCH_ROUNDS as a positive int (None when unset); a pytest.UsageError naming it otherwise."""
    text = os.environ.get("DSRB_BENCH_ROUNDS")
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(f"DSRB_BENCH_ROUNDS: expected a positive integer (timed rounds per case), got {text!r}")
    return value


def _check_memory_budget() -> None:
    """DSRB_BENCH_MEMORY_BUDGET (bytes, read by test_bench_largest_batch.py) as a positive number."""
    text = os.environ.get("DSRB_BENCH_MEMORY_BUDGET")
    if not text:
        return
    try:
        ok = int(float(text)) >= 1
    except (ValueError, OverflowError):  # "abc"; "inf", "nan"
        ok = False
    if not ok:
        raise pytest.UsageError(f"DSRB_BENCH_MEMORY_BUDGET: expected a positive number of bytes (e.g. 134217728 or "
                                f"1.5e9), got {text!r}")


def pytest_configure(config):
    # The environment is checked once, before collection: a bad value is one usage error, not an error in every
    # case after its warm-up and memory profile (or a collection error per module).
    bench_size(config)
    env_rounds()
    _check_memory_budget()


def pytest_generate_tests(metafunc):
    # Shape outermost, then pass, then provider: consecutive cases share the cached inputs of one shape.
    if "shape" in metafunc.fixturenames:
        extra = list(TINY) if getattr(metafunc.module, "HOST_OVERHEAD_SHAPE", False) else []
        metafunc.parametrize("shape", list(SHAPES[bench_size(metafunc.config)]) + extra)
    if "pass_" in metafunc.fixturenames:
        metafunc.parametrize("pass_", PASSES + ((GRAPH_PASS,) if torch.cuda.is_available() else ()))
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", PROVIDERS)


@pytest.fixture(scope="session")
def size(request) -> str:
    return bench_size(request.config)


@pytest.fixture
def dims(size, shape) -> Dict[str, int]:
    return dict(TINY[shape] if shape in TINY else SHAPES[size][shape])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture(scope="session")
def rounds(size) -> int:
    return env_rounds() or ROUNDS[size]


# ----------------------------------------------------------------------------------------------- provider checks


def require_provider(op: str, provider: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Skip the current case when ``provider`` cannot run ``op`` here; return the backend name for op providers
    (None for "official")."""
    import dsrb.ops

    if provider == "official":
        return None
    backend = "torch" if provider == "compile" else provider
    why = dsrb.ops.reasons(op, device, dtype).get(backend, f"unknown backend {backend!r}")
    if why:
        pytest.skip(f"{provider}: backend {backend!r} cannot run {op} on {device.type}/{dtype}: {why}")
    if backend == "triton" and device.type != "cuda":
        pytest.skip("triton: on CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1), whose "
                    "timings mean nothing; timed on CUDA only")
    return backend


def available_memory(device: torch.device) -> Optional[int]:
    """Free memory in bytes on the device (CUDA: mem_get_info plus the allocator's unused cache; CPU: MemAvailable
    of /proc/meminfo), or None when unknown."""
    if device.type == "cuda":  # free on the device plus what this process's caching allocator holds unused
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def skip_if_too_big(estimate_bytes: int, device: torch.device, what: str, fraction: float = 0.8) -> None:
    """Skip when a rough estimate of a case's live memory exceeds ``fraction`` of the device's free memory."""
    free = available_memory(device)
    if free is not None and estimate_bytes > fraction * free:
        pytest.skip(f"{what}: estimated {estimate_bytes / 2**30:.1f} GiB of live tensors exceeds "
                    f"{fraction:.0%} of the {free / 2**30:.1f} GiB free on {device.type}")


def assert_grads_close(provider: str, names, got, want, tol: float) -> None:
    """Each gradient a provider computes equals the official one (None: not reached, taken as zeros). Before timing a
    backward: the forward check alone let a wrong gradient be timed as a valid "bwd" case. atol is ``tol`` times the
    larger of the tensor's own scale and 1 % of the largest reference gradient (a gradient that is zero in exact
    arithmetic, fc3/fc4's biases, is rounding noise in the official one and None in the fused ones)."""
    got, want, names = list(got), list(want), list(names)
    if not len(got) == len(want) == len(names):
        raise AssertionError(f"{provider}: {len(got)} gradients against {len(want)} official ones ({names})")
    scales = [float(w.detach().abs().max()) if w is not None and w.numel() else 0.0 for w in want]
    floor = 1e-2 * max(scales, default=0.0)
    for name, g, w, scale in zip(names, got, want, scales):
        if g is None and w is None:
            continue
        like = w if w is not None else g
        g = torch.zeros_like(like) if g is None else g.detach()
        w = torch.zeros_like(like) if w is None else w.detach()
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * max(scale, floor),
                                   msg=lambda m: f"{provider}: gradient w.r.t. {name} disagrees with the official: {m}")


def dsrb_ops_run(fn: Callable) -> List[str]:
    """The dsrb custom ops (``dsrb::<op>_<backend>[_backward]``) that one ``fn()`` runs, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.key for e in prof.key_averages() if e.key.startswith("dsrb::")})


def _op_backend(name: str) -> str:
    base = name[len("dsrb::"):].rstrip("_")  # prototype_bank_update_cpu_ is the in-place form
    if base.endswith("_backward"):
        base = base[: -len("_backward")]
    return base.rsplit("_", 1)[-1]


def check_served(provider: str, backend: Optional[str], fn: Callable) -> Optional[List[str]]:
    """Assert that ``fn()`` (a forward and backward of the case) ran ``backend``'s kernels and no other backend's:
    a ``cpu`` case that some path served with the ``torch`` code would otherwise be timed and reported as ``cpu``.
    The extension's backends (cpu, cuda) must show their ops; the Python-defined ones (torch, triton) run their
    code without a custom-op record in eager mode, so for them only the absence of any other backend's op is
    checked. Returns the ops seen (recorded in extra_info["served_by"]); None for the official provider."""
    if backend is None:
        return None
    names = dsrb_ops_run(fn)
    foreign = [n for n in names if _op_backend(n) != backend]
    if foreign:
        raise AssertionError(f"{provider}: expected only backend {backend!r} to run, but {foreign} ran")
    if backend in ("cpu", "cuda") and not names:
        raise AssertionError(f"{provider}: no dsrb::*_{backend} op ran: the case would not time the {backend} kernels")
    return names


# ------------------------------------------------------------------------------------------------ environment


# Triton as PyTorch's wheels bring it: version("triton") knew none of these, and the report read "triton None".
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu")


@functools.lru_cache(maxsize=None)  # environment() runs for every case; the lookup reads every installed package
def _triton_version() -> Optional[str]:
    """The version of the distribution that installs the ``triton`` module, whatever its name; None if none does."""
    find = getattr(importlib.metadata, "packages_distributions", None)  # Python 3.10+
    names = [*(find().get("triton", []) if find else []), *_TRITON_DISTRIBUTIONS]
    for name in dict.fromkeys(names):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def environment(device: torch.device) -> Dict[str, object]:
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dsrb": dsrb.__version__,
        "cuda_runtime": torch.version.cuda,
    }


def seed_for(*parts: str) -> int:
    """A stable seed from strings (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(parts).encode())


def official_map(a: torch.Tensor, x: torch.Tensor, dims: Dict[str, int]) -> torch.Tensor:
    """F (B, H, W, C, D) = a[b, c, n] * x[b, n, :], from a (B, C, N) and x (B, N, D): the attention-weighted map
    the official semantic decoupling builds (spec §3.3 step 5) and hands to the blends and the prototype pass."""
    B, H, W, C, D = (dims[k] for k in "BHWCD")
    return (a.transpose(1, 2)[..., None] * x[:, :, None, :]).reshape(B, H, W, C, D)


def attention_weighted_map(gen: torch.Generator, dims: Dict[str, int], device, dtype) -> torch.Tensor:
    """:func:`official_map` of random x and a spatial softmax a drawn from ``gen``."""
    B, N, C, D = (dims[k] for k in "BNCD")
    x = torch.randn(B, N, D, generator=gen, dtype=dtype).to(device)
    a = torch.softmax(torch.randn(B, C, N, generator=gen, dtype=dtype), dim=-1).to(device)
    return official_map(a, x, dims)


def clear_peaks(a: torch.Tensor, x: torch.Tensor, margin: float = 1e-3) -> torch.Tensor:
    """``a`` with every (image, class) peak of the quadrant score a[b, c, n] * x[b, n, :].sum() at least ``margin``
    (relative) above the runner-up. The official search finds the peak on F.sum(-1), the others on a * x.sum(-1):
    the same number in exact arithmetic, rounded differently, and differently again on each device, so a near-tie
    (vg-b32 holds a gap of 3.6e-6) could put one sample in another quadrant and fail the check before timing. The
    peak's weight is scaled by 1 + 2 * margin * sign(score) (the peak moves away from the runner-up, the others stay),
    then the row renormalised (all scores scaled alike): the gap becomes at least 2 * margin / (1 + 2 * margin)."""
    G = a.double() * x.double().sum(-1)[:, None, :]  # (B, C, N)
    top = G.topk(2, dim=-1)
    first, second = top.values.unbind(-1)
    near = (first - second) < margin * first.abs()
    scale = torch.where(near, 1 + 2 * margin * torch.sign(first), torch.ones_like(first)).to(a.dtype)
    a = a.clone()
    a.scatter_(-1, top.indices[..., :1], a.gather(-1, top.indices[..., :1]) * scale[..., None])
    return a / a.sum(-1, keepdim=True)


def seeded_linear(gen: torch.Generator, fan_in: int, fan_out: int, bias: bool, device, dtype) -> torch.nn.Linear:
    """nn.Linear with its default init range, drawn from ``gen`` (the same weights for every provider)."""
    layer = torch.nn.Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype)
    bound = 1 / fan_in ** 0.5
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_((torch.rand(p.shape, generator=gen, dtype=dtype) * 2 - 1) * bound)
    return layer


# ------------------------------------------------------------------------------------------------- passes


def compile_torch(fn: Callable, **options) -> Callable:
    """The ``compile`` provider: ``torch.compile(fn, **options)``, called inside :func:`dsrb.ops.trace_torch_backend`.

    Without it the ``torch`` backend's ops would reach the compiler as opaque custom ops, so that ``compile`` timed
    the eager ``torch`` backend plus a compiled remainder. Traced, the compiler sees (fuses and differentiates) the
    PyTorch code itself: what a user would get from compiling a plain PyTorch implementation."""
    import dsrb.ops

    compiled = torch.compile(fn, **options)

    def call(*args, **kwargs):
        with dsrb.ops.trace_torch_backend():
            return compiled(*args, **kwargs)

    return call


def pass_callables(pass_: str, forward: Callable, leaves, grad_outputs):
    """(fn, setup) for one pass, for :func:`run_case`.

    forward() returns the tuple of differentiable outputs; grad_outputs matches it. The backward is
    ``torch.autograd.grad`` w.r.t. ``leaves`` (no ``.grad`` accumulation between rounds). "bwd" builds a fresh
    forward graph in the untimed setup of every round and times only the backward. ``GRAPH_PASS`` is the fwd+bwd
    callable, which :func:`run_case` captures in a CUDA graph.
    """
    leaves = tuple(leaves)

    def backward(outputs):
        return torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)

    if pass_ == "fwd":
        return forward, None
    if pass_ == "bwd":
        return backward, lambda: ((forward(),), {})
    if pass_ in ("fwd+bwd", GRAPH_PASS):
        return (lambda: backward(forward())), None
    raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES + (GRAPH_PASS,)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(fn: Callable, setup: Optional[Callable] = None, prime: bool = False) -> Optional[int]:
    """Peak growth of live CPU tensor memory during one ``fn(*args, **kwargs)``, ``(args, kwargs) = setup()``: the
    profiler's allocation and free events (``profile_memory=True``), summed in time order, the peak inside the call
    less the bytes live when it starts. ``setup`` (and, with ``prime``, one ``fn()`` before, for a step that frees
    the previous step's tensors, like gradients set to None) runs inside the profile, outside that window, so a
    free inside the call of what they allocated (a bwd pass freeing the saved forward graph) is credited, as CUDA's
    ``max_memory_allocated - before`` credits it; the profiler cannot size a free of a block allocated before it
    started. None where this torch has no allocation events."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile, record_function

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            args, kwargs = _args(setup)
            if prime:
                fn(*args, **kwargs)
            with record_function("dsrb::measured_call"):
                fn(*args, **kwargs)
            del args, kwargs
        events, window, stack = [], None, list(prof.profiler.kineto_results.experimental_event_tree())
    except (ImportError, AttributeError, RuntimeError):
        return None
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.name == "dsrb::measured_call":
            window = (event.start_time_ns, event.end_time_ns)
        elif event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            events.append((event.start_time_ns, event.typed[1].alloc_size))
    if window is None:
        return None
    live, start, peak = 0, None, 0
    for when, size in sorted(events):
        if start is None and when >= window[0]:
            start = peak = live
        if when > window[1]:
            break
        live += size
        if start is not None:
            peak = max(peak, live)
    return peak - start if start is not None else 0


def _args(setup):
    return setup() if setup is not None else ((), {})


# Inductor's CPU code generation in torch 2.6 fails on the backward of the traced `torch` backend and of the
# contrastive loss ("ops.<lambda>" in the generated C++, an AssertionError on a scatter); 2.7 and every later release
# seen (2.8, 2.9, 2.10, 2.11, 2.13) compile both.
_INDUCTOR_CPU_TROUBLE = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 7)


def _compiled_first_call(call: Callable, info: dict, device: torch.device):
    """``call()``, the first call of a case, where torch.compile compiles the forward and the backward. A failure to
    compile a ``compile`` case on the CPU under torch < 2.7 skips the case with the error; anything else raises."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - inductor raises many kinds (CppCompileError, AssertionError, ...)
        if info.get("provider") != "compile" or device.type != "cpu" or not _INDUCTOR_CPU_TROUBLE:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:200]
        pytest.skip(f"torch {torch.__version__}'s inductor could not compile this case on the CPU "
                    f"({type(err).__name__}: {first}); torch 2.7 and later can")


def capture_cuda_graph(fn: Callable, device: torch.device) -> "torch.cuda.CUDAGraph":
    """``fn()`` captured in a CUDA graph, after three calls on a side stream (what ``torch.cuda.graph`` asks of a
    first capture). A call that cannot be captured (a device-to-host read or a synchronisation inside it, e.g. a
    value check) skips the case with the capture's error: that provider has no graph timing, nothing else is lost."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 - a failed capture raises RuntimeErrors from many places
        graph.reset()
        torch.cuda.synchronize(device)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        pytest.skip(f"not capturable in a CUDA graph ({type(err).__name__}: {first})")
    return graph


def run_case(benchmark, fn: Callable, *, device, info: dict, setup: Optional[Callable] = None,
             rounds: int = 10, prime_memory: bool = False, warmup_s: float = 0.0) -> None:
    """Warm up once, time ``fn`` with ``benchmark.pedantic`` and record the case in ``benchmark.extra_info``.

    Args:
        fn: the timed callable; with ``setup``, it receives the arguments ``setup()`` returns as ``(args, kwargs)``
            (built again, untimed, before every round).
        device: where the tensors live. On CUDA each timed round is also bracketed by CUDA events and ends with
            their synchronisation, so the host clock is valid; the events' median, minimum and IQR over the same
            rounds go into extra_info (what the report shows on a GPU).
        info: op, provider, pass, shape, dims, dtype (recorded as given; ``benchmark.group`` is set from it).
        rounds: timed rounds, one iteration each (``extra_info["rounds"]``: an interrupted case has fewer).
        prime_memory: on CPU, one more run before the measured one inside the profile (a training step frees the
            previous step's gradients; see :func:`cpu_peak_bytes`).
        warmup_s: on CUDA, untimed calls after the first until this many seconds have passed (the training step on
            the H200, 2026-12-05, ran 30-40 % slower for its first 12-14 timed rounds after a single warm-up call;
            the op cases showed no such start).

    Peak memory: on CUDA, ``max_memory_allocated`` over one extra run after ``reset_peak_memory_stats``, minus the
    memory allocated before that run (inputs and parameters, plus the saved forward graph for "bwd"). On CPU, the
    same growth over one extra run under the profiler (:func:`cpu_peak_bytes`).

    The pass ``GRAPH_PASS`` (CUDA only): after the warm-up, ``fn`` (a fwd+bwd) is captured once in a CUDA graph
    (:func:`capture_cuda_graph`) and each round times one replay of it, so the host's checks, dispatch, autograd and
    launches are left out for every provider alike; no peak memory (the graph keeps its own memory pool).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    graphed = info["pass"] == GRAPH_PASS
    if graphed and not cuda:
        pytest.skip("the graph pass captures a CUDA graph: CUDA only")
    benchmark.group = f"{info.get('case') or info['op']}-{info['shape']}-{info['pass']}"
    extra = benchmark.extra_info
    extra.update({k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in info.items()})
    extra.update(environment(device))
    extra["rounds"] = rounds

    event_ms: List[float] = []  # on CUDA: each timed round's device time, from CUDA events around the call

    def timed(*args, **kwargs):
        if not cuda:
            return fn(*args, **kwargs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        end.synchronize()  # the host clock pytest-benchmark reads is valid too
        event_ms.append(start.elapsed_time(end))
        return out

    def timed_setup():
        out = setup()
        _sync(device)
        return out

    if benchmark.disabled:  # smoke run: once, untimed, nothing measured
        extra["peak_memory_bytes"] = None
        extra["peak_memory_note"] = "not measured (benchmark disabled)"
        if graphed:  # its calls on the side stream compile what torch.compile would, then the capture
            fn = capture_cuda_graph(fn, device).replay  # what timed() calls from here on
        _compiled_first_call(lambda: benchmark.pedantic(timed, setup=timed_setup if setup else None, rounds=1,
                                                        iterations=1), info, device)
        return

    def warm_up():  # and, for torch.compile, the last compilation: outside the timing
        args, kwargs = _args(setup)
        timed(*args, **kwargs)

    _compiled_first_call(warm_up, info, device)
    if cuda:
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            warm_up()

    if graphed:
        fn = capture_cuda_graph(fn, device).replay  # what timed() calls from here on
        extra["formulation"] = (f"{extra.get('formulation', '')} (fwd+bwd captured once in a CUDA graph; each round "
                                "times one replay)").lstrip()
        extra["peak_memory_bytes"] = None
        extra["peak_memory_note"] = "not measured for a CUDA-graph replay (the graph keeps its own memory pool)"
    elif cuda:
        args, kwargs = _args(setup)
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(*args, **kwargs)
        _sync(device)
        extra["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - before
        extra["memory_before_bytes"] = before
        extra["peak_memory_note"] = ("max_memory_allocated during one run minus the memory allocated before it "
                                     "(inputs, parameters and, for bwd, the saved forward graph)")
        del args, kwargs
    else:
        extra["peak_memory_bytes"] = cpu_peak_bytes(fn, setup, prime=prime_memory)
        extra["peak_memory_note"] = ("peak growth of the bytes live during one run over those live when it starts, "
                                     "from the profiler's allocation events (torch's CPU allocator; inputs and, for "
                                     "bwd, the saved forward graph allocated before it, its frees credited)")

    event_ms.clear()  # the warm-up's
    _sync(device)
    try:
        benchmark.pedantic(timed, setup=timed_setup if setup else None, rounds=rounds, iterations=1, warmup_rounds=0)
    except BaseException:
        # pytest-benchmark flags a case as errored (left out of the JSON) on an Exception only. An interrupt (a part's
        # time cap in gpu_session.sh) before the first round ends leaves a case without timings, on which its JSON
        # writer fails, losing the whole file: leave that case out. A case with some rounds is kept, with fewer
        # rounds than extra_info["rounds"] (the report marks it incomplete).
        if not benchmark.stats:
            benchmark.has_error = True
        raise
    if cuda:
        extra["cuda_event_median_ms"] = statistics.median(event_ms)
        extra["cuda_event_min_ms"] = min(event_ms)
        quartiles = statistics.quantiles(event_ms, n=4) if len(event_ms) > 1 else [event_ms[0]] * 3
        extra["cuda_event_iqr_ms"] = quartiles[2] - quartiles[0]


def measure(benchmark, bench, op: str, provider: str, pass_: str, shape: str, dims, device, dtype, rounds, *,
            estimate: Callable, inputs: Callable, forward: Callable, validate: Callable, official: str, fused: str,
            case: Optional[str] = None, **info) -> None:
    """The body every op suite shares: check the provider, build the inputs and the forward, check the forward
    against the official output once, then time the pass. ``official``/``fused`` describe what is computed (the
    fused text takes the backend name as ``{backend}``). ``forward(provider, backend, inputs, bench)`` returns
    (the forward callable, its differentiable leaves)."""
    backend = require_provider(op, provider, device, dtype)
    if provider == "official":
        skip_if_too_big(estimate(dims), device, f"official {op} at {shape}")
    inp = inputs(bench, shape, dims, device, dtype)
    fwd, leaves = forward(provider, backend, inp, bench)
    validate(provider, fwd, inp, device)
    served = inp.setdefault("served", {})  # once per shape and provider, outside the timing
    key = f"{case or op}:{provider}"
    if key not in served:
        served[key] = check_served(provider, backend, pass_callables("fwd+bwd", fwd, leaves, inp["grad_outputs"])[0])
    fn, setup = pass_callables(pass_, fwd, leaves, inp["grad_outputs"])
    formulation = official if provider == "official" else fused.format(backend=backend) + (
        " under torch.compile(fullgraph=True), torch backend traced" if provider == "compile" else "")
    run_case(benchmark, fn, setup=setup, device=device, rounds=rounds,
             info={"op": op, "case": case or op, "provider": provider, "pass": pass_, "shape": shape, "dims": dims,
                   "dtype": dtype, "formulation": formulation, "served_by": served[key], **info})


def drop_inputs(state: Dict[str, object], device: torch.device) -> None:
    """Forget a suite's cached inputs (its module's ``_STATE``: the inputs of one shape at a time), before the next
    shape's are built, and on CUDA return the allocator's cache: two shapes never hold the device's memory at once."""
    state["key"] = state["value"] = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Fixtures for the suites (they use these instead of importing this module).


@pytest.fixture(autouse=True, scope="module")
def _release_suite_inputs(request):
    """Drop a suite's cached inputs (its module's ``_STATE``) when it ends, so the next suite has the device memory."""
    yield
    state = getattr(request.module, "_STATE", None)
    if isinstance(state, dict):
        state["key"] = state["value"] = None


@pytest.fixture(scope="session")
def bench():
    """The helpers of this module, as one namespace."""
    import types

    return types.SimpleNamespace(
        run_case=run_case,
        measure=measure,
        require_provider=require_provider,
        skip_if_too_big=skip_if_too_big,
        drop_inputs=drop_inputs,
        pass_callables=pass_callables,
        compile_torch=compile_torch,
        seed_for=seed_for,
        official_map=official_map,
        attention_weighted_map=attention_weighted_map,
        clear_peaks=clear_peaks,
        cpu_peak_bytes=cpu_peak_bytes,
        seeded_linear=seeded_linear,
        assert_grads_close=assert_grads_close,
        check_served=check_served,
        available_memory=available_memory,
    )
