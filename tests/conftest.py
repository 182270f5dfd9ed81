import hashlib
import os
import sys
import tempfile

import pytest
import torch

# Tests import their helpers as `helpers` from this folder.
sys.path.insert(0, os.path.dirname(__file__))



def _check_kernels_beside_dsrb() -> None:
    """dsrb.kernels is the checkout's top-level kernels/ (setup.py's package_dir). A dsrb imported from another
    checkout (PYTHONPATH on a git worktree) still took dsrb.kernels from the editable install's tree, so the Triton
    tests silently ran the other checkout's kernels: stop instead."""
    import importlib.util

    import dsrb

    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(dsrb.__file__))), "kernels")
    spec = importlib.util.find_spec("dsrb.kernels")
    if os.path.isdir(beside) and spec is not None and spec.origin is not None:
        found = os.path.dirname(os.path.abspath(spec.origin))
        if not os.path.samefile(found, beside):
            raise pytest.UsageError(f"dsrb comes from {os.path.dirname(dsrb.__file__)} but dsrb.kernels from {found}, "
                                    f"not {beside}: install this checkout (pip install -e .), or link its kernels "
                                    "folder as dsrb/kernels")


_check_kernels_beside_dsrb()

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The flag must be set before triton is
# imported (and before dsrb.ops registers the triton backend's devices).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n auto`) the workers share the cores: torch's default of a thread per core in
# each of them would oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))

# Inductor's on-disk graph cache does not notice a change to a custom op's schema or fake implementation, so a
# stale entry can fail a compile test for no reason: key the cache folder on the package sources.
_digest = hashlib.sha1()
for _root in ("dsrb", "kernels"):
    for folder, _, files in sorted(os.walk(os.path.join(os.path.dirname(__file__), "..", _root))):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    _digest.update(f.read())
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"dsrb-inductor-{_digest.hexdigest()[:12]}"))


@pytest.fixture
def uninitialized_memory_is_nan():
    """Every tensor allocated with empty() (torch.empty in a launcher, at::empty in the extension) comes filled with
    NaN, integers with their largest value, as fresh GPU memory holds anything: an output element a kernel should
    write but does not, or a padding it reads before writing, then shows. Deterministic-algorithm checks only warn
    (warn_only), so a reference op without a deterministic CUDA implementation still runs."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]


@pytest.fixture
def gpus(monkeypatch):
    """Fake visible GPUs (a list of compute capabilities to fill) with a driver for CUDA 99.0, and the registry's
    remembered choices reset."""
    from dsrb.ops import _registry

    caps = []
    monkeypatch.setattr(_registry, "_visible_gpus", lambda: [(i, f"Fake GPU {i}", c) for i, c in enumerate(caps)])
    monkeypatch.setattr(_registry, "_SELECTED", {})
    monkeypatch.setattr(_registry, "_driver_cuda_version", lambda: (99, 0))
    monkeypatch.setattr(_registry, "_CUDA_UNUSABLE", {})
    return caps
