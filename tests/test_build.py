"""Where the build looks for nvcc (dsrb/_build.py): CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda, as
torch does; a GPU machine whose nvcc is only in /usr/local/cuda/bin still gets the CUDA kernels. And what the CUDA
glue (csrc/cuda/glue.cpp) needs of the torch it runs with."""

import ctypes
import importlib.machinery
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

from dsrb import _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout these tests are in


def _copy_for_setup(src, folders=("dsrb", "kernels", "csrc")):
    """What setup.py needs of the checkout, copied to ``src`` (no built library): a build there leaves ROOT alone."""
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy2(os.path.join(ROOT, name), src / name)
    for name in folders:
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so*"))
    return src


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


@pytest.mark.parametrize("machine, sub", [
    ("x86_64", "lib64"), ("x86_64", "lib"), ("x86_64", "targets/x86_64-linux/lib"),
    ("aarch64", "targets/sbsa-linux/lib"), ("x86_64", "lib/x86_64-linux-gnu"), ("aarch64", "lib/aarch64-linux-gnu"),
])
def test_the_static_cuda_runtime_is_found_where_installers_and_distributions_put_it(tmp_path, monkeypatch, machine,
                                                                                     sub):
    """NVIDIA's installers and conda put libcudart_static.a in lib64, lib or targets/<arch>/lib of the toolkit; a
    Debian/Ubuntu package (nvcc in /usr/bin) in /usr/lib/<multiarch>, where a build found none and stopped."""
    monkeypatch.setattr(_build.platform, "machine", lambda: machine)
    monkeypatch.setattr(_build.sysconfig, "get_config_var", lambda name: None)  # as where Python has no MULTIARCH
    nvcc = _fake_nvcc(tmp_path / "usr")
    (tmp_path / "usr" / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "usr" / sub / "libcudart_static.a").write_bytes(b"!<arch>\n")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    home = _build.cuda_home(nvcc)
    assert home == str(tmp_path / "usr")
    assert _build.cuda_link_flags(nvcc)[0] == f"-L{tmp_path / 'usr' / sub}"


def test_arch_list_gencode_flags():
    assert _build.gencode_flags("8.0;9.0+PTX 9.0a 10.0f 90") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100f,code=sm_100f", "-gencode=arch=compute_90,code=sm_90"]
    for bad in ("hopper", "Hopper+PTX", "9.0x", "9.", "9.0+ptx"):  # torch's names are case-sensitive, end in PTX
        with pytest.raises(_build.BuildError, match=f"TORCH_CUDA_ARCH_LIST: cannot read '{re.escape(bad)}'"):
            _build.gencode_flags(bad)


def test_arch_list_takes_torchs_names(monkeypatch):
    """TORCH_CUDA_ARCH_LIST is torch's variable, whose names (Ampere, Hopper, ...) an environment set for every
    extension may use: they were an error at every import, DSRB_BUILD_CUDA=0 included. Each means what it means to
    torch."""
    assert _build.parse_arch_list("Ampere;Hopper") == _build.parse_arch_list("8.0;8.6+PTX;9.0+PTX")
    assert _build.parse_arch_list("Ampere+Tegra Kepler") == _build.parse_arch_list("8.7 3.5+PTX")
    assert _build.gencode_flags("Hopper") == ["-gencode=arch=compute_90,code=sm_90",
                                              "-gencode=arch=compute_90,code=compute_90"]
    assert _build.runs_on("Ampere", (8, 9)) and _build.runs_on("Ampere", (9, 0))  # 8.6+PTX
    assert not _build.runs_on("Ampere", (9, 0), ptx=False)
    from torch.utils import cpp_extension

    older = {"Blackwell": "10.0+PTX"}  # what an older torch (2.6) means by the name, as the README says
    compared = 0
    for name in _build.NAMED_ARCHS:  # the same -gencode flags as torch's builder, where this torch knows the name
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", name)
        try:
            torchs = cpp_extension._get_cuda_arch_flags()
        except ValueError:  # a name (or an architecture) this torch does not know
            continue
        ours = sorted(set(_build.gencode_flags(name)))
        if ours != torchs and name in older:
            ours = sorted(set(_build.gencode_flags(older[name])))
        assert ours == torchs, name
        compared += 1
    assert compared >= 10


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
    res = subprocess.run([sys.executable, "-W", "always", "setup.py", "-q", "egg_info", "-e", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, DSRB_BUILD_CUDA="0"))
    assert res.returncode == 0, res.stderr
    assert "licen" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    (info,) = tmp_path.glob("*.egg-info/PKG-INFO")
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", info.read_text(), re.M)


