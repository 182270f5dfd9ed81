"""Crash-safe writes with the standard library only (the benchmark report imports them without torch): a file
replaced whole or not at all, a line appended durably, and the temporaries a killed write leaves."""

from __future__ import annotations

import os
import random
import shutil
import stat
import sys
import tempfile
import traceback
from typing import Optional

TMP_PREFIX = ".tmp-"  # atomic_write's temporary files
_RANDOM_CHARS = 8  # the length of the random part of the temporary names, as tempfile.mkstemp's
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def as_path(name: str, value) -> str:
    """``value`` (a str, bytes or os.PathLike) as a str path; anything else is a TypeError naming the argument:
    os.fspath's own error names none, and a path test on a NumPy array reported it "not found" as printed."""
    try:
        path = os.fspath(value)
    except TypeError:
        raise TypeError(f"argument '{name}': expected a path (str or os.PathLike), got "
                        f"{type(value).__name__}") from None
    return os.fsdecode(path) if isinstance(path, bytes) else path


def expand_home(path: str) -> str:
    """``path`` with a leading ``~`` made the home folder, as :func:`os.path.expanduser` does; where "~" has no
    meaning (no HOME, and no home folder for this user id: a container run as an arbitrary user) it stands for
    ``<temporary folder>/dsrb-home-<uid>``, neither a folder named "~" in the working directory (expanduser leaves
    it) nor pathlib's RuntimeError "Could not determine home directory"."""
    path = os.path.expanduser(path)
    if path == "~" or path.startswith(("~/", "~" + os.sep)):
        home = os.path.join(tempfile.gettempdir(), f"dsrb-home-{getattr(os, 'getuid', lambda: 'user')()}")
        path = os.path.join(_private(home), path[2:])
    return path


