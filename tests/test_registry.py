"""Backend selection: auto falls back silently, a forced backend never does and explains every rejection."""

import re
import subprocess
import sys

import pytest
import torch

import dsrb.ops as ops
from dsrb import _build
from helpers import assert_close


def test_auto_on_cpu_takes_the_extension_else_torch_and_reports_reasons():
    cpu, f32 = torch.device("cpu"), torch.float32
    why = ops.reasons("semantic_attention", cpu, f32)
    assert set(why) == set(ops.KNOWN_BACKENDS)
    assert why["torch"] is None
    assert any(w in why["cuda"] for w in ("device=cpu", "extension", "TORCH_CUDA_ARCH_LIST")), why["cuda"]
    for name in ("cpu", "triton"):
        assert why[name] is None or (isinstance(why[name], str) and why[name])
    want = "cpu" if why["cpu"] is None else "torch"
    assert ops.select("semantic_attention", cpu, f32) is ops.select("semantic_attention", cpu, f32, want)


def test_forced_unavailable_backend_lists_every_backend():
    x = torch.randn(1, 4, 3)
    u, e, v = torch.randn(1, 4, 2), torch.randn(2, 2), torch.randn(2)
    why = ops.reasons("semantic_attention", x.device, x.dtype)
    unavailable = [n for n, r in why.items() if r is not None]
    if not unavailable:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=f"'{unavailable[0]}' was requested") as err:
        ops.semantic_attention(x, u, e, v, backend=unavailable[0])
    for name in ops.KNOWN_BACKENDS:
        assert f"  {name}: " in str(err.value)


def test_env_var_forces_backend(monkeypatch):
    x = torch.randn(1, 4, 3)
    u, e, v = torch.randn(1, 4, 2), torch.randn(2, 2), torch.randn(2)
    monkeypatch.setenv("DSRB_BACKEND", "torch")
    log = _OpLog()
    with log:
        S, a = ops.semantic_attention(x, u, e, v)
    assert S.shape == (1, 2, 3)
    assert ops.select("semantic_attention", x.device, x.dtype) is ops.select(
        "semantic_attention", x.device, x.dtype, "torch")
    assert not any(op.startswith("dsrb::semantic_attention_cpu") for op in log.ops), log.ops  # the torch impl ran
    monkeypatch.setenv("DSRB_BACKEND", "nonsense")  # named as the variable, not as an argument never given
    with pytest.raises(ValueError, match="^environment variable DSRB_BACKEND: expected 'auto' or one of .*nonsense"):
        ops.semantic_attention(x, u, e, v)
    with pytest.raises(ValueError, match="^argument 'backend': expected 'auto' or one of .*bogus"):
        ops.semantic_attention(x, u, e, v, backend="bogus")


def test_unsupported_dtype_is_explained():
    with pytest.raises(RuntimeError, match="torch: dtype=torch.complex64"):
        ops.select("instance_blend", torch.device("cpu"), torch.complex64, "torch")


def _built(key: str = "cuda_arch_list") -> str:
    """What the extension's CUDA kernels were built with (the test skips if it has none): the arch list or nvcc."""
    from dsrb import _ext

    ext = _ext.load()
    if "cuda" not in ext.backends:
        pytest.skip("the extension was built without CUDA kernels here")
    return str(ext.info[key])


def test_cuda_backend_passes_over_gpus_its_kernels_do_not_cover(gpus):
    """Kernels built for the default 9.0 cannot launch on an A100 (8.0): auto takes triton instead of failing at the
    first launch, a forced cuda says how to rebuild, and a GPU the build covers is served."""
    archs = _built()
    cuda, f32 = torch.device("cuda"), torch.float32
    gpus += [(9, 0), (8, 0)] if archs == "9.0" else [(1, 0)]  # (1, 0): no build covers it
    why = ops.reasons("semantic_attention", cuda, f32)["cuda"]
    assert f"built for TORCH_CUDA_ARCH_LIST={archs}, which does not cover cuda:" in why, why
    if archs == "9.0":
        assert "cuda:1 (Fake GPU 1, compute capability 8.0)" in why and "cuda:0" not in why
        assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in why
    assert ops.select("semantic_attention", cuda, f32) is ops.select("semantic_attention", cuda, f32, "triton")
    with pytest.raises(RuntimeError, match="'cuda' was requested(.|\n)*does not cover"):
        ops.select("semantic_attention", cuda, f32, "cuda")


