"""The C++/CUDA extension: find it, build it on first use, load it, or say why it is not there.

Where a build comes from, in order:
1. ``dsrb/_C*.so``, built by ``pip install -e . --no-build-isolation`` (setup.py), if it was built from the same
   sources for the same torch and Python (``<library>.json`` beside it records what it was built from), and with
   its CUDA kernels where DSRB_BUILD_CUDA=1;
2. the first-use cache ``$DSRB_EXT_CACHE`` (default ``~/.cache/dsrb/extensions``), one folder per
   (sources, torch, Python, CUDA, arch list): a plain ``pip install -e .`` cannot build against torch (pip builds in
   an isolated environment), so the first ``import dsrb.ops`` compiles the extension there, once (about a minute on
   2 cores; torch's ninja builder), and later imports load it in milliseconds.

``DSRB_BUILD_ON_FIRST_USE=0`` skips step 2's compile (report only); ``DSRB_DISABLE_EXT=1`` skips the extension
entirely; ``DSRB_REQUIRE_EXT=1`` turns a missing extension into an ImportError (CI). A failed first-use build is
remembered (``FAILED``, with the compilers and settings it used, + ``build.log`` in its cache folder) and not
retried until those change or that folder is deleted, so a broken toolchain costs one attempt, not one per import;
CUDA kernels that fail to build (DSRB_BUILD_CUDA unset) leave a build of the CPU kernels alone. A finished build
loads from a read-only cache; a cache that cannot be written is a reason like any other (the package runs on its
other backends). ``python -m dsrb.info`` prints the outcome.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import _build
from ._files import expand_home


@dataclass
class Extension:
    """What was loaded (``path``, ``info``) or why nothing was (``reason``)."""

    path: Optional[str] = None
    info: Dict[str, object] = field(default_factory=dict)
    reason: Optional[str] = None
    origin: str = ""  # "setup.py build" or "first-use build (cache)"
    cuda_reason: Optional[str] = None  # loaded without CUDA kernels because they failed to build (set or recorded)

    @property
    def loaded(self) -> bool:
        return self.path is not None

    @property
    def backends(self) -> Tuple[str, ...]:
        if not self.loaded:
            return ()
        return ("cpu", "cuda") if self.info.get("cuda") else ("cpu",)


_STATE: Optional[Extension] = None


def load() -> Extension:
    """Load the extension once per process (building it first if needed); never raises unless a setting is bad (a
    ValueError naming the variable: a value that is not one, DSRB_BUILD_CUDA=1 without nvcc where a build is needed)
    or the extension is missing and DSRB_REQUIRE_EXT=1, checked on every call: a second ``import dsrb.ops`` must not
    pass on the fallback where the first one failed."""
    global _STATE
    _build.check_env_flags()  # first: a bad value is an error, built or not
    required = _build.env_flag("DSRB_REQUIRE_EXT")
    if _STATE is None:
        _STATE = _load()
    if not _STATE.loaded and required:
        raise ImportError(f"dsrb: DSRB_REQUIRE_EXT=1 but the C++ extension is not available: {_STATE.reason}")
    return _STATE


@contextlib.contextmanager
def _scripts_on_path():
    """This interpreter's scripts folder (a virtual environment's bin, where ``pip install ninja`` puts ninja) on
    PATH while torch's builder looks for ninja and runs it: it looks on PATH only, so a venv's python run without
    activating the venv (cron, an IDE, a service) found no ninja and built nothing."""
    scripts, path = sysconfig.get_path("scripts"), os.environ.get("PATH")
    if not scripts or scripts in (path or "").split(os.pathsep):
        yield
        return
    os.environ["PATH"] = scripts + (os.pathsep + path if path else "")
    try:
        yield
    finally:
        if path is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = path


def _cxx() -> str:
    """The compiler torch's builder calls: CXX's first word (CXX="ccache g++"), c++ where CXX is unset or blank."""
    words = os.environ.get("CXX", "").split()
    return words[0] if words else "c++"


@contextlib.contextmanager
def _blank_cxx_unset():
    """A blank CXX unset while torch's builder runs: here, as for every variable, blank means unset (the compiler
    c++), but torch's builder took it for the compiler's name, so a build with CXX="" failed on every source
    ("/bin/sh: 1: : Permission denied") and was remembered."""
    value = os.environ.get("CXX")
    if value is None or value.strip():
        yield
        return
    del os.environ["CXX"]
    try:
        yield
    finally:
        os.environ["CXX"] = value


def cache_root() -> str:
    """DSRB_EXT_CACHE, absolute: a quoted "~/..." (not expanded by the shell, or set in a Dockerfile) made a folder
    named "~" in the working directory, and a relative path another cache, and a rebuild, in every directory. Where
    "~" has no meaning (no HOME, and no home folder for this user id: a container run as an arbitrary user), it
    stands for ``<temporary folder>/dsrb-home-<uid>``, not a folder "~" in the working directory."""
    folder = os.environ.get("DSRB_EXT_CACHE", "").strip() or os.path.join("~", ".cache", "dsrb", "extensions")
    return os.path.abspath(expand_home(folder))


def _matches(info: Dict[str, object], want: Dict[str, object]) -> Optional[str]:
    """None if a build recorded as ``info`` fits ``want``, else what differs."""
    for key in ("torch", "python", "source_hash"):
        if want.get(key) is not None and info.get(key) != want[key]:
            return f"{key} {info.get(key)} != {want[key]}"
    return None


def _read_info(library: str) -> Dict[str, object]:
    try:
        with open(_build.info_path(library)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _open(library: str, info: Dict[str, object], origin: str) -> Extension:
    import torch

    try:
        torch.ops.load_library(library)
    except OSError as exc:  # e.g. built for another torch ABI despite the record
        return Extension(reason=f"{library} could not be loaded: {exc}")
    return Extension(path=library, info=info, origin=origin, cuda_reason=info.get("cuda_failed"))


def _load() -> Extension:
    if _build.env_flag("DSRB_DISABLE_EXT"):
        return Extension(reason=f"disabled by DSRB_DISABLE_EXT={os.environ['DSRB_DISABLE_EXT']}")
    import torch

    root = _build.source_root()
    want = {"torch": torch.__version__, "python": _build.python_version(),
            "source_hash": _build.source_hash(root) if root else None}

    stale = []
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for library in sorted(glob.glob(os.path.join(here, "_C" + suffix))):
            info = _read_info(library)
            why = (_matches(info, want) or _build.library_damaged(library, info)) if info else \
                "no build record beside it"
            if why is None and not info.get("cuda") and _build.env_flag("DSRB_BUILD_CUDA"):
                # as a first-use build would be: its CUDA kernels or an error, never the CPU kernels alone unsaid
                why = "built without its CUDA kernels, and DSRB_BUILD_CUDA=1"
            if why is None:
                return _open(library, info, "setup.py build")
            stale.append(f"{os.path.basename(library)} is stale ({why})")

    if root is None:
        ext = Extension(reason="no C++ sources to build from (neither dsrb/_csrc of a wheel nor csrc/ of a "
                               "checkout): reinstall dsrb")
    else:
        try:
            ext = _first_use_build(root, want)
        except _build.BuildError as exc:
            ext = Extension(reason=str(exc))
        except OSError as exc:  # a read-only home, a file in the way: the package still runs on its other backends
            ext = Extension(reason=f"the extension cache {cache_root()} cannot be written ({exc}); set "
                                   "DSRB_EXT_CACHE to a writable folder")
    if not ext.loaded and stale:
        ext.reason = "; ".join(stale + [ext.reason])
    return ext


def _first_use_build(root: str, want: Dict[str, object]) -> Extension:
    """The cached build of these sources, with the CUDA kernels when nvcc is found. Where those fail to build and
    DSRB_BUILD_CUDA is not 1 (an nvcc that rejects this host compiler, say), the CPU kernels alone: a broken CUDA
    toolchain costs the ``cuda`` backend, not the ``cpu`` one. Raises BuildError when nothing could be built."""
    try:
        nvcc = _build.want_cuda()
    except _build.BuildError as exc:  # DSRB_BUILD_CUDA=1 without nvcc: the user's setting, an error as a bad value is
        if _build.env_flag("DSRB_BUILD_ON_FIRST_USE") is False:  # where no build is made (a tool's --help): a reason
            return Extension(reason=f"{exc}, and DSRB_BUILD_ON_FIRST_USE=0")
        raise ValueError(str(exc)) from None
    if nvcc:  # a bad TORCH_CUDA_ARCH_LIST is the user's to fix: a reason, neither a fallback nor a remembered failure
        _build.arch_list()
    fallback = bool(nvcc) and not _build.env_flag("DSRB_BUILD_CUDA")
    try:
        return _cached_build(root, want, nvcc, fallback)
    except _build.BuildError as exc:
        if not fallback:
            raise
        cuda_failed = str(exc)
    ext = _cached_build(root, want, None, False)
    ext.cuda_reason = f"its CUDA kernels failed to build: {cuda_failed}"
    return ext


def _cached_build(root: str, want: Dict[str, object], nvcc: Optional[str], fallback: bool) -> Extension:
    """The build in its cache folder, made now if needed; raises BuildError for a failure, now or earlier."""
    from .checkpoint import FileLock

    key = f"{want['source_hash']}-torch{want['torch']}-py{want['python']}-" + (
        f"cuda{_build.arch_list().replace(';', '_').replace(' ', '_')}" if nvcc else "cpu")
    folder = os.path.join(cache_root(), key)
    # One name per kind: after a failed CUDA build, torch would give the CPU fallback's library of the same name, built
    # in the same process, another file name (dsrb_ext_v1.so).
    name = "dsrb_ext_cuda" if nvcc else "dsrb_ext_cpu"
    library = os.path.join(folder, name + ".so")
    failed = os.path.join(folder, "FAILED")
    # A finished build, or a failed one, needs no lock (the record and FAILED are written last), so a read-only cache
    # still loads it, or falls back from it.
    info = _finished(library)
    if info:
        return _open(library, info, "first-use build (cache)")
    toolchain = _toolchain(nvcc)
    if _failed_with(failed, toolchain):
        raise _failed_earlier(folder)
    if _build.env_flag("DSRB_BUILD_ON_FIRST_USE") is False:  # nothing to build: no lock to wait for
        recorded = _read_info(library)
        state = (f"the cached build {library} is damaged ({_build.library_damaged(library, recorded)})" if recorded
                 else "not built yet")
        return Extension(reason=f"{state} and DSRB_BUILD_ON_FIRST_USE=0 (unset it, or "
                                "`pip install -e . --no-build-isolation`)")
    os.makedirs(folder, exist_ok=True)
    waiting = (f"dsrb: waiting for another process's first-use build in {folder} (if that process is stopped, "
               "resume or end it)")
    # concurrent processes (DDP ranks, pytest-xdist) build once
    with FileLock(os.path.join(folder, ".lock"), waiting=waiting):
        info = _finished(library)
        if info:
            return _open(library, info, "first-use build (cache)")
        if _failed_with(failed, toolchain):
            raise _failed_earlier(folder)
        if os.path.isfile(failed):
            print("dsrb: the compiler or its settings changed since the first-use build failed; building again",
                  file=sys.stderr, flush=True)
            os.remove(failed)
        _discard_damaged(library)
        cxx = _cxx()
        if shutil.which(cxx) is None:  # not remembered as a failure: installing one is enough
            return Extension(reason=f"no C++ compiler to build it: {cxx!r} is not on PATH (install g++, or set CXX)")
        from torch.utils.cpp_extension import is_ninja_available

        with _scripts_on_path():
            ninja = is_ninja_available()
        if not ninja:
            return Extension(reason="ninja, torch's builder, is not installed (pip install ninja)")
        print(f"dsrb: building the C++{'/CUDA' if nvcc else ''} extension for torch {want['torch']} (first use, "
              f"about a minute on 2 cores; cached in {folder})", file=sys.stderr, flush=True)
        start = time.time()
        log = []
        _wait_for_orphaned_build(folder)
        # torch's builder guards the folder with its own file "lock", which a build killed by a signal (a time limit,
        # the OOM killer) leaves behind: every later build would wait on it forever. Under dsrb's lock no other
        # build of this folder runs, so a "lock" here is such a leftover.
        if os.path.exists(os.path.join(folder, "lock")):
            os.remove(os.path.join(folder, "lock"))
        jobs = _build.jobs()  # a bad MAX_JOBS is the user's to fix, not a build failure to remember
        try:
            with _scripts_on_path(), _blank_cxx_unset():
                _build.first_use_build(root, folder, name, nvcc, jobs, log)
        except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure becomes a reported reason
            with open(os.path.join(folder, "build.log"), "w") as f:
                f.write("\n\n".join(log + [str(exc)]))
            if _killed(exc, log):  # not remembered: the next import builds again
                print(f"dsrb: the first-use build was killed (the OOM killer, a time limit?); the next import builds "
                      f"again (MAX_JOBS=1 needs less memory; log: {folder}{os.sep}build.log)", file=sys.stderr,
                      flush=True)
                raise _build.BuildError(f"the first-use build was killed (log: {os.path.join(folder, 'build.log')}); "
                                        "the next import builds again") from None
            with open(failed, "w") as f:
                json.dump(toolchain, f)
            # DSRB_REQUIRE_EXT=1 stops the tool next: no word of other backends
            what = ("the build with the CUDA kernels failed; building the CPU kernels alone" if fallback else
                    "the extension build failed" + ("" if _build.env_flag("DSRB_REQUIRE_EXT") else
                                                    "; the ops run on their other backends"))
            print(f"dsrb: {what} (log: {folder}{os.sep}build.log; `python -m dsrb.info` says more)", file=sys.stderr,
                  flush=True)
            raise _build.BuildError(f"the first-use build failed: {_first_error(str(exc))} (log: "
                                    f"{os.path.join(folder, 'build.log')}; change the compiler or its settings, or "
                                    f"delete {folder}, to retry)") from None
        info = _build.build_info(root, nvcc)
        _build.write_info(library, info)
        print(f"dsrb: extension built in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        # cpp_extension.load in _build.first_use_build has already loaded the library into this process.
        return Extension(path=library, info=info, origin="first-use build (cache)")


# Programs a build runs in its folder (ninja and what it starts, nvcc and its stages), by their /proc comm name.
_BUILD_PROGRAMS = frozenset({"ninja", "c++", "g++", "gcc", "cc", "cc1plus", "clang", "clang++", "as", "ld", "collect2",
                             "ld.bfd", "ld.gold", "ld.lld", "nvcc", "cicc", "ptxas", "cudafe++", "fatbinary", "nvlink"})


def _build_processes(folder: str) -> List[int]:
    """The build programs running in ``folder`` or below it (Linux: their /proc working directory), but this process."""
    found, folder = [], os.path.realpath(folder)  # as /proc gives working directories
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc (macOS): nothing to find
        return found
    for pid in filter(str.isdigit, entries):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:  # gone, or another user's
            continue
        if comm in _BUILD_PROGRAMS and int(pid) != os.getpid() and (cwd == folder or cwd.startswith(folder + os.sep)):
            found.append(int(pid))
    return found


def _wait_for_orphaned_build(folder: str, poll_s: float = 0.5) -> None:
    """Under the lock, before building: wait for the build programs still running in ``folder``. A process killed
    during its build (SIGKILL, a time limit) releases the lock, but ninja and the compilers it started run on, writing
    the same objects and link as a new build would: the two together could leave a broken library, remembered as a
    failed build."""
    pids = _build_processes(folder)
    if pids:
        print(f"dsrb: waiting for the build programs (pids {', '.join(map(str, pids))}) that a killed process left "
              f"running in {folder} (end them to stop waiting)", file=sys.stderr, flush=True)
    while pids:
        time.sleep(poll_s)
        pids = _build_processes(folder)


def _finished(library: str) -> Dict[str, object]:
    """The build record of ``library`` if it is a finished build (the record is there, and the library is the file it
    was written for), else {}."""
    info = _read_info(library)
    return info if info and _build.library_damaged(library, info) is None else {}


def _discard_damaged(library: str) -> None:
    """Under the lock, before building: a library its record does not vouch for (truncated or overwritten since its
    build, or left without a record) is removed with the record, so that it is linked again, not taken as up to date
    by ninja and loaded (a truncated library ends the process with SIGBUS)."""
    info = _read_info(library)
    if info:
        why = _build.library_damaged(library, info)
        print(f"dsrb: the cached build {library} is damaged ({why}); building it again", file=sys.stderr, flush=True)
    for path in (_build.info_path(library), library):
        if os.path.exists(path):
            os.remove(path)


# What a compiler driver or nvcc prints when the OOM killer or a time limit ends one of its programs.
_KILLED = re.compile(r"Killed signal terminated program|died due to signal|unable to execute command: Killed|"
                     r"killed by signal")


def _killed(exc: BaseException, log: List[str]) -> bool:
    """Whether the build failed because a process was killed by a signal, rather than on the sources."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, subprocess.CalledProcessError) and seen.returncode < 0:
            return True
        seen = seen.__cause__ or seen.__context__
    return bool(_KILLED.search(str(exc)) or any(_KILLED.search(entry) for entry in log))