def _build_without_torch(kind: str, tmp_path) -> str:
    """Builds a wheel or sdist of a copy of the checkout the way pip's isolated build does, without torch (so without
    the compiled extension: seconds); returns its path."""
    src, out = _copy_for_setup(tmp_path / "src", ("dsrb", "kernels", "csrc", "tests", "benchmarks")), tmp_path / "out"
    code = ("import sys; sys.modules['torch'] = None; from setuptools import build_meta; "
            "print(getattr(build_meta, sys.argv[1])(sys.argv[2]))")
    res = subprocess.run([sys.executable, "-c", code, f"build_{kind}", str(out)], cwd=src, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return str(out / res.stdout.strip().splitlines()[-1])


def _load_build_module(path: str):
    spec = importlib.util.spec_from_file_location("dsrb_build_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheel_carries_the_sources_of_the_first_use_build(tmp_path):
    """`pip install .` (a wheel built without torch) has no compiled extension: it must carry csrc/ as dsrb/_csrc,
    found by source_root() and with the checkout's source hash, so the first-use build works and a wheel built with
    --no-build-isolation finds its own library current."""
    wheel = _build_without_torch("wheel", tmp_path)
    csrc = os.path.join(ROOT, "csrc")
    sources = {os.path.relpath(p, csrc) for p in _build.source_files(csrc)}
    assert {"registration.cpp", os.path.join("cpu", "common.h"), os.path.join("cuda", "common.cuh")} <= sources
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    assert {n[len("dsrb/_csrc/"):] for n in names if n.startswith("dsrb/_csrc/")} == sources
    assert "dsrb/kernels/semantic_attention.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    # the package alone: not the tests or benchmarks the sdist carries (and this build's source folder holds), no
    # top-level package of theirs, no bytecode or library
    assert all(n.startswith(("dsrb/", "dsrb-")) and not n.endswith((".pyc", ".so")) for n in names), sorted(names)

    installed = _load_build_module(str(tmp_path / "site" / "dsrb" / "_build.py"))
    root = installed.source_root()
    assert root == str(tmp_path / "site" / "dsrb" / "_csrc")
    assert installed.source_hash(root) == _build.source_hash(csrc)
    def rel(paths, base):
        return [os.path.relpath(p, base) for p in paths]

    assert rel(installed.cpp_sources(root, with_cuda=True), root) == rel(_build.cpp_sources(csrc, with_cuda=True), csrc)
    assert rel(installed.cuda_sources(root), root) == rel(_build.cuda_sources(csrc), csrc)


def test_strict_editable_install_finds_the_checkouts_sources(tmp_path):
    """pip install -e . --config-settings editable_mode=strict runs the package from a tree of symlinks
    (build/__editable__...): the sources are found where dsrb/_build.py really lives."""
    tree = tmp_path / "build" / "__editable__.dsrb" / "dsrb"
    tree.mkdir(parents=True)
    (tree / "_build.py").symlink_to(_build.__file__)
    linked = _load_build_module(str(tree / "_build.py"))
    assert _build.source_root() is not None and linked.source_root() == _build.source_root()


def test_sdist_carries_the_sources_and_the_license(tmp_path):
    sdist = _build_without_torch("sdist", tmp_path)
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    csrc = os.path.join(ROOT, "csrc")
    assert {os.path.join("csrc", os.path.relpath(p, csrc)) for p in _build.source_files(csrc)} <= names
    assert {"LICENSE", "kernels/semantic_attention.py", "dsrb/_build.py"} <= names
    # the test suite whole, or not at all: its test files alone fail to import helpers, conftest's fixtures, ...
    tests = {p for p in names if p.startswith(("tests/", "benchmarks/"))}
    assert {f"tests/{n}" for n in ("conftest.py", "helpers.py", "cuda_emulator.py", "cuda_emu/runtime.cpp")} <= tests
    assert "benchmarks/conftest.py" in tests


def test_source_hash_follows_sources_not_location(tmp_path):
    """The digest keys the first-use cache and the stale check: same files anywhere give the same digest, a changed
    source or a new one another, a README does not count."""
    csrc = os.path.join(ROOT, "csrc")
    copy = tmp_path / "elsewhere"
    shutil.copytree(csrc, copy)
    assert _build.source_hash(str(copy)) == _build.source_hash(csrc)
    (copy / "README.md").write_text("notes")
    assert _build.source_hash(str(copy)) == _build.source_hash(csrc)
    (copy / "cpu" / "extra.h").write_text("#pragma once\n")
    changed = _build.source_hash(str(copy))
    assert changed != _build.source_hash(csrc)
    (copy / "cpu" / "extra.h").write_text("#pragma once // edited\n")
    assert _build.source_hash(str(copy)) not in (changed, _build.source_hash(csrc))


@pytest.mark.parametrize("value, archs", [(None, "9.0"), ("", "9.0"), ("  ", "9.0"), (" 8.0;9.0+PTX ", "8.0;9.0+PTX")])
def test_arch_list_default_and_value(monkeypatch, value, archs):
    if value is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    assert _build.arch_list() == archs


@pytest.mark.parametrize("value, message", [("9.0a;foo", "cannot read 'foo'"), (";", "no architecture in ';'"),
                                            ("../x", "cannot read '../x'")])
def test_a_bad_arch_list_is_an_error_naming_the_variable(monkeypatch, value, message):
    """A bad TORCH_CUDA_ARCH_LIST was read as is: ';' built for nvcc's own default GPU, a path ended up in the
    first-use cache's folder name, and a typo surfaced only as CUDA kernels that failed to build."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    with pytest.raises(_build.BuildError, match=f"^TORCH_CUDA_ARCH_LIST: {re.escape(message)}"):
        _build.arch_list()


@pytest.mark.parametrize("var, value, message", [
    ("TORCH_CUDA_ARCH_LIST", "9.0;foo", "TORCH_CUDA_ARCH_LIST: cannot read 'foo'"),
    ("MAX_JOBS", "abc", "MAX_JOBS: expected a positive number of parallel compile jobs, got 'abc'"),
    ("DSRB_BUILD_CUDA", "ture", "environment variable DSRB_BUILD_CUDA: expected 1 or 0"),
    ("DSRB_REQUIRE_EXT", "ture", "environment variable DSRB_REQUIRE_EXT: expected 1 or 0"),  # was a traceback
])
def test_setup_refuses_a_bad_setting_before_building(tmp_path, var, value, message):
    """setup.py with nvcc found and TORCH_CUDA_ARCH_LIST=9.0;foo built the CPU kernels alone (a minute), reporting
    CUDA kernels that failed to build; and a bad setting (or DSRB_BUILD_CUDA=1 without nvcc) was a warning pip
    shows only under -v, the install "succeeding" without the extension. Now each is an error naming the variable,
    before any compile, with or without DSRB_REQUIRE_EXT."""
    src = _copy_for_setup(tmp_path / "src")
    _fake_nvcc(tmp_path / "cuda")
    env = {k: v for k, v in os.environ.items() if k not in ("DSRB_BUILD_CUDA", "CUDA_PATH", "DSRB_REQUIRE_EXT")}
    env.update(CUDA_HOME=str(tmp_path / "cuda"), **{var: value})
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "lib"), "-t",
                          str(tmp_path / "tmp")], cwd=src, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0, res.stdout + res.stderr
    # A CUDA build of torch without a CUDA runtime (the GPU rehearsal) says "No CUDA runtime is found" first: a log
    # line ("W1207 ... ] No CUDA ...") from torch 2.11 on, a bare line before.
    ours = "".join(line for line in res.stderr.splitlines(keepends=True)
                   if not re.match(r"[IW]\d{4} .*\] |No CUDA runtime is found", line))
    assert ours.startswith(f"dsrb: error: {message}") and "Traceback" not in res.stderr, res.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so")), "nothing is built"


def test_the_install_time_build_leaves_out_debug_information(tmp_path):
    """setuptools compiles with Python's own CFLAGS first, which carry -g: the CPU kernels an install built were
    18 MB, nearly all debug sections, against 1 MB. A compiler that records its arguments shows -g0 after every -g."""
    src = _copy_for_setup(tmp_path / "src")
    record = tmp_path / "args.txt"
    compiler = tmp_path / "cc"  # answers the version checks with the real compiler, records and fails the rest
    compiler.write_text(f'#!/bin/sh\ncase "$1" in -v|--version|-dumpversion|-dumpfullversion) exec c++ "$@";; esac\n'
                        f'echo "$@" >> {record}\nexit 1\n')
    compiler.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DSRB_REQUIRE_EXT", "CFLAGS", "CXXFLAGS")}
    env.update(DSRB_BUILD_CUDA="0", MAX_JOBS="1", CC=str(compiler), CXX=str(compiler))
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "lib"), "-t",
                    str(tmp_path / "tmp")], cwd=src, capture_output=True, text=True, timeout=300, env=env)
    compiles = [line.split() for line in record.read_text().splitlines() if " -c " in f" {line} "]
    assert compiles, record.read_text()
    for args in compiles:
        last_g = max((i for i, a in enumerate(args) if a.startswith("-g")), default=-1)
        assert last_g >= 0 and args[last_g] == "-g0", args


@pytest.mark.parametrize("old_library", ["older", "newer"])
def test_a_failed_install_time_build_records_no_library(tmp_path, old_library):
    """Without ninja (an environment given torch alone before `pip install --no-build-isolation`), setuptools only
    warns of the optional extension's failed compile, and skips the build of a library newer than the .cpp files
    (blind to a changed header or .cu file): setup.py then wrote a record with the new sources' hash beside the
    library of an earlier build, which loaded as current, and an in-place (editable) install without one failed on
    the missing file. Now the build always runs, and a failed one leaves no record and the install goes on."""
    src = _copy_for_setup(tmp_path / "src")
    compiler = tmp_path / "cc"  # answers the version checks with the real compiler, fails every compile
    compiler.write_text('#!/bin/sh\ncase "$1" in -v|--version|-dumpversion|-dumpfullversion) exec c++ "$@";; esac\n'
                        'exit 1\n')
    compiler.chmod(0o755)
    library = src / "build-lib" / "dsrb" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"an earlier build")
    if old_library == "older":
        os.utime(library, (0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("DSRB_REQUIRE_EXT", "CFLAGS", "CXXFLAGS")}
    env.update(DSRB_BUILD_CUDA="0", MAX_JOBS="1", CC=str(compiler), CXX=str(compiler))
    no_ninja = ("import runpy, sys; import torch.utils.cpp_extension as c; c.is_ninja_available = lambda: False; "
                "sys.argv = ['setup.py', *sys.argv[1:]]; runpy.run_path('setup.py', run_name='__main__')")
    for inplace in ([], ["--inplace"]):
        res = subprocess.run([sys.executable, "-c", no_ninja, "build_ext", *inplace, "-b", "build-lib", "-t", "tmp"],
                             cwd=src, capture_output=True, text=True, timeout=300, env=env)
        assert not [p.name for p in src.rglob("_C*.json*")], "no build record for a library not built"
        assert res.returncode == 0, res.stdout + res.stderr
        assert "dsrb: WARNING: the C++ extension was not built" in res.stdout, res.stdout
        assert library.read_bytes() == b"an earlier build" and not list((src / "dsrb").glob("_C*"))


@pytest.mark.parametrize("env, ccbin", [
    ({"CUDAHOSTCXX": "g++-12"}, ["-ccbin", "g++-12"]),
    ({}, None),
    ({"CUDAHOSTCXX": "g++-12", "NVCC_CCBIN": "g++-11"}, None),  # nvcc reads NVCC_CCBIN itself
    ({"CUDAHOSTCXX": "g++-12", "NVCC_PREPEND_FLAGS": "-ccbin g++-11"}, None),
    ({"CUDAHOSTCXX": "g++-12", "NVCC_APPEND_FLAGS": "-G --compiler-bindir=g++-11"}, None),
])
def test_cudahostcxx_is_nvccs_host_compiler(tmp_path, monkeypatch, env, ccbin):
    """CUDAHOSTCXX, the setting a failed build retries on (an nvcc that rejects the default g++), reached no command:
    nvcc does not read it. It is passed as -ccbin, unless nvcc is given a host compiler already."""
    nvcc = tmp_path / "nvcc"  # records its arguments, writes the object
    nvcc.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "args.txt"}\nwhile [ "$1" != -o ]; do shift; done\n'
                    'touch "$2"\n')
    nvcc.chmod(0o755)
    for var in ("CUDAHOSTCXX", "NVCC_CCBIN", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    src = tmp_path / "k.cu"
    src.write_text("")
    (obj,) = _build.compile_cuda([str(src)], str(tmp_path / "out"), str(nvcc), str(tmp_path), [])
    assert os.path.isfile(obj)
    args = (tmp_path / "args.txt").read_text().split()
    found = [args[i:i + 2] for i, a in enumerate(args) if a == "-ccbin"]
    assert found == ([ccbin] if ccbin else []), args