@pytest.mark.parametrize("origin, hint", [
    ("setup.py build", 'TORCH_CUDA_ARCH_LIST="8.0;9.0" pip install -e . --no-build-isolation, or your non-editable'),
    ("first-use build (cache)", 'export TORCH_CUDA_ARCH_LIST="8.0;9.0" in every run\'s environment'),
])
def test_the_rebuild_hint_fits_how_the_extension_was_built(gpus, origin, hint):
    """An installed library is replaced by reinstalling; the first-use cache keeps one build per arch list, so the
    list must stay set in every run (a reinstall would not be used while the cache holds the old list's build)."""
    from dsrb.ops import _registry

    gpus += [(8, 0)]
    why = _registry._cuda_kernels_unusable("9.0", "Build cuda_13.0.r13.0/compiler.0_0", origin, "/c/x/ext.so")
    assert f"rebuild: {hint}" in why, why


@pytest.mark.parametrize("origin, hint", [
    ("setup.py build", "(CUDA_HOME=... pip install -e . --no-build-isolation, or your non-editable install command)"),
    ("first-use build (cache)", "(export CUDA_HOME=... and delete /c/x, which the first-use build would reuse)"),
])
def test_the_driver_hint_fits_how_the_extension_was_built(gpus, monkeypatch, origin, hint):
    """The first-use cache is kept per arch list, not per CUDA toolkit: another toolkit needs the old build gone."""
    from dsrb.ops import _registry

    monkeypatch.setattr(_registry, "_driver_cuda_version", lambda: (12, 8))
    gpus += [(9, 0)]
    why = _registry._cuda_kernels_unusable("9.0", "Build cuda_13.0.r13.0/compiler.0_0", origin, "/c/x/ext.so")
    assert why.endswith(f"toolkit {hint}"), why


def test_cuda_backend_serves_gpus_its_kernels_cover(gpus):
    gpus.append(tuple(_build.parse_arch_list(_built())[0][:2]))
    assert ops.reasons("semantic_attention", torch.device("cuda"), torch.float32)["cuda"] is None
    assert ops.select("semantic_attention", torch.device("cuda"), torch.float32) is ops.select(
        "semantic_attention", torch.device("cuda"), torch.float32, "cuda")


def test_cuda_backend_passes_over_a_driver_older_than_its_cuda_runtime(gpus, monkeypatch):
    """The kernels carry a static CUDA runtime of nvcc's version: a driver of an older CUDA major cannot run them."""
    from dsrb.ops import _registry

    cuda, f32 = torch.device("cuda"), torch.float32
    built = re.search(r"cuda_(\d+)\.(\d+)", _built("nvcc"))
    assert built, _built("nvcc")
    major = int(built[1])
    gpus += [tuple(_build.parse_arch_list(_built())[0][:2])]  # covered
    monkeypatch.setattr(_registry, "_driver_cuda_version", lambda: (major - 1, 8))
    why = ops.reasons("semantic_attention", cuda, f32)["cuda"]
    assert f"built with CUDA {major}.{built[2]} (nvcc), newer than this machine's driver supports " \
           f"(CUDA {major - 1}.8)" in why, why
    assert ops.select("semantic_attention", cuda, f32) is ops.select("semantic_attention", cuda, f32, "triton")
    monkeypatch.setattr(_registry, "_CUDA_UNUSABLE", {})
    monkeypatch.setattr(_registry, "_driver_cuda_version", lambda: (major, 0))  # an older minor: compatible
    assert ops.reasons("semantic_attention", cuda, f32)["cuda"] is None


@pytest.mark.parametrize("driver, caps, served", [
    ((13, 1), [(9, 0), (10, 0)], True),  # the driver knows the PTX's CUDA 13.1
    ((13, 0), [(9, 0)], True),  # a cubin runs on an older minor of the same major
    ((13, 0), [(9, 0), (10, 0)], False),  # cuda:1 only has PTX of CUDA 13.1, which a 13.0 driver cannot compile
    ((12, 9), [(9, 0)], False),  # an older major runs nothing
])
def test_cuda_backend_passes_over_ptx_newer_than_the_driver(gpus, monkeypatch, driver, caps, served):
    """A GPU reached only through +PTX needs a driver that knows the PTX's CUDA version, minor included; a GPU with a
    cubin needs the same CUDA major only."""
    from dsrb.ops import _registry

    monkeypatch.setattr(_registry, "_driver_cuda_version", lambda: driver)
    gpus += caps
    why = _registry._cuda_kernels_unusable("9.0+PTX", "Build cuda_13.1.r13.1/compiler.36836380_0")
    assert (why is None) is served, why
    if not served and driver[0] == 13:
        assert "does not cover cuda:1 (Fake GPU 1, compute capability 10.0) with a cubin (its PTX, from CUDA 13.1, " \
               "is newer than this machine's driver, CUDA 13.0, can compile" in why, why
        assert 'rebuild: export TORCH_CUDA_ARCH_LIST="10.0;9.0+PTX"' in why, why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_driver_cuda_version_is_read_on_a_gpu():
    from dsrb.ops import _registry

    driver = _registry._driver_cuda_version()  # torch runs here, so the driver has at least torch's CUDA major
    assert driver is not None and driver[0] >= int(torch.version.cuda.split(".")[0]), driver


