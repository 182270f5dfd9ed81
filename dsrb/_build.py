"""How the C++/CUDA extension is built: shared by ``setup.py`` and the first-use build of :mod:`dsrb._ext`.

Standard library only at import (``setup.py`` loads this file by path, before torch may exist). Layout:

    csrc/*.cpp, csrc/cpu/*.cpp    op schemas, CPU kernels             (g++, against torch)
    csrc/cuda/*.cu                CUDA kernels on raw pointers        (nvcc, no torch headers)
    csrc/cuda/*.cpp               glue registering the CUDA kernels   (g++, only with CUDA)

The ``.cu`` files are compiled here with nvcc and linked with the static CUDA runtime into an ordinary C++
extension, so the CPU build of torch links them too: a machine without a GPU still compiles every CUDA line.
A wheel (``pip install .``) carries the same tree as ``dsrb/_csrc``, so the first-use build works outside a checkout.

Environment: ``DSRB_BUILD_CUDA`` (1/0; default 1 when nvcc is found), ``TORCH_CUDA_ARCH_LIST`` (default "9.0";
e.g. "8.0;9.0+PTX"), ``MAX_JOBS`` (parallel compiler processes), ``CUDA_HOME`` (toolkit location), ``CUDAHOSTCXX``
(nvcc's host compiler).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

DEFAULT_ARCH_LIST = "9.0"
# -fopenmp: at::parallel_for runs serially without it. -fno-trapping-math: lets GCC turn the clamps of the CPU
# kernels' vectorisable tanh into selects (with trapping math it keeps branches and the loops stay scalar).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
LD_FLAGS = ["-fopenmp"]


class BuildError(RuntimeError):
    """The extension could not be built; the message says why and where the log is."""


# What the build reads under the source root; setup.py ships exactly these files in a wheel (dsrb/_csrc).
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_root() -> Optional[str]:
    """The C++/CUDA sources: ``dsrb/_csrc`` of an installed wheel (setup.py copies them there), else ``csrc/`` of a
    source checkout or editable install; None if neither holds them. A strict editable install runs this file
    through a symlink in a link tree (build/__editable__...): the checkout is where the link points."""
    for here in dict.fromkeys(os.path.dirname(f) for f in (os.path.abspath(__file__), os.path.realpath(__file__))):
        for root in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
            if os.path.isfile(os.path.join(root, "registration.cpp")):
                return root
    return None


def source_files(root: str) -> List[str]:
    """Every file under ``root`` the build reads (SOURCE_SUFFIXES), sorted."""
    files = glob.glob(os.path.join(root, "**", "*"), recursive=True)
    return sorted(p for p in files if p.endswith(SOURCE_SUFFIXES) and os.path.isfile(p))


def cpp_sources(root: str, with_cuda: bool) -> List[str]:
    """C++ sources: schemas and CPU kernels, plus the CUDA glue (csrc/cuda/*.cpp) when building CUDA."""
    cpp = sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "cpu", "*.cpp")))
    return cpp + (cuda_glue_sources(root) if with_cuda else [])


def cuda_glue_sources(root: str) -> List[str]:
    return sorted(glob.glob(os.path.join(root, "cuda", "*.cpp")))


def cuda_sources(root: str) -> List[str]:
    return sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))


def source_hash(root: str) -> str:
    """Digest of the sources under ``root`` and of this build recipe: a change to either means a rebuild. Paths are
    taken relative to ``root``, so a checkout's csrc/ and a wheel's copy of it give the same digest."""
    digest = hashlib.sha256()
    recipe = os.path.abspath(__file__)
    for name, path in [(os.path.relpath(p, root), p) for p in source_files(root)] + [("<recipe>", recipe)]:
        digest.update(name.encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def find_nvcc() -> Optional[str]:
    """CUDA_HOME's or CUDA_PATH's nvcc, else the one on PATH, else /usr/local/cuda's (torch looks there too)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    default = "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc") or (default if os.access(default, os.X_OK) else None)


def cuda_home(nvcc: str) -> str:
    """The toolkit folder holding the static CUDA runtime that goes with ``nvcc``."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in filter(None, candidates):
        if _cudart_dir(home):
            return home
    raise BuildError(f"found {nvcc} but no libcudart_static.a beside it; set CUDA_HOME to the CUDA toolkit")


def _cudart_dir(home: str) -> Optional[str]:
    """The folder of ``home`` holding libcudart_static.a: NVIDIA's installers and conda (lib64, lib, targets/<arch>/lib)
    or a Debian/Ubuntu package (nvcc in /usr/bin, the library in /usr/lib/<multiarch>)."""
    machine = platform.machine()
    targets = {"x86_64": ("x86_64-linux",), "aarch64": ("sbsa-linux", "aarch64-linux")}.get(machine, ())
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{machine}-linux-gnu"
    for sub in ("lib64", "lib", *(os.path.join("targets", t, "lib") for t in targets), os.path.join("lib", multiarch)):
        if os.path.isfile(os.path.join(home, sub, "libcudart_static.a")):
            return os.path.join(home, sub)
    return None


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str) -> Optional[bool]:
    """The on/off environment variable ``name``: True (1, true, yes, on), False (0, false, no, off) or None (unset or
    empty). Any other value is a ValueError naming it: a DSRB_REQUIRE_EXT=ture must not pass CI on the fallback."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if value.lower() in _ON:
        return True
    if value.lower() in _OFF:
        return False
    raise ValueError(f"environment variable {name}: expected 1 or 0 (or true/false, yes/no, on/off), got {value!r}")


ENV_FLAGS = ("DSRB_BUILD_CUDA", "DSRB_REQUIRE_EXT", "DSRB_BUILD_ON_FIRST_USE", "DSRB_DISABLE_EXT")


def check_env_flags() -> None:
    """Every on/off variable read, and MAX_JOBS and TORCH_CUDA_ARCH_LIST checked, so that a bad value is a ValueError
    naming it whether or not the code path reading it runs (a bad build variable was only the extension's reason to
    be missing, and the tools ran on the torch backend)."""
    for name in ENV_FLAGS:
        env_flag(name)
    for check in (jobs, arch_list):
        try:
            check()
        except BuildError as err:
            raise ValueError(str(err)) from None


def want_cuda() -> Optional[str]:
    """The nvcc to build the CUDA kernels with, or None. DSRB_BUILD_CUDA=1 without nvcc is an error."""
    flag = env_flag("DSRB_BUILD_CUDA")
    if flag is False:
        return None
    nvcc = find_nvcc()
    if flag and nvcc is None:
        raise BuildError("DSRB_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return nvcc


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST (unset or blank: the default), checked: a bad entry is a BuildError naming the variable
    before anything is built, not a CUDA build failure that is remembered or falls back to the CPU kernels alone."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    parse_arch_list(archs)
    return archs


_ARCH_ENTRY = re.compile(r"(\d+)\.?(\d)([af]?)")  # 9.0, 90, 10.0, 9.0a, 10.0f
# torch's names for architectures in TORCH_CUDA_ARCH_LIST (torch.utils.cpp_extension, 2.13): the variable is torch's,
# set for every extension ("Ampere;Hopper" in a Dockerfile), so each name means here what it means to torch.
NAMED_ARCHS = {"Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
               "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
               "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
               "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX"}


def parse_arch_list(archs: str) -> List[Tuple[int, int, str, bool]]:
    """TORCH_CUDA_ARCH_LIST syntax ("8.0;9.0+PTX", "9.0a", torch's names such as "Hopper", spaces or semicolons) ->
    (major, minor, suffix, ptx)."""
    entries = []
    items = archs.replace(";", " ").split()
    for item in [entry for item in items for entry in NAMED_ARCHS.get(item, item).split(";")]:
        ptx = item.endswith("+PTX")
        m = _ARCH_ENTRY.fullmatch(item[:-4] if ptx else item)
        if m is None:
            raise BuildError(f"TORCH_CUDA_ARCH_LIST: cannot read {item!r} (expected entries like 8.0, 9.0, 9.0+PTX, "
                             "or torch's names such as Hopper)")
        entries.append((int(m[1]), int(m[2]), m[3], ptx))
    if not entries:  # ";" alone: nvcc would pick its own default GPU, which no recorded list would name
        raise BuildError(f"TORCH_CUDA_ARCH_LIST: no architecture in {archs!r} (expected entries like 8.0, 9.0, "
                         "9.0+PTX)")
    return entries


def gencode_flags(archs: str) -> List[str]:
    """TORCH_CUDA_ARCH_LIST -> nvcc -gencode flags: a cubin per entry, and PTX where it says +PTX."""
    flags = []
    for major, minor, suffix, ptx in parse_arch_list(archs):
        cc = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def runs_on(archs: str, capability: Tuple[int, int], ptx: bool = True) -> bool:
    """Whether kernels built for TORCH_CUDA_ARCH_LIST ``archs`` run on a GPU of compute ``capability``, by CUDA's
    compatibility rules: a cubin for X.Y runs on X.Z with Z >= Y (an architecture-specific X.Ya only on X.Y); PTX
    (+PTX) of a plain X.Y also on every later GPU, which the driver compiles it for (``ptx=False``: cubins only)."""
    major, minor = capability
    for M, m, suffix, has_ptx in parse_arch_list(archs):
        if suffix == "a":
            if (major, minor) == (M, m):
                return True
        elif (major == M and minor >= m) or (ptx and has_ptx and not suffix and (major, minor) >= (M, m)):
            return True
    return False


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a cpuset, taskset), as torch sizes its thread pool, where
    os.cpu_count() counts every CPU of the machine (a container limited to 2 of 64 ran 64 compilers or threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity to ask (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def jobs() -> int:
    """Parallel compile jobs: MAX_JOBS, else the usable CPUs up to 8. A MAX_JOBS that is not a positive integer is a
    BuildError (0 would reach ninja as -j 0, which it reads as no limit)."""
    value = os.environ.get("MAX_JOBS", "").strip()
    if not value:
        return min(usable_cpus(), 8)
    if not (value.isascii() and value.isdigit()) or int(value) < 1:  # isdigit alone takes "²", which int() refuses
        raise BuildError(f"MAX_JOBS: expected a positive number of parallel compile jobs, got {value!r}")
    return int(value)


def host_compiler_flags() -> List[str]:
    """``-ccbin $CUDAHOSTCXX``: nvcc does not read CUDAHOSTCXX (CMake's name for its host compiler), so setting it to
    fix an nvcc that rejects the default g++ changed nothing. Not where nvcc is given one already (NVCC_CCBIN, or a
    -ccbin in NVCC_PREPEND_FLAGS or NVCC_APPEND_FLAGS: older nvcc refuse a second)."""
    host = os.environ.get("CUDAHOSTCXX", "").strip()
    given = " ".join(os.environ.get(name, "") for name in ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS"))
    if not host or os.environ.get("NVCC_CCBIN", "").strip() or re.search(r"(^|\s)(-ccbin|--compiler-bindir)", given):
        return []
    return ["-ccbin", host]


def compile_cuda(cu_sources: List[str], out_dir: str, nvcc: str, include_dir: str, log: List[str]) -> List[str]:
    """Compile each .cu to an object in ``out_dir`` (in parallel); returns the object paths."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{os.path.abspath(include_dir)}",
             *gencode_flags(arch_list()), *host_compiler_flags()]

    def one(src: str) -> str:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        cmd = [nvcc, "-c", os.path.abspath(src), "-o", obj, *flags]
        # Run in the build folder, as torch runs ninja: an nvcc left running by a killed build is then found by its
        # working directory (dsrb._ext waits for it before building there again).
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir)
        log.append(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        if proc.returncode < 0:
            raise BuildError(f"nvcc was killed by signal {-proc.returncode} on {os.path.basename(src)}")
        if proc.returncode != 0:
            raise BuildError(f"nvcc failed on {os.path.basename(src)}:\n{proc.stderr.strip()[-4000:]}")
        return obj

    with ThreadPoolExecutor(jobs()) as pool:
        return list(pool.map(one, cu_sources))


def cuda_link_flags(nvcc: str) -> List[str]:
    """Static CUDA runtime: the extension needs no libcudart on the library path (and loads without a GPU)."""
    return [f"-L{_cudart_dir(cuda_home(nvcc))}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]


def first_use_build(root: str, folder: str, name: str, nvcc: Optional[str], jobs: int, log: List[str]) -> None:
    """Build the library ``name`` from the sources under ``root`` into ``folder`` with torch's ninja builder
    (the first-use build of :mod:`dsrb._ext`; here, so that a change to it changes :func:`source_hash`)."""
    from torch.utils import cpp_extension

    cflags, ldflags = list(CXX_FLAGS), list(LD_FLAGS)
    if nvcc:
        objects = compile_cuda(cuda_sources(root), os.path.join(folder, "cuda"), nvcc, root, log)
        cflags.append("-DDSRB_WITH_CUDA")
        # torch writes the link flags into build.ninja joined by spaces, unquoted, and ninja hands the command to
        # the shell: quote the paths (the cache folder may hold a space), and double ninja's '$'.
        ldflags = [shlex.quote(flag).replace("$", "$$") for flag in objects + cuda_link_flags(nvcc)] + ldflags
    # is_python_module=False: a plain shared library whose static initialisers register the ops; load() dlopens it.
    # MAX_JOBS, validated (ninja reads 0 as no limit), for this build only.
    previous = os.environ.get("MAX_JOBS")
    os.environ["MAX_JOBS"] = str(jobs)
    try:
        cpp_extension.load(name=name, sources=cpp_sources(root, bool(nvcc)), extra_cflags=cflags,
                           extra_ldflags=ldflags, extra_include_paths=[root], build_directory=folder,
                           is_python_module=False, verbose=False)
    finally:
        if previous is None:
            del os.environ["MAX_JOBS"]
        else:
            os.environ["MAX_JOBS"] = previous


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


def python_version() -> str:
    """The Python a build is for: "3.11", or "3.13t" for a free-threaded one (another ABI: its builds load only in
    it, yet the two shared one cache folder and one record's "python")."""
    return f"{sys.version_info.major}.{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"


def build_info(root: str, nvcc: Optional[str]) -> Dict[str, object]:
    """What a build was made from; stored beside the library and compared before loading it."""
    import torch

    return {
        "torch": torch.__version__,
        "python": python_version(),
        "source_hash": source_hash(root),
        "cuda": bool(nvcc),
        "cuda_arch_list": arch_list() if nvcc else None,
        "nvcc": nvcc_version(nvcc) if nvcc else None,
        "cxx_flags": CXX_FLAGS,
    }


def info_path(library: str) -> str:
    return library + ".json"


def library_digest(library: str) -> str:
    """SHA-256 of the built library: recorded with it, so that a truncated or overwritten copy is found before it is
    loaded (dlopen of a truncated library ends the process with SIGBUS, no Python error)."""
    digest = hashlib.sha256()
    with open(library, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_damaged(library: str, info: Dict[str, object]) -> Optional[str]:
    """None if ``library`` is the file its build record ``info`` was written for, else what is wrong with it."""
    if not os.path.isfile(library):
        return "the library is missing"
    if library_digest(library) != info.get("library_sha256"):
        return "the library does not match its build record: truncated or changed since it was built"
    return None


def write_info(library: str, info: Dict[str, object]) -> None:
    """The build record beside ``library``, with the library's digest; written last, atomically."""
    tmp = info_path(library) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(info, library_sha256=library_digest(library)), f, indent=1, sort_keys=True)
    os.replace(tmp, info_path(library))
