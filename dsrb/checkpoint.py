"""Crash-safe files: atomic writes, and the random-number-generator state a resumed run needs."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import sys
import zipfile
from typing import Any, Dict, Optional

import numpy as np
import torch

# The writers live in dsrb._files (no torch); imported here, where the tools and tests have always taken them.
from ._files import TMP_PREFIX, append_line, as_path, atomic_write, remove_stale_temporaries

__all__ = ["TMP_PREFIX", "append_line", "atomic_write", "remove_stale_temporaries", "save_checkpoint", "save_json",
           "load_checkpoint", "numpy_globals", "rng_state", "set_rng_state", "FileLock"]


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """torch.save ``state`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def save_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON (indented, keys sorted, a final newline) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def numpy_globals() -> list:
    """What pickled NumPy values name: the array and scalar reconstructors under the module names of NumPy 1 and 2,
    ndarray and the dtypes. They build values and run no other code, so allowing them keeps ``torch.load(...,
    weights_only=True)`` safe."""
    scalar, array = np.float64(0).__reduce__()[0], np.zeros(1).__reduce__()[0]
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [*((f, f"{module}.multiarray.{name}") for f, name in ((scalar, "scalar"), (array, "_reconstruct"))
              for module in ("numpy.core", "numpy._core")), np.ndarray, np.dtype, *dtypes]


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The dict saved by :func:`save_checkpoint`; a ValueError naming ``path`` if it cannot be read (truncated), if a
    record's CRC-32 shows it damaged (:func:`_damaged_record`), or if it holds anything a dsrb checkpoint does not.

    Loaded with ``weights_only=True``: a checkpoint is unpickled, and a file from elsewhere could otherwise run code
    as it loads. Besides tensors and plain Python values ours hold NumPy's RNG state and scalars, and (written before
    2026-12-06) torch's version as its ``TorchVersion`` string; those are allowed, nothing else.
    """
    path = as_path("path", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:  # torch.load's EOFError says nothing
        raise ValueError(f"checkpoint {path} is empty (0 bytes); expected a checkpoint written by python -m dsrb.train")
    damaged = _damaged_record(path)
    if damaged is not None:
        raise ValueError(f"checkpoint {path} is damaged: its record {damaged}, so the file changed after it was "
                         "saved (a disk or copy error); not loaded, since its values could be silently wrong; restore "
                         "it from a copy")
    try:
        with torch.serialization.safe_globals([*numpy_globals(), torch.torch_version.TorchVersion]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds (OSError, UnpicklingError, RuntimeError, EOFError, ...)
        # weights_only's refusal of a global (a truncated file is an UnpicklingError too): one not allowed, or one of
        # a module it blocks outright ("Trying to load unsupported GLOBAL posix.system whose module posix is blocked")
        refused = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)",
                            str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if refused is not None:
            raise ValueError(f"checkpoint {path} holds a {refused.group(1)}, which no checkpoint of python -m "
                             "dsrb.train holds; not loaded, since unpickling it could run code") from None
        reason = str(err)  # without torch's advice to load it with weights_only=False, the unsafe load refused here
        if "WeightsUnpickler error:" in reason:
            reason = reason.split("WeightsUnpickler error:", 1)[1]
        reason = reason.split("Check the documentation", 1)[0].replace("Weights only load failed.", "")
        advice = getattr(torch.serialization, "UNSAFE_MESSAGE", "")  # also where no "WeightsUnpickler error:" is
        if advice:
            reason = reason.replace(advice, "")
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {' '.join(reason.split())}); "
                         "the file is truncated or not a checkpoint written by python -m dsrb.train") from err
    return state


def _damaged_record(path: str) -> Optional[str]:
    """Why the zip archive ``path`` (torch.save's format) is damaged: its first record whose bytes do not match the
    CRC-32 stored with it, whose header zipfile cannot follow, or that is marked as a folder; None if none is.
    torch.load checks no CRC-32: a changed byte in a tensor's data, or in a header (a name length shifts where the
    data is read; an attribute makes the record a folder, read as nothing), loaded silently as other values. A record
    stored without a CRC-32 (0: ``torch.serialization.set_crc32_options(False)``) is not checked; a file that is no zip
    archive (truncated, the legacy format) is left to torch.load to report."""
    try:
        archive = zipfile.ZipFile(path)
    except Exception:  # BadZipFile, NotImplementedError, ... (what torch.load then says is the error to show)
        return None
    with archive:
        for info in archive.infolist():
            # torch.save writes no folders; a record marked as one (the DOS attribute bit 0x10) is read as empty
            if info.is_dir() or info.external_attr & 0x10:
                return f"{info.filename} is marked as a folder"
            if info.CRC == 0:
                continue
            try:
                with archive.open(info) as f:
                    while f.read(1 << 24):  # zipfile compares the CRC-32 when the record's end is read
                        pass
            except Exception as err:  # BadZipFile (a bad CRC-32, headers that disagree), or what they lead to
                if str(err).startswith("Bad CRC-32"):
                    return f"{info.filename} does not match the CRC-32 checksum written with it"
                return f"{info.filename} cannot be read ({type(err).__name__}: {' '.join(str(err).split())})"
    return None


def rng_state() -> Dict[str, Any]:
    """Every RNG the training loop touches: Python, NumPy, torch CPU and (if initialised) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the RNGs saved by :func:`rng_state`; CUDA's only for the GPUs visible both then and now."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU visible when saved: a resume that sees fewer (or more) restores those both have, where
        # set_rng_state_all would fail with an IndexError.
        for index, generator_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state, index)


class FileLock:
    """An exclusive advisory file lock (POSIX) held while inside ``with``; a no-op where fcntl is missing. The lock
    goes with the process: one killed, even by SIGKILL, leaves none behind. Held by another process, it is waited
    for, after printing ``waiting`` (if given) to stderr, so that a wait on a stopped holder is never silent."""

    def __init__(self, path: str, *, waiting: Optional[str] = None):
        self.path, self.waiting = path, waiting

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.waiting:
                print(self.waiting, file=sys.stderr, flush=True)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock
