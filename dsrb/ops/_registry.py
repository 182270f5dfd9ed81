"""Backend registry: which implementation serves an op for given tensors, and why the others cannot.

Backends in priority order per device type (architecture §4): on CUDA ``cuda`` -> ``triton`` -> ``torch``; on CPU
``cpu`` -> ``torch``; any other device ``torch``. ``backend="auto"`` (or ``DSRB_BACKEND`` unset / ``auto``) takes the
first backend that can serve the inputs and falls back silently. A backend named explicitly (argument or
``DSRB_BACKEND``) never falls back: if it cannot serve the inputs, the error lists every backend and its reason.

Everything here looks only at device types and dtypes, so ``torch.compile`` traces it without a graph break; what
it cannot trace, whether the C++ extension is loaded, whether its CUDA kernels can run on the visible GPUs and whether
triton imports, is asked once and taken by the compiler as a constant (:func:`_extension_unavailable`,
:func:`_cuda_kernels_unusable`, :func:`_triton_unavailable`), so a process's first op call may be inside a compiled
graph.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as forward_ad

from .. import _cli

OPS = ("semantic_attention", "instance_blend", "prototype_blend", "quadrant_index", "prototype_bank_update")
BACKEND_CHOICES = _cli.BACKEND_CHOICES  # what backend= and --backend take (the tools check DSRB_BACKEND with them)
KNOWN_BACKENDS = BACKEND_CHOICES[1:]
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Backend:
    """One implementation family. ``devices`` of None means every device type."""

    name: str
    devices: Optional[Tuple[str, ...]]
    dtypes: Tuple[torch.dtype, ...]
    impls: Dict[str, Callable] = field(default_factory=dict)
    unavailable: Optional[Callable[[], Optional[str]]] = None  # returns a reason when it cannot run at all

    def reason(self, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if self.unavailable is not None:
            why = self.unavailable()
            if why:
                return why
        if op not in self.impls:
            return f"no '{op}' implementation"
        if self.devices is not None and device.type not in self.devices:
            return f"device={device.type} (supported: {', '.join(self.devices)})"
        if dtype not in self.dtypes:
            return f"dtype={dtype} (supported: {', '.join(str(d) for d in self.dtypes)})"
        return None


_BACKENDS: Dict[str, Backend] = {}
_SELECTED: Dict[tuple, Callable] = {}  # select()'s choices
_TRACE_TORCH = False  # trace_torch_backend()


def register_backend(backend: Backend) -> Backend:
    """Add (or return the existing) backend of that name."""
    if backend.name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {KNOWN_BACKENDS}")
    return _BACKENDS.setdefault(backend.name, backend)


def register_impl(backend: str, op: str, fn: Callable) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    _BACKENDS[backend].impls[op] = fn
    _SELECTED.clear()


def reasons(op: str, device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """For every known backend: None if it can serve ``op`` on (device, dtype), else the reason it cannot."""
    out = {}
    for name in KNOWN_BACKENDS:
        out[name] = _BACKENDS[name].reason(op, device, dtype)
    return out


def check_backend_choice(backend, source: str = "argument 'backend'") -> str:
    """``backend`` if it is 'auto' or a known backend's name, else a ValueError naming ``source``: for modules that
    keep a backend for later op calls, so a typo fails when they are built, not at their first forward."""
    if not (isinstance(backend, str) and backend in BACKEND_CHOICES):
        raise ValueError(f"{source}: expected 'auto' or one of {KNOWN_BACKENDS}, got {backend!r}")
    return backend


def _requested(backend: str) -> str:
    if backend == "auto":
        return _cli.check_backend_env()
    return check_backend_choice(backend)


def select(op: str, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> Callable:
    """Return the implementation of ``op`` that serves tensors on ``device`` with ``dtype``.

    Choices are remembered per (op, device type, dtype, requested backend): what a backend can serve does not change
    within a process once the registry is filled, and every op call asks (a few microseconds of host time saved)."""
    requested = _requested(backend)
    if torch.compiler.is_compiling():
        # Traced, the choice is a constant of the graph; the cache is neither read (the compiler would guard on its
        # contents and recompile once an eager call fills it) nor written (a side effect, which strict export warns of).
        return _select(op, device, dtype, requested)
    key = (op, device.type, dtype, requested)
    fn = _SELECTED.get(key)
    if fn is None:
        fn = _SELECTED[key] = _select(op, device, dtype, requested)
    return fn


def selected_backend(op: str, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> str:
    """The name of the backend whose implementation :func:`select` returns (raising as it does)."""
    fn = select(op, device, dtype, backend)
    return next(name for name, b in _BACKENDS.items() if b.impls.get(op) is fn)


def _select(op: str, device: torch.device, dtype: torch.dtype, requested: str) -> Callable:
    if requested != "auto":
        b = _BACKENDS[requested]
        if b.reason(op, device, dtype) is None:
            return b.impls[op]
    else:
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            b = _BACKENDS[name]
            if b.reason(op, device, dtype) is None:
                return b.impls[op]
    table = "\n".join(f"  {name}: {why or 'available'}" for name, why in reasons(op, device, dtype).items())
    what = f"backend {requested!r} was requested" if requested != "auto" else "no backend fits"
    raise RuntimeError(f"dsrb.ops.{op}: {what} for device={device.type}, dtype={dtype}. Backends:\n{table}")


def define_op(name: str, schema: str, impl: Optional[Callable] = None, check: Optional[Callable] = None,
              differentiable: bool = False):
    """The op ``dsrb::<name>``: defined here from a Python implementation, or (``impl`` None) already defined by the
    C++ extension with the same schema (csrc/registration.cpp, csrc/cuda/glue.cpp). Returns its OpOverload; fakes
    are then registered by name for both, autograd only for the Python-defined ones (:func:`register_python_op`;
    the extension registers its own in C++, csrc/autograd.h, which saves the Python autograd's host time).

    ``check(*args)``, called before ``impl`` whenever the op runs, checks the op's own contract (the shapes, dtypes
    and devices csrc/checks.h checks for the C++ ops): the op can be called directly, through ``torch.ops.dsrb``,
    and neither ``impl`` nor its kernels check shapes. The public functions check their arguments before they call
    an op, and their eager path calls ``impl`` itself (:func:`register_python_op`), without this second check.
    ``differentiable``: the op or its backward has autograd (:func:`register_python_op`), which has no forward-mode
    rule: an error under forward-mode AD."""
    if impl is not None:
        run = without_autocast(impl)
        if check is not None:
            unchecked = run

            @functools.wraps(unchecked)
            def run(*args):
                check(*args)
                return unchecked(*args)

        if differentiable:
            no_forward_ad = run

            @functools.wraps(no_forward_ad)
            def run(*args):
                # The autograd torch.library gives a custom op has no forward-mode rule, and no error either: under
                # torch.func.jvp or a forward_ad.dual_level it returned a zero tangent (or none). Inside the op a
                # tangent is not always visible (torch.func.jvp hides it), so an active forward-AD level is refused.
                if forward_ad._current_level >= 0:
                    raise RuntimeError(f"dsrb::{name}: forward-mode AD (torch.func.jvp, jacfwd, "
                                       "torch.autograd.forward_ad) is not supported; differentiate with torch.autograd")
                return no_forward_ad(*args)

        torch.library.custom_op(f"dsrb::{name}", run, mutates_args=(), schema=schema)
    return getattr(torch.ops.dsrb, name).default


def without_autocast(fn: Callable) -> Callable:
    """``fn`` (its first argument a tensor) with autocast off inside: every backend computes in its inputs' dtype
    (half precision accumulating in fp32), the dtype its fake implementation declares, whatever autocast would make
    of the products inside; the C++ kernels do the same (csrc/no_autocast.h). Before, a backward run under autocast
    got bf16 products where the ``cpu`` kernels expected fp32 (an error), and the ``torch`` backend's results
    depended on the autocast state."""

    @functools.wraps(fn)
    def run(*args):
        device = args[0].device.type
        # meta has no autocast state to ask (an error); torch.amp.is_autocast_available is no builtin Dynamo traces
        if device == "meta" or not torch.is_autocast_enabled(device):
            return fn(*args)
        with torch.autocast(device, enabled=False):
            return fn(*args)

    return run


class _NotDifferentiable(torch.autograd.Function):
    """The identity on a backward's results, whose own backward raises: recorded under create_graph=True with edges
    to what those results depend on, so that any gradient through them reaches the error. (torch's
    once_differentiable links its error to detached copies instead, so a second derivative taken with
    torch.autograd.grad w.r.t. the op's inputs silently left the op's part out.) The C++ extension does the same
    (csrc/autograd.h)."""

    @staticmethod
    def forward(ctx, op: str, n: int, *tensors):
        ctx.op = op
        return tensors[:n]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"dsrb.ops.{ctx.op}: its backward cannot be differentiated (double backward, or a gradient "
                           "of a gradient taken with create_graph=True); no backend of dsrb supports it")


def _once_differentiable(op: str, backward: Callable) -> Callable:
    """``backward(ctx, *grads)`` run without autograd; under create_graph=True its results lead to an error when
    differentiated (:class:`_NotDifferentiable`), never to a silent zero."""

    def run(ctx, *grads):
        if not torch.is_grad_enabled():  # no create_graph: the common case, nothing to record
            return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        depends_on = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not depends_on:
            return out
        results = [i for i, t in enumerate(out) if t is not None]
        wrapped = _NotDifferentiable.apply(op, len(results), *(out[i] for i in results), *depends_on)
        out = list(out)
        for i, t in zip(results, wrapped):
            out[i] = t
        return tuple(out)

    return run


@contextlib.contextmanager
def trace_torch_backend():
    """Within this block ``torch.compile`` traces the ``torch`` backend's differentiable ops (``semantic_attention``
    and both blends) as the PyTorch code they run, which the compiler fuses and autograd differentiates, instead of
    calling them as custom ops with their hand-written backward.

    That is what ``torch.compile`` makes of a plain PyTorch implementation, the benchmarks' ``compile`` baseline
    (benchmarks/conftest.py, ``compile_torch``). Faster where the compiler fuses the tanh-score chunks, but the
    derived backward may keep more for the backward than the hand-written one (at the COCO shape on CPU
    128 MiB instead of 97). Eager calls and the other backends are unaffected; compiled code guards on this setting
    and is recompiled when it changes.
    """
    global _TRACE_TORCH
    previous, _TRACE_TORCH = _TRACE_TORCH, True
    try:
        yield
    finally:
        _TRACE_TORCH = previous


def register_python_op(backend: str, op: str, fwd, bwd, forward: Callable, backward: Callable,
                       setup_context: Callable, backward_fn: Callable) -> None:
    """Autograd for an op defined in Python (``torch``, ``triton`` backends), and its entry in the registry.

    ``fwd`` and ``bwd`` are the custom ops made by :func:`define_op` from ``forward`` and ``backward``;
    ``setup_context(ctx, inputs, output)`` and ``backward_fn(impl, ctx, *grads)`` are the autograd formula, where
    ``impl`` computes the input gradients (``bwd`` or ``backward``). Under ``torch.compile`` the registry's entry calls
    ``fwd``, whose fake implementation and registered autograd (through ``bwd``) are what the compiler traces (for
    the ``torch`` backend inside :func:`trace_torch_backend`, ``forward`` itself, which must then be differentiable
    PyTorch code with the same gradients as ``backward``). In
    eager mode it runs ``forward``, and ``backward`` in the same formula, through a ``torch.autograd.Function``: the
    same kernels and arithmetic without the custom ops' dispatch and Python autograd wrapper, which is pure host
    time (on a GPU the host often bounds these ops at training sizes). Neither supports double backward: an error,
    not a silent zero.
    """
    forward, backward = without_autocast(forward), without_autocast(backward)
    torch.library.register_autograd(fwd, functools.partial(backward_fn, bwd), setup_context=setup_context)
    eager_backward = _once_differentiable(op, functools.partial(backward_fn, backward))

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        backward = staticmethod(eager_backward)

    traceable = backend == "torch"

    def call(*inputs):
        if not torch.compiler.is_compiling():
            return Eager.apply(*inputs)
        return forward(*inputs) if traceable and _TRACE_TORCH else fwd(*inputs)

    call.__name__ = call.__qualname__ = f"{op}_{backend}"
    register_impl(backend, op, call)


def extension_backends() -> Tuple[str, ...]:
    """The backends the C++ extension provides in this process ("cpu", and "cuda" if built with CUDA kernels).

    The first call loads the extension, building it first if needed (dsrb/_ext.py)."""
    from .. import _ext

    return _ext.load().backends


def _extension_unavailable(backend: str) -> Optional[str]:
    from .. import _ext

    ext = _ext.load()
    if not ext.loaded:
        return f"the C++ extension is not available: {ext.reason}"
    if backend not in ext.backends:
        return ext.cuda_reason or ("the C++ extension was built without CUDA kernels (no nvcc at build time, or "
                                   "DSRB_BUILD_CUDA=0)")
    if backend == "cuda":
        return _cuda_kernels_unusable(str(ext.info.get("cuda_arch_list")), str(ext.info.get("nvcc")), ext.origin,
                                      ext.path)
    return None


# Never traced, as _cuda_kernels_unusable below: the first op call of a process may happen inside
# torch.compile(fullgraph=True), and loading the extension reads the environment and the build (os.cpu_count, files),
# which the compiler cannot trace; what it returns does not change within a process once the extension is loaded.
_extension_unavailable._dynamo_marked_constant = True  # type: ignore[attr-defined]

_CUDA_UNUSABLE: Dict[Tuple[str, str, str, str], Optional[str]] = {}


def _visible_gpus() -> List[Tuple[int, str, Tuple[int, int]]]:
    """(index, name, compute capability) of every visible CUDA GPU."""
    if not torch.cuda.is_available():
        return []
    return [(i, torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
            for i in range(torch.cuda.device_count())]


def _driver_cuda_version() -> Optional[Tuple[int, int]]:
    """The CUDA version the installed driver supports (cuDriverGetVersion), or None if it cannot be asked."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def _rebuild(origin: str, library: str, setting: str) -> str:
    """How to rebuild the extension of ``origin`` (at ``library``) with ``setting`` (``NAME=value``) in the
    environment."""
    if origin == "setup.py build":  # the library installed with the package: only a reinstall replaces it
        return f"{setting} pip install -e . --no-build-isolation, or your non-editable install command"
    if setting.startswith("TORCH_CUDA_ARCH_LIST="):  # the first-use cache keeps one build per arch list
        return f"export {setting} in every run's environment; the next import builds and caches it"
    return f"export {setting} and delete {os.path.dirname(library)}, which the first-use build would reuse"


