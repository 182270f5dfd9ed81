"""``python -m dsrb.info``: versions, the extension's build, and which backend serves each op, with the reasons."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import dsrb.ops as ops
from dsrb import info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _info(**env):
    return subprocess.run([sys.executable, "-m", "dsrb.info"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})


def test_info_reports_versions_build_and_every_op():
    res = _info()
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"torch {torch.__version__}" in out and "C++/CUDA extension: " in out
    assert re.search(r"^ops on cpu \(float32\)\s+serves\s+" + r"\s+".join(ops.KNOWN_BACKENDS) + "$", out, re.M), out
    for op in ops.OPS:
        cells = re.search(rf"^  {op}\s+(\w+)\s+((?:(?:yes|no)\s*){{{len(ops.KNOWN_BACKENDS)}}})$", out, re.M)
        assert cells, (op, out)
        assert cells[1] == ops.selected_backend(op, torch.device("cpu"), torch.float32)
        why = ops.reasons(op, torch.device("cpu"), torch.float32)
        assert cells[2].split() == ["yes" if why[b] is None else "no" for b in ops.KNOWN_BACKENDS]
    for backend, why in ops.reasons("semantic_attention", torch.device("cpu"), torch.float32).items():
        assert why is None or f"  {backend}: {why}" in out


def test_info_says_how_the_float32_table_reads_for_the_other_dtypes():
    """The table is made for float32; a line says whether bfloat16, float16 and float64 read alike (it did not say,
    and triton serves no float64)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    alike = all(ops.reasons(op, cpu, dt) == ops.reasons(op, cpu, torch.float32)
                for op in ops.OPS for dt in (torch.bfloat16, torch.float16, torch.float64))
    assert ("\n  bfloat16, float16, float64: as float32\n" in info.report()) == alike
    if ops.reasons("instance_blend", cuda, torch.float32)["triton"] is None:  # triton takes CUDA float32 here
        why = ops.reasons("instance_blend", cuda, torch.float64)["triton"]
        assert why.startswith("dtype=torch.float64")
        lines = info._other_dtypes(cuda)
        assert lines[0] == "  bfloat16, float16: as float32" and lines[1].startswith("  float64: ")
        assert f"all ops triton no: {why}" in lines[1] and len(lines) == 2
        served = {info._serves(op, cuda, torch.float64) for op in ops.OPS}  # torch where triton served float32
        assert (f"all ops served by {served.pop()}" in lines[1]) == (info._serves("instance_blend", cuda) == "triton")


