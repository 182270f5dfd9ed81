"""``python -m dsrb.info``: versions, what was built, and which backend serves each op, with reasons."""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds (torch) or a minute (first-use build)
    import os

    from ._cli import start

    # a report, harmless in every rank, that shows a DSRB_BACKEND typo before refusing it
    start("python -m dsrb.info", one_process=False, require_ext=False, backend_env=False)
    # info is the tool that says why the extension is missing: DSRB_REQUIRE_EXT=1 (CI) would make the imports below
    # raise instead, so main() checks it after the report.
    _REQUIRED = os.environ.pop("DSRB_REQUIRE_EXT", None)

import importlib.util
import os
import platform
import sys
from typing import Dict, Optional

import torch

from . import __version__, _ext
from ._cli import ArgumentParser
from .inference import print_out, run_main
from .ops import BACKEND_CHOICES, KNOWN_BACKENDS, OPS, reasons, selected_backend


def _optional_version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        mod = __import__(module)
    except Exception as exc:  # this tool says why a backend is missing: a broken install is one of the reasons
        return f"installed but fails to import ({type(exc).__name__}: {exc})"
    return getattr(mod, "__version__", "installed")


def _driver() -> str:
    from .ops._registry import _driver_cuda_version

    version = _driver_cuda_version()
    return f"; the driver supports CUDA {version[0]}.{version[1]}" if version else ""


def _extension_lines() -> list:
    ext = _ext.load()
    if not ext.loaded:
        return [f"C++/CUDA extension: not available: {ext.reason}"]
    info = ext.info
    if info.get("cuda"):
        cuda = f"CUDA kernels for arch {info.get('cuda_arch_list')} ({info.get('nvcc')})"
    elif ext.cuda_reason:
        cuda = "no CUDA kernels (they failed to build: see the cuda backend below)"
    else:
        cuda = "no CUDA kernels (nvcc not found at build time, or DSRB_BUILD_CUDA=0)"
    return [
        f"C++/CUDA extension: {ext.path} ({ext.origin})",
        f"  built for torch {info.get('torch')}, python {info.get('python')}, sources {info.get('source_hash')}",
        f"  CPU kernels (flags {' '.join(info.get('cxx_flags', []))}); {cuda}",
    ]


def report() -> str:
    lines = [
        f"dsrb {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {_optional_version('numpy')}, "
        f"triton {_optional_version('triton')}",
        f"CUDA available: {torch.cuda.is_available()} (torch built with CUDA {torch.version.cuda}{_driver()})",
        *_extension_lines(),
        "",
    ]
    devices = _devices()
    width = max(len(op) for op in OPS)
    forced = os.environ.get("DSRB_BACKEND")
    for device in devices:
        header = f"ops on {device.type} (float32)"
        lines.append(f"{header:<{width + 4}}" + "  ".join(f"{n:<6}" for n in ("serves",) + KNOWN_BACKENDS))
        notes = {}
        for op in OPS:
            why = reasons(op, device, torch.float32)
            notes.update({n: r for n, r in why.items() if r is not None})
            cells = "  ".join(f"{c:<6}" for c in [_serves(op, device)] + ["yes" if why[n] is None else "no"
                                                                           for n in KNOWN_BACKENDS])
            lines.append(f"  {op:<{width}}  {cells}".rstrip())
        lines += [f"  {name}: {why}" for name, why in notes.items()] + _other_dtypes(device) + [""]
    lines.append("serves: what backend='auto' (the default) runs"
                 + (f", here DSRB_BACKEND={forced}" if forced else "; DSRB_BACKEND=<name> forces one") + "; yes/no: "
                 "what each backend can serve")
    return "\n".join(lines)


def _other_dtypes(device: torch.device) -> list:
    """Lines saying how the table, made for float32, reads for the other dtypes the ops take: alike, or each
    (op, backend) whose answer differs, with the reason (float64 on a GPU: triton serves none)."""
    alike, lines = [], []
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        name = str(dtype).replace("torch.", "")
        changes: Dict[str, list] = {}  # what changes -> the ops it changes for
        for op in OPS:
            if _serves(op, device, dtype) != _serves(op, device):
                changes.setdefault(f"served by {_serves(op, device, dtype)}", []).append(op)
            base, here = reasons(op, device, torch.float32), reasons(op, device, dtype)
            for b in KNOWN_BACKENDS:
                if (base[b] is None) != (here[b] is None):
                    changes.setdefault(f"{b} {'no: ' + here[b] if here[b] else 'yes'}", []).append(op)
        diffs = [f"{'all ops' if ops == list(OPS) else ', '.join(ops)} {change}" for change, ops in changes.items()]
        if diffs:
            lines.append(f"  {name}: " + "; ".join(diffs))
        else:
            alike.append(name)
    return ([f"  {', '.join(alike)}: as float32"] if alike else []) + lines


def _devices() -> list:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _serves(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    try:
        return selected_backend(op, device, dtype)
    except (RuntimeError, ValueError):  # a DSRB_BACKEND that cannot serve it, or not a backend's name
        return "none"


def main(argv=None, require: Optional[str] = None) -> None:
    """``require``: the DSRB_REQUIRE_EXT value to check after the report. Exit status 1, after the report, where it
    fails or DSRB_BACKEND is not a backend's name or names one that serves no op here."""
    ArgumentParser(prog="python -m dsrb.info", description=__doc__.split(":", 1)[1].strip()).parse_args(argv)
    print_out(report() + "\n")  # a failed write (a full disk) is one error line, a closed pipe a quiet exit (run_main)
    errors = []
    forced = os.environ.get("DSRB_BACKEND") or "auto"
    if forced not in BACKEND_CHOICES:  # every tool refuses it; the report shows it serving nothing
        errors.append(f"environment variable DSRB_BACKEND: expected one of {BACKEND_CHOICES}, got {forced!r}")
    elif all(_serves(op, device) == "none" for op in OPS for device in _devices()):  # every op would fail
        device = _devices()[-1]
        errors.append(f"environment variable DSRB_BACKEND={forced}: serves no op on this machine "
                      f"({device.type}: {reasons(OPS[0], device, torch.float32)[forced]})")
    if require is not None:
        os.environ["DSRB_REQUIRE_EXT"] = require
        try:
            _ext.load()
        except ImportError as err:  # the extension is missing
            errors.append(str(err))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":  # a closed stdout, or one that cannot be written, is one error line, as in the other tools
    run_main("python -m dsrb.info", lambda: main(require=_REQUIRED))
