"""What every command-line tool does first, before its heavy imports (standard library only)."""

import os
import sys


def quiet_interrupt(prog: str) -> None:
    """Ctrl-C that no handler of the tool catches (while torch is imported or the extension is built on first use,
    before ``main`` runs) prints one "<prog>: interrupted" line instead of a traceback; the exit status stays the
    interrupted one (130). Output piped to a reader that stopped early (``| head``) ends the tool silently, exit
    status 1. Other uncaught exceptions are printed as before."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr)
        elif issubclass(kind, BrokenPipeError):
            discard(sys.stdout)
        else:
            default(kind, value, tb)

    sys.excepthook = hook


def discard(stream) -> None:
    """Send what is still written to ``stream`` (whose reader went away) nowhere: else the flush at exit fails too,
    with an "Exception ignored" message."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def error_line(prog: str, err: BaseException) -> str:
    """"<prog>: error: <message>" for a user error. One raised in a DataLoader worker reaches the main process with
    the worker's traceback in its message ("Caught X in DataLoader worker process 0. Original Traceback ..."): only
    the original message, its last line, is kept."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return f"{prog}: error: {text}"
