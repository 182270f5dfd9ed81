"""What every command-line tool does first, before its heavy imports (standard library only)."""

import argparse
import contextlib
import math
import os
import sys
from typing import Iterable, Iterator, NoReturn, Optional, Tuple

from ._files import expand_home, name_max, probe_folder, special_file  # standard library only, as this module


def say(line: str) -> None:
    """``line`` and its newline on stderr in one write: the lines that the processes of one run print at the same
    moment (every rank's error, or "rank N stops" beside the failing rank's) never run into each other, as the two
    writes of ``print()`` and ``sys.exit(message)`` let them (seen under torchrun)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or gone: as sys.exit(message), say nothing; the status still tells
        pass


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 image", "0 images", "3 training images"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def path_arg(text: str) -> str:
    """argparse type of the tools' file and folder options: a leading ``~`` is the home folder, as in dsrb.train's
    paths (the shell expands it in a word of its own only: ``--out=~/p.json`` keeps it)."""
    return expand_home(text)


def out_arg(text: str) -> str:
    """argparse type of the tools' ``--out``: ``-`` is standard output (``/dev/stdout``), as in most command-line
    tools, not a file named ``-``; any other value as :func:`path_arg`."""
    return "/dev/stdout" if text == "-" else path_arg(text)


def fail(line: str, status: int = 1) -> NoReturn:
    """End the process with one line on stderr (:func:`say`) and ``status``."""
    say(line)
    sys.exit(status)


# The failure of a tool that runs in several processes (dsrb.train under torchrun) that start() leaves to the tool,
# which joins the other ranks to stop them with it: a bad value of an extension variable, the missing extension under
# DSRB_REQUIRE_EXT=1. Exiting alone, the rank left them waiting for it in init_process_group (its default timeout: 30
# minutes) where its node alone had that environment.
deferred_failure: Optional[Exception] = None


# The backends' names, "auto" first: dsrb.ops.BACKEND_CHOICES, kept here for the tools' check before torch loads.
BACKEND_CHOICES = ("auto", "torch", "cpu", "cuda", "triton")


def check_backend_env() -> str:
    """DSRB_BACKEND, blank or unset for "auto", else a backend's name; any other value a ValueError naming it. The ops
    read it at their call (dsrb.ops), and a tool checks it first, since its imports build the extension on first use
    (minutes) before any op runs."""
    value = os.environ.get("DSRB_BACKEND", "") or "auto"
    if value not in BACKEND_CHOICES:
        raise ValueError(f"environment variable DSRB_BACKEND: expected 'auto' or one of {BACKEND_CHOICES[1:]}, got "
                         f"{value!r}")
    return value


def start(prog: str, *, one_process: bool = True, require_ext: bool = True, backend_env: bool = True) -> None:
    """The first lines of every tool's ``__main__``: :func:`quiet_interrupt` and :func:`stop_on_termination` (a kill
    while torch is imported or the extension built is then one "interrupted" line, not a silent end); a Python
    without torch one error line saying how to install it; ``-h``/``--help`` answered without compiling the
    extension (the tools' imports build it on first use, a minute; help needs none of it); a ``one_process`` tool
    started as one of several processes (torchrun: WORLD_SIZE > 1) stops with one error line; the extension's on/off
    environment variables checked (one error line for a bad value, or for DSRB_BUILD_CUDA=1 without nvcc where a
    build is needed); and, with ``require_ext``, a missing extension under DSRB_REQUIRE_EXT=1 one error line with
    the reason, where the tool's imports would raise it as a traceback (dsrb.info passes False: it reports first,
    then fails); with ``backend_env``, a DSRB_BACKEND that names no backend one error line, before the imports build
    the extension (dsrb.info passes False, as for ``require_ext``). dsrb.train under torchrun gets these errors as
    :data:`deferred_failure` instead."""
    global deferred_failure
    quiet_interrupt(prog)
    stop_on_termination()
    import importlib.util

    # Without torch every tool's imports (dsrb.info's too, the tool run to diagnose an install) ended in
    # ModuleNotFoundError's traceback. find_spec looks without importing. The version: pyproject.toml's dependency.
    if importlib.util.find_spec("torch") is None:
        fail(f"{prog}: error: torch is not installed in this Python ({sys.executable}); install PyTorch >= 2.6 "
             "first, the build that fits your machine (CPU or CUDA: https://pytorch.org/get-started/locally gives "
             "the command)")
    from ._build import ENV_FLAGS, check_env_flags, env_flag  # standard library only

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a typo in one set by hand was int()'s traceback
        value = os.environ.get(name, "").strip()
        if value and not (value.isascii() and value.isdigit()):
            fail(f"{prog}: error: environment variable {name}={os.environ[name]!r}: expected a whole number "
                 "(torchrun sets it; unset it to run one process)")
    world = os.environ.get("WORLD_SIZE", "1").strip()
    several = not one_process and world not in ("", "0", "1")
    try:  # a bad value is one error line here, not a traceback from the imports that read it (--help's too)
        check_env_flags()
        if backend_env:  # dsrb.info passes False: it reports first, then refuses it
            check_backend_env()
    except ValueError as err:
        if not several:
            fail(f"{prog}: error: {err}")
        deferred_failure = err
        # the tool's imports (and its backend check) read them: they pass,
        for name in (*ENV_FLAGS, "MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "DSRB_BACKEND"):
            os.environ.pop(name, None)
        os.environ["DSRB_DISABLE_EXT"] = "1"  # without the extension (the tool stops before using it)
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):  # argparse then prints help or an error, never runs
        os.environ["DSRB_BUILD_ON_FIRST_USE"] = "0"
        os.environ.pop("DSRB_REQUIRE_EXT", None)
        return
    if one_process and world not in ("", "0", "1"):  # each process would do all the work and write the same files
        fail(f"{prog}: error: it runs in one process, but WORLD_SIZE={world} (torchrun) started it as one of "
             "several; run it without torchrun (only python -m dsrb.train uses several processes), with "
             "WORLD_SIZE=1 where the environment sets it for every process")
    required = require_ext and env_flag("DSRB_REQUIRE_EXT")
    if required or env_flag("DSRB_BUILD_CUDA"):  # what the tool's imports would raise as a traceback, one line here
        from . import _ext  # imports torch, which the tool's imports do next anyway

        try:
            _ext.load()
        except ValueError as err:  # DSRB_BUILD_CUDA=1 without nvcc, where a build is needed
            if not several:
                fail(f"{prog}: error: {err}")
            deferred_failure = err
            os.environ["DSRB_DISABLE_EXT"] = "1"  # as for a bad value: the imports pass, the tool stops
            os.environ.pop("DSRB_REQUIRE_EXT", None)
        except ImportError as err:  # missing under DSRB_REQUIRE_EXT=1 (dsrb.info reports it after its report)
            if required:
                if not several:
                    fail(f"{prog}: error: {err}")
                deferred_failure = err
                os.environ["DSRB_REQUIRE_EXT"] = "0"  # the tool's imports pass (on the fallback), the tool stops


def env_int(name: str, default: int) -> int:
    """torchrun's WORLD_SIZE, RANK or LOCAL_RANK (checked by :func:`start`); blank is unset."""
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a flag of the wrong type, an unknown one) are one line, as the tools'
    other errors are: the usage it prints first is dozens of lines for dsrb.train. Exit status 2, as argparse's.
    Flags are not abbreviated: argparse would take a typo such as --epoch or --weight for --epochs or
    --weight-decay, setting another setting."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")

    def parse_intermixed_args(self, args=None, namespace=None):
        """argparse's, with "--" ending the options: everything after it is a positional, "-x.jpg" included.
        argparse's own (Python 3.11) rejected such names as unrecognized arguments and made the positionals
        before "--" a missing argument. For parsers with one positional argument (a list of names)."""
        args = list(sys.argv[1:] if args is None else args)
        if "--" not in args:
            return super().parse_intermixed_args(args, namespace)
        end = args.index("--")
        rest = args[end + 1:]
        if not rest:
            return super().parse_intermixed_args(args[:end], namespace)
        if end:  # an option left without its value ("--out -- a.jpg") would take the placeholder below as it
            option = next((a for a in self._actions if args[end - 1] in a.option_strings and a.nargs != 0), None)
            if option is not None:
                self.error(f"argument {'/'.join(option.option_strings)}: expected one argument")
        # A placeholder positional stands for the names after "--", so that a required list is not missing
        # (a name without a leading "-" cannot be taken for an option).
        placeholder = "\0"
        parsed = super().parse_intermixed_args(args[:end] + [placeholder], namespace)
        (action,) = [a for a in self._actions if not a.option_strings]
        names = getattr(parsed, action.dest)
        setattr(parsed, action.dest, names[:-1] + rest)
        return parsed


