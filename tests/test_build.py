"""Where the build looks for nvcc (dsrb/_build.py): CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda, as
torch does; a GPU machine whose nvcc is only in /usr/local/cuda/bin still gets the CUDA kernels."""

import os
import stat

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
