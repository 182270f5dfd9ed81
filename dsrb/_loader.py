"""Iterating a DataLoader so that its worker processes end with the loop, whatever ends it."""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Optional

__all__ = ["batches"]


def batches(loader: Iterable, limit: Optional[int] = None) -> Iterator:
    """The batches of ``loader``, the first ``limit`` only when given (``for batch in batches(loader, limit)``); its
    worker processes are stopped as soon as the loop ends: at the end, at a ``break`` or an exception in the loop
    (when the generator is closed), and at an error raised in a worker.

    Stop a loop early with ``limit`` rather than ``break``: after a ``break`` the generator is closed when it is
    garbage, where Python prints and drops any exception, so a Ctrl-C that came while the workers were being stopped
    was lost and the run went on. With ``limit`` the generator ends by itself, inside the loop's ``next()``, from
    which that KeyboardInterrupt propagates.

    The last is the reason for it: a worker's error (an unreadable image) reaches the caller with a traceback whose
    frames hold the DataLoader's iterator in a reference cycle, so that without this its workers and queues live on
    in the caller's process (a notebook, a test session) until the garbage collector runs, and on Python 3.12 that
    late clean-up can close a queue's pipe twice ("Exception in thread QueueFeederThread ... Bad file descriptor").
    Meant for loaders without ``persistent_workers``, whose workers belong to one iteration (this package's own).
    """
    iterator = iter(loader)
    try:
        yield from iterator if limit is None else itertools.islice(iterator, limit)
    finally:
        # torch's own clean-up of a multi-process iterator (a private method, absent with num_workers=0): what the
        # iterator runs when it is exhausted or deleted; it does nothing the second time.
        stop = getattr(iterator, "_shutdown_workers", None)
        if stop is not None:
            stop()