def test_gpu_coverage_check_is_not_traced_by_the_compiler(gpus, monkeypatch):
    """The first op call may happen inside torch.compile(fullgraph=True): the device queries must not break it."""
    from dsrb.ops import _registry

    @torch.compiler.disable  # what the compiler cannot trace, as torch.cuda's device queries on a real GPU
    def visible_gpus():
        return [(0, "Fake GPU 0", (8, 0))]

    monkeypatch.setattr(_registry, "_visible_gpus", visible_gpus)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + (1 if _registry._cuda_kernels_unusable("9.0", "Build cuda_13.0.r13.0") else 0)

    assert f(torch.zeros(2)).tolist() == [1.0, 1.0]


def test_triton_import_check_is_not_traced_by_the_compiler(monkeypatch):
    """Nor the triton backend's import check (importlib.import_module, which the compiler refuses to trace), asked
    when the first op call that may pick triton happens inside torch.compile(fullgraph=True)."""
    from dsrb.ops import _registry

    monkeypatch.setattr(_registry, "_TRITON_UNAVAILABLE", {})  # not asked yet

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + (1 if _registry._triton_unavailable() is None else 0)

    assert f(torch.zeros(2)).tolist() == [1.0, 1.0]  # triton 3.7.1 is a test dependency: it imports


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_first_op_call_inside_a_compiled_graph(monkeypatch, backend):
    """The first op call of a process may be the first forward of a model under torch.compile(fullgraph=True): choosing
    the backend then asks whether the C++ extension is loaded, which reads the environment and the build (e.g.
    os.cpu_count, which the compiler cannot trace); it is asked as a constant. Before, that first call failed."""
    from dsrb.ops import _registry

    monkeypatch.setattr(_registry, "_SELECTED", {})  # no choice made yet in this process

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, u, e, v):
        return ops.semantic_attention(x, u, e, v, backend=backend)

    args = (torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(6, 5), torch.randn(5))
    for got, want in zip(f(*args), ops.semantic_attention(*args, backend=backend)):
        assert_close(got, want)


def test_compiled_op_calls_neither_read_nor_write_the_choice_cache(monkeypatch):
    """Traced, an op's backend choice is made afresh as a constant of the graph: reading the cache made the compiler
    guard on its contents, so a graph traced before any eager call was compiled again once an eager call (a
    prototype pass, an evaluation) filled it; writing it inside the trace is a side effect, which strict torch.export
    warns of (tests/test_export.py)."""
    from dsrb.ops import _registry

    monkeypatch.setattr(_registry, "_SELECTED", {})
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda *a: ops.instance_blend(*a, validate=False), backend=counting, fullgraph=True)
    args = (torch.randn(4, 3, 8), torch.randint(-1, 2, (4, 3)).float(), torch.full((1,), 0.5))
    f(*args)
    assert _registry._SELECTED == {}  # not written while traced
    ops.instance_blend(*args, validate=False)  # an eager call fills it
    assert len(_registry._SELECTED) == 1
    for got, want in zip(f(*args), ops.instance_blend(*args, validate=False)):
        assert_close(got, want)
    assert len(graphs) == 1, "the compiled call was traced again after the eager call"


def test_importing_the_ops_leaves_the_compiler_unloaded():
    """Every tool imports dsrb.ops at start; torch._dynamo (1.3 s to import) is for runs that compile or train (an
    optimizer step imports it), not for `--help`, `dsrb.info` or `dsrb.predict`."""
    code = "import sys, dsrb.ops; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[-2] == "[]", res.stdout


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The dsrb ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dsrb":
            self.ops.add(func.name())
        return func(*args, **(kwargs or {}))


