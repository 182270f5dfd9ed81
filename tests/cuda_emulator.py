"""The CUDA kernels of csrc/cuda/ run on the CPU, for the tests: `load()` builds them with the host compiler against
the emulation header tests/cuda_emu/cuda_runtime.h, with the real glue (csrc/cuda/glue.cpp, built with
DSRB_CUDA_EMULATION), and registers the glue's ops as ``torch.ops.dsrb_emu.<op>_cuda`` on CPU tensors.

So every CUDA kernel line runs in CI, without a GPU, through the same entry points as on a GPU: the launch plans of
an H200 (132 SMs; DSRB_EMU_SMS to change), the index arithmetic, the tiling, the barriers and warp shuffles (the
threads of a block are fibers switched at barriers, in a new order each round; see cuda_runtime.h for what is
reported as a launch error). What it cannot show: speed, races other than those that the order of threads and
blocks exposes (both are shuffled; no two threads run at once), and the GPU's own error in the PTX approximations:
here ex2.approx and rcp.approx carry a modelled error of up to 2 and 1 ulp (an assumption; cuda_runtime.h,
ulp_error). With 8 ulp on ex2.approx one fp32 semantic_attention case fails its tolerance, with 64 six do: that is
the margin the tests leave the GPU.

Source rewrites make a ``.cu`` file valid C++: ``kernel<<<cfg>>>(args)`` becomes
``::dsrb_emu::launch(::dsrb_emu::config(cfg), &kernel, args)``, each ``asm`` PTX instruction becomes a call of its
emulation (a PTX instruction not known here is an error, so none is silently skipped), and each ``__shared__``
declaration is followed by ``::dsrb_emu::block_shared(&name, sizeof(name));``, which fills the array with 0xFF bytes
at the start of every block (uninitialised on a GPU; a read before a write gives NaN here). A kernel's
``__launch_bounds__(n)`` becomes a check at the top of its body: a launch of more than n threads per block, which a
GPU refuses (too many resources requested for launch), is a launch error here, and the kernel does nothing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu")

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
# asm("op %0, %1;" : "=f"(out) : "f"(in));  (single-output, single-input fp32 instructions)
ASM = re.compile(r'asm\("([\w.]+) %0, %1;"\s*:\s*"=f"\((\w+)\)\s*:\s*"f"\((\w+)\)\);')
PTX = {"ex2.approx.ftz.f32", "rcp.approx.ftz.f32"}
# __shared__ [qualifiers] type name[dims]...;  (static shared memory; dynamic shared memory is not emulated)
SHARED = re.compile(r"(__shared__[^;{}]*?\b([A-Za-z_]\w*)\s*(?:\[[^\]]*\]\s*)*;)")
# __launch_bounds__(max_threads[, min_blocks]) name(params) {  (a kernel definition)
BOUNDS = re.compile(r"__launch_bounds__\(((?:[^()]|\([^()]*\))*)\)([^{;]*)\{")


def emulated_source(text: str, name: str) -> str:
    """A .cu file's text rewritten for the host compiler."""
    text = LAUNCH.sub(lambda m: f"::dsrb_emu::launch(::dsrb_emu::config({m[2]}), &{m[1]}, ", text)

    def ptx(m: re.Match) -> str:
        if m[1] not in PTX:
            raise ValueError(f"{name}: PTX instruction {m[1]!r} has no emulation in tests/cuda_emulator.py")
        return f"{m[2]} = ::dsrb_emu::ptx_{m[1].replace('.', '_')}({m[3]});"

    text = ASM.sub(ptx, text)
    shared = text.count("__shared__")
    text, n = SHARED.subn(lambda m: f"{m[1]} ::dsrb_emu::block_shared(&{m[2]}, sizeof({m[2]}));", text)
    if n != shared:
        raise ValueError(f"{name}: {shared - n} __shared__ declaration(s) not understood; "
                         "extend tests/cuda_emulator.py")
    bounds = text.count("__launch_bounds__")
    text, n = BOUNDS.subn(
        lambda m: f"{m[2]}{{ if (!::dsrb_emu::within_launch_bounds(__LINE__, {m[1]})) return;", text)
    if n != bounds:
        raise ValueError(f"{name}: {bounds - n} __launch_bounds__ not understood; extend tests/cuda_emulator.py")
    for left in ("<<<", "asm(", "asm volatile"):
        if left in text:
            raise ValueError(f"{name}: {left!r} left after the rewrite; extend tests/cuda_emulator.py")
    return text


def toolkit_include() -> Optional[str]:
    """The CUDA toolkit's include folder (for cuda_fp16.h, driver_types.h, ...), or None."""
    from dsrb import _build

    nvcc = _build.find_nvcc()
    if nvcc is None:
        return None
    inc = os.path.join(_build.cuda_home(nvcc), "include")
    return inc if os.path.isfile(os.path.join(inc, "cuda_fp16.h")) else None