def _private(home: str) -> str:
    """``home`` (the stand-in home folder in the shared temporary folder), made 0700 if new. One that another user made
    first, a link or writable by others, is refused: its caches would be theirs, the extension's build included,
    which this process would load."""
    try:
        os.makedirs(home, mode=0o700, exist_ok=True)
        st = os.lstat(home)
    except OSError:  # a read-only temporary folder: what writes there says so, as before
        return home
    uid = getattr(os, "getuid", None)
    if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid()) or st.st_mode & 0o022:
        raise PermissionError(f"{home}, the stand-in for a home folder (there is none: no HOME, and no home folder "
                              "for this user id), is not a private folder of this user (a link, another user's, or "
                              "writable by others); set HOME to a folder of yours")
    return home


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write) -> None:
    """Write a file so that ``path`` holds either the old or the complete new content, never a torn one.

    ``write(f)`` fills a temporary file in the same directory (binary mode); it is flushed, fsynced and renamed over
    ``path``, and the directory entry is fsynced too. A new file gets the permissions of any new file (0666 less the
    umask), not mkstemp's private 0600; a file replaced keeps its own. A failed write (a full disk, say) is an
    OSError naming ``path`` and the free space; ``path`` is then unchanged and the temporary file removed.

    A symbolic link is followed (its target is replaced, the link stays). A path that exists but is not a regular file
    or a directory (``/dev/null``, a named pipe) is written to directly, and ``/dev/stdout``, ``/dev/stderr`` and
    ``/dev/fd/N`` through the process's own stream: renaming over them would replace the device or pipe with a file,
    or the file a shell redirected the stream to, behind the shell's back.
    """
    stream = standard_stream(path)
    if special_file(path):
        try:
            if stream is not None:  # a duplicate shares the offset into a file the shell redirected the stream to
                for buffered in (sys.stdout, sys.stderr):
                    if buffered is not None and not buffered.closed:
                        buffered.flush()
                f = os.fdopen(os.dup(stream), "wb")
            else:
                f = open(path, "wb")
            with f:
                _write(write, f)
        except (OSError, RuntimeError) as err:
            _reraise_interrupt(err)
            raise _write_error("write", path, err, "") from err
        return
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    try:  # the file replaced keeps its permissions (a private 0600 one stays private); a new one, the umask's
        mode = stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    made = []  # the temporary file's name, known before it exists: a signal as it is made still finds it
    try:
        try:  # a folder that became read-only names the file meant, not the temporary one
            os.makedirs(directory, exist_ok=True)
            fd = _make_temporary(directory, _temporary_suffix(directory, os.path.basename(path)), made)
        except OSError as err:
            raise _write_error("write", path, err, f"; the previous {os.path.basename(path)}, if any, is "
                                                   "unchanged") from err
        tmp = made[0]
        os.fchmod(fd, mode)
        try:  # closing is inside: on a full disk, the close's flush of what write() left buffered fails again
            with os.fdopen(fd, "wb") as f:
                _write(write, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            _reraise_interrupt(err)
            raise _write_error("write", path, err, f"; the previous {os.path.basename(path)}, if any, is "
                                                   "unchanged") from err
        os.replace(tmp, path)
    except BaseException:
        _remove(made)
        raise
    try:  # make the rename durable; not possible on every platform
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _make_temporary(directory: str, suffix: str, made: list) -> int:
    """Create ``<directory>/<TMP_PREFIX><random><suffix>`` exclusively, mode 0600 (as tempfile.mkstemp does), and
    return its descriptor; its name is put in ``made`` before it is created. mkstemp gives the name only once the
    file exists, so a Ctrl-C or SIGTERM landing in between left the file behind."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    draw = random.SystemRandom()
    for _ in range(100):
        made[:] = [os.path.join(directory, TMP_PREFIX + "".join(draw.choices(_NAME_CHARS, k=_RANDOM_CHARS)) + suffix)]
        try:
            return os.open(made[0], flags | getattr(os, "O_BINARY", 0), 0o600)
        except OSError as err:  # not made: another file of that name, or a folder refusing new files
            made.clear()
            if not isinstance(err, FileExistsError):
                raise
    raise FileExistsError(f"no unused temporary file name in {directory}")


def _remove(made: list) -> None:
    for name in made:
        try:
            os.unlink(name)
        except OSError:  # not made yet or already renamed; any other failure must not hide the error being raised
            pass


def probe_folder(directory: str) -> None:
    """Make a file in ``directory`` and remove it at once: an OSError where none can be made (root passes
    ``os.access`` on /proc or a read-only mount). Nothing is left, even if a signal lands in between."""
    made = []
    try:
        os.close(_make_temporary(directory, "", made))
    finally:
        _remove(made)


def _write(write, f) -> None:
    """``write(f)``; if it raises, the locals of the frames it went through are dropped while ``f`` is still open.
    torch.save's zip writer, interrupted after it was made but before its ``with`` block began (a Ctrl-C or SIGTERM
    as the write starts), is never finished, and finishes the archive when destroyed: kept alive by the traceback
    until the interpreter exited, it wrote to the closed file there and aborted the process (SIGABRT, "terminate
    called ... write to closed file"). Destroyed now, it writes to the temporary file, which is then removed."""
    try:
        write(f)
    except BaseException as err:
        chained, seen = [err], set()
        while chained:
            e = chained.pop()
            if e is not None and id(e) not in seen:
                seen.add(id(e))
                traceback.clear_frames(e.__traceback__)  # frames still running (ours) are left as they are
                chained += [e.__cause__, e.__context__]
        raise


def special_file(path: str) -> bool:
    """Whether :func:`atomic_write` writes ``path`` in place rather than replacing it by a rename: a standard stream,
    or an existing file that is neither a regular file nor a folder (a device, a pipe). An absent path, a dangling
    link or an unreadable one is not (the rename reports the last)."""
    if standard_stream(path) is not None:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def name_max(directory: str) -> int:
    """The longest file name (in bytes) the file system of ``directory`` takes; 255 where it cannot be asked."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no such limit reported
        return 255


def _temporary_suffix(directory: str, name: str) -> str:
    """``"-" + name``, the end of the temporary name of ``name``'s :func:`atomic_write`, cut from the front so that
    the whole temporary name (``TMP_PREFIX``, mkstemp's random characters and this) fits the file system's limit: a
    ``name`` of 245 characters is a valid file but its temporary name was "File name too long"."""
    suffix = "-" + name
    room = name_max(directory) - len(os.fsencode(TMP_PREFIX)) - _RANDOM_CHARS
    while len(os.fsencode(suffix)) > room and len(suffix) > 1:  # by characters: a UTF-8 one is never split
        suffix = "-" + suffix[2:]
    return suffix


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


def _reraise_interrupt(err: BaseException) -> None:
    """torch.save turns a Ctrl-C that lands in one of its writes into a RuntimeError ("unexpected pos"), the
    KeyboardInterrupt only its context: raise that, so that the tools stop as interrupted, not on a failed write."""
    seen = err
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            raise KeyboardInterrupt from err
        seen = seen.__cause__ or seen.__context__


def standard_stream(path: str) -> Optional[int]:
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
    suffixes = tuple(_temporary_suffix(directory, n) for n in names)  # what atomic_write gave them
    for entry in os.scandir(directory):
        if (entry.name.startswith(TMP_PREFIX) and entry.name.endswith(suffixes)
                and entry.is_file(follow_symlinks=False)):
            os.unlink(entry.path)


def lock_directory(path: str) -> Optional[int]:
    """An exclusive, non-blocking lock on the folder ``path`` (a flock on the folder itself: no file in it), released
    when the returned descriptor is closed or the process ends, a kill included. BlockingIOError when another
    process holds it; None where locks are missing (no fcntl; a file system without flock: unguarded). The
    descriptor is not inherited by subprocesses (PEP 446)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # some network file systems
        os.close(fd)
        return None
    return fd
