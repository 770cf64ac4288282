"""Rank 0's progress display: tqdm's bar on a terminal, plain lines when output is piped.

tqdm's bar redraws one line with carriage returns, sized to the terminal. Under ``mpirun`` a
rank's standard output is a pseudo-terminal of width 0 that Open MPI forwards: the bar (sized
0, or redrawn without a newline) never reaches the reader, whether ``mpirun``'s own output is
a terminal or a pipe; under Slurm or ``| tee`` it is a plain pipe, where a bar is one
ever-growing line. So the bar is drawn only on a real terminal (one with a width); on any other
output this prints one ordinary line every ``interval`` seconds, formatted by tqdm
(``tqdm.format_meter``: steps, percentage, elapsed and remaining time, rate) with the same
figures the bar shows, and flushes it.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Dict, Optional, TextIO


def is_terminal(stream: TextIO) -> bool:
    """A terminal that a bar can be drawn on: a tty with a known, non-zero width."""
    import os

    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """``update(n)`` after steps, ``set_postfix(**figures)`` now and then, ``close()`` at the end."""

    def __init__(self, total: Optional[int], initial: int, desc: str, file: Optional[TextIO] = None,
                 interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        from tqdm import tqdm

        self.file = file if file is not None else sys.stdout
        self.total, self.n, self.desc = total, initial, desc
        self.interval, self.clock = interval, clock
        self.postfix: Dict[str, str] = {}
        self.bar = None
        if is_terminal(self.file):
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.file,
                            mininterval=1.0)
        self._start = clock()
        self._initial = initial
        self._last_line = self._start
        self._last_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.clock() - self._last_line >= self.interval:
            self.line()

    def set_postfix(self, **figures) -> None:
        self.postfix = {key: str(value) for key, value in figures.items()}
        if self.bar is not None:
            self.bar.set_postfix(**figures)

    def line(self) -> None:
        """One plain progress line (piped output)."""
        from tqdm import tqdm

        now = self.clock()
        self._last_line, self._last_n = now, self.n
        elapsed = now - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else None
        text = tqdm.format_meter(self.n, self.total, elapsed, ascii=True, prefix=self.desc, rate=rate,
                                 unit="step", postfix=", ".join(f"{k}={v}" for k, v in self.postfix.items()) or None,
                                 ncols=0, initial=self._initial)
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.n != self._last_n:
            self.line()