# What a user changes to fix a failed build, besides the sources and torch (the cache folder's name): what the
# first-use build reads (torch's ninja builder takes CXX, not CC, CFLAGS, CXXFLAGS or LDFLAGS, so a change to those
# retried a build that would fail the same way), the search paths g++ reads, and nvcc's settings.
_TOOLCHAIN_VARIABLES = ("CXX", "CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH", "LIBRARY_PATH", "CUDA_HOME",
                        "CUDA_PATH", "CUDAHOSTCXX", "NVCC_CCBIN", "NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS")


def _toolchain(nvcc: Optional[str]) -> Dict[str, object]:
    """The compilers a build would use (their real paths: an upgrade or another alternative changes them) and the
    settings they read."""
    cxx = shutil.which(_cxx())
    return {"cxx": cxx and os.path.realpath(cxx), "nvcc": nvcc and os.path.realpath(nvcc),
            "env": {name: os.environ[name] for name in _TOOLCHAIN_VARIABLES if name in os.environ}}


def _failed_with(failed: str, toolchain: Dict[str, object]) -> bool:
    """Whether a failed build (its FAILED file) was made with this toolchain: a build that failed with another
    compiler or other settings is tried again. A record that cannot be read (an older dsrb's empty file) counts."""
    if not os.path.isfile(failed):
        return False
    try:
        with open(failed) as f:
            return json.load(f) == toolchain
    except (OSError, ValueError):
        return True


# A compiler's or nvcc's error line: "x.cpp:3:5: error: ...", "g++: fatal error: ...", "nvcc fatal   : ...".
_ERROR_LINE = re.compile(r"(error|fatal)\s*:", re.IGNORECASE)


def _first_error(output: str, limit: int = 300) -> str:
    """The line of a failed build's output that says why (its first error line, else its first line), cut to
    ``limit`` characters: the reason is one line, as a tool's error under DSRB_REQUIRE_EXT=1 must be (torch's message
    is ninja's whole output, command lines included); build.log keeps all of it."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    line = next((line for line in lines if _ERROR_LINE.search(line)), lines[0] if lines else "no output")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _failed_earlier(folder: str) -> "_build.BuildError":
    """The remembered failure, with its log's error line: the failed build said that `python -m dsrb.info` says
    more, which later found only that it had failed."""
    log = os.path.join(folder, "build.log")
    try:
        with open(log, errors="replace") as f:
            why = f": {_first_error(f.read())}"
    except OSError:  # removed or unreadable: the rest of the reason stands
        why = ""
    return _build.BuildError(f"the first-use build failed earlier{why} (log: {log}); change the compiler or its "
                             f"settings, or delete {folder}, to retry")
