"""Where the build looks for nvcc (dsrb/_build.py): CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda, as
torch does; a GPU machine whose nvcc is only in /usr/local/cuda/bin still gets the CUDA kernels. And what the CUDA
glue (csrc/cuda/glue.cpp) needs of the torch it runs with."""

import ctypes
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from dsrb import _build


def _fake_nvcc(folder) -> str:
    path = os.path.join(folder, "bin", "nvcc")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def test_find_nvcc_order(tmp_path, monkeypatch):
    home, on_path = _fake_nvcc(tmp_path / "home"), _fake_nvcc(tmp_path / "path")
    default = "/usr/local/cuda/bin/nvcc"
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", os.path.dirname(on_path))
    assert _build.find_nvcc() == home
    monkeypatch.delenv("CUDA_HOME")
    assert _build.find_nvcc() == on_path
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc on PATH: the default location, when it is there
    monkeypatch.setattr(_build.os, "access", lambda p, mode: p == default)
    assert _build.find_nvcc() == default
    monkeypatch.setattr(_build.os, "access", lambda p, mode: False)
    assert _build.find_nvcc() is None


def test_arch_list_gencode_flags():
    assert _build.gencode_flags("8.0;9.0+PTX 9.0a 10.0f 90") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100f,code=sm_100f", "-gencode=arch=compute_90,code=sm_90"]
    for bad in ("Hopper", "9.0x", "9.", "9.0+ptx"):
        with pytest.raises(_build.BuildError, match=f"TORCH_CUDA_ARCH_LIST: cannot read '{re.escape(bad)}'"):
            _build.gencode_flags(bad)


@pytest.mark.parametrize("archs, capability, runs", [
    ("9.0", (9, 0), True), ("9.0", (8, 0), False), ("9.0", (10, 0), False),  # the default: H100/H200 only
    ("8.0", (8, 6), True), ("8.0", (8, 9), True), ("8.6", (8, 0), False),  # a cubin runs on later minors only
    ("9.0+PTX", (10, 0), True), ("9.0+PTX", (12, 0), True), ("9.0+PTX", (8, 9), False),  # PTX: any later GPU
    ("9.0a", (9, 0), True), ("9.0a+PTX", (10, 0), False),  # architecture-specific: that GPU only
    ("10.0f", (10, 3), True), ("10.0f+PTX", (12, 0), False),  # family-specific: that major
    ("8.0;9.0", (8, 9), True), ("7.5 8.0", (9, 0), False),
])
def test_arch_list_runs_on(archs, capability, runs):
    """CUDA's compatibility rules, which decide whether the cuda backend may serve a GPU (dsrb/ops/_registry.py)."""
    assert _build.runs_on(archs, capability) is runs


@pytest.mark.parametrize("archs, capability, runs", [
    ("9.0+PTX", (9, 0), True), ("9.0+PTX", (9, 2), True), ("9.0+PTX", (10, 0), False),  # a cubin where one is built
    ("8.0;9.0+PTX", (12, 0), False), ("8.0;9.0+PTX;12.0", (12, 0), True),
])
def test_arch_list_runs_on_without_ptx(archs, capability, runs):
    """With ptx=False only cubins count: what a driver older than the PTX can still run."""
    assert _build.runs_on(archs, capability, ptx=False) is runs


def _current_stream_function():
    """What glue.cpp's stream_of looks up: aoti_torch_get_current_cuda_stream, through dlopen("libtorch_cuda.so",
    RTLD_LAZY | RTLD_NOLOAD), in the library `import torch` has loaded."""
    lib = ctypes.CDLL("libtorch_cuda.so", mode=os.RTLD_LAZY | os.RTLD_NOLOAD)
    assert hasattr(lib, "aoti_torch_get_current_cuda_stream"), "this torch does not export the function the glue uses"
    current = lib.aoti_torch_get_current_cuda_stream
    current.argtypes, current.restype = [ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int32
    return current


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch has no libtorch_cuda.so (the cuda "
                    "backend needs a CUDA build; gpu_rehearsal.sh and gpu_session.sh run one)")
def test_cuda_glue_finds_torchs_current_stream_function():
    assert callable(_current_stream_function())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_glue_gets_torchs_current_stream():
    """The function gives torch's current stream, a side stream included: the cuda kernels queue where torch does."""
    current = _current_stream_function()
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
        with torch.cuda.stream(stream):
            handle = ctypes.c_void_p()
            assert current(torch.cuda.current_device(), ctypes.byref(handle)) == 0
            assert (handle.value or 0) == stream.cuda_stream


def test_package_metadata_builds_without_deprecated_license_forms(tmp_path):
    """setuptools >= 77 deprecates pyproject's license table (an error from 2027) and setuptools < 77 refuses the SPDX
    string: setup.py gives the form the running setuptools takes, and the metadata says Apache-2.0 without a warning."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(_build.__file__)))
    res = subprocess.run([sys.executable, "-W", "always", "setup.py", "-q", "egg_info", "-e", str(tmp_path)], cwd=root,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, DSRB_BUILD_CUDA="0"))
    assert res.returncode == 0, res.stderr
    assert "licen" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    (info,) = tmp_path.glob("*.egg-info/PKG-INFO")
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", info.read_text(), re.M)