@functools.lru_cache(maxsize=None)
def load():
    """Build (cached by the digest of its sources) and load the emulated CUDA ops; returns ``torch.ops.dsrb_emu``.
    Raises RuntimeError when no CUDA toolkit headers are found (the caller skips)."""
    import torch
    from torch.utils import cpp_extension

    from dsrb import _build, _ext

    inc = toolkit_include()
    if inc is None:
        raise RuntimeError("no CUDA toolkit headers (cuda_fp16.h): nvcc not found (set CUDA_HOME)")
    shim = [os.path.join(SHIM, f) for f in ("cuda_runtime.h", "runtime.cpp", "selftest.cpp")]
    # DSRB_EMU_SANITIZE=address: an AddressSanitizer build (run python with LD_PRELOAD=$(gcc
    # -print-file-name=libasan.so) and ASAN_OPTIONS=detect_leaks=0): any out-of-bounds access of a kernel aborts.
    sanitize = os.environ.get("DSRB_EMU_SANITIZE", "")
    digest = hashlib.sha256((_build.source_hash(CSRC) + sanitize).encode())
    for path in shim + [os.path.abspath(__file__)]:
        with open(path, "rb") as f:
            digest.update(f.read())
    build = os.path.join(_ext.cache_root(), f"cuda-emulator-{digest.hexdigest()[:16]}")
    os.makedirs(os.path.join(build, "src"), exist_ok=True)
    sources = _build.cuda_glue_sources(CSRC) + [os.path.join(SHIM, "runtime.cpp")]
    for path in _build.cuda_sources(CSRC) + [os.path.join(SHIM, "selftest.cpp")]:
        with open(path) as f:
            text = emulated_source(f.read(), os.path.basename(path))
        out = os.path.join(build, "src", os.path.splitext(os.path.basename(path))[0] + ".cpp")
        try:
            with open(out) as f:
                same = f.read() == text
        except OSError:
            same = False
        if not same:  # rewritten only when changed (a new mtime makes ninja compile it again)
            tmp = f"{out}.{os.getpid()}.tmp"  # per process: xdist workers build the same emulator at once
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, out)
        sources.append(out)
    # The shim comes first so that #include <cuda_runtime.h> finds it; the toolkit's headers after it.
    flags = ["-O1", "-DDSRB_CUDA_EMULATION", "-ffp-contract=off", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
             f"-I{SHIM}", f"-I{CSRC}", f"-I{inc}"]
    ldflags = ["-Wl,-Bsymbolic"]
    if sanitize:
        flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        ldflags += [f"-fsanitize={sanitize}"]
    cpp_extension.load(name="dsrb_cuda_emulator", sources=sources, extra_cflags=flags, extra_ldflags=ldflags,
                       build_directory=build, is_python_module=False, verbose=False)
    return torch.ops.dsrb_emu


# ---- autograd over the emulated ops (on a GPU it is csrc/autograd.h); an output left out of the loss gets a zero
# gradient, as autograd gives none

class SemanticAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, e, v):
        S, a = load().semantic_attention_cuda(x, u, e, v)
        ctx.save_for_backward(x, u, e, v, a)
        return S, a

    @staticmethod
    def backward(ctx, gS, ga):
        x, u, e, v, a = ctx.saved_tensors
        gS = torch.zeros(x.shape[0], e.shape[0], x.shape[2], dtype=x.dtype) if gS is None else gS
        ga = torch.zeros_like(a) if ga is None else ga
        return load().semantic_attention_cuda_backward(gS, ga, x, u, e, v, a)


class InstanceBlend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S, T, alpha, partner, detach_target):
        ctx.save_for_backward(S, T, alpha, partner)
        ctx.detach_target = detach_target
        return load().instance_blend_cuda(S, T, alpha, partner, detach_target)

    @staticmethod
    def backward(ctx, gS, gT):
        S, T, alpha, partner = ctx.saved_tensors
        gS = torch.zeros_like(S) if gS is None else gS
        gT = torch.zeros_like(T) if gT is None else gT
        grad_S, grad_alpha = load().instance_blend_cuda_backward(gS, gT, S, T, alpha, partner, ctx.detach_target)
        return grad_S, None, grad_alpha, None, None


class PrototypeBlend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S, T, beta, bank, quadrant, shift, select, detach_target):
        ctx.save_for_backward(S, beta, bank, quadrant, shift, select)
        ctx.detach_target = detach_target
        return load().prototype_blend_cuda(S, T, beta, bank, quadrant, shift, select, detach_target)

    @staticmethod
    def backward(ctx, gS, gT):
        S, beta, bank, quadrant, shift, select = ctx.saved_tensors
        gS = torch.zeros_like(S) if gS is None else gS
        gT = S.new_zeros(S.shape[:2]) if gT is None else gT
        grad_S, grad_beta, grad_bank = load().prototype_blend_cuda_backward(
            gS, gT, S, beta, bank, quadrant, shift, select, ctx.detach_target, ctx.needs_input_grad[3])
        return grad_S, None, grad_beta, grad_bank, None, None, None, None