def test_info_reports_a_triton_that_fails_to_import(tmp_path):
    """A triton that is installed but fails to import (a broken or mismatched install): info reports it, in the
    versions line and as the triton backend's reason, where it used to end in that import's traceback."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise RuntimeError('broken triton install')\n")
    res = _info(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert res.returncode == 0, res.stderr
    assert "triton installed but fails to import (RuntimeError: broken triton install)" in res.stdout, res.stdout
    assert "  triton: triton is installed but fails to import (RuntimeError: broken triton install)" in res.stdout


def test_info_reports_under_dsrb_require_ext_and_then_fails():
    """CI's DSRB_REQUIRE_EXT=1 made info, the tool that says why the extension is missing, end in an ImportError
    traceback instead; now it reports, then says what the requirement finds, one line, exit status 1."""
    res = _info(DSRB_REQUIRE_EXT="1", DSRB_DISABLE_EXT="1")
    assert res.returncode == 1, res.stderr
    assert "C++/CUDA extension: not available: disabled by DSRB_DISABLE_EXT=1" in res.stdout
    assert re.search(r"^  semantic_attention\s+torch\s", res.stdout, re.M), res.stdout
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and \
        "the C++ extension is not available: disabled by DSRB_DISABLE_EXT=1" in res.stderr, res.stderr


def test_info_reports_then_refuses_a_dsrb_backend_that_is_no_backend():
    """DSRB_BACKEND=nonsense: every tool refuses it, while info showed "none" serving every op and exited 0."""
    res = _info(DSRB_BACKEND="nonsense")
    assert res.returncode == 1 and "here DSRB_BACKEND=nonsense" in res.stdout, res.stderr
    assert res.stderr == ("error: environment variable DSRB_BACKEND: expected one of ('auto', 'torch', 'cpu', "
                          "'cuda', 'triton'), got 'nonsense'\n"), res.stderr
    assert _info(DSRB_BACKEND="torch").returncode == 0


def test_info_reports_then_refuses_a_dsrb_backend_that_serves_nothing_here():
    """DSRB_BACKEND=cpu without the extension: every tool stops at its first op, while info exited 0."""
    res = _info(DSRB_BACKEND="cpu", DSRB_DISABLE_EXT="1", DSRB_REQUIRE_EXT="0")  # CI's 1 would add its own error
    assert res.returncode == 1 and re.search(r"^  semantic_attention\s+none\s", res.stdout, re.M), res.stderr
    assert res.stderr == ("error: environment variable DSRB_BACKEND=cpu: serves no op on this machine (cpu: the C++ "
                          "extension is not available: disabled by DSRB_DISABLE_EXT=1)\n"), res.stderr


@pytest.mark.parametrize("name", ["DSRB_REQUIRE_EXT", "DSRB_DISABLE_EXT", "DSRB_BUILD_CUDA", "DSRB_BUILD_ON_FIRST_USE"])
def test_a_bad_on_off_value_is_one_error_line(name):
    """A bad DSRB_DISABLE_EXT or DSRB_BUILD_CUDA ended every tool in a traceback from its imports, and a bad
    DSRB_BUILD_ON_FIRST_USE passed unnoticed once the extension was built (it is read only to build)."""
    res = _info(**{name: "ture"})
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr == (f"python -m dsrb.info: error: environment variable {name}: expected 1 or 0 (or "
                          "true/false, yes/no, on/off), got 'ture'\n"), res.stderr


@pytest.mark.parametrize("tool", ["dsrb.info", "dsrb.train"])
def test_a_bad_on_off_value_is_one_error_line_with_help_too(tool):
    """--help skips the extension's build, but the tools' imports still read the variables: a traceback before."""
    res = subprocess.run([sys.executable, "-m", tool, "--help"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "DSRB_DISABLE_EXT": "ture"})
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr == (f"python -m {tool}: error: environment variable DSRB_DISABLE_EXT: expected 1 or 0 (or "
                          "true/false, yes/no, on/off), got 'ture'\n"), res.stderr


def test_a_bad_build_variable_is_one_error_line():
    res = _info(TORCH_CUDA_ARCH_LIST="garbage")
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr == ("python -m dsrb.info: error: TORCH_CUDA_ARCH_LIST: cannot read 'garbage' (expected entries "
                          "like 8.0, 9.0, 9.0+PTX, or torch's names such as Hopper)\n"), res.stderr


@pytest.mark.parametrize("tool", ["dsrb.info", "dsrb.train"])
def test_build_cuda_1_without_nvcc_is_one_error_line(tool, tmp_path):
    """DSRB_BUILD_CUDA=1 without nvcc, where a first-use build is needed, is a ValueError from `import dsrb.ops`: every
    tool ended in its traceback (dsrb.info included, the tool meant to say what is missing)."""
    code = ("import importlib.machinery, runpy, sys; import dsrb._build as b; b.find_nvcc = lambda: None; "
            "importlib.machinery.EXTENSION_SUFFIXES = ['.no-such-suffix']; sys.argv = [sys.argv[0]]; "
            f"runpy.run_module({tool!r}, run_name='__main__')")
    env = {**os.environ, "DSRB_BUILD_CUDA": "1", "DSRB_EXT_CACHE": str(tmp_path / "cache")}
    env.pop("DSRB_BUILD_ON_FIRST_USE", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr == (f"python -m {tool}: error: DSRB_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put "
                          "nvcc on PATH)\n"), res.stderr


@pytest.mark.parametrize("tool", ["dsrb.train", "dsrb.evaluate", "dsrb.predict"])
def test_a_dsrb_backend_that_is_no_backend_is_one_error_line_before_any_build(tool, tmp_path):
    """DSRB_BACKEND=troch was refused at the first op only, after the tool's imports had built the extension on first
    use (minutes). Here a first-use build ends the process: the tools now refuse the name before their imports."""
    code = ("import importlib.machinery, runpy, sys; import dsrb._ext as e; "
            "e._first_use_build = lambda *a: sys.exit('the first-use build started'); "
            "importlib.machinery.EXTENSION_SUFFIXES = ['.no-such-suffix']; sys.argv = [sys.argv[0]]; "
            f"runpy.run_module({tool!r}, run_name='__main__')")
    env = {**os.environ, "DSRB_BACKEND": "troch", "DSRB_EXT_CACHE": str(tmp_path / "cache")}
    for name in ("DSRB_DISABLE_EXT", "DSRB_BUILD_ON_FIRST_USE"):
        env.pop(name, None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr == (f"python -m {tool}: error: environment variable DSRB_BACKEND: expected 'auto' or one of "
                          "('torch', 'cpu', 'cuda', 'triton'), got 'troch'\n"), res.stderr


@pytest.mark.parametrize("value", ["troch", "Torch", " cpu", "auto", "", "torch"])
def test_the_tools_check_of_dsrb_backend_is_the_ops_check(monkeypatch, value):
    """The tools check DSRB_BACKEND before torch is imported (dsrb._cli): the same message as the ops."""
    from dsrb import _cli

    monkeypatch.setenv("DSRB_BACKEND", value)
    try:
        ops.select("instance_blend", torch.device("cpu"), torch.float32)
    except ValueError as err:
        with pytest.raises(ValueError, match=f"^{re.escape(str(err))}$"):
            _cli.check_backend_env()
    else:
        _cli.check_backend_env()


@pytest.mark.parametrize("tool", ["dsrb.info", "dsrb.train", "dsrb.predict"])
def test_a_python_without_torch_is_one_error_line_saying_how_to_install_it(tool):
    """Every tool, dsrb.info (run to diagnose an install) included, ended in ModuleNotFoundError's traceback. torch
    is hidden as an uninstalled one is: the path finder does not find it (no ImportError from a finder)."""
    code = ("import importlib.machinery as m, runpy, sys\n"
            "class Hide(m.PathFinder):\n"
            "    @classmethod\n"
            "    def find_spec(cls, name, path=None, target=None):\n"
            "        return None if name.partition('.')[0] == 'torch' else super().find_spec(name, path, target)\n"
            "sys.meta_path[sys.meta_path.index(m.PathFinder)] = Hide\n"
            f"sys.argv = [sys.argv[0]]; runpy.run_module({tool!r}, run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=os.environ)
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr == (f"python -m {tool}: error: torch is not installed in this Python ({sys.executable}); "
                          "install PyTorch >= 2.6 first, the build that fits your machine (CPU or CUDA: "
                          "https://pytorch.org/get-started/locally gives the command)\n"), res.stderr


@pytest.mark.parametrize("tool", ["dsrb.info", "dsrb.train"])
def test_a_torch_that_fails_to_import_is_one_error_line(tmp_path, tool):
    """A torch that is installed but cannot be imported (a CUDA library missing, a broken install) ended every tool,
    dsrb.info included, in a traceback from inside torch's import: now one error line with torch's own message."""
    broken = tmp_path / "torch"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise OSError('libtorch_cuda.so: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    res = subprocess.run([sys.executable, "-m", tool], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr == (f"python -m {tool}: error: torch is installed but cannot be imported (OSError: "
                          "libtorch_cuda.so: cannot open shared object file); reinstall the PyTorch build that fits "
                          "this machine (CPU or CUDA: https://pytorch.org/get-started/locally gives the command) in "
                          f"this Python ({sys.executable})\n"), res.stderr


@pytest.mark.parametrize("tool", ["dsrb.info", "dsrb.train", "dsrb.predict"])
def test_a_kill_while_torch_is_imported_is_the_interrupted_line(tmp_path, tool):
    """A SIGTERM before the tool's main (torch's import, the first-use build) ended it at once, without a word and
    with status -15; now as Ctrl-C there: one interrupted line and the interrupted status. The torch imported here
    sends itself the signal, then waits."""
    slow = tmp_path / "torch"
    slow.mkdir()
    (slow / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    res = subprocess.run([sys.executable, "-m", tool], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    assert res.returncode == -signal.SIGINT and res.stdout == "", (res.returncode, res.stderr)
    assert res.stderr == f"python -m {tool}: interrupted\n", res.stderr


def test_info_takes_no_arguments(capsys):
    """--help is help, and an unknown argument an error (both printed the report and exited 0)."""
    with pytest.raises(SystemExit) as exit_:
        info.main(["--help"])
    assert exit_.value.code == 0 and "usage: python -m dsrb.info" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        info.main(["--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("forced, serves", [("torch", "torch"), ("cuda", "none"), ("nonsense", "none")])
def test_info_shows_the_backend_dsrb_backend_forces(monkeypatch, forced, serves):
    monkeypatch.setenv("DSRB_BACKEND", forced)  # cuda never serves the CPU section
    out = info.report()
    assert all(re.search(rf"^  {op}\s+{serves}\s", out, re.M) for op in ops.OPS), out
    assert f"here DSRB_BACKEND={forced}" in out


def test_info_says_why_the_cuda_kernels_cannot_run_on_this_gpu(gpus):
    from dsrb import _ext

    if "cuda" not in _ext.load().backends:
        pytest.skip("the extension was built without CUDA kernels here")
    gpus.append((1, 0))  # a GPU no arch list covers
    assert re.search(r"  cuda: its CUDA kernels were built for TORCH_CUDA_ARCH_LIST=\S+, which does not cover "
                     r"cuda:0 \(Fake GPU 0, compute capability 1\.0\); rebuild: ", info.report())


def test_info_says_the_cuda_kernels_failed_to_build(monkeypatch):
    """An extension loaded without its CUDA kernels because they failed to build (the CPU kernels were built alone)
    says so, and the cuda backend's reason is the failure."""
    from dsrb import _ext

    built = _ext.load()
    if not built.loaded:
        pytest.skip(f"no extension here: {built.reason}")
    failed = _ext.Extension(path=built.path, info=dict(built.info, cuda=False), origin=built.origin,
                            cuda_reason="its CUDA kernels failed to build: nvcc failed on instance_blend.cu")
    monkeypatch.setattr(_ext, "_STATE", failed)
    out = info.report()
    assert "; no CUDA kernels (they failed to build: see the cuda backend below)" in out, out
    assert "  cuda: its CUDA kernels failed to build: nvcc failed on instance_blend.cu" in out, out