def quiet_interrupt(prog: str) -> None:
    """Ctrl-C that no handler of the tool catches (while torch is imported or the extension is built on first use,
    before ``main`` runs) prints one "<prog>: interrupted" line instead of a traceback; the exit status stays the
    interrupted one (130). Output piped to a reader that stopped early (``| head``) ends the tool silently, exit
    status 1. A torch that is installed but fails to import (a missing CUDA library, a broken install) is one error
    line, exit status 1. Other uncaught exceptions are printed as before."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            say(f"{prog}: interrupted")
        elif issubclass(kind, BrokenPipeError):
            discard(sys.stdout)
        elif _raised_importing_torch(tb):
            first = (str(value).strip().splitlines() or [""])[0]
            say(f"{prog}: error: torch is installed but cannot be imported ({kind.__name__}: {first}); reinstall the "
                f"PyTorch build that fits this machine (CPU or CUDA: https://pytorch.org/get-started/locally gives "
                f"the command) in this Python ({sys.executable})")
        else:
            default(kind, value, tb)

    sys.excepthook = hook


def _raised_importing_torch(tb) -> bool:
    """Whether a traceback passes through the module code of torch/__init__.py: the error came as torch was imported."""
    suffix = os.path.join("torch", "__init__.py")
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "<module>" and code.co_filename.endswith(suffix):
            return True
        tb = tb.tb_next
    return False


_TERMINATED = False  # set by stop_on_termination's handler, for check_termination
_DEFERRING = 0  # how many termination_deferred blocks are open


def stop_on_termination() -> None:
    """A kill (SIGTERM: a scheduler's preemption, ``docker stop``) or a closed terminal (SIGHUP) stops the tool as
    Ctrl-C does, with its clean-up and its one line, instead of ending it mid-write without a word. A signal the
    process was started ignoring (``nohup`` ignores SIGHUP) stays ignored.

    A forked child inherits the handler: there (a DataLoader worker before torch has set its own) the signal ends
    the child with status 0, since a process group's signal stops its parent too; a KeyboardInterrupt raised there
    printed a traceback from multiprocessing's start-up and made torch report the worker's failure.

    The signal is also remembered for :func:`check_termination`: Python prints and drops an exception raised where
    it cannot propagate (an at-fork callback such as logging's, run as a DataLoader starts its workers; a
    ``__del__``), and a SIGTERM that landed there was lost: the run trained on to its end. Within
    :func:`termination_deferred` the signal is only remembered. Ctrl-C (SIGINT) is handled the same way where its
    handler is Python's own (not where the process ignores it, as a shell's background job does, or set another)."""
    import signal

    global _TERMINATED
    _TERMINATED = False  # a new run: a signal an earlier one in this process stopped on is handled
    parent = os.getpid()

    def interrupt(signum, frame):
        global _TERMINATED
        if os.getpid() != parent:
            os._exit(0)
        _TERMINATED = True
        if not _DEFERRING:
            raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)


def check_termination() -> None:
    """Raise KeyboardInterrupt if :func:`stop_on_termination`'s signal came: a no-op while none did, and the way a
    signal whose KeyboardInterrupt Python dropped still stops the tool. Called where a loop can stop cleanly (each
    batch of :func:`dsrb._loader.batches`)."""
    if _TERMINATED:
        raise KeyboardInterrupt


@contextlib.contextmanager
def termination_deferred() -> Iterator[None]:
    """Within the block :func:`stop_on_termination`'s signal is only remembered, for :func:`check_termination` after
    it. For a step that an exception would leave half done: a DataLoader's iterator, interrupted as it starts its
    workers, printed "Exception ignored ... _workers_status" when deleted, and the at-fork callbacks run there drop
    an exception (logging's: the lost SIGTERM above)."""
    global _DEFERRING
    _DEFERRING += 1
    try:
        yield
    finally:
        _DEFERRING -= 1


def discard(stream) -> None:
    """Send what is still written to ``stream`` (whose reader went away) nowhere: else the flush at exit fails too,
    with an "Exception ignored" message."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, stream.fileno())
    finally:
        os.close(null)  # the stream's descriptor now points at the null device too


def error_line(prog: str, err: BaseException) -> str:
    """"<prog>: error: <message>" for a user error. One raised in a DataLoader worker reaches the main process with
    the worker's traceback in its message ("Caught X in DataLoader worker process 0. Original Traceback ..."): only
    the original message, its last line, is kept."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return f"{prog}: error: {text}"


def exit_on_error(prog: str, err: BaseException) -> NoReturn:
    """End a tool on a user error with its :func:`error_line`, exit status 1. A BrokenPipeError is no user error
    but the reader of stdout going away (``| head``): the tool ends silently, exit status 1, as :func:`quiet_interrupt`
    says."""
    if isinstance(err, BrokenPipeError):
        discard(sys.stdout)
        sys.exit(1)
    sys.exit(error_line(prog, err))  # one process: nothing else writes to stderr at the same moment


def out_of_memory_line(prog: str, err: BaseException, reduce: str) -> str:
    """One error line for running out of memory: what to reduce, and the first line of the error (the original one,
    for an error raised in a DataLoader worker, which torch wraps in "Caught ... in DataLoader worker process")."""
    text = str(err).strip()
    if "\nOriginal Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    detail = text.splitlines()[0] if text else type(err).__name__
    return f"{prog}: error: out of memory ({detail}); reduce {reduce}"


def check_output_file(path: str, *, name: str = "argument --out", what: str = "the file to write",
                      inputs: Iterable[Tuple[str, str]] = ()) -> None:
    """Raise a ValueError starting with ``name`` unless a file can be written at ``path``: it is not a directory, nor
    one of the ``inputs`` ((what it is, path) pairs: the checkpoint, the images, which the write would replace), and
    its folder is a writable folder or can be made in one. For a check before long work whose result would be lost
    (the write itself, atomic, comes at the end). An empty ``path`` is refused (it names the current folder), and so
    is a broken symbolic link (the write would follow it, making its target's folders). A device, a pipe or a
    standard stream (``/dev/null``, ``/dev/stdout``), written to directly, needs no folder. Leaves nothing behind
    (:func:`_check_folder` makes and removes a probe)."""
    if not path:  # "" (--out "") would be the current folder, found only by the write at the end
        raise ValueError(f"{name}: expected the path of {what}, got an empty string")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"{name}: {path} is a directory; expected the path of {what}")
    if os.path.islink(path) and not os.path.exists(path):  # the write would make its target's folders, anywhere
        raise ValueError(f"{name}: {path} is a broken symbolic link (to {os.readlink(path)}); expected the path of "
                         f"{what}")
    if os.path.exists(path):
        for label, source in inputs:
            if os.path.exists(source) and os.path.samefile(path, source):
                raise ValueError(f"{name}: {path} is {label}, which writing there would replace; expected the path "
                                 f"of {what}, another file")
    if special_file(path):
        return
    _check_folder(os.path.dirname(os.path.abspath(path)), name, "its folder")
    _check_name_lengths(path, name)


