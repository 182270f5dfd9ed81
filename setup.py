"""Build script: the Python package, and the C++/CUDA extension ``dsrb._C`` when torch is importable here.

- ``pip install -e . --no-build-isolation`` (torch installed first): compiles the extension now, CUDA kernels
  included when nvcc is found (``DSRB_BUILD_CUDA``, ``TORCH_CUDA_ARCH_LIST`` default 9.0, ``MAX_JOBS``).
- ``pip install -e .`` builds in an isolated environment without torch, so it installs the Python package only;
  the extension is then compiled on first use (see dsrb/_ext.py) or explained by ``python -m dsrb.info``.
- ``pip install .`` (a wheel) is the same, with the C++/CUDA sources copied into the package for that first-use build.
- ``DSRB_REQUIRE_EXT=1``: a failure to compile here is an error, not a warning (torch being absent is not a
  failure: the first-use build takes over, and fails loudly under the same variable).
The recipe (sources, flags, nvcc step) lives in dsrb/_build.py and is shared with the first-use build.
"""

import importlib.util
import os
import sys

import setuptools
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))

# An editable install through setuptools < 64 (what pip falls back to with --no-build-isolation in an environment
# with an old setuptools; pyproject.toml asks for >= 64) is `setup.py develop`, which ignores the package_dir mapping
# of dsrb.kernels: the package would install without its Triton kernels.
if "develop" in sys.argv and int(setuptools.__version__.split(".")[0]) < 64:
    sys.exit(f"dsrb: an editable install needs setuptools >= 64 (found {setuptools.__version__}): run "
             "`pip install -U setuptools wheel`, then install again")

_spec = importlib.util.spec_from_file_location("dsrb_build", os.path.join(ROOT, "dsrb", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def extension():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("dsrb: torch is not importable at build time (isolated build): installing the Python package; the "
              "C++ extension will be built on first use (or use `pip install -e . --no-build-isolation`)")
        return [], {}

    class Build(BuildExtension):
        """Compiles csrc/cuda/*.cu with nvcc first, then the C++ sources with the objects and the CUDA runtime."""

        def finalize_options(self):
            # Always link: distutils skips an extension whose library is newer than its .cpp files, blind to the
            # headers and the CUDA objects, and the record written below would then vouch for the old library.
            super().finalize_options()
            self.force = True

        def build_extension(self, ext):
            super().build_extension(ext)
            self.dsrb_built = True  # not reached on a failure, which setuptools only warns of for an optional one

        def build_extensions(self):
            # The user's settings first, outside the fallback below: a bad value (MAX_JOBS, which torch's builder
            # reads too; TORCH_CUDA_ARCH_LIST; an on/off variable) or DSRB_BUILD_CUDA=1 without nvcc fails the
            # install. Reported as a warning there, pip showed it only under -v and the install "succeeded".
            try:
                build.check_env_flags()
                nvcc = build.want_cuda()
            except (ValueError, build.BuildError) as exc:
                sys.exit(f"dsrb: error: {exc}")
            try:
                ext, root = self.extensions[0], build.source_root()
                cuda_failed = None
                if nvcc:
                    try:
                        ext.extra_objects += build.compile_cuda(build.cuda_sources(root),
                                                                os.path.join(self.build_temp, "cuda"), nvcc, root, [])
                    except build.BuildError as exc:  # e.g. an nvcc that rejects this host compiler
                        if build.env_flag("DSRB_BUILD_CUDA"):
                            raise
                        cuda_failed, nvcc = f"its CUDA kernels failed to build at install time: {exc}", None
                        print(f"dsrb: WARNING: {cuda_failed}\ndsrb: building the CPU kernels alone")
                if nvcc:
                    ext.sources += [os.path.relpath(p, ROOT) for p in build.cuda_glue_sources(root)]
                    ext.extra_compile_args["cxx"].append("-DDSRB_WITH_CUDA")
                    ext.extra_link_args += build.cuda_link_flags(nvcc)
                super().build_extensions()
                if not getattr(self, "dsrb_built", False):
                    raise build.BuildError("the compiler or the linker failed (its output is above)")
                info = build.build_info(root, nvcc)
                if cuda_failed:
                    info["cuda_failed"] = cuda_failed
                build.write_info(self.get_ext_fullpath(ext.name), info)
                self.dsrb_info = info  # what copy_extensions_to_source records: only a library built here
            except Exception as exc:  # noqa: BLE001 - reported; the first-use build or dsrb.info explains later
                if build.env_flag("DSRB_REQUIRE_EXT"):
                    raise
                print(f"dsrb: WARNING: the C++ extension was not built ({exc}); the package works on the torch "
                      "backend, and `python -m dsrb.info` says what is missing")

        def copy_extensions_to_source(self):
            """Editable installs copy the built library into dsrb/ (self.inplace is set again by now, so
            get_ext_fullpath names that copy): its build record goes beside it. After a failed build (reported
            above) there is nothing to copy; setuptools < 64, which ignores `optional` here, would fail the install."""
            if not getattr(self, "dsrb_info", None):
                return
            super().copy_extensions_to_source()
            build.write_info(self.get_ext_fullpath(self.extensions[0].name), self.dsrb_info)

    try:  # read here, before build_extensions' check of every setting: one error line, not a traceback
        required = build.env_flag("DSRB_REQUIRE_EXT")
    except ValueError as exc:
        sys.exit(f"dsrb: error: {exc}")
    root = build.source_root()
    cpp = build.cpp_sources(root, with_cuda=False)
    # optional: after a failed build (reported above) an editable install skips copying the missing library
    # instead of failing, so the package still installs and runs on its other backends.
    # -g0 last: Python's own CFLAGS, which setuptools puts first, carry -g (the CPU kernels: 18 MB, 1 MB without).
    ext = CppExtension("dsrb._C", [os.path.relpath(p, ROOT) for p in cpp], include_dirs=[root],
                       extra_compile_args={"cxx": [*build.CXX_FLAGS, "-g0"]}, extra_link_args=list(build.LD_FLAGS),
                       optional=not required)
    return [ext], {"build_ext": Build}


class BuildPy(build_py):
    """Copies the C++/CUDA sources into the package as dsrb/_csrc, so that an installed wheel (``pip install .``,
    ``pip install git+...``) can build its extension on first use; an editable install reads csrc/ in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        root = os.path.join(ROOT, "csrc")
        for src in build.source_files(root):
            dst = os.path.join(self.build_lib, "dsrb", "_csrc", os.path.relpath(src, root))
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst)


ext_modules, cmdclass = extension()
cmdclass["build_py"] = BuildPy

# The license is set here, not in pyproject.toml: setuptools >= 77 takes only an SPDX string there (the table form is
# deprecated, an error from 2027), and setuptools < 77 (Python 3.11's venv default is 65.5, used by
# --no-build-isolation) takes only the table.
LICENSE = "Apache-2.0"
_license = {"license_expression": LICENSE} if int(setuptools.__version__.split(".")[0]) >= 77 else {"license": LICENSE}

setup(
    packages=find_packages(include=["dsrb", "dsrb.*"]) + ["dsrb.kernels"],
    package_dir={"dsrb.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    **_license,
)