def _cuda_kernels_unusable(archs: str, nvcc: str, origin: str = "", library: str = "") -> Optional[str]:
    """Why the CUDA kernels, built for ``archs`` by ``nvcc`` (its ``--version`` line), cannot serve every visible
    GPU, or None. Such a launch would fail ("no kernel image" on a GPU the arch list does not cover, e.g. the default
    9.0 on an A100, or one only PTX covers and the driver is older than that PTX; "driver version is insufficient"
    when the static CUDA runtime is of a newer CUDA major than the driver); instead
    ``auto`` passes over the ``cuda`` backend (to ``triton``) and the reason says what to do. The ``cuda`` backend
    serves all visible GPUs or none."""
    key = (archs, nvcc, origin, library)
    if key not in _CUDA_UNUSABLE:
        from .. import _build

        gpus, why = _visible_gpus(), None
        built = re.search(r"cuda_(\d+)\.(\d+)", nvcc)
        driver = _driver_cuda_version() if gpus and built else None
        # A driver compiles PTX only of a CUDA version it knows, minor included; cubins need the same major only.
        ptx_ok = driver is None or driver >= (int(built[1]), int(built[2]))
        missing = [(i, name, cap) for i, name, cap in gpus if not _build.runs_on(archs, cap, ptx=ptx_ok)]
        if driver is not None and driver[0] < int(built[1]):
            why = (f"its CUDA kernels were built with CUDA {built[1]}.{built[2]} (nvcc), newer than this machine's "
                   f"driver supports (CUDA {driver[0]}.{driver[1]}): update the driver, or rebuild with the nvcc of a "
                   f"CUDA {driver[0]} toolkit ({_rebuild(origin, library, 'CUDA_HOME=...')})")
        elif missing:
            gpus_text = ", ".join(f"cuda:{i} ({name}, compute capability {c[0]}.{c[1]})" for i, name, c in missing)
            wanted = ";".join(sorted({f"{c[0]}.{c[1]}" for _, _, c in missing}) + archs.replace(";", " ").split())
            why = f"its CUDA kernels were built for TORCH_CUDA_ARCH_LIST={archs}, which does not cover {gpus_text}"
            if not ptx_ok and any(_build.runs_on(archs, cap) for _, _, cap in missing):
                why += (f" with a cubin (its PTX, from CUDA {built[1]}.{built[2]}, is newer than this machine's "
                        f"driver, CUDA {driver[0]}.{driver[1]}, can compile; a driver update also helps)")
            setting = f'TORCH_CUDA_ARCH_LIST="{wanted}"'
            why += f"; rebuild: {_rebuild(origin, library, setting)}"
        _CUDA_UNUSABLE[key] = why
    return _CUDA_UNUSABLE[key]


