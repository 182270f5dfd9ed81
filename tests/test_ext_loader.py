"""The first-use build of the extension (dsrb/_ext.py), with the compiler and the library loader replaced by fakes:
a finished build is reused, also from a cache this process cannot write; a failed build is remembered, not retried,
while a missing compiler or ninja is not; CUDA kernels that fail to build leave the CPU kernels; an unusable cache or
a disabled build is a reason (the package runs on its other backends), never an exception from ``import dsrb.ops``;
DSRB_REQUIRE_EXT=1 turns any reason into an ImportError."""

import fcntl
import importlib.machinery
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest
import torch
from torch.utils import cpp_extension

from dsrb import _build, _ext, checkpoint
from dsrb.ops import _registry  # imported (the real extension loaded) before any fixture fakes the loader


@pytest.fixture
def loader(tmp_path, monkeypatch):
    """A cache under tmp_path, CPU-only builds, no library inside the package, and a fake compiler (a call count;
    it "builds" by writing the library file) and loader."""
    monkeypatch.setenv("DSRB_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DSRB_BUILD_CUDA", "0")
    monkeypatch.setenv("CXX", sys.executable)  # a compiler is found (the fake below never calls it)
    for var in ("DSRB_BUILD_ON_FIRST_USE", "DSRB_DISABLE_EXT", "DSRB_REQUIRE_EXT", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES", [".no-such-suffix"])
    calls = []

    def compile_(root, folder, name, nvcc, jobs, log):
        # torch's builder would wait forever on a "lock" file a killed build left behind
        assert not os.path.exists(os.path.join(folder, "lock"))
        calls.append(folder)
        compile_.jobs = jobs
        if getattr(compile_, "fail", False) or (nvcc and getattr(compile_, "fail_cuda", False)):
            raise RuntimeError(getattr(compile_, "message", "g++: fatal error: no input files"))
        with open(os.path.join(folder, name + ".so"), "wb") as f:
            f.write(b"\x7fELF")

    monkeypatch.setattr(_build, "first_use_build", compile_)
    monkeypatch.setattr(_ext, "_open", lambda library, info, origin: _ext.Extension(path=library, info=info,
                                                                                     origin=origin))
    compile_.calls = calls
    return compile_


def test_builds_once_then_reuses_the_cache(loader):
    first = _ext._load()
    assert first.loaded and first.origin == "first-use build (cache)", first
    assert first.info["source_hash"] == _build.source_hash(_build.source_root())
    assert os.path.dirname(first.path).startswith(_ext.cache_root())
    again = _ext._load()
    assert again.loaded and again.path == first.path
    assert len(loader.calls) == 1


def test_a_finished_build_loads_from_a_cache_it_cannot_write(loader, monkeypatch):
    """A shared, read-only cache of a finished build (a lock file cannot be created there) still loads."""
    built = _ext._load()

    def refuse(self):
        raise PermissionError(13, "Permission denied", self.path)

    monkeypatch.setattr(checkpoint.FileLock, "__enter__", refuse)
    reused = _ext._load()
    assert reused.loaded and reused.path == built.path, reused
    assert len(loader.calls) == 1


def test_an_unwritable_cache_is_a_reason_not_an_exception(loader, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DSRB_EXT_CACHE", str(blocker / "cache"))
    ext = _ext._load()
    assert not ext.loaded
    assert "cannot be written" in ext.reason and "DSRB_EXT_CACHE" in ext.reason and str(blocker) in ext.reason
    assert loader.calls == []
    monkeypatch.setattr(_ext, "_STATE", None)
    monkeypatch.setenv("DSRB_REQUIRE_EXT", "1")
    for _ in range(2):  # every time: a second import of dsrb.ops passed on the fallback where the first failed
        with pytest.raises(ImportError, match="DSRB_REQUIRE_EXT=1.*cannot be written"):
            _ext.load()
    monkeypatch.delenv("DSRB_REQUIRE_EXT")
    assert _ext.load() is _ext._STATE and not _ext._STATE.loaded


def test_a_failed_build_is_remembered_and_not_retried(loader, capsys):
    loader.fail = True
    first = _ext._load()
    assert "dsrb: the extension build failed; the ops run on their other backends" in capsys.readouterr().err
    assert not first.loaded
    assert "the first-use build failed" in first.reason and "no input files" in first.reason
    folder = loader.calls[0]
    with open(os.path.join(folder, "build.log")) as f:
        assert "no input files" in f.read()
    assert os.path.isfile(os.path.join(folder, "FAILED"))
    loader.fail = False
    again = _ext._load()
    assert not again.loaded and "failed earlier" in again.reason and folder in again.reason
    assert len(loader.calls) == 1


def test_a_build_that_failed_earlier_still_says_why(loader):
    """The failed build says `python -m dsrb.info` says more; later processes (info among them) said only that it
    had failed earlier. They now give the log's error line too."""
    loader.fail, loader.message = True, "ninja output\nx.cpp:3:5: error: 'foo' was not declared\nmore output"
    _ext._load()
    loader.fail = False
    again = _ext._load()
    assert again.reason.startswith("the first-use build failed earlier: x.cpp:3:5: error: 'foo' was not declared "
                                   "(log: "), again.reason
    assert len(loader.calls) == 1
    os.remove(os.path.join(loader.calls[0], "build.log"))  # the failure stays remembered, without its line
    assert _ext._load().reason.startswith("the first-use build failed earlier (log: ")


@pytest.mark.parametrize("change", ["CXX", "CPATH"])
def test_a_failed_build_is_retried_with_another_compiler_or_settings(loader, capsys, monkeypatch, change):
    """A build that failed was retried only after its cache folder was deleted, though the fix is usually another
    compiler (CXX) or another search path for its headers (CPATH): with either changed, the next import builds
    again."""
    loader.fail = True
    assert not _ext._load().loaded
    loader.fail = False
    assert "failed earlier" in _ext._load().reason  # the same toolchain: remembered
    monkeypatch.setenv(change, shutil.which("sh") if change == "CXX" else "/opt/include")
    capsys.readouterr()
    again = _ext._load()
    assert again.loaded and len(loader.calls) == 2, again
    assert "the compiler or its settings changed since the first-use build failed" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(loader.calls[0], "FAILED"))


@pytest.mark.parametrize("var", ["CC", "CFLAGS", "CXXFLAGS", "LDFLAGS"])
def test_a_failed_build_is_not_retried_for_a_setting_the_build_does_not_read(loader, monkeypatch, var):
    """torch's ninja builder reads CXX but not these: a change to one retried a build that would fail the same way."""
    loader.fail = True
    assert not _ext._load().loaded
    monkeypatch.setenv(var, "-O1")
    assert "failed earlier" in _ext._load().reason and len(loader.calls) == 1


def test_an_older_dsrbs_failure_record_still_counts(loader, monkeypatch):
    """An older dsrb's FAILED file is empty: it counts as a failure with any toolchain, as it did."""
    loader.fail = True
    assert not _ext._load().loaded
    loader.fail = False
    open(os.path.join(loader.calls[0], "FAILED"), "w").close()
    monkeypatch.setenv("CPATH", "/opt/include")
    assert "failed earlier" in _ext._load().reason and len(loader.calls) == 1


def test_a_failed_build_under_require_ext_does_not_promise_other_backends(loader, capsys, monkeypatch):
    """With DSRB_REQUIRE_EXT=1 the tool stops on the missing extension next: "the ops run on their other backends"
    said the opposite, one line above the error."""
    loader.fail = True
    monkeypatch.setenv("DSRB_REQUIRE_EXT", "1")
    assert not _ext._load().loaded
    err = capsys.readouterr().err
    assert "dsrb: the extension build failed (log: " in err and "other backends" not in err


def test_a_failed_build_is_one_line_with_the_compilers_first_error(loader, monkeypatch):
    """torch's message for a failed build is ninja's whole output, compiler command lines included: under
    DSRB_REQUIRE_EXT=1 a tool's one error line was a dozen, the last 2,000 characters starting mid-command. The
    reason is now one line: the compiler's first error, then the log."""
    command = "[1/7] c++ -MMD -MF instance_blend.o.d " + "-I/opt/include " * 200
    loader.fail, loader.message = True, (
        f"Error building extension 'dsrb_ext_cpu': {command}\nFAILED: [code=1] instance_blend.o\n{command}\n"
        "instance_blend.cpp:12:5: error: 'foo' was not declared in this scope\n"
        "instance_blend.cpp:13:5: error: 'bar' was not declared in this scope\n"
        "ninja: build stopped: subcommand failed.\n")
    monkeypatch.setenv("DSRB_REQUIRE_EXT", "1")
    monkeypatch.setattr(_ext, "_STATE", None)
    with pytest.raises(ImportError) as err:
        _ext.load()
    message = str(err.value)
    assert "\n" not in message, message
    assert re.search(r"the first-use build failed: instance_blend\.cpp:12:5: error: 'foo' was not declared in this "
                     r"scope \(log: .*build\.log; change the compiler", message), message
    with open(os.path.join(loader.calls[0], "build.log")) as f:
        assert "'bar' was not declared" in f.read()  # the whole output stays in the log


@pytest.mark.parametrize("message", ["c++: fatal error: Killed signal terminated program cc1plus",
                                     "nvcc error   : 'cicc' died due to signal 9 (Kill signal)",
                                     "nvcc was killed by signal 9 on semantic_attention.cu"])
def test_a_build_killed_by_a_signal_is_not_remembered(loader, capsys, message):
    """A compiler the OOM killer (or a time limit) ended is no failure of the sources: the next import builds again,
    where it used to be remembered as failed until the folder was deleted."""
    def killed(root, folder, name, nvcc, jobs, log):
        loader.calls.append(folder)
        raise RuntimeError(f"Error building extension 'dsrb_ext_cpu': {message}")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_build, "first_use_build", killed)
        first = _ext._load()
    assert not first.loaded and "the first-use build was killed" in first.reason
    assert "the next import builds again" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(loader.calls[0], "FAILED"))
    assert _ext._load().loaded and len(loader.calls) == 2


