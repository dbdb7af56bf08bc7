"""Progress bars for long work (unpacking and committing layers), drawn by tqdm on a terminal.

``make_progress(quiet)`` gives a ``Progress`` whose ``task(desc, total)`` returns a ``Task``
with ``advance(done_bytes, entries)`` (absolute figures, so a caller never counts twice) and
``close()``. It draws only when stderr is a terminal and ``quiet`` is false; otherwise
every call is a no-op. Several tasks may be open at once (a registry pull's parallel
downloads): each gets its own line.
"""
from __future__ import annotations

import sys
from typing import Optional


class Task:
    """A no-op task."""

    def advance(self, done: int, entries: Optional[int] = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Progress:
    """No output at all."""

    enabled = False

    def task(self, desc: str, total: Optional[int] = None, unit: str = "B") -> Task:
        return Task()


class _TqdmTask(Task):
    def __init__(self, bar):
        self.bar = bar
        self.done = 0
        self.entries = 0

    def advance(self, done: int, entries: Optional[int] = None) -> None:
        if done > self.done:
            if entries is not None and entries - self.entries >= 256:
                self.entries = entries
                self.bar.set_postfix_str(f"{entries} entries", refresh=False)
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TqdmProgress(Progress):
    enabled = True

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def task(self, desc: str, total: Optional[int] = None, unit: str = "B") -> Task:
        import os
        from tqdm import tqdm
        try:
            size = os.get_terminal_size(self.stream.fileno())
        except (OSError, ValueError, AttributeError):
            size = os.terminal_size((0, 0))
        # a terminal that reports no size (some ptys) would get no bars at all: assume 80x24
        sizing = {"dynamic_ncols": True} if size.columns > 0 else {"ncols": 80}
        if size.lines <= 0:
            sizing["nrows"] = 24
        bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                   file=self.stream, leave=True, mininterval=0.2, **sizing)
        return _TqdmTask(bar)


def make_progress(quiet: bool = False, stream=None) -> Progress:
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if quiet or not tty:
        return Progress()
    return TqdmProgress(stream)
