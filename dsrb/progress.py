"""A dependency-free progress line: position, loss, throughput and ETA.

On a terminal it redraws one line; otherwise (logs, CI) it prints a line every ``every`` steps and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from ._cli import discard


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream=None, every: Optional[int] = None):
        self.stream = stream or sys.stderr  # None when the process was started with stderr closed (2>&-)
        self.total, self.desc, self.enabled = total, desc, enabled and self.stream is not None
        try:
            self.tty = self.enabled and self.stream.isatty()
        except (OSError, ValueError, AttributeError):  # a closed stream, or one without isatty
            self.tty = False
        self.every = every or max(1, total // 10)
        self.start = time.perf_counter()
        self.items = 0
        self.step = 0

    def update(self, items: int, **values: float) -> None:
        self.step += 1
        self.items += items
        if not self.enabled or not (self.tty or self.step % self.every == 0 or self.step == self.total):
            return
        elapsed = time.perf_counter() - self.start
        rate = self.items / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.step) * elapsed / self.step
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = f"{self.desc} {self.step}/{self.total} {shown} {rate:.1f} img/s {_clock(elapsed)}<{_clock(eta)}"
        self._write(("\r" + line.ljust(100)) if self.tty else line + "\n")

    def close(self) -> float:
        """End the line; returns the elapsed seconds."""
        if self.enabled and self.tty:
            self._write("\n")
        return time.perf_counter() - self.start

    def _write(self, text: str) -> None:
        # A stream that fails (a reader that went away, ``2>&1 | head``; a full disk, ``2>/dev/full``; a closed
        # stream) ends the bar, not the run.
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # OSError includes BrokenPipeError; ValueError: the stream was closed
            self.enabled = False
            try:
                discard(self.stream)  # what is left in its buffer, else the flush at exit fails too
            except (OSError, ValueError, AttributeError):  # a stream without a file descriptor
                pass
