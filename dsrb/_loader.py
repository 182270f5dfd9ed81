"""Iterating a DataLoader so that its worker processes end with the loop, whatever ends it."""

from __future__ import annotations

import itertools
import os
import signal
from typing import Iterable, Iterator, Optional

from ._cli import check_termination, termination_deferred

__all__ = ["batches", "end_quietly_on_sigterm", "worker_stopped_with_us"]


def end_quietly_on_sigterm(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: a SIGTERM ends the worker with status 0, whoever sends it.

    torch's worker handler does so only for its parent's SIGTERM and dies of any other, and torchrun, schedulers and
    ``kill -- -PGID`` signal the whole process group: the main process, stopping on the same signal with its one
    line, then raised "DataLoader worker (pid N) is killed by signal: Terminated" over it, a traceback per rank. A
    worker that ends while its main process goes on is still reported by torch ("exited unexpectedly").
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def worker_died(err: BaseException) -> bool:
    """torch's report of a worker that ended by a signal or an exit status, from its SIGCHLD handler or its loop."""
    return isinstance(err, RuntimeError) and str(err).startswith("DataLoader worker (pid")


def worker_stopped_with_us(err: BaseException) -> bool:
    """Whether ``err`` is torch's report of a DataLoader worker's death raised while a KeyboardInterrupt (Ctrl-C,
    or SIGTERM through :func:`dsrb._cli.stop_on_termination`) unwinds this process: the signal that stops the
    process reached its workers too (a process group's), so the report is no news. It covers what
    :func:`end_quietly_on_sigterm` cannot: a worker signalled before torch has called its ``worker_init_fn``."""
    if not worker_died(err):
        return False
    seen = set()
    cause = err.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


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
    A SIGTERM (:func:`dsrb._cli.stop_on_termination`) that comes while the iterator starts its workers stops the
    loop once the iterator is made (or as it fails, where a worker died of it); one whose KeyboardInterrupt Python
    dropped stops it at the next batch.
    """
    with termination_deferred():
        try:
            iterator = iter(loader)
        except RuntimeError as err:
            # A worker that the same signal reached before torch had set its handler died of it, and torch's SIGCHLD
            # handler (run after ours: signals are handled in number order) reported that while the iterator started
            # the workers: no news, the run stops on the signal.
            if worker_died(err):
                check_termination()
            raise
    ending = None
    try:
        check_termination()  # a SIGTERM that came as the workers started
        for batch in iterator if limit is None else itertools.islice(iterator, limit):
            check_termination()  # a SIGTERM whose KeyboardInterrupt Python dropped (in a __del__)
            yield batch
    except BaseException as err:  # a KeyboardInterrupt in next(); GeneratorExit when the loop left early
        ending = err
        raise
    finally:
        # torch's own clean-up of a multi-process iterator (a private method, absent with num_workers=0): what the
        # iterator runs when it is exhausted or deleted; it does nothing the second time.
        stop = getattr(iterator, "_shutdown_workers", None)
        if stop is not None:
            try:
                stop()
            except RuntimeError as err:
                # A worker's death while the loop already ends (interrupted, or left) is no news, and raised here
                # it would replace the interrupt, or be printed as "Exception ignored" when the generator is closed.
                if ending is None or not worker_died(err):
                    raise
