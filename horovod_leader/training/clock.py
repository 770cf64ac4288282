"""The training clock: time spent training, evaluation excluded, as the authors measure it.

Two readings, both in seconds since the run started (continued across ``--resume``):

* ``train_seconds``: wall time less the time spent inside ``excluded()`` blocks (evaluation
  and checkpoint writes). ``--time-budget``, ``--lr-time-milestones``, ``--eval-every`` and
  the report's time to accuracy all use it; the authors' ``raw_time = total - test_time``.
* ``wall_seconds``: everything, evaluation included.

Synchronous runs take every time-based decision on rank 0's clock, known to every rank one
step late without a blocking round trip (``AgreedClock``), so every rank decides alike at the
same step, whatever the period, the method or the launcher; asynchronous runs read their own.
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

    def state_dict(self) -> Dict[str, float]:
        return {"train_seconds": self.train_seconds(), "wall_seconds": self.wall_seconds()}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.train_before = float(state["train_seconds"])
        self.wall_before = float(state["wall_seconds"])
        self.start()


class AgreedClock:
    """Rank 0's training clock on every rank, one step late, with no blocking round trip.

    After each step, rank 0 posts a non-blocking broadcast of its reading (training and wall
    seconds) and of how long it expects the next step to take; every other rank posts the
    matching receive. After the next step each rank takes that value, waiting only when some
    rank is more than a step behind, and posts the next one. The value then estimates rank 0's
    clock at the end of the step just taken: its reading one step earlier plus that step's
    expected length. Steps are not alike: a step that holds a round (every ``cycle`` steps, a
    global refresh across a slow link, say) takes longer than the others, so the expected
    length of a step is that of the last step at the same place in the cycle (the last step
    at all, before a whole cycle has passed). Every time-based decision (the budget,
    evaluations, learning-rate milestones) is taken on that estimate: on every rank at the
    same step, whatever the period (1 or 100,000), the method or the launcher, and at the
    first step whose estimated end is past the time. The cost is one 24-byte broadcast per
    step, posted while the next step computes.

    Asynchronous runs have no common step: every rank reads its own clock.

    Args:
        clock: this rank's ``TrainingClock``.
        hvd: ``horovod.torch``, initialised.
        asynchronous: read this rank's own clock only.
        cycle: the steps after which the pattern of rounds repeats (the longest period of the
            method: LSGD's global period, another method's period; 1: every step alike).
    """

    NAME = "train.clock"

    def __init__(self, clock: TrainingClock, hvd, asynchronous: bool, cycle: int = 1):
        self.clock, self.hvd, self.asynchronous = clock, hvd, asynchronous
        self.cycle = max(int(cycle), 1)
        self._pending = None
        self._sent = None  # the tensor the pending broadcast fills
        self._last_train = None  # rank 0: its reading at the previous step
        self._steps = 0  # steps this clock has seen end
        self._lengths: Dict[int, float] = {}  # rank 0: the last step's length at each place in the cycle
        self._last_length = 0.0

    def _reading(self):
        """[training seconds, wall seconds, the expected length of the next step] (rank 0's matter)."""
        import torch

        train = self.clock.train_seconds()
        if self._last_train is not None:
            self._last_length = max(train - self._last_train, 0.0)
            self._lengths[self._steps % self.cycle] = self._last_length
        self._last_train = train
        expected = self._lengths.get((self._steps + 1) % self.cycle, self._last_length)
        return torch.tensor([train, self.clock.wall_seconds(), expected], dtype=torch.float64)

    def _post(self) -> None:
        self._sent = self._reading()  # only rank 0's matters; the others' are overwritten
        self._pending = self.hvd.broadcast_async_(self._sent, root_rank=0, name=self.NAME)

    def start(self) -> Tuple[float, float]:
        """(train_seconds, wall_seconds) when the loop starts: rank 0's, waited for (synchronous)."""
        if self.asynchronous:
            return self.clock.train_seconds(), self.clock.wall_seconds()
        self._post()
        value = self.hvd.synchronize(self._pending)
        self._post()  # what the first step's decisions will read
        return float(value[0]), float(value[1])

    def after_step(self) -> Tuple[float, float]:
        """The estimated (train_seconds, wall_seconds) of rank 0 at the end of the step just
        taken, the same on every rank (synchronous); this rank's own clock (asynchronous)."""
        if self.asynchronous:
            return self.clock.train_seconds(), self.clock.wall_seconds()
        value = self.hvd.synchronize(self._pending)
        self._steps += 1
        self._post()
        return float(value[0] + value[2]), float(value[1] + value[2])

    def finish(self) -> None:
        """Complete the broadcast in flight (before leaving the loop's collectives)."""
        if self._pending is not None:
            self.hvd.synchronize(self._pending)
            self._pending = None
