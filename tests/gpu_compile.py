"""Compile every Triton kernel for an H100/H200 (sm_90) or an A100 (sm_80) on a machine without a GPU, and report
register use.

The interpreter (TRITON_INTERPRET=1) checks the kernels' maths on the CPU but never runs Triton's GPU compiler, so
a kernel can pass every CPU test and still fail to compile, or spill registers, on the GPU. This module calls each
launcher of ``kernels/`` at the benchmark shapes with the launch recorded instead of run (the kernel objects are
swapped for recorders), turns each recorded launch into the signature, constants and divisibility hints the Triton
runtime would derive from the same arguments, compiles it ahead of time for ``GPUTarget("cuda", 90, 32)`` (or 80)
and runs the ptxas that ships with triton (``-v``) on the PTX for registers and spills. No GPU and no CUDA driver
are needed.

Run it as a script in a process where TRITON_INTERPRET is not set (the kernels must be JIT functions, not
interpreted ones): ``python tests/gpu_compile.py [--arch 80]`` prints a JSON line with the names of all kernels (and of those
launched outside a ``device_guard`` of their tensors' device), then one per distinct launch (kernel, case,
constants, num_warps, shared memory, registers, spill bytes, or the compiler's error).
``tests/test_triton_gpu_compile.py`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Tuple

import torch
import triton

# (name, B, N, C, D, I, dtypes): the benchmark shapes (coco in every dtype a kernel takes, vg-b32), a large map
# (14 x 14: N > BLOCK_N) and the odd sizes of the GPU tests (the smallest blocks). Other shapes change only runtime
# sizes, not what is compiled, except through the block-size rules, which these cover.
SHAPES = [("coco", 8, 49, 80, 1024, 512, (torch.float32, torch.bfloat16, torch.float16, torch.float64)),
          ("vg-b32", 32, 49, 200, 1024, 512, (torch.float32, torch.bfloat16)),
          ("n196", 4, 196, 20, 256, 64, (torch.float32,)),
          ("odd", 2, 13, 20, 33, 17, (torch.float32, torch.bfloat16, torch.float16, torch.float64))]
SMS = {90: 132, 80: 108}  # H200, A100: the SM count the launch policy (k split, backward groups) is recorded with
_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call, runs nothing;
    a launch made outside a ``device_guard`` of its tensors' device is noted in ``unguarded``."""

    def __init__(self, fn, log: List[Tuple[Any, tuple, dict]], guards: List[torch.device], unguarded: set):
        self.fn, self.log, self.guards, self.unguarded = fn, log, guards, unguarded

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            if not self.guards or devices != {self.guards[-1]}:
                self.unguarded.add(self.fn.__name__)
            self.log.append((self.fn, args, kwargs))
        return launch


