"""The training clock: time spent training, evaluation excluded, as the authors measure it.

Two readings, both in seconds since the run started (continued across ``--resume``):

* ``train_seconds``: wall time less the time spent inside ``excluded()`` blocks (evaluation
  and checkpoint writes). ``--time-budget``, ``--lr-time-milestones``, ``--eval-every`` and
  the report's time to accuracy all use it; the authors' ``raw_time = total - test_time``.
* ``wall_seconds``: everything, evaluation included.

Synchronous runs take time-based decisions on rank 0's clock (``agreed``: one small
broadcast), so every rank decides alike at the same step; asynchronous runs read their own.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Tuple


class TrainingClock:
    def __init__(self):
        self.train_before = 0.0  # earlier segments of a resumed run
        self.wall_before = 0.0
        self.excluded_seconds = 0.0
        self._excluded_since = None  # inside an excluded() block: when it began
        self._start = time.perf_counter()

    def start(self) -> None:
        """Start (or restart, after ``load_state_dict``) this segment's count."""
        self._start = time.perf_counter()
        self.excluded_seconds = 0.0

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self._start

    def train_seconds(self) -> float:
        now = time.perf_counter()
        current = now - self._excluded_since if self._excluded_since is not None else 0.0
        return self.train_before + now - self._start - self.excluded_seconds - current

    @contextlib.contextmanager
    def excluded(self):
        """Time spent in this block does not count as training (blocks may nest)."""
        if self._excluded_since is not None:
            yield
            return
        self._excluded_since = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_seconds += time.perf_counter() - self._excluded_since
            self._excluded_since = None

    def agreed(self, hvd, asynchronous: bool) -> Tuple[float, float]:
        """(train_seconds, wall_seconds): rank 0's in synchronous runs, this rank's otherwise."""
        if asynchronous:
            return self.train_seconds(), self.wall_seconds()
        import torch

        value = torch.tensor([self.train_seconds(), self.wall_seconds()], dtype=torch.float64)
        value = hvd.broadcast(value, root_rank=0, name="train.clock")
        return float(value[0]), float(value[1])

    def state_dict(self) -> Dict[str, float]:
        return {"train_seconds": self.train_seconds(), "wall_seconds": self.wall_seconds()}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.train_before = float(state["train_seconds"])
        self.wall_before = float(state["wall_seconds"])
        self.start()