def check_output_dir(path: str, *, name: str, what: str = "the folder to write to") -> None:
    """:func:`check_output_file` for a folder: ``path`` is a writable folder or can be made in one (a read-only disk,
    a file or a broken symbolic link in the way; an empty ``path``). Creates nothing."""
    if not path:  # os.makedirs("") fails, after the work
        raise ValueError(f"{name}: expected {what}, got an empty string")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name}: {path} is a file; expected {what}")
    _check_folder(os.path.abspath(path), name, what)
    _check_name_lengths(path, name)


def _check_name_lengths(path: str, name: str) -> None:
    """Raise a ValueError starting with ``name`` if a name in ``path`` still to make (the file, folders to make) is
    longer than its file system takes: os.makedirs, or the rename that ends an atomic write, failed with "File name
    too long" only after the work."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # False for a name too long too
        existing = os.path.dirname(existing)
    limit = name_max(existing)
    for part in os.path.relpath(os.path.abspath(path), existing).split(os.sep):
        size = len(os.fsencode(part))
        if size > limit:
            raise ValueError(f"{name}: {path} has a name of {size} bytes, {part[:12]}...; the file system takes at "
                             f"most {limit}; expected a shorter name")


def _int_at_least(minimum: int, what: str, maximum: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            most = "" if maximum is None else f" (at most {maximum})"
            raise argparse.ArgumentTypeError(f"expected a {what} integer{most}, got {text!r}")
        return value

    return parse


def _in_unit_interval(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:  # NaN too
            raise argparse.ArgumentTypeError(f"expected {what} in [0, 1], got {text!r}")
        return value

    return parse


# argparse types shared by the command-line tools (here, not in dsrb.inference, which loads the extension: a tool's
# --help does not wait for a build).
positive_int = _int_at_least(1, "positive")
# DataLoader worker processes: a DataLoader starts every one it is given, whatever the data's size, and --workers
# 100000 started processes until the machine ran out (dsrb.train's setting has the same bound).
MAX_WORKERS = 1024
worker_count = _int_at_least(0, "non-negative", MAX_WORKERS)
probability = _in_unit_interval("a probability")
unit_number = _in_unit_interval("a number")


def _check_folder(folder: str, name: str, what: str) -> None:
    existing = folder
    while not os.path.exists(existing):  # the folders still to make go in the nearest one that exists
        if os.path.islink(existing):  # os.makedirs cannot make a folder where a broken link is ("File exists")
            raise ValueError(f"{name}: {existing} is a broken symbolic link (to {os.readlink(existing)}); expected "
                             f"{what if existing == folder else 'a folder there'}")
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{name}: {existing} is a file, not a folder")
    where = what if existing == folder else f"cannot make {what} {folder}:"
    if not os.access(existing, os.W_OK | os.X_OK):  # False on a read-only file system too
        raise ValueError(f"{name}: {where} {existing} is not writable")
    try:  # root passes os.access where nothing can be made (/proc, /sys)
        probe_folder(existing)
    except OSError as err:
        raise ValueError(f"{name}: {where} {existing} is not writable ({err.strerror or err})") from None