def test_a_wait_for_another_processs_build_says_so(loader, capfd, monkeypatch):
    """An import that finds another process building (or stopped mid-build, Ctrl-Z) says what it waits for, rather
    than hanging silently; with DSRB_BUILD_ON_FIRST_USE=0 it does not wait at all."""
    ext = _ext._load()  # where the build goes; then a fresh cache entry for the same key
    folder = os.path.dirname(ext.path)
    os.remove(ext.path)

    def load_in_thread():
        result = []
        thread = threading.Thread(target=lambda: result.append(_ext._load()), daemon=True)
        thread.start()
        return thread, result

    with open(os.path.join(folder, ".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file: conflicts as another process's would
        with monkeypatch.context() as m:
            m.setenv("DSRB_BUILD_ON_FIRST_USE", "0")
            thread, result = load_in_thread()
            thread.join(10.0)
            assert result and "DSRB_BUILD_ON_FIRST_USE=0" in result[0].reason  # returned without waiting
        thread, result = load_in_thread()
        thread.join(2.0)
        assert thread.is_alive() and not result  # waiting ...
        assert f"dsrb: waiting for another process's first-use build in {folder}" in capfd.readouterr().err
    thread.join(30.0)  # ... until the lock is released
    assert result and result[0].loaded


def test_cuda_objects_reach_the_link_quoted(monkeypatch, tmp_path):
    """torch writes the link flags into build.ninja joined by spaces, unquoted, for the shell: a cache folder with a
    space split each CUDA object's path in two and failed the CUDA build."""
    folder = str(tmp_path / "cache with space $HOME")
    objects = [os.path.join(folder, "cuda", name) for name in ("a.cu.o", "b.cu.o")]
    seen = {}
    monkeypatch.setattr(_build, "compile_cuda", lambda *a: objects)
    monkeypatch.setattr(_build, "cuda_link_flags", lambda nvcc: ["-L/opt/cuda dir/lib64", "-lcudart_static"])
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(kw))
    _build.first_use_build(_build.source_root(), folder, "dsrb_ext_cuda", "/opt/cuda/bin/nvcc", 1, [])
    line = " ".join(seen["extra_ldflags"]).replace("$$", "$")  # as build.ninja holds it, after ninja's unescaping
    assert shlex.split(line)[:3] == objects + ["-L/opt/cuda dir/lib64"]


def test_no_compiler_or_ninja_is_a_reason_not_a_remembered_failure(loader, monkeypatch):
    """Without a C++ compiler or ninja nothing is attempted (no torch builder warning, no build log) and nothing is
    marked failed: once they are installed, the next import builds."""
    monkeypatch.setenv("CXX", "dsrb-no-such-compiler --flag")
    ext = _ext._load()
    assert not ext.loaded
    assert ext.reason == "no C++ compiler to build it: 'dsrb-no-such-compiler' is not on PATH (install g++, or set CXX)"
    assert loader.calls == []
    monkeypatch.setenv("CXX", f"{sys.executable} --flag")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    ext = _ext._load()
    assert not ext.loaded and ext.reason == "ninja, torch's builder, is not installed (pip install ninja)"
    assert loader.calls == []
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert _ext._load().loaded and len(loader.calls) == 1


def test_build_on_first_use_disabled_and_extension_disabled(loader, monkeypatch):
    for off in ("0", "false", "No"):
        monkeypatch.setenv("DSRB_BUILD_ON_FIRST_USE", off)
        ext = _ext._load()
        assert not ext.loaded and "DSRB_BUILD_ON_FIRST_USE=0" in ext.reason
    for on in ("1", "true"):
        monkeypatch.setenv("DSRB_DISABLE_EXT", on)
        assert _ext._load().reason == f"disabled by DSRB_DISABLE_EXT={on}"
    assert loader.calls == []


@pytest.mark.parametrize("var", ["DSRB_DISABLE_EXT", "DSRB_REQUIRE_EXT", "DSRB_BUILD_ON_FIRST_USE", "DSRB_BUILD_CUDA"])
def test_an_on_off_variable_with_another_value_is_an_error(loader, monkeypatch, var):
    """DSRB_REQUIRE_EXT=ture used to count as unset: a CI run passed on the torch fallback."""
    monkeypatch.setenv(var, "ture")
    monkeypatch.setattr(_ext, "_STATE", None)
    with pytest.raises(ValueError, match=rf"environment variable {var}: expected 1 or 0 .*got 'ture'"):
        _ext.load()
    assert loader.calls == []


@pytest.mark.parametrize("var, value, match", [
    ("MAX_JOBS", "abc", "MAX_JOBS: expected a positive number of parallel compile jobs, got 'abc'"),
    ("TORCH_CUDA_ARCH_LIST", "9.0;foo", "TORCH_CUDA_ARCH_LIST: cannot read 'foo'"),
    ("TORCH_CUDA_ARCH_LIST", ";", "TORCH_CUDA_ARCH_LIST: no architecture in ';'"),
])
def test_a_bad_build_variable_is_an_error_built_or_not(loader, monkeypatch, var, value, match):
    """A bad MAX_JOBS or TORCH_CUDA_ARCH_LIST was only the extension's reason to be missing: a tool ran on the torch
    backend, passing over a finished build, and said nothing. Like the on/off variables, it is an error."""
    assert _ext._load().loaded
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(_ext, "_STATE", None)
    with pytest.raises(ValueError, match=re.escape(match)):
        _ext.load()
    assert len(loader.calls) == 1


@pytest.mark.parametrize("value", ["0", "-2", "x", "²"])  # "²".isdigit(), but int("²") fails
def test_a_bad_max_jobs_is_a_reason_not_a_remembered_failure(loader, monkeypatch, value):
    """MAX_JOBS=0 reached ninja as -j 0, which it reads as no limit; now it is the user's to fix, and the next import
    with a good value builds (with exactly that many jobs)."""
    monkeypatch.setenv("MAX_JOBS", value)
    ext = _ext._load()
    assert not ext.loaded and f"MAX_JOBS: expected a positive number of parallel compile jobs, got '{value}'" in \
        ext.reason
    assert loader.calls == []
    monkeypatch.setenv("MAX_JOBS", "3")
    assert _ext._load().loaded and loader.jobs == 3 and os.environ["MAX_JOBS"] == "3"


def test_a_lock_left_by_a_killed_build_is_cleared(loader):
    """torch's builder's own "lock" file, left by a build killed by a signal (timeout, OOM killer), made every later
    import wait on it forever; under dsrb's lock it is a leftover, removed before building."""
    def killed(root, folder, *rest):
        open(os.path.join(folder, "lock"), "w").close()
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:  # where the build will go: make it, with the leftover inside
        m.setattr(_build, "first_use_build", killed)
        with pytest.raises(KeyboardInterrupt):
            _ext._load()
    ext = _ext._load()
    assert ext.loaded and len(loader.calls) == 1


def test_a_build_waits_for_the_programs_a_killed_build_left_running(loader, tmp_path, capfd):
    """A process killed during its build releases dsrb's lock, but ninja and the compilers it started run on in the
    build folder; a new build there at the same time could write the same objects and link. It waits for them (found
    by their working directory) and says so; programs elsewhere, or of another name, are not waited for."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux)")
    killed = []

    def start_left_running(root, build_folder, *rest):  # the killed build: its "ninja" outlives it
        ninja = tmp_path / "ninja"
        ninja.symlink_to(shutil.which("sleep"))  # /proc/<pid>/comm is the name it was started by
        killed.append(subprocess.Popen([str(ninja), "1"], cwd=build_folder))
        # elsewhere, and another program in the folder: neither is waited for
        killed.append(subprocess.Popen([str(ninja), "600"], cwd=tmp_path))
        killed.append(subprocess.Popen([shutil.which("sleep"), "600"], cwd=build_folder))
        raise KeyboardInterrupt

    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_build, "first_use_build", start_left_running)
            with pytest.raises(KeyboardInterrupt):
                _ext._load()
        assert killed[0].poll() is None
        capfd.readouterr()
        ext = _ext._load()
        assert ext.loaded and len(loader.calls) == 1
        assert killed[0].poll() == 0  # the build ran after the left-over ninja had ended
        assert killed[1].poll() is None and killed[2].poll() is None
        err = capfd.readouterr().err
        assert f"waiting for the build programs (pids {killed[0].pid})" in err, err
    finally:
        for proc in killed:
            proc.kill()
            proc.wait()


def _library_in_package(monkeypatch, tmp_path, contents: bytes) -> str:
    """A library file ``_C.so`` holding ``contents`` in a stand-in package folder that the loader looks in."""
    package = tmp_path / "dsrb"
    package.mkdir()
    monkeypatch.setattr(_ext, "__file__", str(package / "_ext.py"))
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES", [".so"])
    library = package / "_C.so"
    library.write_bytes(contents)
    return str(library)


def test_a_library_built_for_other_sources_is_stale(loader, monkeypatch, tmp_path):
    """A library in the package whose record names other sources is passed over, with the reason kept."""
    library = _library_in_package(monkeypatch, tmp_path, b"")
    _build.write_info(library, {"torch": torch.__version__, "python": "0.0", "source_hash": "x"})
    monkeypatch.setenv("DSRB_BUILD_ON_FIRST_USE", "0")
    ext = _ext._load()
    assert not ext.loaded
    assert "_C.so is stale (python 0.0 != " in ext.reason and "DSRB_BUILD_ON_FIRST_USE=0" in ext.reason, ext.reason


def test_a_free_threaded_python_has_builds_of_its_own(loader, monkeypatch, tmp_path):
    """A free-threaded Python (abiflags "t") is another ABI: a record made for the same version without it is stale
    there, where both read "python": "3.11" and shared one cache folder."""
    library = _library_in_package(monkeypatch, tmp_path, b"")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    monkeypatch.setattr(sys, "abiflags", "", raising=False)
    _build.write_info(library, {"torch": torch.__version__, "python": _build.python_version(),
                                "source_hash": _build.source_hash(_build.source_root())})
    monkeypatch.setattr(sys, "abiflags", "t")
    monkeypatch.setenv("DSRB_BUILD_ON_FIRST_USE", "0")
    ext = _ext._load()
    assert not ext.loaded
    assert f"_C.so is stale (python {version} != {version}t)" in ext.reason, ext.reason


def test_cuda_kernels_that_fail_to_build_leave_the_cpu_kernels(loader, monkeypatch, capsys):
    """nvcc found (the default DSRB_BUILD_CUDA) but the CUDA step fails (an nvcc that rejects the host compiler):
    the CPU kernels are built alone and the cuda backend's reason says why; later imports reuse both outcomes.
    With DSRB_BUILD_CUDA=1 the failure stands."""
    monkeypatch.delenv("DSRB_BUILD_CUDA")
    monkeypatch.setattr(_build, "want_cuda", lambda: "/opt/fake-cuda/bin/nvcc")
    loader.fail_cuda = True
    ext = _ext._load()
    assert ext.loaded and ext.backends == ("cpu",), ext
    assert "dsrb: the build with the CUDA kernels failed; building the CPU kernels alone" in capsys.readouterr().err
    assert len(loader.calls) == 2 and loader.calls[0].endswith("-cuda9.0") and loader.calls[1].endswith("-cpu")
    assert ext.cuda_reason.startswith("its CUDA kernels failed to build: the first-use build failed")
    monkeypatch.setattr(_ext, "_STATE", ext)
    assert _registry._extension_unavailable("cuda") == ext.cuda_reason
    assert _registry._extension_unavailable("cpu") is None
    again = _ext._load()
    assert again.loaded and again.path == ext.path and "failed earlier" in again.cuda_reason
    assert len(loader.calls) == 2

    def refuse(self):  # a shared cache made read-only since: both outcomes still reused
        raise PermissionError(13, "Permission denied", self.path)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoint.FileLock, "__enter__", refuse)
        read_only = _ext._load()
        assert read_only.loaded and read_only.path == ext.path and "failed earlier" in read_only.cuda_reason
    assert len(loader.calls) == 2

    monkeypatch.setenv("DSRB_BUILD_CUDA", "1")
    strict = _ext._load()
    assert not strict.loaded and "failed earlier" in strict.reason and "-cuda9.0" in strict.reason


def test_a_bad_arch_list_is_a_reason_not_a_fallback(loader, monkeypatch):
    """nvcc found and TORCH_CUDA_ARCH_LIST="9.0a;foo": the CUDA build "failed", was remembered in a folder named after
    the bad value, and the CPU kernels were built alone; now the variable is named, nothing is built or remembered,
    and the next import with a good value builds."""
    monkeypatch.delenv("DSRB_BUILD_CUDA")
    monkeypatch.setattr(_build, "want_cuda", lambda: "/opt/fake-cuda/bin/nvcc")
    monkeypatch.setattr(_build, "nvcc_version", lambda nvcc: "Build cuda_13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a;foo")
    ext = _ext._load()
    assert not ext.loaded and "TORCH_CUDA_ARCH_LIST: cannot read 'foo'" in ext.reason, ext
    assert loader.calls == [] and not os.path.exists(_ext.cache_root())
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    ext = _ext._load()
    assert ext.loaded and ext.backends == ("cpu", "cuda") and loader.calls[0].endswith("-cuda9.0a"), ext


def test_a_damaged_cached_library_is_built_again(loader, capsys):
    """A cached library truncated after its build (a full disk, a copy cut short) crashed the process with SIGBUS
    when loaded; its recorded digest finds it, and it is built again."""
    first = _ext._load()
    with open(first.path, "r+b") as f:
        f.truncate(2)
    again = _ext._load()
    assert again.loaded and again.path == first.path and len(loader.calls) == 2, again
    assert f"dsrb: the cached build {first.path} is damaged" in capsys.readouterr().err
    assert _ext._load().loaded and len(loader.calls) == 2  # the rebuilt one is reused


def test_a_library_without_a_valid_record_is_not_kept_for_the_rebuild(loader, monkeypatch):
    """A truncated library beside a broken record (both cut short by a full disk) is removed before the build, so
    that the builder links it again instead of finding it up to date and loading it."""
    first = _ext._load()
    with open(first.path, "r+b") as f:
        f.truncate(2)
    with open(_build.info_path(first.path), "w") as f:
        f.write('{"torch": ')
    seen = []

    def compile_(root, folder, name, nvcc, jobs, log):
        seen.append(os.path.exists(os.path.join(folder, name + ".so")))
        loader(root, folder, name, nvcc, jobs, log)

    monkeypatch.setattr(_build, "first_use_build", compile_)
    assert _ext._load().loaded and seen == [False]


def test_a_damaged_library_in_the_package_is_passed_over(loader, monkeypatch, tmp_path):
    """The same for the library setup.py built into the package: passed over with the reason, never loaded."""
    library = _library_in_package(monkeypatch, tmp_path, b"\x7fELF and more")
    _build.write_info(library, _build.build_info(_build.source_root(), None))
    assert _ext._load().origin == "setup.py build"
    with open(library, "r+b") as f:
        f.truncate(4)
    monkeypatch.setenv("DSRB_BUILD_ON_FIRST_USE", "0")
    ext = _ext._load()
    assert not ext.loaded and "_C.so is stale (the library does not match its build record" in ext.reason, ext


def test_the_cache_folder_without_a_home_is_a_temporary_one(monkeypatch, tmp_path):
    """No HOME and no home folder for the user id (a container's arbitrary uid): "~" stayed "~", and the cache went
    to a folder named "~" in the working directory (whichever it was)."""
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # what it returns there
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DSRB_EXT_CACHE", raising=False)
    home = tmp_path / "tmp" / f"dsrb-home-{os.getuid()}"
    assert _ext.cache_root() == str(home / ".cache" / "dsrb" / "extensions")
    monkeypatch.setenv("DSRB_EXT_CACHE", "~/cache")
    assert _ext.cache_root() == str(home / "cache")


def test_ninja_in_the_interpreters_scripts_folder_is_found_without_an_activated_venv(monkeypatch, tmp_path):
    """A venv's python run without activating the venv (cron, an IDE): torch's builder looks for ninja on PATH only,
    and the venv's own ninja, a dependency, was "not installed"; the extension was never built."""
    scripts = tmp_path / "venv-bin"
    monkeypatch.setattr(_ext.sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with _ext._scripts_on_path():
        assert os.environ["PATH"] == f"{scripts}{os.pathsep}/usr/bin:/bin"
    assert os.environ["PATH"] == "/usr/bin:/bin"
    seen = []
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: seen.append(os.environ["PATH"]) or False)
    monkeypatch.setenv("DSRB_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DSRB_BUILD_CUDA", "0")
    monkeypatch.setenv("CXX", sys.executable)
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES", [".no-such-suffix"])
    assert "ninja" in _ext._load().reason and seen == [f"{scripts}{os.pathsep}/usr/bin:/bin"]


def test_build_cuda_1_without_nvcc_is_an_error_where_a_build_is_needed(loader, monkeypatch):
    """README: DSRB_BUILD_CUDA=1 is an error without nvcc. The first-use build kept it as the extension's reason, and
    every op ran on the torch backend without a word."""
    monkeypatch.setenv("DSRB_BUILD_CUDA", "1")
    monkeypatch.setattr(_build, "find_nvcc", lambda: None)
    monkeypatch.setattr(_ext, "_STATE", None)
    with pytest.raises(ValueError, match=r"^DSRB_BUILD_CUDA=1 but nvcc was not found"):
        _ext.load()
    assert loader.calls == []
    # No build is needed where none is made: a tool's --help (which sets DSRB_BUILD_ON_FIRST_USE=0) ended in this
    # ValueError's traceback
    monkeypatch.setenv("DSRB_BUILD_ON_FIRST_USE", "0")
    ext = _ext.load()
    assert not ext.loaded and ext.reason.startswith("DSRB_BUILD_CUDA=1 but nvcc was not found"), ext
    assert ext.reason.endswith("and DSRB_BUILD_ON_FIRST_USE=0") and loader.calls == []


def test_the_cache_folder_is_absolute_and_expands_home(monkeypatch, tmp_path):
    """DSRB_EXT_CACHE="~/cache" (quoted, so the shell leaves the ~) built into a folder named "~" under the working
    directory, and a relative folder meant one cache, and one rebuild, per working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DSRB_EXT_CACHE", "~/cache")
    assert _ext.cache_root() == str(tmp_path / "home" / "cache")
    monkeypatch.setenv("DSRB_EXT_CACHE", "rel/cache")
    assert _ext.cache_root() == str(tmp_path / "rel" / "cache")
    monkeypatch.setenv("DSRB_EXT_CACHE", "")
    assert _ext.cache_root() == str(tmp_path / "home" / ".cache" / "dsrb" / "extensions")


def test_build_cuda_1_passes_over_a_library_in_the_package_without_cuda_kernels(loader, monkeypatch, tmp_path):
    """DSRB_BUILD_CUDA=1 asks for the CUDA kernels: a first-use build gives them or an error, but a library setup.py
    built without them (DSRB_BUILD_CUDA=0 or no nvcc at install, or kernels that failed to build there) was loaded
    as it was, and CUDA tensors went to the other backends without a word, DSRB_REQUIRE_EXT=1 or not."""
    library = _library_in_package(monkeypatch, tmp_path, b"\x7fELF")
    _build.write_info(library, _build.build_info(_build.source_root(), None))
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Build cuda_12.8.r12.8/compiler.0'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(_build, "find_nvcc", lambda: str(nvcc))
    assert _ext._load().origin == "setup.py build"  # DSRB_BUILD_CUDA=0 (the fixture's)
    monkeypatch.delenv("DSRB_BUILD_CUDA")
    assert _ext._load().origin == "setup.py build"
    monkeypatch.setenv("DSRB_BUILD_CUDA", "1")
    ext = _ext._load()
    assert ext.loaded and ext.origin == "first-use build (cache)" and ext.info["cuda"], ext
    assert len(loader.calls) == 1
    monkeypatch.setenv("DSRB_BUILD_ON_FIRST_USE", "0")
    monkeypatch.setenv("DSRB_EXT_CACHE", str(tmp_path / "empty-cache"))
    ext = _ext._load()
    assert not ext.loaded and "_C.so is stale (built without its CUDA kernels, and DSRB_BUILD_CUDA=1)" in ext.reason


@pytest.mark.parametrize("blank", ["", " "])
def test_a_blank_cxx_builds_with_cpp(loader, monkeypatch, tmp_path, blank):
    """A blank CXX means c++ where dsrb looks for the compiler, but torch's builder took "" for the compiler's name:
    every compile failed ("/bin/sh: 1: : Permission denied"), and the failure was remembered; CXX=" " ended
    `import dsrb.ops` in an IndexError. It is unset for the build."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "c++").write_text("#!/bin/sh\n")
    (bin_dir / "c++").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("CXX", blank)
    seen = []

    def compile_(*args):
        seen.append(os.environ.get("CXX"))
        loader(*args)

    monkeypatch.setattr(_build, "first_use_build", compile_)
    ext = _ext._load()
    assert ext.loaded and seen == [None], (ext, seen)
    assert os.environ["CXX"] == blank