# Asked once per process and never traced into a compiled graph: what torch.compiler.assume_constant_result marks,
# set without it because it imports torch._dynamo, 1.3 s at every `import dsrb.ops` (every tool's start).
# test_registry checks that the compiler still calls it as a constant.
_cuda_kernels_unusable._dynamo_marked_constant = True  # type: ignore[attr-defined]


_TRITON_UNAVAILABLE: Dict[str, Optional[str]] = {}  # _triton_unavailable()'s answer, once asked


def _triton_unavailable() -> Optional[str]:
    if "why" in _TRITON_UNAVAILABLE:
        return _TRITON_UNAVAILABLE["why"]
    why = None
    if importlib.util.find_spec("triton") is None:
        why = "triton is not installed (pip install triton, or the triton that matches your torch)"
    else:
        try:  # installed is not enough: a broken or mismatched install fails here, not inside the first kernel call
            importlib.import_module("triton")
        except Exception as exc:  # any error of its import (ImportError, a RuntimeError from its driver probing, ...)
            why = f"triton is installed but fails to import ({type(exc).__name__}: {exc})"
    _TRITON_UNAVAILABLE["why"] = why
    return why


# Asked once per process and never traced, as _cuda_kernels_unusable (the compiler refuses importlib.import_module).
_triton_unavailable._dynamo_marked_constant = True  # type: ignore[attr-defined]


TORCH = register_backend(Backend("torch", devices=None, dtypes=FLOAT_DTYPES))
CPU = register_backend(Backend("cpu", devices=("cpu",), dtypes=FLOAT_DTYPES,
                               unavailable=lambda: _extension_unavailable("cpu")))
CUDA = register_backend(Backend("cuda", devices=("cuda",), dtypes=FLOAT_DTYPES,
                                unavailable=lambda: _extension_unavailable("cuda")))
# Triton kernels run on CUDA tensors; under the Triton interpreter (TRITON_INTERPRET=1, how the tests run them on
# machines without a GPU) they also take CPU tensors, when the backend is forced. fp64 is left to the other backends.
TRITON = register_backend(Backend(
    "triton",
    devices=("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    unavailable=_triton_unavailable,
))
