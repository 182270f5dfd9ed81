"""Every Triton kernel compiles for sm_90 (H100/H200) without register spills, and for sm_80 (A100, where ``auto``
serves CUDA tensors with Triton unless the extension is rebuilt for it), checked on a machine without a GPU.

The interpreter tests check the kernels' maths; this checks what only the GPU compiler sees: that each launch the
launchers make at the benchmark shapes (every dtype at COCO) lowers through Triton and ptxas, fits the block's
shared memory and registers, and on sm_90, the architecture the block sizes are tuned for, that ptxas reports no
spilled registers. ``tests/gpu_compile.py`` does the work in a subprocess, because the kernels must be JIT
functions there, not the interpreted ones this test session holds (tests/conftest.py sets TRITON_INTERPRET).
"""

import inspect
import json
import os
import subprocess
import sys
import tempfile

import pytest

from helpers import version_of

triton = pytest.importorskip("triton")

SCRIPT = os.path.join(os.path.dirname(__file__), "gpu_compile.py")
# The limits the Triton runtime checks when it loads a kernel (CompiledKernel._init_handles): shared memory per block
# (the opt-in maximum: 227 KiB on sm_90, 163 KiB on sm_80) and the threads a block may have with the registers it
# uses (a 64 Ki-register file on both, allocated per warp in units of 256 registers).
SHARED_PER_BLOCK = {90: 232448, 80: 166912}
REGISTERS_PER_SM = 65536
MAX_SPILL_BYTES = {90: 0, 80: 16}


def max_threads(registers: int) -> int:
    per_warp = -(-registers * 32 // 256) * 256
    return min(1024, 32 * (REGISTERS_PER_SM // per_warp))


PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


ARCHS = (90, 80)
# Under pytest-xdist (`-n auto --dist loadgroup`, the README's command) this file's tests share one worker, which
# compiles once; otherwise each worker that ran one of them would compile everything again.
pytestmark = pytest.mark.xdist_group("gpu_compile")


@pytest.fixture(scope="module")
def reports():
    """{arch: (exit status, stdout, stderr)} of ``gpu_compile.py --arch`` for each of ARCHS, run side by side (each
    is one busy core for a minute or two on a cold Triton cache)."""
    if not os.path.exists(PTXAS):
        pytest.skip(f"this triton build ships no ptxas ({PTXAS}): cannot compile for a GPU here")
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip(f"triton {triton.__version__} has the older ASTSource(constants, AttrsDescriptor) interface, "
                    "which gpu_compile.py does not speak (CI and the GPU host have triton 3.7 and 3.6)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {}
    try:
        for arch in ARCHS:  # output to files: a full pipe would stall one compile until the other had finished
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            runs[arch] = (subprocess.Popen([sys.executable, SCRIPT, "--arch", str(arch)], stdout=out, stderr=err,
                                           text=True, env=env), out, err)
        results = {}
        for arch, (proc, out, err) in runs.items():
            proc.wait(timeout=900)
            out.seek(0), err.seek(0)
            results[arch] = (proc.returncode, out.read(), err.read())
        return results
    finally:
        for proc, out, err in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close(), err.close()


@pytest.fixture(params=ARCHS, ids=[f"sm{a}" for a in ARCHS])
def report(request, reports):
    """(arch, kernels line, launch records) of ``gpu_compile.py --arch``."""
    returncode, stdout, stderr = reports[request.param]
    assert returncode == 0, stderr[-4000:]
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return request.param, lines[0], lines[1:]


def test_every_kernel_is_compiled(report):
    kernels, launches = report[1]["kernels"], report[2]
    assert len(kernels) >= 9, kernels  # three semantic_attention kernels and six for the other four ops
    assert sorted({r["kernel"] for r in launches}) == kernels
    cases = {r["case"] for r in launches}
    assert {"coco/float32", "coco/bfloat16", "coco/float16", "coco/float64", "vg-b32/float32"} <= cases


def test_no_compile_errors(report):
    errors = [f"{r['kernel']} {r['case']} {r['constants']}: {r['error']}" for r in report[2] if "error" in r]
    if version_of("triton") < (3, 5):  # tl.dot takes float64 from triton 3.5; the triton backend leaves float64 alone
        errors = [e for e in errors if not ("/float64 " in e and "tl.dot" in e)]
    assert not errors, "\n".join(errors)


@pytest.mark.skipif(version_of("triton") < (3, 6), reason="the block sizes are chosen spill-free for the ptxas of "
                    "triton 3.6 and 3.7 (the GPU host's and CI's); older ones spill a few bytes in some launches, a "
                    "matter of speed, not of results")
def test_no_register_spills(report):
    """ptxas -v for sm_90a: 0 bytes of spill stores and loads for every compiled launch. On sm_80, which the block
    sizes are not tuned for, at most a few bytes (4 in the semantic_attention backward with triton 3.7.1)."""
    rows = [r for r in report[2] if "error" not in r]
    # every figure was read off ptxas's report: a changed report format must fail here, not pass as "no spills"
    assert rows and all(r[k] is not None for r in rows for k in ("registers", "spill_stores", "spill_loads"))
    spills = [f"{r['kernel']} {r['case']} num_warps={r['num_warps']} {r['constants']}: {r['registers']} registers, "
              f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
              for r in rows if max(r["spill_stores"], r["spill_loads"]) > MAX_SPILL_BYTES[report[0]]]
    assert not spills, "\n".join(spills)


def test_every_launch_fits_an_sm(report):
    """Shared memory and registers within what the GPU gives one block, else the launch fails with OutOfResources."""
    arch, rows = report[0], [r for r in report[2] if "error" not in r]
    assert rows and all(isinstance(r["shared"], int) for r in rows)
    too_big = [f"{r['kernel']} {r['case']} num_warps={r['num_warps']} {r['constants']}: {r['shared']} B shared "
               f"(limit {SHARED_PER_BLOCK[arch]}), {r['registers']} registers (at most {max_threads(r['registers'])} "
               "threads)" for r in rows
               if r["shared"] > SHARED_PER_BLOCK[arch] or 32 * r["num_warps"] > max_threads(r["registers"])]
    assert not too_big, "\n".join(too_big)


def test_every_launch_is_on_its_tensors_device(report):
    """Each kernel is launched inside ``device_guard`` of its tensors' device (Triton uses the current device)."""
    assert report[1]["unguarded"] == []
