"""Crash-safe files: atomic writes, and the random-number-generator state a resumed run needs."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import sys
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

TMP_PREFIX = ".tmp-"  # atomic_write's temporary files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write) -> None:
    """Write a file so that ``path`` holds either the old or the complete new content, never a torn one.

    ``write(f)`` fills a temporary file in the same directory (binary mode); it is flushed, fsynced and renamed over
    ``path``, and the directory entry is fsynced too. The file gets the permissions of any new file (0666 less the
    umask), not mkstemp's private 0600. A failed write (a full disk, say) is an OSError naming ``path`` and the free
    space; ``path`` is then unchanged and the temporary file removed.

    A symbolic link is followed (its target is replaced, the link stays). A path that exists but is not a regular file
    or a directory (``/dev/null``, a named pipe) is written to directly, and ``/dev/stdout``, ``/dev/stderr`` and
    ``/dev/fd/N`` through the process's own stream: renaming over them would replace the device or pipe with a file,
    or the file a shell redirected the stream to, behind the shell's back.
    """
    stream = _standard_stream(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:  # absent, a dangling link (or unreadable: the rename below reports it)
        mode = None
    if stream is not None or (mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
        try:
            if stream is not None:  # a duplicate shares the offset into a file the shell redirected the stream to
                for buffered in (sys.stdout, sys.stderr):
                    if buffered is not None and not buffered.closed:
                        buffered.flush()
                f = os.fdopen(os.dup(stream), "wb")
            else:
                f = open(path, "wb")
            with f:
                write(f)
        except (OSError, RuntimeError) as err:
            raise _write_error("write", path, err, "") from err
        return
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    try:  # a folder that became read-only names the file meant, not the temporary one
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=directory)
    except OSError as err:
        raise _write_error("write", path, err, f"; the previous {os.path.basename(path)}, if any, is unchanged") \
            from err
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        try:  # closing is inside: on a full disk, the close's flush of what write() left buffered fails again
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            raise _write_error("write", path, err, f"; the previous {os.path.basename(path)}, if any, is "
                                                   "unchanged") from err
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable; not possible on every platform
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def append_line(path: str, line: str) -> None:
    """Append ``line`` and a newline to the UTF-8 text file ``path`` (created if missing), flushed and fsynced; a
    failed write (a full disk) is an OSError naming ``path`` and the free space."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _write_error("append to", path, err) from err


def _standard_stream(path: str) -> Optional[int]:
    """The file descriptor ``path`` names (/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N), else None."""
    names = {"/dev/stdout": 1, "/dev/stderr": 2}
    path = os.path.abspath(path)
    if path in names:
        return names[path]
    for prefix in ("/dev/fd/", "/proc/self/fd/"):
        if path.startswith(prefix) and path[len(prefix):].isdigit():
            return int(path[len(prefix):])
    return None


def _write_error(verb: str, path: str, err: BaseException, more: str = "") -> OSError:
    """The OSError of a failed write: the file, the cause and the free space where it goes (a full disk, often)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = f"; {shutil.disk_usage(directory).free / 2**20:.1f} MiB free in {directory}"
    except OSError:  # the folder is missing or unreadable
        free = ""
    return OSError(f"could not {verb} {path} ({type(err).__name__}: {err}){free}{more}")


def remove_stale_temporaries(directory: str, names) -> None:
    """Delete the temporary files that killed :func:`atomic_write` calls for the files ``names`` left in ``directory``
    (each may be a whole checkpoint). Only for a directory no other process writes those files to (dsrb.train locks
    its run directory); anything else there, another program's ``.tmp-*`` file or a folder, is left alone."""
    for entry in os.scandir(directory):
        if (entry.name.startswith(TMP_PREFIX) and any(entry.name.endswith("-" + n) for n in names)
                and entry.is_file(follow_symlinks=False)):
            os.unlink(entry.path)


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """torch.save ``state`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def save_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The dict saved by :func:`save_checkpoint`; a ValueError naming ``path`` if it cannot be read (truncated)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Our checkpoints hold numpy RNG state and plain Python values besides tensors.
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises many kinds (OSError, UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {err}); the file is truncated "
                         "or not a checkpoint written by python -m dsrb.train") from err
    return state


def rng_state() -> Dict[str, Any]:
    """Every RNG the training loop touches: Python, NumPy, torch CPU and (if initialised) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
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