def _signature(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) as the Triton runtime specialises these arguments."""
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TT[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the runtime turns an int argument equal to 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name!r} of type {type(value).__name__} is not handled")
    return signature, constexprs, attrs, options


def _launches(sms: int) -> Tuple[List[Tuple[str, Any, tuple, dict]], List[str], List[str]]:
    """Every kernel launch the launchers make at SHAPES, recorded (label, fn, args, kwargs), the names of all the
    kernels found (so that a kernel no launch reaches is noticed), and those launched outside a device guard of their
    tensors' device (Triton launches on the current device, whatever the tensors': on a second GPU such a launch
    reads another device's addresses)."""
    mods = {n: importlib.import_module(f"dsrb.kernels.{n}") for n in
            ("semantic_attention", "instance_blend", "prototype_blend", "prototype_bank_update", "quadrant_index")}
    log: List[Tuple[Any, tuple, dict]] = []
    kernels, guards, unguarded = [], [], set()

    @contextlib.contextmanager
    def device_guard(t):
        guards.append(t.device)
        try:
            yield
        finally:
            guards.pop()

    for mod in mods.values():
        mod.device_guard = device_guard  # each launcher module imports the helper by this name
        for attr in dir(mod):
            obj = getattr(mod, attr)
            if isinstance(obj, triton.runtime.JITFunction) and attr.endswith("_kernel"):
                setattr(mod, attr, _Recorder(obj, log, guards, unguarded))
                kernels.append(attr)
    sa, ib, pb = mods["semantic_attention"], mods["instance_blend"], mods["prototype_blend"]
    bu, qi = mods["prototype_bank_update"], mods["quadrant_index"]
    # The launch policy as on the GPU (k split and backward groups > 1 at coco), not as on CPU tensors (1 SM).
    sa._sm_count = lambda device: sms
    out = []
    for label, B, N, C, D, I, dtypes in SHAPES:
        for dtype in dtypes:
            def z(*shape, dt=dtype):
                return torch.zeros(shape, dtype=dt)

            q = torch.zeros((B, C), dtype=torch.int64)
            partner = torch.arange(B).flip(0)
            start = len(log)
            x, u, e, v = z(B, N, D), z(B, N, I), z(C, I), z(I)
            sa.semantic_attention_forward(x, u, e, v)
            sa.semantic_attention_forward(x, u, e, v, ksplit=4)
            sa.semantic_attention_backward(z(B, C, D), z(B, C, N), x, u, e, v, z(B, C, N))
            sa.semantic_attention_backward(z(B, C, D), z(B, C, N), x, u, e, v, z(B, C, N), groups=1)
            S, T = z(B, C, D), z(B, C)
            ib.instance_blend_forward(S, T, z(), partner)
            for detach in (False, True):
                ib.instance_blend_backward(S, T, S, T, z(), partner, detach)
            beta, bank, shift, select = z(), z(C, 4, D), q + 1, torch.zeros((B, C), dtype=torch.bool)
            pb.prototype_blend_forward(S, T, beta, bank, q, shift, select)
            for detach in (False, True):
                for bank_grad in (False, True):
                    pb.prototype_blend_backward(S, T, S, beta, bank, q, shift, select, detach, bank_grad)
            bu.prototype_bank_update(z(C, 4, D), torch.zeros((C, 4), dtype=torch.int64), S, T, q, 100)
            side = int(N ** 0.5)
            if side * side == N:
                qi.quadrant_index(z(B, C, N), z(B, N), side, side)
            out += [(f"{label}/{str(dtype).replace('torch.', '')}",) + rec for rec in log[start:]]
    # A map too large for one register tile (100 x 100: the tiled quadrant kernel).
    for dtype in (torch.float32, torch.bfloat16):
        start = len(log)
        qi.quadrant_index(torch.zeros((2, 3, 100 * 100), dtype=dtype), torch.zeros((2, 100 * 100), dtype=dtype), 100,
                          100)
        out += [(f"map100/{str(dtype).replace('torch.', '')}",) + rec for rec in log[start:]]
    # The int64-offset variants (IDX64, for tensors spanning 2**31 elements or more), at the odd shape.
    for mod in mods.values():
        mod.needs_int64 = lambda *tensors: True
    start = len(log)
    B, N, C, D, I = 2, 13, 20, 33, 17
    x, u, e, v, S, T = (torch.zeros(s) for s in ((B, N, D), (B, N, I), (C, I), (I,), (B, C, D), (B, C)))
    q, partner = torch.zeros((B, C), dtype=torch.int64), torch.arange(B).flip(0)
    select = torch.zeros((B, C), dtype=torch.bool)
    sa.semantic_attention_backward(S, torch.zeros(B, C, N), x, u, e, v, sa.semantic_attention_forward(x, u, e, v)[1])
    ib.instance_blend_forward(S, T, torch.zeros(()), partner)
    ib.instance_blend_backward(S, T, S, T, torch.zeros(()), partner, False)
    pb.prototype_blend_forward(S, T, torch.zeros(()), torch.zeros(C, 4, D), q, q + 1, select)
    pb.prototype_blend_backward(S, T, S, torch.zeros(()), torch.zeros(C, 4, D), q, q + 1, select, False, True)
    bu.prototype_bank_update(torch.zeros(C, 4, D), torch.zeros((C, 4), dtype=torch.int64), S, T, q, 100)
    qi.quadrant_index(torch.zeros(B, C, 49), torch.zeros(B, 49), 7, 7)
    out += [("idx64/float32",) + rec for rec in log[start:]]
    return out, kernels, sorted(unguarded)


def _ptxas_usage(ptx: str, arch: str) -> Dict[str, int]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", "--gpu-name", arch, f.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True)
    finally:
        os.unlink(f.name)
    usage = {}
    for key, pattern in (("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads")):
        found = re.search(pattern, res.stderr)
        usage[key] = int(found.group(1)) if found else None
    return usage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(SMS), default=90, help="compute capability x 10")
    arch = parser.parse_args(argv).arch
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gpu_compile: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    seen = set()
    launches, kernels, unguarded = _launches(SMS[arch])
    print(json.dumps(dict(kernels=sorted(kernels), unguarded=unguarded)), flush=True)
    for label, fn, args, kwargs in launches:
        signature, constexprs, attrs, options = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        record = dict(kernel=fn.__name__, case=label, num_warps=options.get("num_warps", 4),
                      constants={k: str(v) for k, v in constexprs.items()})
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            record["shared"] = compiled.metadata.shared  # bytes per program (static and pipelining buffers)
            record.update(_ptxas_usage(compiled.asm["ptx"], "sm_90a" if arch == 90 else f"sm_{arch}"))
        except Exception as exc:  # noqa: BLE001 - reported per launch; the test fails on it
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