def _python_backend_calls():
    """(name, fn(backend), leaves) for the three ops with autograd, on small random inputs."""
    g = torch.Generator().manual_seed(0)
    B, N, C, D, I = 2, 5, 3, 4, 6
    x, u, e, v = (torch.randn(s, generator=g, dtype=torch.float64).requires_grad_()
                  for s in ((B, N, D), (B, N, I), (C, I), (I,)))
    S = torch.randn(B, C, D, generator=g, dtype=torch.float64).requires_grad_()
    T = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    coef = torch.tensor([0.3], dtype=torch.float64).requires_grad_()
    bank = torch.randn(C, 4, D, generator=g, dtype=torch.float64).requires_grad_()
    q, shift = torch.zeros(B, C, dtype=torch.long), torch.ones(B, C, dtype=torch.long)
    select = torch.tensor([[False, True, False], [True, False, True]])
    return [
        ("semantic_attention", lambda backend: ops.semantic_attention(x, u, e, v, backend=backend), (x, u, e, v)),
        ("instance_blend", lambda backend: ops.instance_blend(S, T, coef, backend=backend), (S, coef)),
        ("prototype_blend", lambda backend: ops.prototype_blend(S, T, coef, bank, q, shift, select, backend=backend),
         (S, coef, bank)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_python_backend_eager_path_and_compiled_op_agree(case):
    """Eager calls of a Python-defined backend skip the custom op (an autograd.Function runs the same forward and
    formula: less host time); under torch.compile the custom op is traced. Both give the same values and gradients,
    and neither differentiates twice (an error, never a silent zero)."""
    name, fn, leaves = _python_backend_calls()[case]
    log = _OpLog()
    with log:
        out = fn("torch")
        grads = torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(out)), leaves, create_graph=True)
    assert not any(op.startswith(f"dsrb::{name}_torch") for op in log.ops), log.ops
    compiled = torch.compile(lambda: fn("torch"), fullgraph=True, backend="aot_eager")
    # Donated buffers (torch 2.11 compiles the backward with them on) refuse create_graph=True before our op's
    # double-backward error can be seen.
    with torch._functorch.config.patch(donated_buffer=False):
        out_c = compiled()
        grads_c = torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(out_c)), leaves, create_graph=True)
    for got, want in zip(list(out_c) + list(grads_c), list(out) + list(grads)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g in (grads, grads_c):
        with pytest.raises(RuntimeError, match="cannot be differentiated|does not require grad|double backward"):
            torch.autograd.grad(g[0].sum(), leaves[0])


@pytest.mark.parametrize("case", range(5))
def test_trace_torch_backend_compiles_the_pytorch_code(case):
    """Inside ops.trace_torch_backend() torch.compile traces the torch backend's PyTorch code (no custom op runs,
    autograd derives the backward) with the values and gradients of the eager op, detach_target included; outside
    it, the same compiled function is recompiled to call the custom op again."""
    calls = _python_backend_calls()
    S, T, coef = calls[1][2][0], torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64), calls[1][2][1]
    bank, (q, shift) = calls[2][2][2], (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    select = torch.tensor([[False, True, False], [True, False, True]])
    calls += [  # the blends with detach_target: alpha and beta get no gradient through the soft targets
        ("instance_blend", lambda b: ops.instance_blend(S, T, coef, detach_target=True, backend=b), (S, coef)),
        ("prototype_blend", lambda b: ops.prototype_blend(S, T, coef, bank, q, shift, select, detach_target=True,
                                                          backend=b), (S, coef, bank)),
    ]
    name, fn, leaves = calls[case]

    def value_and_grads(f):
        out = f()
        return list(out) + list(torch.autograd.grad(sum(o.sum() * (i + 2) for i, o in enumerate(out)), leaves))

    want = value_and_grads(lambda: fn("torch"))
    graphs = []  # the dsrb ops in each graph that dynamo hands to the compiler

    def recording_backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if str(n.target).startswith("dsrb.")})
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()  # every case compiles the same lambda: no recompile limit across cases
    compiled = torch.compile(lambda: fn("torch"), fullgraph=True, backend=recording_backend)
    with ops.trace_torch_backend():
        got = value_and_grads(compiled)
    assert graphs == [set()], graphs  # the op's PyTorch code was traced
    assert len(got) == len(want)
    for g, w in zip(got, want):  # autograd's derived backward against the hand-written one: rounding apart
        assert_close(g, w, what=name)
    again = value_and_grads(compiled)
    assert graphs == [set(), {f"dsrb.{name}_torch.default"}], graphs  # recompiled: the custom op again
    for g, w in zip(again, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