def test_info_reports_a_truncated_cached_library_instead_of_crashing(tmp_path):
    """A cached build whose library was truncated after its record was written (a full disk, a copy cut short):
    loading it ended info, and every import of dsrb.ops, with SIGBUS and no word; now it is reported as damaged."""
    from dsrb import _ext

    built = _ext.load()
    if built.origin != "first-use build (cache)":
        pytest.skip(f"no first-use build to copy here: {built.reason or built.origin}")
    folder = tmp_path / "cache" / os.path.basename(os.path.dirname(built.path))
    folder.mkdir(parents=True)
    library = folder / os.path.basename(built.path)
    with open(built.path, "rb") as f:
        library.write_bytes(f.read(100_000))
    with open(built.path + ".json") as f:
        (folder / (library.name + ".json")).write_text(f.read())
    # DSRB_REQUIRE_EXT (CI sets it) would make the missing extension an error after the report
    res = _info(DSRB_EXT_CACHE=str(tmp_path / "cache"), DSRB_BUILD_ON_FIRST_USE="0", DSRB_REQUIRE_EXT="0")
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert (f"C++/CUDA extension: not available: the cached build {library} is damaged (the library does not match "
            "its build record: truncated or changed since it was built)") in res.stdout, res.stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_standard_output_that_cannot_be_written_is_one_error_line():
    """Output to a full disk ended in an OSError traceback; started with stdout closed (>&-), info printed nothing
    and exited 0, as if the report had been written. Now one error line each, exit status 1, as the other tools."""
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "dsrb.info"], stdout=full, stderr=subprocess.PIPE, text=True,
                             timeout=900)
    assert res.returncode == 1 and res.stderr == ("python -m dsrb.info: error: could not write to standard output "
                                                  "(OSError: [Errno 28] No space left on device)\n"), res.stderr
    res = subprocess.run([sys.executable, "-m", "dsrb.info"], stderr=subprocess.PIPE, text=True, timeout=900,
                         preexec_fn=lambda: os.close(1))
    assert res.returncode == 1 and res.stderr.startswith("python -m dsrb.info: error: standard output is closed"), \
        res.stderr
